"""Servo buses: protocol codecs, control tables, the bus driver and an emulated bus for tests."""
