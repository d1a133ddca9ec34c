"""A real robot's sensors beyond its servos: the camera reader, the BNO055 IMU driver, ArUco marker poses,
markers tracked in the table frame, and `Sensors`, which reads them all once per control step."""
