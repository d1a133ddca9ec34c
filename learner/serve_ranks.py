"""`reverie-learner serve` on several ranks (torchrun, or `serve --gpus N`): rank 0 is the server, the other
ranks only train.

Rank 0 runs everything `Server` does: the link to the robots, the replay, metrics, checkpoints, weights. It
samples the global batch (`train.batch_size` sequences) from its replay as one process would, and drives
the other ranks with a command per step of its loop, broadcast from rank 0:

    IDLE    nothing to train (sent at least every HEARTBEAT_S: a rank that dies is noticed at once, and
            a waiting rank never runs into the collective timeout)
    BUILD   the run's step layout follows as JSON: build the agent, then take rank 0's state
    UPDATE  the batch follows: train on this rank's share, send the posterior latents back
    STOP    the run is over: exit 0

Each rank trains on batch / N sequences; `learner.distributed` makes the N updates one. The replay lives
on rank 0 only (it is what the robots stream into; docs/scaling.md says why and what it costs).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core.config import Config
from learner.agents import make_agent
from learner.agents.dreamer.agent import _nonfinite_inputs
from learner.distributed import (
    RankLost,
    World,
    broadcast_json,
    collective,
    distribute,
    gather_context,
    scatter_batch,
)
from learner.link.server import RunSpec
from learner.serve import Server, spaces_of

IDLE, BUILD, UPDATE, STOP = range(4)
HEARTBEAT_S = 1.0


def send_command(world: World, command: int) -> int:
    """Rank 0's command on every rank (the others pass anything and get rank 0's)."""
    word = torch.tensor([command], dtype=torch.int64, device=world.device)
    with collective(world, "receiving the next command from rank 0" if world.rank else "sending a command"):
        dist.broadcast(word, 0)
    return int(word.item())


class Leader:
    """The agent as rank 0's `Run` sees it: `train` takes the global batch, has every rank train on its
    share and returns rank 0's metrics and the whole batch's latents; the rest is the agent's own."""

    def __init__(self, agent: Any, world: World) -> None:
        self.agent, self.world = agent, world

    def __getattr__(self, name: str) -> Any:
        return getattr(self.agent, name)

    def train(self, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if _nonfinite_inputs(batch):  # the agent skips it before any collective: the others need not know
            return self.agent.train(batch)
        send_command(self.world, UPDATE)
        metrics, context = self.agent.train(scatter_batch(self.world, batch))
        # A skipped update is skipped on every rank (the loss is agreed), with no latents anywhere.
        return metrics, (gather_context(self.world, context) or {}) if context else {}


class RankedServer(Server):
    """`Server` as rank 0 of a data-parallel job."""

    def __init__(self, cfg: Config, logdir: str | Path, world: World, bind: str | None = None,
                 progress: bool = True) -> None:
        super().__init__(cfg, logdir, bind=bind, progress=progress)
        self.world = world
        self.lost: RankLost | None = None
        self._last_command = time.monotonic()

    def _command(self, command: int) -> None:
        send_command(self.world, command)
        self._last_command = time.monotonic()

    def _idle(self) -> None:
        if time.monotonic() - self._last_command >= HEARTBEAT_S:
            self._command(IDLE)

    def _build(self, spec: RunSpec) -> None:
        super()._build(spec)  # the agent, and the checkpoint if there is one (whatever world size wrote it)
        self._command(BUILD)
        broadcast_json(self.world, spec.to_json(), "sending the step layout")
        distribute(self.agent, self.world, self.cfg.seed)
        self.agent = Leader(self.agent, self.world)

    def _maybe_train(self, received: int, batch_steps: int) -> bool:
        trained = super()._maybe_train(received, batch_steps)
        if trained:
            self._last_command = time.monotonic()
        else:
            self._idle()
        return trained

    def run(self, duration: float | None = None) -> dict[str, Any]:
        """As `Server.run`; when another rank is lost, rank 0 still writes its checkpoint and summary (every
        rank held the same weights), then raises the `RankLost`."""
        try:
            summary = super().run(duration)
        except RankLost as exc:
            self.lost = exc
            self.stop(f"lost a rank: {exc}")
            summary = self.finish(0.0)
        if self.lost is not None:
            raise self.lost
        return summary

    def finish(self, seconds: float) -> dict[str, Any]:
        summary = super().finish(seconds)
        if self.lost is None:
            try:
                self._command(STOP)
            except RankLost as exc:
                self.lost = exc
        return summary


def follow(cfg: Config, world: World) -> None:
    """What a rank other than 0 runs: rank 0's commands until STOP (a lost rank 0 raises `RankLost`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank; rank 0 stops the job in order
    torch.manual_seed(cfg.seed)
    agent = None
    while (command := send_command(world, IDLE)) != STOP:
        if command == BUILD:
            spec = RunSpec.from_json(broadcast_json(world))
            agent = make_agent(cfg, *spaces_of(spec))
            distribute(agent, world, cfg.seed)
        elif command == UPDATE:
            assert agent is not None, "rank 0 sent UPDATE before BUILD"
            _, context = agent.train(scatter_batch(world, None))
            if context:
                gather_context(world, context)
