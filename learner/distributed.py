"""Data-parallel training on `torch.distributed`: the ranks of a job, the gradient average, and what an
update shares across ranks so that N ranks with batch B/N each make the very update one process makes
with batch B.

Each rank holds a full copy of the agent and trains on its slice of the global batch. Gradients are
averaged by `DistributedDataParallel` during the backward pass, before the optimiser: LaProp's adaptive
clipping and the 2023 recipe's global-norm clipping act on the averaged gradient, as they would on the
whole batch. Dreamer's update is one loss and one backward pass, so DDP wraps it as is: the module DDP
holds owns every trainable parameter and its `forward` is the agent's update (`_Update`).

Two parts of the update are not a mean over the batch and are made global here:
- the return normaliser's percentiles: the lambda-returns of every rank are gathered first
  (`GlobalReturnNorm`);
- the sampling noise (posterior latents, imagined actions): every rank draws the noise of the whole global
  batch from a generator seeded alike on all ranks and keeps its own rows (`GlobalBatchNoise`), so no two
  ranks share noise and the update does not depend on the number of ranks.

Bytes move between ranks as tensors described by JSON (`pack`/`unpack`), never pickled. A collective that
fails (a rank died, or stopped answering for `timeout_s`) raises `RankLost`, naming what was being done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.overrides import TorchFunctionMode

from core.tensor_tree import flatten_state, unflatten_state
from learner.agents.dreamer.behavior import ReturnNorm

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets
DEFAULT_TIMEOUT_S = 300.0  # a collective waiting this long for a silent rank fails (a dead one fails at once)
ALIGN = 16  # byte alignment of each array in a packed buffer (any dtype can be viewed in place)


class DistributedError(RuntimeError):
    """The ranks of a job cannot be set up (environment, devices, batch size)."""


class RankLost(RuntimeError):
    """A collective failed: another rank exited or stopped answering. The message says what this rank was
    doing; the job stops (a data-parallel job cannot go on with a rank missing)."""


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the job: rank `rank` of `size`, on `device`."""

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: receives the robots' experience, holds the replay, logs, checkpoints, publishes weights."""
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started as a rank (torchrun or `serve --gpus N` set RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, low: int, high: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        raise DistributedError(f"environment variable {name} is not set (torchrun sets {', '.join(ENV_VARS)})")
    try:
        value = int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r}: expected an integer") from None
    if value < low or (high is not None and value > high):
        top = "" if high is None else high
        raise DistributedError(f"environment variable {name}={value}: expected {low}..{top}")
    return value


def init_world(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the job described by torchrun's environment variables: NCCL with one GPU per rank (LOCAL_RANK)
    when `device` (dreamer.device) is cuda or auto with CUDA present, else gloo on the CPU. `timeout_s`
    bounds every collective, so a rank that hangs stops the others instead of blocking them forever."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0, size - 1)
    local = _env_int("LOCAL_RANK", 0) if "LOCAL_RANK" in os.environ else rank
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise DistributedError(f"environment variable {name} is not set (torchrun sets {', '.join(ENV_VARS)})")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        count = torch.cuda.device_count()
        if local >= count:
            raise DistributedError(f"LOCAL_RANK={local} but torch sees {count} CUDA device(s) on this machine")
        torch.cuda.set_device(local)
        where = torch.device("cuda", local)
    else:
        where = torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=where if cuda else None)
    return World(rank, size, local, where)


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(world: World, what: str) -> Iterator[None]:
    """Turn a failed collective into `RankLost` naming this rank and what it was doing."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as exc:  # gloo and NCCL report a lost peer as these
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise RankLost(f"rank {world.rank} of {world.size}: another rank exited or stopped answering while "
                       f"{what} ({first}); stopping the job") from exc


def ranks_problem(cfg: Any, ranks: int, local: bool = False) -> str | None:
    """Why `cfg` cannot train on `ranks` ranks (None if it can): the global batch must split evenly and, for
    a launch on this machine (not `local`: one rank's own check), there must be a GPU per rank."""
    if ranks < 1:
        return f"{ranks} ranks: need at least 1"
    if cfg.agent != "dreamer":
        return f"data-parallel training supports agent: dreamer, not {cfg.agent!r}"
    if cfg.train.batch_size % ranks:
        return (f"train.batch_size={cfg.train.batch_size} does not split evenly over {ranks} ranks; use a "
                f"multiple of {ranks}")
    if not local and cfg.dreamer.device != "cpu" and torch.cuda.device_count() < ranks:
        return (f"torch sees {torch.cuda.device_count()} CUDA device(s); to run {ranks} ranks on the CPU "
                "(gloo; for tests) set dreamer.device=cpu")
    return None


# --- what an update shares across ranks


class GlobalBatchNoise(TorchFunctionMode):
    """Inside the update, `torch.rand`/`torch.randn` draw the noise of the global batch from `generator` and
    return this rank's part. The batch axis of a draw is its first axis of this rank's batch rows, B or B * T
    (`rows`, set per update): posterior uniforms come as (T, B, ...), imagination's as (B * T, ...). The
    global draw has N times as many rows there, and rank r keeps rows [r * n, (r + 1) * n), which are the
    rows of its sequences in the global batch: the ranks together draw exactly what one process draws for
    the whole batch. (Were T equal to B, a time axis would be cut instead: every rank still gets noise of its
    own, only not the single process's.) Drawing N times the noise is cheap beside the networks."""

    FUNCS = frozenset({torch.rand, torch.randn})

    def __init__(self, world: World, generator: torch.Generator) -> None:
        super().__init__()
        self.world, self.generator = world, generator
        self.rows: tuple[int, ...] = ()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func not in self.FUNCS:
            return func(*args, **kwargs)
        size = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)
        where = torch.device(kwargs.get("device") or "cpu")
        if kwargs.get("generator") is None and where.type == self.generator.device.type:
            kwargs["generator"] = self.generator
        if not size or self.world.size == 1:
            return func(size, **kwargs)
        axis = next((i for i, n in enumerate(size) if n in self.rows), 0)
        n, rank = size[axis], self.world.rank
        full = func((*size[:axis], n * self.world.size, *size[axis + 1:]), **kwargs)
        return full.narrow(axis, rank * n, n).contiguous()


