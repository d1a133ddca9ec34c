"""The learner's end of the robot link: the server. The protocol and CURVE security it speaks are
`core.link`, shared with the robot."""
