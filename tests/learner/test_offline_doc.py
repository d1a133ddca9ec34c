"""docs/offline.md's commands (its `sh` blocks), run as written (in order, in-process) on a replay recorded by
a real short `train` run: only the sizes are made tiny (`FAST` for every train, record and offline run; a short eval
horizon for 10-step episodes) and `runs/` lies in a temp directory."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from learner.cli import main as learner_main
from learner.replay_cli import main as replay_main

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "offline.md"
SIZES = ["camera.width=32", "camera.height=32", "control.episode_steps=9"]
FAST = [*SIZES, "dreamer.size=tiny", "dreamer.threads=1", "train.batch_size=2", "train.batch_length=8",
        "train.prefill=20", "train.train_ratio=8", "train.steps=40", "train.eval_every=0", "replay.chunk_length=16"]


def doc_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def adapted(command: str, tmp: Path) -> list[str]:
    argv = [arg.replace("runs/", f"{tmp}/runs/") for arg in shlex.split(command)]
    argv = [str(ROOT / a) if a.startswith("hardware_configs/") else a for a in argv]
    prog, rest = argv[0], argv[1:]
    if prog == "reverie-learner" or rest[0] == "record":
        sets = SIZES if rest[0] == "record" else FAST
        rest += [x for s in sets for x in ("--set", s)]
    if "--offline" in rest:
        rest += ["--updates", "2"]
    if rest[0] == "eval":
        rest += ["--horizon", "4", "--sequences", "4"]
    return [prog, *rest]


def test_the_doc_names_every_verb_of_section_one() -> None:
    text = " ".join(doc_commands())
    for verb in ("info", "episodes", "plot", "video", "eval", "filter", "split", "merge", "record", "export",
                 "import", "view"):
        assert f"reverie-replay {verb} " in text, verb
    assert "--format lerobot" in text and "--format minari" in text
    assert "--offline" in text and "--prefill-from" in text


def test_every_command_of_the_doc_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    commands = doc_commands()
    assert commands[0].startswith("reverie-learner train")  # the replay every later command reads
    for command in commands:
        prog, *argv = adapted(command, tmp_path)
        code = (learner_main if prog == "reverie-learner" else replay_main)(argv)
        out, err = capsys.readouterr()
        assert code == 0, f"{command}\n{err[-3000:]}"
        assert "Traceback" not in err, command
    runs = tmp_path / "runs"
    assert (runs / "reach" / "replay" / "streams.json").is_file()
    for name in ("returns.png", "lengths.png", "observations.png"):
        assert (runs / "reach" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (runs / "reach" / "episode.mp4").stat().st_size > 0
    result = json.loads((runs / "reach" / "eval" / "eval.json").read_text())
    assert set(result["entries"]) >= {"image", "joint_pos", "reward", "continuation"}
    assert (runs / "reach" / "eval" / "openloop.mp4").stat().st_size > 0
    for name in ("reach-late", "reach-a", "reach-b", "reach-again", "demos"):
        assert (runs / name / "index.json").is_file(), name
    offline = json.loads((runs / "reach-offline" / "summary.json").read_text())
    assert offline["updates"] == 2 and (runs / "reach-offline" / "policy.safetensors").is_file()
    demo = json.loads((runs / "reach-demo" / "prefilled_from.json").read_text())
    assert demo["streams"] == ["demo-scripted"] and demo["steps"] == 30
    info = json.loads((runs / "datasets" / "reach" / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 4
    assert (runs / "reach-imported" / "index.json").is_file()
    assert (runs / "minari" / "reverie" / "ArmReach" / "reach-v0" / "data" / "metadata.json").is_file()
    assert (runs / "reach" / "reach.rrd").stat().st_size > 0