class GlobalReturnNorm(ReturnNorm):
    """The return normaliser over the whole global batch: every rank's lambda-returns are gathered before
    the percentiles (a percentile of halves is not the percentile of the whole)."""

    def __init__(self, cfg: Any, world: World) -> None:
        super().__init__(cfg)
        self.world = world

    @torch.no_grad()
    def update(self, returns: Tensor) -> None:
        flat = returns.detach().float().flatten().contiguous()
        parts = [torch.empty_like(flat) for _ in range(self.world.size)]
        with collective(self.world, "gathering the lambda-returns"):
            dist.all_gather(parts, flat)
        super().update(torch.cat(parts))


class _Update(nn.Module):
    """What DDP wraps: every trainable weight of the agent, and the agent's update as `forward`. A loss that
    is non-finite on any rank is made non-finite on all, so every rank skips the same updates."""

    def __init__(self, agent: Any, world: World, noise: GlobalBatchNoise) -> None:
        super().__init__()
        self.model = agent.model
        self._update, self._world, self._noise = agent._update, world, noise

    def forward(self, data: dict[str, Tensor], start: dict[str, Tensor]) -> tuple[Tensor, Any, dict]:
        b, t = data["action"].shape[:2]
        self._noise.rows = (b, b * t)
        with self._noise:
            loss, post, metrics = self._update(data, start)
        ok = torch.isfinite(loss.detach()).float()
        with collective(self._world, "agreeing on the loss"):
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return loss + (1.0 / ok - 1.0), post, metrics  # + 0 everywhere, or + inf everywhere


def distribute(agent: Any, world: World, seed: int) -> None:
    """Make `agent` (a Dreamer) one rank of a data-parallel job. Call it on every rank after rank 0 has
    loaded any checkpoint: rank 0's full state (weights, optimiser, normaliser) is broadcast first, so the
    ranks start equal whatever each built, and stay equal since each applies the same averaged gradient."""
    if not hasattr(agent, "_update") or not hasattr(agent.behavior, "retnorm"):
        raise DistributedError(f"data-parallel training supports Dreamer's update; {type(agent).__name__} has none")
    beh = agent.behavior
    retnorm = GlobalReturnNorm(agent.cfg, world).to(agent.device)
    retnorm.load_state_dict(beh.retnorm.state_dict())
    beh.retnorm = retnorm
    sync_state(agent, world)
    generator = torch.Generator(device=world.device).manual_seed(seed)
    module = _Update(agent, world, GlobalBatchNoise(world, generator))
    ids = [world.device.index] if world.device.type == "cuda" else None
    with collective(world, "wrapping the model in DistributedDataParallel"):
        agent._update_fn = DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)


# --- moving state and batches between ranks (tensors described by JSON; nothing pickled)


