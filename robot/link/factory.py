"""The one place a `link:` config block becomes a link: a child process (`link.process: true`, the default,
so the link's disk and socket work never holds the control loop's GIL) or a thread of the robot process."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.config.link import LinkConfig
from core.link.security import ClientKeys
from robot.link.contract import Link
from robot.link.process import LinkProcess
from robot.link.spool import Spool
from robot.link.thread import RobotLink


def make_link(cfg: LinkConfig, address: str, robot_id: str, spool_dir: Path, hello: dict[str, Any],
              log: logging.Logger | None = None) -> Link:
    """A link (not started) to the learner at `address`, spooling to `spool_dir`, with `cfg`'s timing, message
    limit, spool limit and CURVE keys; `hello` is the meta of its hello (step layout, task, rate)."""
    keys = ClientKeys(Path(cfg.client_secret), Path(cfg.server_public)) \
        if cfg.client_secret and cfg.server_public else None
    timing = {"keys": keys, "heartbeat_s": cfg.heartbeat_s, "lost_after_s": cfg.lost_after_s,
              "resend_after_s": cfg.resend_after_s, "max_bytes": int(cfg.max_message_mb * 2**20), "log": log}
    spool_max = int(cfg.spool_max_mb * 2**20)
    if cfg.process:
        return LinkProcess(address, robot_id, (spool_dir, spool_max), hello, **timing)
    return RobotLink(address, robot_id, Spool(spool_dir, spool_max), hello, **timing)
