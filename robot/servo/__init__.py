"""Robots made of serial servos: the Dynamixel 2.0 and Feetech codecs, control tables, the bus driver, joint
calibration, the USB adapter's latency timer, and `ServoRobot`, the servo backend behind the safety layer."""
