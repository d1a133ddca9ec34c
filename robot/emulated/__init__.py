"""Devices emulated byte for byte on a pseudo-terminal, so the real drivers run unchanged in tests and
simulation: the servo bus and the BNO055 IMU (sim/emulation/ drives them with PyBullet)."""
