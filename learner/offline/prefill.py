"""Putting a recorded replay into a new run's store: `reverie-learner train --offline DIR` trains on it alone,
`train`/`serve --prefill-from DIR` start learning with it (demonstrations, yesterday's robot data).

The readable chunk files are copied (the same rows, names and uuids, with streams.json) into a hidden
directory beside LOGDIR/replay and renamed into place, so the source is only read and a killed copy leaves
no half store. The copies carry no robot positions: a robot that streams to the run under a name the
source also used must not have its new chunks taken for ones already stored.
`prefilled_from.json` in the run directory names the source; a resumed run finds it and copies nothing
again. A run directory that already holds a replay of its own is refused: prefill starts a run."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_bytes, fsync_dir
from core.layout import ACTION_KEY, StepLayout
from learner.offline.reader import ReplayDir, ReplayDirError
from learner.replay.chunk_file import write_chunk
from learner.replay.describe import write_descriptions
from learner.replay.index import entry_for, write_index

MARKER = "prefilled_from.json"
STORE = "replay"


def layout_text(layout: StepLayout) -> str:
    return ", ".join(f"{k} {f.dtype.name}{list(f.shape)}" for k, f in layout.items())


def copy_into_run(source: Path, logdir: Path, expected: StepLayout | None = None) -> dict[str, Any]:
    """Copy `source`'s readable chunks into `logdir/replay` (see the module docstring); returns what the marker
    says. `expected`: the step layout the run will store (train knows it from its env); a replay of another
    layout is refused naming the difference. Raises ReplayDirError."""
    marker, store = logdir / MARKER, logdir / STORE
    src = ReplayDir(source)
    if marker.is_file():
        done = json.loads(marker.read_text())
        if Path(done.get("source", "")).resolve() != source.resolve():
            raise ReplayDirError(f"{logdir}: was prefilled from {done.get('source')}, not {source}; use another "
                                 "--logdir for another source")
        return done
    if store.exists() and any(store.iterdir()):
        raise ReplayDirError(f"{logdir}: already holds a replay ({store}); prefill starts a new run: "
                             "use a new --logdir")
    layout = src.layout
    if expected is not None and layout != expected:
        diff = sorted(k for k in set(layout) | set(expected) if layout.get(k) != expected.get(k))
        raise ReplayDirError(f"{source}: its steps ({layout_text(layout)}) do not fit this run's "
                             f"({layout_text(expected)}); they differ in {diff}")
    logdir.mkdir(parents=True, exist_ok=True)
    tmp = logdir / f".{STORE}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        entries = []
        for path, _ in src.chunks:
            meta, steps, times, versions = src.read(path)
            meta.source = None
            write_chunk(tmp / path.name, meta, steps, times, versions, compress=False)
            entries.append(entry_for(tmp / path.name, meta))
        write_index(tmp, entries)
        if src.descriptions:
            write_descriptions(tmp, src.descriptions)
        fsync_dir(tmp)
        if store.exists():
            store.rmdir()  # empty (checked above)
        os.rename(tmp, store)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    done = {"source": str(source.resolve()), "chunks": len(src.chunks), "steps": sum(m.length for _, m in src.chunks),
            "streams": src.streams, "skipped": src.problems, "discrete": src.discrete_actions()}
    atomic_write_bytes(marker, json.dumps(done, indent=1).encode())
    return done


def action_layout(layout: StepLayout) -> tuple[StepLayout, int]:
    """(observation part, action width) of a replay's step layout."""
    if ACTION_KEY not in layout or len(layout[ACTION_KEY].shape) != 1:
        raise ReplayDirError(f"the replay's steps have no action vector ({layout_text(layout)})")
    return layout.without(ACTION_KEY), int(layout[ACTION_KEY].shape[0])


# --- the command line's hooks (learner/cli.py): what `train --offline` and `--prefill-from` run ------------------


def train_layout(cfg: Any, env: str | None) -> StepLayout:
    """The step layout `train` stores for this config: its env's observations and the model-form action."""
    from learner.envs import Env

    made = Env(cfg, env, seed=cfg.seed)
    try:
        return StepLayout({**made.obs_space, ACTION_KEY: ((made.act_space.dim,), "float32")})
    finally:
        made.close()


def prefill_train(cfg: Any, logdir: Path, source: Path, env: str | None) -> str:
    """`train --prefill-from`: the demonstrations into the new run's replay (checked against the env's layout)."""
    done = copy_into_run(source, logdir, train_layout(cfg, env))
    return f"prefilled {logdir / STORE} with {done['steps']} steps of {done['source']} (streams {done['streams']})"


def prefill_serve(cfg: Any, logdir: Path, source: Path) -> str:
    """`serve --prefill-from`: the recorded steps into the new run's replay, and their layout made the run's,
    so that a robot of another layout is refused at its hello with the difference named."""
    import math

    from learner.link.server import SPEC_FILE, RunSpec

    done = copy_into_run(source, logdir)
    spec_path = logdir / SPEC_FILE
    if not spec_path.exists():
        src = ReplayDir(logdir / STORE, verify=False)
        desc = next(iter(src.descriptions.values()), {})
        hz = float(desc.get("control_hz") or cfg.control.hz)
        spec = RunSpec(src.layout, src.discrete_actions(), str(desc.get("task") or cfg.task or cfg.name),
                       hz if math.isfinite(hz) and hz > 0 else cfg.control.hz)
        atomic_write_bytes(spec_path, json.dumps(spec.to_json(), indent=1).encode())
    return f"prefilled {logdir / STORE} with {done['steps']} steps of {done['source']} (streams {done['streams']})"


def train_offline(args: Any) -> int:
    """`reverie-learner train --offline REPLAY_DIR`: see learner/offline/train.py."""
    import sys

    from core.config import apply_overrides, config_from_dict, load_config, parse_overrides
    from learner.offline.train import OfflineTrainer

    source = Path(args.offline)
    if args.env or args.prefill_from:
        print("reverie-learner: --offline trains on the replay alone: leave out --env and --prefill-from",
              file=sys.stderr)
        return 2
    if args.config:
        cfg = load_config(args.config, args.set)
    else:  # no config: the defaults, named for the data (`--set` still applies)
        raw: dict = {"name": f"offline-{source.name}", "backend": "gym", "gym_id": "offline"}
        overrides = parse_overrides(args.set)
        apply_overrides(raw, overrides)
        cfg = config_from_dict(raw, f"--offline {source}", overrides)
    try:
        trainer = OfflineTrainer(cfg, args.logdir, source, updates=args.updates, progress=not args.quiet)
        summary = trainer.run()
    except ReplayDirError as exc:
        print(f"reverie-learner: --offline: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
