"""The hardware of a real robot, emulated on PyBullet: servo bus, IMU and camera (`reverie-sim emulate`).

The robot process talks to these over the same pseudo-terminals and HTTP stream as to real devices, so
its drivers, calibration and tasks run unchanged against simulated physics.
"""
