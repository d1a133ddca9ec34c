"""The learner's serve loop rules and the robot's safe stop, without a network run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dreamer_helpers import make_cfg

from core.agents.dreamer.policy import Policy, policy_weights
from core.agents.spaces import ActSpace
from core.link.protocol import decode
from core.weights import weights_to_bytes
from learner.agents.dreamer.agent import DreamerModel
from learner.run import updates_allowed
from robot.demo import free_port
from robot.link.spool import Spool

ROOT = Path(__file__).resolve().parents[2]


def test_train_ratio_counts_replayed_steps_per_received_step():
    batch_steps = 16 * 64
    assert updates_allowed(99, prefill=100, ratio=512, batch_steps=batch_steps) == 0  # prefill not in yet
    assert updates_allowed(100, prefill=100, ratio=512, batch_steps=batch_steps) == 1
    # 512 replayed steps per received step: one update (1024 replayed steps) per 2 received steps.
    assert updates_allowed(100 + 2048, prefill=100, ratio=512, batch_steps=batch_steps) == 1 + 1024
    assert updates_allowed(100 + 2048, prefill=100, ratio=64, batch_steps=batch_steps) == 1 + 128
    assert updates_allowed(5000, prefill=100, ratio=-1, batch_steps=batch_steps) == float("inf")  # unthrottled


def test_half_precision_weights_on_the_wire_act_like_the_float32_ones():
    space = {"pos": ((5,), "float32"), "reward": ((), "float32"), "is_first": ((), "bool"),
             "is_last": ((), "bool"), "is_terminal": ((), "bool")}
    torch.manual_seed(0)
    model = DreamerModel(make_cfg(policy_out_scale=1.0), space, ActSpace(2, False))
    tensors, meta = policy_weights(model, 7)
    full = Policy.from_weights(weights_to_bytes(tensors, meta))
    half = Policy.from_weights(weights_to_bytes({k: v.half() for k, v in tensors.items()}, meta))
    assert half.version == 7 and next(half.actor.parameters()).dtype == torch.float32
    rng = np.random.default_rng(0)
    for t in range(10):
        obs = {"pos": rng.normal(size=5).astype(np.float32), "reward": 0.0, "is_first": t == 0,
               "is_last": False, "is_terminal": False}
        torch.manual_seed(t)  # the same latent samples for both (acting samples the posterior)
        a = full.act(obs, mode="mode")
        torch.manual_seed(t)
        b = half.act(obs, mode="mode")
        np.testing.assert_allclose(a, b, atol=0.02)


@pytest.mark.parametrize("process", [False, True], ids=["link-thread", "link-process"])
def test_robot_with_a_full_spool_stops_safely_and_says_why(tmp_path, process):
    """No learner at all and a tiny spool: the robot keeps every chunk it could store, then stops."""
    port = free_port()  # nobody listens there
    cmd = [sys.executable, "-m", "robot.cli", "run", "--config", str(ROOT / "hardware_configs" /
           "sim_arm_reach_proprio.yaml"), "--learner", f"tcp://127.0.0.1:{port}", "--spool", str(tmp_path / "spool"),
           "--duration", "120", "--ledger", str(tmp_path / "ledger.jsonl"), "--set", "control.hz=40",
           "--set", "link.spool_max_mb=0.02", "--set", f"link.process={str(process).lower()}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 3, proc.stderr[-2000:]
    summary = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert summary["stopped"].startswith("spool full"), summary
    assert "spool" in summary["stopped"] and str(tmp_path / "spool") in summary["stopped"]
    spooled = sorted((tmp_path / "spool").glob("*"))
    assert summary["spool_pending"] >= 1 and len([p for p in spooled if p.suffix != ".corrupt"]) >= 1
    assert summary["steps"] < 40 * 120  # it stopped long before the time limit
    # Nothing recorded is dropped: the chunks recorded while it stopped are written past the limit.
    recorded = [t for line in (tmp_path / "ledger.jsonl").read_text().splitlines() for t in json.loads(line)["time"]]
    spool = Spool(tmp_path / "spool", 1 << 30)
    kept = [t for seq in spool.pending() for t in decode(spool.load(seq)).arrays["time"].tolist()]
    assert len(recorded) >= summary["steps"] and kept == recorded
    assert summary["spool_pending"] == spool.count


def test_realtime_priority_applies_to_the_calling_thread_or_says_why(caplog):
    import os
    import threading

    from robot.runner import realtime

    assert realtime(None) is False
    result: dict = {}

    def worker() -> None:  # a thread of its own, so the test process keeps normal scheduling
        result["applied"] = realtime(10)
        if hasattr(os, "sched_getscheduler"):
            result["policy"] = os.sched_getscheduler(0)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    if result["applied"]:
        assert result["policy"] == os.SCHED_FIFO
    else:
        assert "realtime" in caplog.text and ("refused" in caplog.text or "no SCHED_FIFO" in caplog.text)
