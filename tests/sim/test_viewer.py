"""`reverie-sim view` writes videos that a reader opens with the expected frame count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import pytest
import yaml
from dreamer_helpers import FLAG_SPACE, make_cfg
from PIL import Image

from core.agents.dreamer.policy import export_policy
from core.agents.spaces import ActSpace
from learner.agents.dreamer.agent import DreamerModel
from sim.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _frames(path: Path) -> list:
    reader = imageio.get_reader(path)
    try:
        return [frame for frame in reader]
    finally:
        reader.close()


def _gif_duration_ms(path: Path) -> float:
    with Image.open(path) as im:
        total = 0.0
        for i in range(im.n_frames):
            im.seek(i)
            total += im.info["duration"]
    return total


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_view_writes_readable_video(tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"reach{suffix}"
    code = main(["view", "--config", str(ROOT / "hardware_configs/sim_arm_reach.yaml"), "--policy", "scripted",
                 "--steps", "30", "--size", "128", "--out", str(out), "--set", "control.episode_steps=20"])
    assert code == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout.splitlines()[0])
    assert summary["frames"] == 30 and summary["episodes"] == 1
    assert str(out.resolve()) in stdout
    frames = _frames(out)
    if suffix == ".gif":
        # GIF writers merge identical consecutive frames into one longer frame; the playing time
        # is what must match: 30 frames at control.hz = 10 -> 3 s.
        assert _gif_duration_ms(out) == pytest.approx(3000, abs=10)
    else:
        assert len(frames) == 30
    # scene view (128) beside the policy's 64x64 image scaled x2
    assert frames[0].shape[:2] == (128, 256)
    resolved = yaml.safe_load((tmp_path / f"reach{suffix}.config.yaml").read_text())
    assert resolved["control"]["episode_steps"] == 20


def test_console_script_on_the_quadruped(tmp_path: Path) -> None:
    """The command from the README, through the installed console script, with no display."""
    out = tmp_path / "run.mp4"
    script = Path(sys.executable).with_name("reverie-sim")
    result = subprocess.run(
        [str(script), "view", "--config", "hardware_configs/sim_quadruped_walk.yaml", "--policy", "random",
         "--steps", "40", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert f"video written to {out}" in result.stdout
    assert len(_frames(out)) == 40


def test_bad_arguments_give_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(ROOT / "hardware_configs/sim_arm_reach.yaml")
    assert main(["view", "--config", cfg, "--out", str(tmp_path / "x.avi")]) == 2
    assert "expected a name ending in .mp4 or .gif" in capsys.readouterr().err
    assert main(["view", "--config", cfg, "--set", "control.hz=-1"]) == 2
    err = capsys.readouterr().err
    assert "control.hz: expected a value greater than or equal to 0.1" in err and "sim_arm_reach.yaml" in err
    assert main(["view", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 64)
    assert main(["view", "--config", cfg, "--policy", str(corrupt), "--out", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err
    assert f"policy file {corrupt}: " in err and "Traceback" not in err
    other = tmp_path / "other.safetensors"  # weights of a 1-D task: ArmReach takes 3-D actions
    model = DreamerModel(make_cfg(), {"joint_pos": ((6,), "float32"), **FLAG_SPACE}, ActSpace(1, False))
    other.write_bytes(export_policy(model, 1))
    assert main(["view", "--config", cfg, "--policy", str(other), "--out", str(tmp_path / "v.mp4")]) == 2
    assert f"{other}: the policy acts in 1 continuous dimensions, the robot in 3" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("")
    out = a_file / "v.mp4"  # inside a plain file: cannot be written
    assert main(["view", "--config", cfg, "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: cannot write it" in err and "Traceback" not in err


def test_specs_lists_every_observation(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["specs", "--config", str(ROOT / "hardware_configs/sim_arm_reach.yaml")]) == 0
    data = json.loads(capsys.readouterr().out)
    names = [row["name"] for row in data["observation"]]
    assert names[:1] == ["image"] and {"joint_pos", "joint_vel", "reward", "is_first"} <= set(names)
    assert data["action"]["shape"] == [3]


@pytest.mark.parametrize("flags,expected", [
    (["--size", "0"], "argument --size: expected a whole number of pixels in 8..2048, found '0'"),
    (["--size", "-4"], "argument --size: expected a whole number of pixels in 8..2048, found '-4'"),
    (["--steps", "0"], "argument --steps: expected a whole number >= 1, found '0'"),
    (["--steps", "-1"], "argument --steps: expected a whole number >= 1, found '-1'"),
    (["--episodes", "0"], "argument --episodes: expected a whole number >= 1, found '0'"),
    (["--seed", "-1"], "argument --seed: expected a whole number in 0..4294967295, found '-1'"),
])
def test_view_refuses_flags_it_cannot_honour(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                                             expected: str) -> None:
    # --size 0 was a ZeroDivisionError traceback from the renderer, after the config was written next to the video.
    out = tmp_path / "v.mp4"
    with pytest.raises(SystemExit) as info:
        main(["view", "--config", str(ROOT / "hardware_configs/sim_arm_reach_proprio.yaml"), "--out", str(out),
              "--steps", "2", *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == f"reverie-sim view: error: {expected}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["inf", "nan", "0"])
def test_emulate_refuses_a_duration_it_cannot_honour(capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["emulate", "--config", str(ROOT / "hardware_configs/so101_arm.yaml"), "--duration", value])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.splitlines()[-1] == ("reverie-sim emulate: error: argument --duration: expected a finite number of "
                                    f"seconds > 0, found {value!r}")


@pytest.mark.parametrize("name,task", [("so101_arm", "marker_reach"), ("koch_arm", "pick_place"),
                                       ("servo_quadruped", "stand_walk")])
@pytest.mark.parametrize("command", ["specs", "view"])
def test_real_robot_configs_point_to_emulate(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
                                             task: str, command: str) -> None:
    """A real robot's config was a bare `KeyError: 'marker_reach'`; it names config and task and says what runs it."""
    config = f"hardware_configs/{name}.yaml"
    extra = ["--out", str(tmp_path / "v.mp4")] if command == "view" else []
    assert main([command, "--config", config, *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyError" not in err
    assert config in err and f"task {task!r} runs on a real robot" in err
    assert f"`reverie-sim emulate --config {config}`" in err
    assert list(tmp_path.iterdir()) == []


def test_view_runs_exactly_the_episodes_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--episodes 3 ran 3 x episode_steps steps: 15 episodes where episodes end early (here on success)."""
    out = tmp_path / "v.mp4"
    assert main(["view", "--config", str(ROOT / "hardware_configs/sim_arm_reach_proprio.yaml"), "--policy", "scripted",
                 "--episodes", "3", "--size", "32", "--out", str(out),
                 "--set", "arm_reach.terminate_on_success=true"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["episodes"] == 3 and len(summary["returns"]) == 3 and summary["success_rate"] == 1.0
    assert summary["frames"] < 3 * 20 and "partial_episode" not in summary
    assert len(_frames(out)) == summary["frames"]


def test_view_never_overwrites_a_video_silently(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = str(ROOT / "hardware_configs/sim_arm_reach_proprio.yaml")
    (tmp_path / "run.mp4").write_bytes(b"an earlier video")
    # no --out: the default name is taken, so the next free one is used and named
    assert main(["view", "--config", cfg, "--steps", "2", "--size", "32"]) == 0
    captured = capsys.readouterr()
    assert "run.mp4 exists: writing run-2.mp4" in captured.err
    assert f"video written to {tmp_path / 'run-2.mp4'}" in captured.out
    assert (tmp_path / "run.mp4").read_bytes() == b"an earlier video" and len(_frames(tmp_path / "run-2.mp4")) == 2
    # an explicit --out that exists: refused, untouched, unless --force
    assert main(["view", "--config", cfg, "--steps", "2", "--size", "32", "--out", "run.mp4"]) == 2
    assert "--out run.mp4 exists; add --force to overwrite it" in capsys.readouterr().err
    assert (tmp_path / "run.mp4").read_bytes() == b"an earlier video"
    assert main(["view", "--config", cfg, "--steps", "3", "--size", "32", "--out", "run.mp4", "--force"]) == 0
    assert len(_frames(tmp_path / "run.mp4")) == 3


def _proprio_policy(path: Path) -> Path:
    """An untrained policy blob for sim_arm_reach_proprio's observations (no camera) and 3-D actions."""
    space = {"joint_pos": ((6,), "float32"), "joint_vel": ((6,), "float32"), "tool_pos": ((3,), "float32"),
             **FLAG_SPACE}
    path.write_bytes(export_policy(DreamerModel(make_cfg(), space, ActSpace(3, False)), 1))
    return path


@pytest.mark.parametrize("act", ["mode", "sample"])
def test_view_warns_of_a_policy_made_for_another_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         act: str) -> None:
    """A policy trained without a camera ran on the camera config without a word (its actions still fit)."""
    policy = _proprio_policy(tmp_path / "policy.safetensors")
    for config, warned in (("sim_arm_reach_proprio", False), ("sim_arm_reach", True)):
        out = tmp_path / f"{config}.mp4"
        assert main(["view", "--config", str(ROOT / f"hardware_configs/{config}.yaml"), "--policy", str(policy),
                     "--act", act, "--steps", "3", "--size", "32", "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert ("warning:" in err) is warned, err
        if warned:
            assert (f"reverie-sim: warning: {policy} was trained on other observations than sim_arm_reach gives "
                    "('image' uint8[64, 64, 3] is new to it)") in err


def test_view_reports_a_partial_episode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """30 steps of 50-step episodes: no episode ends; the return so far is reported, marked partial."""
    assert main(["view", "--config", str(ROOT / "hardware_configs/sim_arm_reach.yaml"), "--policy", "scripted",
                 "--steps", "30", "--size", "32", "--out", str(tmp_path / "v.mp4")]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = json.loads(lines[0])
    assert summary["episodes"] == 0 and summary["mean_return"] is None
    partial = summary["partial_episode"]
    assert partial["steps"] == 30 and partial["of"] == 50 and -30 * 0.5 < partial["return"] < 0
    assert lines[1] == (f"the last episode is partial (30 of 50 steps, return {partial['return']:g}); no episode "
                        "ended, so mean_return is null")
