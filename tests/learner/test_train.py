"""The training loop end to end on real simulated tasks: outputs, train ratio, resume, CLI errors."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.agents.dreamer.policy import Policy
from core.config import load_config
from learner.checkpoint import CheckpointWarning, checkpoint_step, latest_checkpoint, load_checkpoint
from learner.cli import main as learner_main
from learner.metrics import read_metrics
from learner.replay import Replay
from learner.replay.context import CONTEXT_PART
from learner.train import Trainer

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "hardware_configs" / "sim_arm_reach.yaml"
# A tiny, fast variant: 32x32 images, 10-step episodes, 2x8 batches.
FAST = [
    "dreamer.size=tiny", "dreamer.threads=1", "camera.width=32", "camera.height=32",
    "control.episode_steps=9", "train.batch_size=2", "train.batch_length=8", "train.prefill=20",
    "train.train_ratio=8", "train.log_every=10", "replay.chunk_length=16",
]


def _run(logdir: Path, *extra: str) -> dict:
    cfg = load_config(CONFIG, [*FAST, *extra])
    return Trainer(cfg, logdir, progress=False).run()


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One 60-step run with evaluations and checkpoints, (its logdir, its summary): what several tests read
    (evaluation uses its own environment, so the training steps and updates are those of a run without)."""
    logdir = tmp_path_factory.mktemp("short_run")
    return logdir, _run(logdir, "train.steps=60", "train.eval_every=30", "train.eval_episodes=1",
                        "train.checkpoint_every=30")


