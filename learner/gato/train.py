"""`reverie-learner gato train`: behaviour cloning of one Gato model on the expert episodes of several tasks.

A run directory holds `gato.json` (the resolved gato config and the task directories trained on),
`metrics.jsonl`, `checkpoints/` (the network, AdamW's state, the update count and the batch generator's
state: a stopped run resumes exactly where it was) and `policies/<task>.safetensors`, one policy blob per
task, written with every checkpoint. Running the same command again resumes.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.agents.gato.model import GatoNet, action_loss
from core.atomic import atomic_write_bytes
from core.config.gato import GatoConfig
from learner.checkpoint import load_latest_checkpoint, save_checkpoint
from learner.gato.episodes import TaskData
from learner.gato.evaluate import evaluate, export
from learner.gato.sampler import Sampler
from learner.metrics import MetricsLogger

RUN_FILE = "gato.json"
CHECKPOINTS, POLICIES = "checkpoints", "policies"


def device_of(cfg: GatoConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def learning_rate(cfg: GatoConfig, update: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to a tenth of it at `updates` (Gato's schedule)."""
    if update < cfg.warmup:
        return cfg.lr * (update + 1) / cfg.warmup
    progress = min(1.0, (update - cfg.warmup) / max(1, cfg.updates - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(net: GatoNet, cfg: GatoConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices and convolutions only."""
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and not n.startswith(
        ("token.", "patch_row.", "patch_col.", "local.", "position."))]
    rest = [p for p in net.parameters() if all(p is not q for q in decay)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


class GatoRun:
    """One training run over the given tasks, in `logdir` (resumed when it holds a checkpoint)."""

    def __init__(self, cfg: GatoConfig, tasks: list[TaskData], logdir: str | Path, progress: bool = True) -> None:
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"gato: two tasks of the same name among {names}")
        self.cfg, self.tasks, self.logdir, self.progress = cfg, tasks, Path(logdir), progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = device_of(cfg)
        torch.manual_seed(cfg.seed)
        self.net = GatoNet(cfg).to(self.device)
        self.optimizer = make_optimizer(self.net, cfg)
        self.rng = np.random.default_rng(cfg.seed)
        self.sampler = Sampler(tasks, cfg, self.rng)
        self.updates = 0
        self.stopped = ""
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._resume()

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def _resume(self) -> None:
        found = load_latest_checkpoint(self.logdir / CHECKPOINTS, self.device)
        if found is None:
            return
        _, parts, meta = found
        if meta.get("tasks") != [t.name for t in self.tasks]:
            raise ValueError(f"{self.logdir}: its checkpoint was trained on tasks {meta.get('tasks')}, not "
                             f"{[t.name for t in self.tasks]}; give the same task directories or a new --logdir")
        self.net.load_state_dict(parts["net"])
        self.optimizer.load_state_dict(parts["optimizer"])
        self.rng.bit_generator.state = json.loads(meta["rng"])
        self.updates = int(meta["updates"])

    def save(self) -> Path:
        meta = {"updates": self.updates, "tasks": [t.name for t in self.tasks],
                "rng": json.dumps(self.rng.bit_generator.state)}
        path = save_checkpoint(self.logdir / CHECKPOINTS, self.updates,
                               {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}, meta)
        (self.logdir / POLICIES).mkdir(exist_ok=True)
        for task in self.tasks:
            export(self.net, self.cfg, task, self.logdir / POLICIES / f"{task.name}.safetensors", self.updates)
        return path

    def update(self) -> dict[str, float]:
        """One AdamW step on a batch of every task's sequences: the action tokens' cross-entropy."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.updates)
        batch = self.sampler.batch(self.cfg.batch_size, self.device)
        logits, _ = self.net(batch)
        loss = action_loss(logits, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.updates += 1
        return {"loss": float(loss.detach()), "grad_norm": float(norm), "lr": self.optimizer.param_groups[0]["lr"],
                "tokens": float(batch.lengths.sum())}

    def run(self) -> dict[str, Any]:
        """Train to `updates` (checkpointing and exporting every `checkpoint_every`); SIGINT/SIGTERM stop at
        the next update with a checkpoint. Returns a summary."""
        cfg, start = self.cfg, time.time()
        write_run_file(self.logdir, cfg, self.tasks)
        rows: list[dict[str, float]] = []
        with MetricsLogger(self.logdir, tensorboard=False) as logger, self._stop_on_signals():
            while self.updates < cfg.updates and not self.stopped:
                rows.append(self.update())
                if self.updates % cfg.log_every == 0 or self.updates == cfg.updates:
                    row = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
                    logger.log(self.updates, row)
                    rows = []
                    if self.progress:
                        print(f"gato: update {self.updates}/{cfg.updates} loss {row['loss']:.4f}", flush=True)
                if self.updates % cfg.checkpoint_every == 0:
                    self.save()
        checkpoint = self.save()
        return {"updates": self.updates, "parameters": self.parameters, "seconds": time.time() - start,
                "checkpoint": str(checkpoint), "policies": str(self.logdir / POLICIES), "stopped": self.stopped}

    def evaluate(self, episodes: int | None = None, mode: str = "mode") -> list[dict[str, Any]]:
        return [evaluate(self.net, self.cfg, t, episodes or self.cfg.eval_episodes, mode) for t in self.tasks]

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        def handler(signum: int, _frame: object) -> None:
            self.stopped = signal.Signals(signum).name

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def write_run_file(logdir: Path, cfg: GatoConfig, tasks: list[TaskData]) -> None:
    data = {"gato": cfg.model_dump(mode="json"), "tasks": [t.name for t in tasks]}
    atomic_write_bytes(logdir / RUN_FILE, json.dumps(data, indent=1).encode(), prefix=".gato.")


def read_run_config(logdir: str | Path) -> GatoConfig | None:
    """The gato config a run directory was started with (None for a new one)."""
    path = Path(logdir) / RUN_FILE
    if not path.exists():
        return None
    try:
        return GatoConfig.model_validate(json.loads(path.read_text())["gato"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: unreadable run file ({exc})") from exc
