"""Run outputs: checkpoints resume training exactly and survive crashes, weights blobs round-trip,
metrics survive a killed run, and plots and videos come out readable."""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from core.tensor_tree import flatten_state, unflatten_state
from core.video import episode_frames, openloop_grid, write_video
from core.weights import load_weights, save_weights, weights_from_bytes, weights_to_bytes
from learner.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from learner.metrics import Mean, MetricsLogger, read_metrics
from learner.plots import plot_learning_curve, plot_losses

# --- helpers ---------------------------------------------------------------------------------------


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Equal values *and* equal types all the way down (tensor vs array vs int vs float ...)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert type(k) is type(next(kb for kb in b if kb == k)), f"{path}: key {k!r} type"
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def through_disk(state: dict) -> dict:
    """Flatten, serialise tensors with safetensors and the skeleton with strict JSON, and rebuild."""
    tensors, skeleton = flatten_state(state)
    blob = safetensors.torch.save(tensors)
    text = json.dumps(skeleton, allow_nan=False)
    return unflatten_state(safetensors.torch.load(blob), json.loads(text))


def make_model(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train(model: nn.Module, opt: torch.optim.Optimizer, rng: np.random.Generator, steps: int) -> None:
    """Steps that draw from both the torch global RNG and a numpy generator, so both must resume."""
    for _ in range(steps):
        x = torch.randn(16, 4) + torch.from_numpy(rng.normal(size=(16, 4)).astype(np.float32))
        loss = (model(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def run_state(model: nn.Module, opt: torch.optim.Optimizer, rng: np.random.Generator) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": rng.bit_generator.state,
    }


# --- flatten / unflatten -----------------------------------------------------------------------------


def test_flatten_roundtrip_resumes_training_exactly() -> None:
    model, opt = make_model(0)
    rng = np.random.default_rng(123)
    train(model, opt, rng, 3)
    state = run_state(model, opt, rng)
    restored = through_disk(state)
    assert_same(restored, state)
    assert all(isinstance(k, int) for k in restored["optimizer"]["state"])  # Adam keys param ids by int
    assert isinstance(restored["optimizer"]["param_groups"][0]["betas"], tuple)
    assert restored["numpy_rng"]["state"]["state"] > 2**64  # PCG64's 128-bit ints survive

    train(model, opt, rng, 3)  # the original run continues
    fresh, fresh_opt = make_model(1)
    fresh.load_state_dict(restored["model"])
    fresh_opt.load_state_dict(restored["optimizer"])
    torch.set_rng_state(restored["torch_rng"])
    fresh_rng = np.random.default_rng()
    fresh_rng.bit_generator.state = restored["numpy_rng"]
    train(fresh, fresh_opt, fresh_rng, 3)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_flatten_odd_values_and_shared_storage() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        "views": [base[0], base[1:], base.t()],  # share storage, one non-contiguous
        "same": (base, base),
        "scalars": {1: 2**70, -3: -(2**64), 2.5: float("nan"), "inf": -math.inf, None: True, (1, "a"): "tuple key"},
        "numpy": {
            "mt": np.random.MT19937(5).state["state"]["key"],  # uint32
            "half": np.arange(3, dtype=np.float16),
            "big_endian": np.arange(4, dtype=">i4"),
            "scalar": np.float32(1.5),
            "bool": np.bool_(True),
            "str": np.str_("numpy text"),
            "nd0": np.array(7, dtype=np.int64),
        },
        "torch": {"bf16": torch.ones(3, dtype=torch.bfloat16), "empty": torch.zeros(0, 5), "zero_d": torch.tensor(3)},
        "misc": {"bytes": b"\x00\xff", "none": None, "neg_zero": -0.0, "__t__": "a key that looks like a tag"},
        "a.b": torch.ones(1),
        "a": {"b": torch.zeros(1)},  # dotted-key collision with the entry above
        "od": OrderedDict(w=torch.ones(2)),
    }
    state["od"]._metadata = {"": {"version": 2}}
    tensors, _ = flatten_state(state)
    safetensors.torch.save(tensors)  # would raise on shared or non-contiguous storage
    restored = through_disk(state)
    assert_same(restored, state)
    assert restored["od"]._metadata == {"": {"version": 2}}
    assert restored["numpy"]["big_endian"].dtype == np.dtype(">i4")


def test_flatten_refuses_unknown_types() -> None:
    with pytest.raises(TypeError, match="fn"):
        flatten_state({"fn": print})
    with pytest.raises(TypeError, match="object"):
        flatten_state({"obj": np.array([{}], dtype=object)})


# --- checkpoint directories ------------------------------------------------------------------------


def _save(root: Path, step: int, keep: int = 3) -> Path:
    model, opt = make_model(step)
    train(model, opt, np.random.default_rng(step), 1)
    parts = {"agent": model.state_dict(), "optimizer": opt.state_dict(), "retnorm": {"low": torch.tensor(-1.0)}}
    meta = {
        "step": step,
        "config": {"lr": 1e-2, "name": "test"},
        "np_rng": np.random.default_rng(step).bit_generator.state,
    }
    return save_checkpoint(root, step, parts, meta, keep=keep)


def test_checkpoint_save_latest_load(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    model, opt = make_model(0)
    train(model, opt, np.random.default_rng(0), 2)
    meta = {"env_steps": 1000, "rng": np.random.default_rng(1).bit_generator.state, "loss": float("nan")}
    parts = {"agent": model.state_dict(), "optimizer": opt.state_dict()}
    path = save_checkpoint(tmp_path, 1000, parts, meta)
    assert path.name == "ckpt-000001000" and checkpoint_step(path) == 1000
    assert sorted(p.name for p in path.iterdir()) == ["agent.safetensors", "meta.json", "optimizer.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dir left behind
    assert latest_checkpoint(tmp_path) == path
    header = json.loads((path / "meta.json").read_text())
    assert header["parts"] == ["agent", "optimizer"] and header["version"] == 1 and header["created"] > 0
    loaded, loaded_meta = load_checkpoint(path)
    assert_same(loaded_meta, meta)
    assert_same(loaded["optimizer"], opt.state_dict())
    assert_same(dict(loaded["agent"]), dict(model.state_dict()))
    fresh, _ = make_model(9)
    fresh.load_state_dict(loaded["agent"])


def test_crashed_saves_are_ignored(tmp_path: Path) -> None:
    good = _save(tmp_path, 100)
    crashed = tmp_path / ".tmp-ckpt-000000200-abc"  # what a save killed before its rename leaves
    crashed.mkdir()
    (crashed / "agent.safetensors").write_bytes(b"partial")
    no_meta = tmp_path / "ckpt-000000300"  # a directory without meta.json
    no_meta.mkdir()
    (no_meta / "agent.safetensors").write_bytes((good / "agent.safetensors").read_bytes())
    with pytest.warns(CheckpointWarning, match="ckpt-000000300"):
        assert latest_checkpoint(tmp_path) == good
    assert crashed not in list_checkpoints(tmp_path)


def test_keep_prunes_oldest(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40, 50):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000040", "ckpt-000000050"]
    _save(tmp_path, 5, keep=2)  # a lower step (resumed from elsewhere) is never pruned on its own save
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [5, 50]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000005", "ckpt-000000050"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_corrupt_newest_falls_back(tmp_path: Path, damage: str) -> None:
    older = _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    file = newest / ("meta.json" if damage == "meta" else "agent.safetensors")
    data = bytearray(file.read_bytes())
    if damage == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, valid header: only the checksum can tell
        data[-3] ^= 0xFF
        file.write_bytes(bytes(data))
    else:
        file.write_bytes(data[:-10])
    if damage == "flip":
        assert latest_checkpoint(tmp_path) == newest
        with pytest.raises(CheckpointError, match="agent.safetensors.*checksum"):
            load_checkpoint(newest)
        return
    with pytest.warns(CheckpointWarning, match="ckpt-000000002"):
        assert latest_checkpoint(tmp_path) == older
    with pytest.raises(CheckpointError, match=str(file.name)):
        load_checkpoint(newest)


@pytest.mark.parametrize("damage", ["tensor data", "meta digit"])
def test_load_latest_falls_back_past_flipped_bytes(tmp_path: Path, damage: str) -> None:
    """Same size, still parseable: the tensor checksums, and the header's own digest, must tell."""
    older = _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    if damage == "tensor data":
        file = newest / "agent.safetensors"
        data = bytearray(file.read_bytes())
        data[-3] ^= 0xFF
        file.write_bytes(bytes(data))
    else:  # a digit of the metadata changes: valid JSON, wrong state
        file = newest / "meta.json"
        text = file.read_text()
        assert '"step": 2' in text
        file.write_text(text.replace('"step": 2', '"step": 7'))
    with pytest.warns(CheckpointWarning, match=rf"ckpt-000000002.*{file.name}"):
        found = load_latest_checkpoint(tmp_path)
    assert found is not None
    path, parts, meta = found
    assert path == older and meta["step"] == 1
    assert_same(parts, load_checkpoint(older)[0])
    with pytest.raises(CheckpointError, match=file.name):
        load_checkpoint(newest)
    assert load_latest_checkpoint(tmp_path / "none") is None


def test_save_replaces_same_step(tmp_path: Path) -> None:
    _save(tmp_path, 7)
    path = save_checkpoint(tmp_path, 7, {"agent": {"w": torch.full((2,), 3.0)}}, {"again": True})
    parts, meta = load_checkpoint(path)
    assert meta == {"again": True} and torch.equal(parts["agent"]["w"], torch.full((2,), 3.0))
    assert len(list(tmp_path.iterdir())) == 1


# --- policy weights blob -------------------------------------------------------------------------------


def test_weights_file_and_bytes(tmp_path: Path) -> None:
    model, _ = make_model(0)
    meta = {"task": "arm_reach", "obs_keys": ("image", "joints"), "step": 12_345, "stats": {"mean": np.zeros(3)}}
    blob = weights_to_bytes(model.state_dict(), meta)
    weights, got = weights_from_bytes(blob)
    assert_same(got, meta)
    assert_same(dict(sorted(weights.items())), dict(sorted(model.state_dict().items())))
    header = json.loads(blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]])
    assert header["__metadata__"]["format"] == "reverie-weights"  # plain str->str, readable by any tool

    path = save_weights(tmp_path / "policy.safetensors", model.state_dict(), meta)
    weights, got = load_weights(path)
    assert_same(got, meta)
    fresh, _ = make_model(3)
    fresh.load_state_dict(weights)
    assert [p.name for p in tmp_path.iterdir()] == ["policy.safetensors"]

    with pytest.raises(CheckpointError, match="weights blob"):
        weights_from_bytes(blob[:100])
    (tmp_path / "bad.safetensors").write_bytes(b"not weights")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_weights(tmp_path / "bad.safetensors")
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(1)}, plain)
    with pytest.raises(CheckpointError, match="not a reverie-weights"):
        load_weights(plain)