def test_run_leaves_config_metrics_videos_curve_checkpoint(short_run: tuple[Path, dict]) -> None:
    tmp_path, summary = short_run
    assert summary["env_steps"] == 60
    assert (tmp_path / "config.yaml").is_file()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert any("wm/dec" in r for r in rows) and any("eval/return" in r for r in rows)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    videos = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert any(v.startswith("eval_") and v.endswith(".mp4") for v in videos)
    assert any(v.startswith("openloop_") for v in videos)
    assert (tmp_path / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpts = sorted((tmp_path / "checkpoints").glob("ckpt-*"))
    assert ckpts and (ckpts[-1] / "meta.json").is_file()
    policy = Policy.from_weights((tmp_path / "policy.safetensors").read_bytes())
    assert policy.version == summary["updates"]
    assert json.loads((tmp_path / "summary.json").read_text())["updates"] == summary["updates"]


def test_train_ratio_counts_policy_steps(short_run: tuple[Path, dict]) -> None:
    # ratio 8 with 2x8 batches: one update per 2 policy steps once prefill (20 steps) is done
    summary = short_run[1]
    assert summary["updates"] == pytest.approx((60 - 20) * 8 / 16 + 0.5, abs=1)


def _weights(logdir: Path) -> dict[str, np.ndarray]:
    ckpt = sorted((logdir / "checkpoints").glob("ckpt-*"))[-1]
    return {k: v.numpy() for k, v in load_file(ckpt / "model.safetensors").items()}


def test_resumed_run_continues_identically(tmp_path: Path) -> None:
    # The default recipe (2024) starts replayed sequences from stored latents: the checkpoint keeps them.
    extra = ("train.eval_every=0", "train.checkpoint_every=1000")
    straight = _run(tmp_path / "straight", "train.steps=80", *extra)
    _run(tmp_path / "resumed", "train.steps=40", *extra)
    summary = _run(tmp_path / "resumed", "train.steps=80", *extra)
    assert summary["env_steps"] == 80
    # The summary's returns span the episodes before the restart too (it took the last 10).
    assert summary["train_return_last10"] == straight["train_return_last10"]
    assert summary["random_return"] == straight["random_return"]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_cli_reports_bad_config_and_env(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert learner_main(["train", "--config", str(CONFIG), "--logdir", str(tmp_path), "--set", "train.steps=-1"]) == 2
    assert "train.steps" in capsys.readouterr().err
    assert learner_main(["train", "--env", "gymnasium:NoSuchEnv-v0", "--logdir", str(tmp_path)]) == 2
    assert "NoSuchEnv-v0" in capsys.readouterr().err
    assert learner_main(["train", "--logdir", str(tmp_path)]) == 2
    assert "--config" in capsys.readouterr().err
    servo = CONFIG.parent / "so101_arm.yaml"  # a real robot: it streams to `serve`, nothing here steps it
    assert learner_main(["train", "--config", str(servo), "--logdir", str(tmp_path / "servo")]) == 2
    err = capsys.readouterr().err
    assert "so101_arm: `train` steps a simulated task or a Gymnasium env" in err and "reverie-learner serve" in err
    assert "Traceback" not in err and not (tmp_path / "servo").exists()


@pytest.mark.parametrize("command", ["train", "serve"])
def test_cli_reports_a_logdir_it_cannot_use(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a run")
    for logdir, why in [(a_file, "exists and is not a directory"), (a_file / "run", "cannot create it")]:
        assert learner_main([command, "--config", str(CONFIG), "--logdir", str(logdir)]) == 2
        err = capsys.readouterr().err
        assert f"--logdir {logdir}: {why}" in err and "Traceback" not in err, err
    # A bad config is reported before the logdir is made, so no empty run directory is left behind.
    fresh = tmp_path / "fresh"
    assert learner_main([command, "--config", str(CONFIG), "--logdir", str(fresh), "--set", "train.steps=-1"]) == 2
    assert not fresh.exists()


@pytest.mark.parametrize("command", ["train", "serve"])
@pytest.mark.parametrize("raw,expected", [
    (b"name: r\xff\n", "line 1: not UTF-8 text (byte 0xff at offset 7)"),
    (b"name: r\ntask: arm_reach\nsim: " + b"[" * 5000 + b"]" * 5000 + b"\n",
     "line 3, column 21: nested more than 16 levels deep"),
    (b"name: r\ntask: arm_reach\ncontrol: {hz: 10}\ncontrol: {hz: 20}\n",
     "line 4, column 1: duplicate key 'control' (first at line 3"),
    (b"name: r\ntask: arm_reach\nseed: 1180591620717411303424\n", "seed: expected a value less than or equal to"),
])
def test_cli_names_a_config_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str,
                                           raw: bytes, expected: str) -> None:
    # These were tracebacks (UnicodeDecodeError, RecursionError, torch's seeding overflow) or, for the
    # duplicated block, a run with only the second one.
    config = tmp_path / "robot.yaml"
    config.write_bytes(raw)
    assert learner_main([command, "--config", str(config), "--logdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(config) in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 2 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_serve_refuses_a_duration_it_cannot_honour(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   value: str) -> None:
    # --duration nan served forever; a negative one started a learner and stopped it at once, exit 0.
    with pytest.raises(SystemExit) as info:
        learner_main(["serve", "--config", str(CONFIG), "--logdir", str(tmp_path / "run"), "--duration", value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and not (tmp_path / "run").exists()
    assert err.splitlines()[-1] == ("reverie-learner serve: error: argument --duration: expected a finite number "
                                    f"of seconds > 0, found {value!r}")


def test_serve_refuses_a_bind_flag_zeromq_would_misread(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = learner_main(["serve", "--config", str(CONFIG), "--logdir", str(tmp_path / "run"),
                         "--bind", "tcp://127.0.0.1:70000", "--duration", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--bind 'tcp://127.0.0.1:70000': expected" in err and "1..65535" in err, err
    assert not (tmp_path / "run").exists()


def test_trains_on_a_gymnasium_env(tmp_path: Path) -> None:
    code = learner_main([
        "train", "--env", "gymnasium:Pendulum-v1", "--logdir", str(tmp_path), "--quiet",
        "--set", "dreamer.size=tiny", "--set", "train.steps=40", "--set", "train.prefill=20",
        "--set", "train.batch_size=2", "--set", "train.batch_length=8", "--set", "train.train_ratio=8",
        "--set", "train.eval_every=0", "--set", "control.episode_steps=20",
    ])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["env_steps"] == 40 and summary["updates"] > 0


def test_resume_falls_back_past_a_checkpoint_with_flipped_bytes(tmp_path: Path) -> None:
    extra = ("train.eval_every=0", "train.checkpoint_every=20")
    _run(tmp_path, "train.steps=60", *extra)
    older, newest = sorted((tmp_path / "checkpoints").glob("ckpt-*"))[-2:]
    file = newest / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0xFF  # same size, header intact: only the checksum tells
    file.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match=rf"{newest.name}.*model.safetensors.*checksum"):
        trainer = Trainer(load_config(CONFIG, [*FAST, "train.steps=80", *extra]), tmp_path, progress=False)
    assert trainer.counters.env_steps == checkpoint_step(older)
    summary = trainer.run()
    assert summary["env_steps"] == 80


def _start_cli(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """`reverie-learner train` in a child process on the fast config, its output in tmp_path/train.log."""
    sets = [x for s in [*FAST, *extra] for x in ("--set", s)]
    cmd = [sys.executable, "-m", "learner.cli", "train", "--config", str(CONFIG), "--logdir", str(tmp_path / "run"),
           "--quiet", *sets]
    log_path = tmp_path / "train.log"
    with log_path.open("w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log_path


def _wait_until(proc: subprocess.Popen, log: Path, cond: Callable[[], bool]) -> None:
    """Poll until `cond()` holds while the child runs (a generous deadline: not a timing test)."""
    deadline = time.monotonic() + 120
    while not cond():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def _ended(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    """The child's exit status and output (killed if it does not end)."""
    try:
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, log.read_text()


def _summary(output: str) -> dict:
    return json.loads([ln for ln in output.splitlines() if ln.startswith("{")][-1])


def test_cli_train_on_sigterm_cuts_the_episode_and_checkpoints_at_that_boundary(tmp_path: Path) -> None:
    """docker stop, systemd and Slurm send SIGTERM: it ends the run like Ctrl-C. A stop mid-episode stores
    the episode as cut (is_last, not terminal), so the checkpoint falls at a boundary as the README says;
    the resumed run starts that episode over. Issue 23 item 5 too: with a log interval the run never
    reaches, the first update still writes a metrics row, and TensorBoard shows it while the run goes on."""
    episode = 1000  # steps; the stop lands in the first episode, long after the prefill's 20 steps
    proc, log = _start_cli(tmp_path, "train.steps=100000", "train.checkpoint_every=100000", "train.eval_every=0",
                           f"control.episode_steps={episode}", "train.log_every=1000000")
    logdir = tmp_path / "run"
    try:
        _wait_until(proc, log, lambda: any(r.get("updates", 0) > 0 for r in _rows(logdir / "metrics.jsonl")))
        first = next(r for r in _rows(logdir / "metrics.jsonl") if r.get("updates", 0) > 0)
        assert first["step"] < episode and "train/return" not in first  # the first update's row, early
        events = EventAccumulator(str(logdir / "tb"))
        events.Reload()
        assert set(first) - {"step", "time"} <= set(events.Tags()["scalars"])
        proc.send_signal(signal.SIGTERM)
    finally:
        code, output = _ended(proc, log)
    assert code == 0, output[-3000:]
    assert "SIGTERM" in output and "checkpoint" in output and "Traceback" not in output, output[-3000:]
    summary = _summary(output)
    assert summary["stopped"] == "SIGTERM" and summary["updates"] > 0 and summary["env_steps"] < episode
    ckpts = sorted((logdir / "checkpoints").glob("ckpt-*"))
    assert [checkpoint_step(p) for p in ckpts] == [summary["env_steps"]]
    with Replay(logdir / "replay") as replay:
        stats = replay.stats()["totals"]
        assert stats["steps"] == summary["env_steps"] and stats["abandoned"] == 1 and stats["episodes"] == 0
        (stream,) = replay.stats()["streams"].values()
        assert stream["returns"] == []
    resumed = Trainer(load_config(CONFIG, [*FAST, f"train.steps={summary['env_steps']}", "train.eval_every=0",
                                           f"control.episode_steps={episode}"]), logdir, progress=False)
    assert resumed.counters.env_steps == summary["env_steps"] and resumed.agent.updates == summary["updates"]
    assert resumed.env.episodes == 0  # the cut episode starts over from its start state
    resumed.close()


def test_ctrl_c_during_an_evaluation_drops_it_and_stops_at_that_boundary(tmp_path: Path) -> None:
    """Issue 23 item 4: Ctrl-C ran the evaluation under way, with its videos, to the end (26-33 s). It is
    dropped now: no eval row, no video; the checkpoint is taken at the boundary the evaluation began at,
    and the resumed run evaluates there again."""
    proc, log = _start_cli(tmp_path, "train.steps=100000", "train.eval_every=20", "train.eval_episodes=1000",
                           "train.checkpoint_every=100000")
    logdir = tmp_path / "run"
    try:
        _wait_until(proc, log, lambda: "evaluating at 20 env steps" in log.read_text())
        proc.send_signal(signal.SIGINT)
    finally:
        code, output = _ended(proc, log)
    assert code == 0 and "Traceback" not in output, output[-3000:]
    assert "evaluation at 20 env steps dropped" in output and "eval at" not in output, output[-3000:]
    summary = _summary(output)
    assert summary["stopped"] == "SIGINT" and summary["env_steps"] == 20 and summary["final_eval_return"] is None
    assert not any("eval/return" in r for r in read_metrics(logdir)) and not (logdir / "videos").exists()
    assert summary["checkpoint"] == str(latest_checkpoint(logdir / "checkpoints"))
    resumed = Trainer(load_config(CONFIG, [*FAST, "train.steps=20", "train.eval_every=20"]), logdir, progress=False)
    assert resumed.counters.env_steps == 20 and resumed.counters.eval_rounds == resumed.counters.last_eval == 0
    resumed.close()


def test_a_second_signal_exits_at_once_in_one_line_leaving_whole_checkpoints(tmp_path: Path) -> None:
    """Issue 23 item 4: a second Ctrl-C printed a 30-line traceback. It exits at once now (status 128 + the
    signal), saying so in one line; what is on disk stays whole. Two SIGINTs pending together merge into one,
    so the child is paused while SIGINT and then SIGTERM are sent: it handles them in one go, mid-evaluation."""
    proc, log = _start_cli(tmp_path, "train.steps=100000", "train.eval_every=20", "train.eval_episodes=1000",
                           "train.checkpoint_every=10")
    logdir = tmp_path / "run"
    try:
        _wait_until(proc, log, lambda: "evaluating at 20 env steps" in log.read_text())
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
    finally:
        code, output = _ended(proc, log)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    lines = output.strip().splitlines()
    assert lines[-1].startswith("reverie-learner: SIGTERM again: exiting now, without a new checkpoint"), lines[-3:]
    assert "Traceback" not in output and not any(ln.startswith("{") for ln in lines), output[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # no damaged checkpoint to skip
        # The boundary at 20 evaluates before it checkpoints: the newest checkpoint is 10's, not a part of 20's.
        assert [checkpoint_step(p) for p in sorted((logdir / "checkpoints").glob("ckpt-*"))] == [10]
        resumed = Trainer(load_config(CONFIG, [*FAST, "train.steps=20", "train.eval_every=0"]), logdir,
                          progress=False)
    assert resumed.counters.env_steps == 10
    resumed.close()


def _rows(path: Path) -> list[dict]:
    try:
        return read_metrics(path)
    except (OSError, ValueError):
        return []


def test_cli_serve_on_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path: Path) -> None:
    """The same for `serve`: a robot streams (a hand-driven DEALER on loopback), the learner trains and
    publishes, SIGTERM ends it with a checkpoint a restart resumes from."""
    from link_helpers import RawRobot

    from learner.checkpoint import latest_checkpoint, load_checkpoint
    from robot.demo import free_port

    port, logdir = free_port(), tmp_path / "run"
    cmd = [sys.executable, "-m", "learner.cli", "serve", "--config", str(ROOT / "hardware_configs" /
           "sim_arm_reach_proprio.yaml"), "--logdir", str(logdir), "--bind", f"tcp://127.0.0.1:{port}", "--quiet",
           "--set", "train.prefill=20", "--set", "train.batch_size=2", "--set", "train.batch_length=8",
           "--set", "train.train_ratio=64", "--set", "train.checkpoint_every=100000",
           "--set", "link.weights_every_updates=1", "--set", "dreamer.threads=1"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    spec = {"joint_pos": ["float32", [3]], "action": ["float32", [2]], "reward": ["float32", []],
            "is_first": ["bool", []], "is_last": ["bool", []], "is_terminal": ["bool", []]}
    try:
        with RawRobot(f"tcp://127.0.0.1:{port}", "arm-1") as robot:
            assert robot.hello(spec=spec, task="arm_reach", hz=10.0).kind == "welcome"
            rng = np.random.default_rng(0)
            for seq in range(4):  # 40 steps, episodes of 10
                rows = np.arange(10)
                robot.steps(seq, {"joint_pos": rng.normal(size=(10, 3)).astype(np.float32),
                                  "action": rng.uniform(-1, 1, (10, 2)).astype(np.float32),
                                  "reward": rng.normal(size=10).astype(np.float32), "is_first": rows == 0,
                                  "is_last": rows == 9, "is_terminal": np.zeros(10, bool),
                                  "policy_version": np.zeros(10, np.int64),
                                  "time": time.time() + seq * 10 + rows.astype(np.float64)})
            robot.expect({"weights"}, deadline=120)  # it trained
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (tmp_path / "serve.log").read_text()
    summary = json.loads([ln for ln in output.splitlines() if ln.startswith("{")][-1])
    assert summary["stopped"] == "interrupted" and summary["updates"] > 0 and "Traceback" not in output
    assert summary["received_steps"] == 40 and summary["checkpoint"] == str(latest_checkpoint(logdir / "checkpoints"))
    _, meta = load_checkpoint(summary["checkpoint"])
    assert meta["updates"] == summary["updates"]


def test_evaluation_reports_sampled_and_mode_returns_success_and_updates(tmp_path: Path) -> None:
    """Evaluation acts as the official agent does (sampled actions) and with the mode action, from the
    same start states; ArmReach reports its success rate; the row carries the update count so
    curves can be drawn against updates too."""
    cfg = load_config(CONFIG, [*FAST, "train.eval_episodes=2", "control.episode_steps=4"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    returned = trainer.evaluate()
    trainer.close()
    row = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/return" in r][-1]
    assert returned == row["eval/return"]
    for key in ("eval/return_mode", "eval/success", "eval/success_mode"):
        assert key in row, key
    assert 0.0 <= row["eval/success"] <= 1.0 and row["updates"] == 0
    assert (tmp_path / "learning_curve_updates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_acting_writes_its_posterior_latents_into_replay(tmp_path: Path) -> None:
    """Steps the policy acted on carry its posterior latents as replay context before any update
    has touched them (a train ratio so low that no update happens); prefill steps carry none. The
    checkpoint keeps them."""
    cfg = load_config(CONFIG, [*FAST, "train.steps=40", "train.eval_every=0", "train.train_ratio=0.01"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    seen: list[dict] = []
    act = trainer.policy.act

    def spy(obs, **kw):  # noqa: ANN001, ANN202
        out = act(obs, **kw)
        seen.append({k: v[0].clone() for k, v in trainer.policy.state.items()})
        return out

    trainer.policy.act = spy
    summary = trainer.run()
    assert summary["updates"] == 0
    parts, _ = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    state = parts[CONTEXT_PART]
    assert len(state["row"]) == 40 - 20 == len(seen)  # every acted step, no prefill step
    for key in ("deter", "stoch", "action"):
        stored = np.asarray(state["latents"][key][-1])
        np.testing.assert_array_equal(stored, seen[-1][key].numpy().reshape(stored.shape))


def test_episode_reward_per_step_is_logged(short_run: tuple[Path, dict]) -> None:
    rows = read_metrics(short_run[0] / "metrics.jsonl")
    per_step = [r["train/reward_per_step"] for r in rows if "train/reward_per_step" in r]
    returns = [r["train/return"] for r in rows if "train/reward_per_step" in r]
    assert per_step and all(abs(p * 10 - r) < 1e-6 for p, r in zip(per_step, returns))  # 10-step episodes


def test_first_rows_come_before_the_first_log_interval(tmp_path: Path) -> None:
    """Issue 23 item 5: metrics.jsonl and tb/ stayed empty until the first log interval (1000 steps: many
    minutes on a small CPU). The first episode and the first update write a row each; then the interval."""
    _run(tmp_path, "train.steps=40", "train.eval_every=0", "train.log_every=30")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["step"] == 10 and rows[0]["train/return"] < 0 and rows[0]["updates"] == 0  # the first episode
    assert rows[1]["step"] < 30 and rows[1]["updates"] == 1 and "wm/dec" in rows[1]  # the first update
    assert [r["step"] for r in rows[2:]] == [30, 40]  # the interval's row, and the final one


def test_progress_bar_says_what_it_waits_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 23 item 5: the bar showed `updates=0 upd_s=0.00 ret=nan` through the prefill. It counts the
    prefill now, then shows updates and the latest return, and never a nan."""
    cfg = load_config(CONFIG, [*FAST, "train.steps=30", "train.eval_every=0"])
    Trainer(cfg, tmp_path, progress=True).run()
    err = capsys.readouterr().err
    assert "prefill 0/20" in err and "nan" not in err, err
    last = err.rstrip().split("\r")[-1]  # the bar's final state
    assert last.startswith("train") and re.search(r"updates=[1-9]", last) and "return=" in last, last