def pack(arrays: Mapping[str, Any]) -> tuple[list[list[Any]], Tensor]:
    """Arrays (numpy or tensors) as one flat uint8 tensor, and its layout [[key, dtype, shape, offset]]."""
    layout, chunks, offset = [], [], 0
    for key, value in arrays.items():
        t = value.detach() if isinstance(value, Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        raw = t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        layout.append([key, str(t.dtype).removeprefix("torch."), list(t.shape), offset])
        pad = -raw.numel() % ALIGN
        chunks += [raw.to("cpu"), torch.zeros(pad, dtype=torch.uint8)]
        offset += raw.numel() + pad
    buf = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    return layout, buf


def unpack(layout: list[list[Any]], buf: Tensor) -> dict[str, Tensor]:
    """The arrays `pack` wrote, as views into `buf` (on its device)."""
    out = {}
    for key, dtype, shape, offset in layout:
        dt = getattr(torch, dtype)
        count = int(np.prod(shape)) * torch.empty((), dtype=dt).element_size()
        out[key] = buf[offset:offset + count].view(dt).reshape(shape)
    return out


def broadcast_json(world: World, value: Any = None, what: str = "receiving a message from rank 0") -> Any:
    """Rank 0's JSON-able `value` on every rank (others pass nothing)."""
    data = json.dumps(value).encode() if world.is_main else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=world.device)
    with collective(world, what):
        dist.broadcast(size, 0)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(world.device) if world.is_main
               else torch.empty(int(size.item()), dtype=torch.uint8, device=world.device))
        dist.broadcast(buf, 0)
    return value if world.is_main else json.loads(bytes(buf.cpu().numpy()))


def broadcast_arrays(world: World, arrays: Mapping[str, Any] | None = None,
                     what: str = "receiving arrays from rank 0") -> dict[str, Tensor]:
    """Rank 0's arrays on every rank (on this rank's device)."""
    layout, buf = pack(arrays or {}) if world.is_main else (None, None)
    layout = broadcast_json(world, layout, what)
    buf = buf.to(world.device) if buf is not None else torch.empty(_packed_size(layout), dtype=torch.uint8,
                                                                    device=world.device)
    with collective(world, what):
        dist.broadcast(buf, 0)
    return unpack(layout, buf)


def sync_state(agent: Any, world: World) -> None:
    """Every rank loads rank 0's `agent.state_dict()` (weights, optimiser state, update count)."""
    tensors, skeleton = flatten_state(agent.state_dict()) if world.is_main else ({}, None)
    skeleton = broadcast_json(world, skeleton, "receiving the agent's state from rank 0")
    tensors = broadcast_arrays(world, tensors, "receiving the agent's state from rank 0")
    if not world.is_main:
        agent.load_state_dict(unflatten_state({k: v.to(agent.device) for k, v in tensors.items()}, skeleton))


def scatter_batch(world: World, batch: Mapping[str, Any] | None) -> dict[str, Tensor]:
    """Rank 0's global batch (numpy, (B, T, ...)) split along B: each rank gets rows
    [rank * B/N, (rank + 1) * B/N) of every key, on its device."""
    if world.is_main:
        assert batch is not None
        slices = []
        for r in range(world.size):
            part = {}
            for key, value in batch.items():
                n = value.shape[0] // world.size
                part[key] = value[r * n:(r + 1) * n]
            slices.append(pack(part))
        layout = slices[0][0]
    else:
        slices, layout = [], None
    layout = broadcast_json(world, layout, "receiving the batch layout from rank 0")
    size = slices[0][1].numel() if slices else _packed_size(layout)
    out = torch.empty(size, dtype=torch.uint8, device=world.device)
    with collective(world, "receiving this rank's share of the batch"):
        dist.scatter(out, [buf.to(world.device) for _, buf in slices] if world.is_main else None, src=0)
    return unpack(layout, out)


def gather_context(world: World, context: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """Each rank's posterior latents (B/N, T, ...) joined along B on rank 0 (None elsewhere): rank 0's replay
    stores them as the context of later samples."""
    layout, buf = pack(context)
    buf = buf.to(world.device)
    parts = [torch.empty_like(buf) for _ in range(world.size)] if world.is_main else None
    with collective(world, "sending the replay context to rank 0"):
        dist.gather(buf, parts, dst=0)
    if not world.is_main:
        return None
    assert parts is not None
    pieces = [unpack(layout, p) for p in parts]
    return {key: torch.cat([p[key] for p in pieces]) for key in pieces[0]}


def _packed_size(layout: list[list[Any]]) -> int:
    if not layout:
        return 0
    key, dtype, shape, offset = layout[-1]
    count = int(np.prod(shape)) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return offset + count + (-count % ALIGN)