# --- metrics -----------------------------------------------------------------------------------------------


def test_metrics_jsonl_and_tensorboard(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as log:
        log.log(1, {"train/return": 1.5, "wm/loss": torch.tensor(0.25)})
        log.log(2, {"train/return": float("nan"), "wm/loss": float("inf"), "n": np.int64(3)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)  # strict JSON, one row per line
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["step"] == 1 and rows[0]["train/return"] == 1.5 and rows[0]["wm/loss"] == 0.25
    assert math.isnan(rows[1]["train/return"]) and rows[1]["wm/loss"] == math.inf and rows[1]["n"] == 3.0
    assert rows[1]["time"] >= rows[0]["time"] > 0
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    with pytest.raises(ValueError, match="reserved"), MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(3, {"step": 1.0})


def test_metrics_survive_a_killed_run(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(3):
            log.log(step, {"x": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "x": 3.')  # killed mid-row
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a truncated *last* line is expected after a kill: no warning
        assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    with MetricsLogger(tmp_path, tensorboard=False) as log:  # the resumed run appends
        log.log(3, {"x": 3.0})
    with pytest.warns(UserWarning, match="metrics.jsonl:4"):
        rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]


def test_mean_aggregates_tensors_and_floats() -> None:
    mean = Mean()
    for v in (1.0, 2.0, 6.0):
        mean.add({"loss": torch.tensor(v), "acc": v / 2, "vec": torch.tensor([v, v + 2.0])})
    assert mean.result() == {"loss": 3.0, "acc": 1.5, "vec": 4.0}
    assert mean.result() == {} and len(mean) == 0
    mean.add({"mixed": torch.tensor(1.0)})
    mean.add({"mixed": 3})
    assert mean.result() == {"mixed": 2.0}


# --- plots ---------------------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_learning_curve_png(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(0, 2000, 10):
            row = {"train/return": math.sin(step / 200) + step / 1000, "wm/loss": 1.0 / (1 + step)}
            if step % 200 == 0:
                row["eval/return"] = step / 1000
            log.log(step, row)
    out = plot_learning_curve(tmp_path / "metrics.jsonl", tmp_path / "plots" / "curve.png", baseline={"random": -0.3})
    w, h = _png_size(out)
    assert 400 <= w <= 2000 and 300 <= h <= 1500
    assert os.path.getsize(out) > 10_000  # actually drew something
    assert sorted(p.name for p in out.parent.iterdir()) == ["curve.png"]  # no temp file left
    image = iio.imread(out)
    assert image.shape[:2] == (h, w)
    rows = read_metrics(tmp_path)
    plot_learning_curve(rows, tmp_path / "smooth.png", keys=("train/return", "missing/key"), smooth=10)
    loss = plot_losses(rows, tmp_path / "loss.png")
    assert _png_size(loss) == (w, h)
    empty = plot_learning_curve([], tmp_path / "empty.png")
    assert _png_size(empty) == (w, h)


# --- video ---------------------------------------------------------------------------------------------


def test_openloop_grid() -> None:
    rng = np.random.default_rng(0)
    b, t, h, w, context = 3, 6, 16, 12, 2
    truth = rng.integers(0, 256, (b, t, h, w, 3), dtype=np.uint8)
    pred = truth.copy()
    pred[1, 4] = 0  # sequence 1 goes wrong at t = 4
    grid = openloop_grid(truth, pred, context)
    assert grid.shape == (t, 3 * h, b * w, 3) and grid.dtype == np.uint8
    error = grid[:, 2 * h :]
    assert np.array_equal(grid[:, :h], truth.transpose(1, 2, 0, 3, 4).reshape(t, h, b * w, 3))
    assert not error[:, :, :w].any() and not error[:, :, 2 * w :].any()  # exact predictions: zero error
    assert not error[:4, :, w : 2 * w].any() and error[4, :, w : 2 * w].any()
    bar = grid[:, h, :, :]  # top line of the prediction row marks context vs imagination
    assert (bar[:context] == (40, 200, 40)).all() and (bar[context:] == (230, 30, 30)).all()
    with pytest.raises(ValueError):
        openloop_grid(truth, pred[:, :-1], context)
    with pytest.raises(ValueError):
        openloop_grid(truth, pred, t + 1)


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_write_video_readable(tmp_path: Path, suffix: str) -> None:
    truth = np.random.default_rng(1).integers(0, 256, (2, 5, 16, 16, 3), dtype=np.uint8)
    frames = openloop_grid(truth, truth[:, ::-1].copy(), context=2)
    path = write_video(tmp_path / f"openloop{suffix}", frames, fps=10)
    video = iio.imread(path)
    assert video.shape[0] == 5 and video.shape[1:3] == frames.shape[1:3]
    ramp = np.linspace(0, 1, 3)[:, None, None, None] * np.ones((3, 3, 7, 9))  # distinct frames: GIF merges repeats
    odd = write_video(tmp_path / f"odd{suffix}", list(episode_frames(ramp, scale=3)), fps=5)
    assert iio.imread(odd).shape[0] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, odd.name])


def test_episode_frames_layouts() -> None:
    first = episode_frames(np.ones((2, 3, 4, 5), np.float32), scale=2)  # channel-first float
    assert first.shape == (2, 8, 10, 3) and first.dtype == np.uint8 and (first == 255).all()
    grey = episode_frames(np.zeros((2, 4, 5, 1), np.uint8))
    assert grey.shape == (2, 4, 5, 3)
