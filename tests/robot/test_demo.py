"""`make demo`'s ending: it says what task it trains, compares the learned policy with the random policy and
the scripted controller on that task, prints a verdict and writes it into summary.json and the curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dreamer_helpers import FLAG_SPACE, make_cfg

from core.agents.dreamer.policy import export_policy
from core.agents.spaces import ActSpace
from core.config import load_config
from learner.agents.dreamer.agent import DreamerModel
from learner.metrics import MetricsLogger
from robot.demo import DEFAULT_CONFIG, README_ARM_REACH, describe_task, report, verdict


def _result(ret: float, success: float | None = None) -> dict:
    return {"mean_return": ret, **({} if success is None else {"success_rate": success})}


@pytest.mark.parametrize("learned,word", [
    (_result(-0.5, 0.8), "learned"),
    (_result(-0.5, 0.2), "partly learned"),  # most of the return, too few successes
    (_result(-2.5, 0.0), "partly learned"),
    (_result(-3.9, 0.0), "not learned yet"),
])
def test_the_verdict_places_the_learned_return_between_random_and_scripted(learned: dict, word: str) -> None:
    text, share = verdict({"learned": learned, "random": _result(-4.0, 0.0), "scripted": _result(-0.2, 1.0)})
    assert text.startswith(f"{word}: success {learned['success_rate']:.0%} (random 0%, scripted 100%), return "
                           f"{learned['mean_return']:.2f} (random -4.00, scripted -0.20)")
    assert share == pytest.approx((learned["mean_return"] + 4.0) / 3.8)
    assert ("DEMO_SECONDS" in text) is (word != "learned")


def test_no_verdict_when_an_evaluation_failed() -> None:
    text, share = verdict({"learned": {"error": "boom"}, "random": _result(-4.0), "scripted": _result(-0.2)})
    assert text == "no verdict: the learned evaluation failed" and share is None


def test_the_demo_says_how_its_task_differs_from_the_readme() -> None:
    text = describe_task(load_config(DEFAULT_CONFIG), load_config(README_ARM_REACH))
    assert text.startswith("demo task: ArmReach as sim_arm_reach_proprio, smaller than the README's sim_arm_reach")
    assert "joint readings only, no camera" in text and "a fixed target at [0.45, 0.12, 0.2] m" in text
    assert "20-step episodes of 2 s (README: 50-step episodes of 5 s)" in text


def test_report_evaluates_and_writes_the_verdict(tmp_path: Path) -> None:
    """What the demo does once its learner and robot stopped, on a run directory as `serve` leaves it (an
    untrained policy of the demo task's layout, metrics rows): real `reverie-sim view` runs, a real plot."""
    learner = tmp_path / "learner"
    space = {"joint_pos": ((6,), "float32"), "joint_vel": ((6,), "float32"), "tool_pos": ((3,), "float32"),
             **FLAG_SPACE}
    learner.mkdir()
    (learner / "policy.safetensors").write_bytes(export_policy(DreamerModel(make_cfg(), space, ActSpace(3, False)), 1))
    with MetricsLogger(learner, tensorboard=False) as log:
        log.log(250, {"train/return": -3.6})
    (learner / "summary.json").write_text(json.dumps({"received_steps": 300, "updates": 12}))
    summary = report(DEFAULT_CONFIG, "demo task: ...", tmp_path, 2, {"steps": 300})
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    evaluation = summary["evaluation"]
    assert evaluation["episodes"] == 2
    for name in ("learned", "random", "scripted"):
        assert len(evaluation[name]["returns"]) == 2, evaluation[name]
        assert Path(evaluation[name]["video"]) == tmp_path / "videos" / f"{name}_policy.mp4"
        assert Path(evaluation[name]["video"]).stat().st_size > 0
    assert evaluation["scripted"]["success_rate"] == 1.0
    expected, share = verdict(evaluation)
    assert summary["verdict"] == expected and summary["learned_share"] == share
    assert summary["verdict"].startswith(("learned:", "partly learned:", "not learned yet:"))
    assert summary["learner_steps"] == 300 and summary["updates"] == 12
    assert (tmp_path / "learning_curve.png").stat().st_size > 0


def test_report_without_a_policy_says_so(tmp_path: Path) -> None:
    summary = report(DEFAULT_CONFIG, "demo task: ...", tmp_path, 2, None)
    assert summary["verdict"].startswith("no verdict: the learner wrote no policy")
    assert json.loads((tmp_path / "summary.json").read_text())["verdict"] == summary["verdict"]
