"""CASCADE's deployments over the link (learner/serve_deployments.py, issue 26 s3): `reverie-learner serve
--deployments` with simulated robot processes (`reverie-robot run`, PyBullet ArmReach from proprioception) on
real loopback TCP. Each robot acts the frozen explorer it was sent, the replay records exactly those versions,
nothing trains while robots collect, the population trains between deployments; one robot takes the members
in turn. Also the link server's per-robot weights (`publish_to`) and the command line's refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from link_helpers import RawRobot, learner

from core.link.protocol import weights_checksum
from learner.cli import main as learner_main
from learner.replay.chunk_file import ChunkError, read_chunk
from learner.serve_deployments import RESULTS, members_of
from robot.demo import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "hardware_configs" / "sim_arm_reach_proprio.yaml"
COMMON = ["--set", "control.hz=20", "--set", "sim.physics_hz=240", "--set", "link.robot_lost_s=5",
          "--set", "link.chunk_seconds=0.5"]
STEPS, UPDATES = 120, 2  # per deployment
LEARNER = ["--set", "dreamer.explore=cascade", "--set", "explore.population=2", "--set", "explore.ensemble=3",
           "--set", "explore.deployments=2", "--set", f"explore.deployment_steps={STEPS}",
           "--set", f"explore.deployment_updates={UPDATES}", "--set", "train.batch_size=2",
           "--set", "train.batch_length=8", "--set", "dreamer.imag_horizon=3", "--set", "link.heartbeat_s=0.2",
           "--set", "dreamer.threads=1"]


def test_members_of_splits_the_population_over_the_robots() -> None:
    assert [members_of(i, 2, 2) for i in range(2)] == [[0], [1]]  # one explorer per robot
    assert members_of(0, 1, 3) == [0, 1, 2]  # one robot: every member in turn
    assert [members_of(i, 2, 5) for i in range(2)] == [[0, 2, 4], [1, 3]]
    assert [members_of(i, 3, 2) for i in range(3)] == [[0], [1], [0]]  # more robots than members
    assert members_of(4, 2, 3) == [1]  # a robot that joined late


def _blob(n: int) -> bytes:
    return bytes([n]) * 64


def test_publish_to_sends_a_robot_its_own_weights_now_and_at_its_next_hello(tmp_path: Path) -> None:
    with learner(tmp_path) as server, RawRobot(server.endpoint, "own-1") as own, \
            RawRobot(server.endpoint, "all-1") as other:
        assert own.hello().kind == "welcome" and other.hello().kind == "welcome"
        server.publish(_blob(1), 5, 5)
        assert own.expect({"weights"}).seq == 5 and other.expect({"weights"}).seq == 5
        server.publish_to("own-1", _blob(2), 7, 5)
        got = own.expect({"weights"})
        assert got.seq == 7 and got.meta["sha256"] == weights_checksum(_blob(2))
        server.publish(_blob(3), 6, 6)  # the run's weights no longer reach a robot that has its own
        assert other.expect({"weights"}).seq == 6
        assert not [m for m in own.listen(0.5) if m.kind == "weights"]
        welcome = own.hello()  # e.g. a restarted robot process: its own weights again
        assert welcome.meta["version"] == 7 and own.expect({"weights"}).seq == 7
        assert other.hello().meta["version"] == 6 and other.expect({"weights"}).seq == 6


def _refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = learner_main(["serve", "--config", str(CONFIG), "--logdir", "/nonexistent/never-made", "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_the_command_line_refuses_what_deployments_cannot_do(capsys: pytest.CaptureFixture[str]) -> None:
    assert "dreamer.explore" in _refused(capsys, "--deployments")  # the config explores nothing
    cascade = ["--set", "dreamer.explore=cascade"]
    assert "one rank" in _refused(capsys, "--deployments", "--gpus", "2", *cascade)
    assert "--robots is for serve --deployments" in _refused(capsys, "--robots", "2", *cascade)
    assert "must be >= 1" in _refused(capsys, "--deployments", "--robots", "0", *cascade)


# --- the whole thing: a learner process and robot processes
def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", *cmd], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def _deploy(tmp: Path, robots: list[str], *extra: str) -> tuple[dict, list[dict], dict[str, np.ndarray]]:
    """`serve --deployments` until its deployments are done, with these robots; (its summary, the deployment
    rows, each robot's stored policy versions in time order)."""
    port, logdir = free_port(), tmp / "run"
    address = f"tcp://127.0.0.1:{port}"
    serve = _start(["learner.cli", "serve", "--config", str(CONFIG), "--logdir", str(logdir), "--bind", address,
                    "--quiet", "--deployments", "--robots", str(len(robots)), *COMMON, *LEARNER, *extra],
                   tmp / "learner.log")
    procs = [_start(["robot.cli", "run", "--config", str(CONFIG), "--learner", address, "--robot-id", robot,
                     "--spool", str(tmp / f"spool-{robot}"), "--duration", "600", *COMMON], tmp / f"{robot}.log")
             for robot in robots]
    try:
        assert serve.wait(300) == 0, (tmp / "learner.log").read_text()[-3000:]
    finally:
        for proc in [serve, *procs]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in [serve, *procs]:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    text = (tmp / "learner.log").read_text()
    summary = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
    rows = [json.loads(line) for line in (logdir / RESULTS).read_text().splitlines()]
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for path in sorted((logdir / "replay").glob("*.npz")):
        try:
            meta, _, times, versions = read_chunk(path, keys=())
        except ChunkError:  # a chunk file being written as the learner stopped
            continue
        parts.setdefault(meta.stream, []).append((times, versions))
    stored = {}
    for stream, chunks in parts.items():
        times, versions = (np.concatenate(x) for x in zip(*chunks, strict=True))
        stored[stream] = versions[np.argsort(times, kind="stable")]
    return summary, rows, stored


def _check_deployments(summary: dict, rows: list[dict]) -> None:
    """Nothing trained while robots collected; the population trained between; new weights each deployment."""
    assert summary["stopped"] == "explore.deployments (2) done", summary
    assert summary["updates"] == 2 * UPDATES
    assert [r["versions"] for r in rows] == [[1, 2], [3, 4]]
    assert [(r["updates_before"], r["updates_collecting"], r["updates_after"]) for r in rows] == \
        [(0, 0, UPDATES), (UPDATES, 0, 2 * UPDATES)]
    assert all(r["collected"] >= STEPS for r in rows)
    # the second deployment's explorers are not the first's: the population trained in between
    assert not set(rows[0]["sha256"]) & set(rows[1]["sha256"]) and len(set(rows[0]["sha256"])) == 2


def test_two_robots_each_act_their_own_frozen_explorer_per_deployment(tmp_path: Path) -> None:
    summary, rows, stored = _deploy(tmp_path, ["arm-a", "arm-b"])
    _check_deployments(summary, rows)
    sent = {robot: [v for r in rows for v in r["robots"][robot]["versions"]] for robot in ("arm-a", "arm-b")}
    # each robot got one explorer per deployment, the two robots different ones
    assert sorted([sent["arm-a"], sent["arm-b"]]) == [[1, 3], [2, 4]], sent
    for robot, versions in sent.items():
        acted = stored[robot]
        # the replay records only versions this robot was sent (0: acting randomly before the first weights)...
        assert set(acted.tolist()) <= {0, *versions}, (robot, np.unique(acted))
        # ...every one of them, in the order sent
        assert all((acted == v).sum() > 0 for v in versions)
        assert (np.diff(acted) >= 0).all()  # a robot takes only newer versions
        # what the learner counted per version as the steps came in is what the replay holds
        for row in rows:
            for version, n in row["robots"][robot]["acted"].items():
                assert (acted == int(version)).sum() >= n
    # a robot's summary names the last explorer it acted with
    for robot in ("arm-a", "arm-b"):
        out = (tmp_path / f"{robot}.log").read_text()
        assert json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])["acting_version"] == \
            sent[robot][-1]


def test_one_robot_acts_the_members_in_turn_and_a_restarted_serve_goes_on_with_the_next_deployment(
        tmp_path: Path) -> None:
    first, rows, _ = _deploy(tmp_path, ["solo"], "--set", "explore.deployments=1")
    assert first["stopped"] == "explore.deployments (1) done" and first["updates"] == UPDATES
    # the same run with two deployments: it resumes after the first (the standing is checkpointed)
    summary, rows, stored = _deploy(tmp_path, ["solo"])
    _check_deployments(summary, rows)
    assert [r["robots"]["solo"]["versions"] for r in rows] == [[1, 2], [3, 4]]  # whole episodes, members in turn
    acted = stored["solo"]
    assert set(acted.tolist()) <= {0, 1, 2, 3, 4} and all((acted == v).sum() > 0 for v in (1, 2, 3, 4))
    nonzero = acted[acted > 0]  # (the restarted robot process acts randomly, as version 0, until v3 arrives)
    assert (np.diff(nonzero) >= 0).all()
    # member 0 acted its share (half the deployment's steps) before member 1 was sent
    assert rows[0]["robots"]["solo"]["acted"]["1"] >= STEPS // 2
