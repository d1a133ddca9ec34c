"""The bring-up subcommands of `reverie-robot` beside `run`: servo bus tools (scan, setup-motor, calibrate)
and device checks (latency, cameras, camera, imu)."""
