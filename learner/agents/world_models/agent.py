"""The World Models agent: the paper's stages on the agent interface that `reverie-learner train` drives.

The run loop acts and calls `train(batch)` at the train ratio; each call does one unit of the current
stage, so the stages follow one another in updates:

    collect: train.prefill random steps, then the policy's own random policy (smooth by default) until C
             has been evolved: every frame V and M see in the first iteration comes from random rollouts
    V:       `vae_updates` VAE updates on `vae_batch` frames of the replayed batch
    M:       `mdn_updates` MDN-RNN updates on the batch's sequences, encoded by the now frozen V (the
             reference's "encode" stage, done per batch: z is drawn from V's posterior each time)
    C:       `generations` CMA-ES generations, each rolling out the whole population in M at once (or in
             the real environment with `evolve_in: real`); C acts with the search mean from then on

and `iterations` > 1 repeats V, M and C on everything collected so far, now also by C (the iterative loop).
Everything (stage position, V, M, both optimisers, CMA-ES, the generator) is checkpoint state, so a
stopped run resumes inside any stage. Metrics are prefixed by stage: v/, m/, c/.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from core.agents.spaces import ActSpace, ObsSpace
from core.agents.world_models import controller
from core.agents.world_models.policy import Controller, Policy, image_problem, policy_weights
from core.agents.world_models.vision import frames
from core.config import Config, ConfigError
from core.config.world_models import WorldModelsConfig
from core.layout import StepLayout
from learner.agents.dreamer.agent import resolve_device
from learner.agents.world_models.dream import dream
from learner.agents.world_models.evolution import Evolution
from learner.agents.world_models.mdn_rnn import MDNRNN, mdn_sample, sequence_loss
from learner.agents.world_models.vae import VAE, vae_loss

log = logging.getLogger(__name__)
STAGES = ("vae", "mdn", "evolve")
VIDEO_SEED = 12345  # dream videos draw their own noise: writing one does not shift training


class WorldModels:
    """V, M and C with their staged training (`core.agents.Agent`)."""

    def __init__(self, cfg: WorldModelsConfig, space: ObsSpace, act: ActSpace, run: Config | None = None,
                 device: torch.device | None = None) -> None:
        if why := image_problem(cfg, space):
            raise ConfigError([why], "world_models")
        self.cfg, self.space, self.act_space, self.run = cfg, StepLayout.of(space), act, run
        self.seed = run.seed if run is not None else 0
        self.device = device or resolve_device(cfg.device)
        self.vae = VAE(cfg.z, cfg.vae_depth).to(self.device)
        self.mdn = MDNRNN(cfg.z, act.dim, cfg.lstm, cfg.mixtures).to(self.device)
        self.controller = Controller(cfg.z, cfg.lstm, act).to(self.device)
        self.net = nn.Module()  # the acting view, named as the policy blob's tensors
        self.net.encoder, self.net.memory, self.net.controller = self.vae.encoder, self.mdn.memory, self.controller
        self.vae_opt = torch.optim.Adam(self.vae.parameters(), lr=cfg.vae_lr)
        self.mdn_opt = torch.optim.Adam(self.mdn.parameters(), lr=cfg.mdn_lr)
        self.evolution: Evolution | None = None
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self.updates = 0  # train() calls that did a unit of a stage
        self.skipped = 0
        self._bar: tqdm | None = None
        self._real_env: Any = None

    # --- the agent interface
    @classmethod
    def from_config(cls, cfg: Config, space: ObsSpace, act: ActSpace) -> WorldModels:
        return cls(cfg.world_models, space, act, run=cfg)

    @classmethod
    def parameter_count(cls, cfg: Config, space: ObsSpace, act: ActSpace) -> int:
        wm = cfg.world_models
        if why := image_problem(wm, space):
            raise ConfigError([why], "world_models")
        with torch.device("meta"):
            modules = [VAE(wm.z, wm.vae_depth), MDNRNN(wm.z, act.dim, wm.lstm, wm.mixtures)]
        return (sum(p.numel() for m in modules for p in m.parameters())
                + controller.parameter_count(wm.z, wm.lstm, act.dim))

    @property
    def replay_context(self) -> bool:
        return False

    @property
    def image_keys(self) -> tuple[str, ...]:
        return (self.cfg.image_key,)

    def policy(self) -> Policy:
        return Policy.from_modules(self.cfg, self.space, self.act_space, self.net)

    def policy_weights(self) -> tuple[dict[str, Tensor], dict]:
        return policy_weights(self.net, self.cfg, self.space, self.act_space, self.updates)

    def openloop(self, batch: Mapping[str, Any], context: int) -> tuple[np.ndarray, np.ndarray]:
        return dream_video(self, batch, context)

    # --- where the pipeline stands
    def stage(self) -> tuple[int, str, int]:
        """(iteration, stage, unit within the stage) of the next train() call; stage "done" at the end."""
        cfg = self.cfg
        lengths = (cfg.vae_updates, cfg.mdn_updates, cfg.generations)
        per = sum(lengths)
        if per == 0 or self.updates >= cfg.iterations * per:
            return cfg.iterations, "done", 0
        iteration, unit = divmod(self.updates, per)
        for name, length in zip(STAGES, lengths):
            if unit < length:
                return iteration, name, unit
            unit -= length
        raise AssertionError("unreachable")

    # --- one update
    def train(self, batch: Mapping[str, Any]) -> tuple[dict[str, float | Tensor], None]:
        """One unit of the current stage on a replayed batch (B, T, ...). Returns its metrics; there is no
        replay context to write back."""
        iteration, stage, unit = self.stage()
        if stage == "done":
            return {}, None
        if stage == "vae":
            metrics = self._train_vae(batch)
        elif stage == "mdn":
            metrics = self._train_mdn(batch)
        else:
            metrics = self._evolve(batch, iteration, unit)
        if metrics is None:
            self.skipped += 1
            return {"skipped_nonfinite": 1.0}, None
        self.updates += 1
        self._progress(iteration, stage, unit)
        return {**metrics, "wm/iteration": float(iteration), "wm/stage": float(STAGES.index(stage))}, None

    def _progress(self, iteration: int, stage: str, unit: int) -> None:
        """A bar per stage (shown on a terminal only), under the run's own bar."""
        length = {"vae": self.cfg.vae_updates, "mdn": self.cfg.mdn_updates, "evolve": self.cfg.generations}[stage]
        if unit == 0 or self._bar is None:
            if self._bar is not None:
                self._bar.close()
            names = {"vae": "V", "mdn": "M", "evolve": "C (CMA-ES generations)"}
            self._bar = tqdm(total=length, initial=unit, position=1, leave=False, disable=None, dynamic_ncols=True,
                             desc=f"world models, iteration {iteration + 1}/{self.cfg.iterations}: {names[stage]}")
        self._bar.update(1)
        if unit + 1 == length:
            self._bar.close()
            self._bar = None

    def _frames(self, batch: Mapping[str, Any]) -> Tensor:
        return frames(batch[self.cfg.image_key], self.device)  # (B, T, 3, 64, 64)

    def _train_vae(self, batch: Mapping[str, Any]) -> dict[str, Tensor] | None:
        images = np.asarray(batch[self.cfg.image_key])
        flat = images.reshape(-1, *images.shape[-3:])
        pick = torch.randint(len(flat), (min(self.cfg.vae_batch, len(flat)),), generator=self.generator,
                             device=self.device).cpu().numpy()
        x = frames(flat[np.sort(pick)], self.device)
        self.vae.train()
        recon, mean, logvar = self.vae(x, self.generator)
        loss, metrics = vae_loss(x, recon, mean, logvar, self.cfg.kl_tolerance)
        return self._step(loss, self.vae_opt, self.vae, None, metrics)

    @torch.no_grad()
    def encode(self, batch: Mapping[str, Any], sample: bool = True) -> Tensor:
        """z of every frame of a batch (B, T, z), drawn from V's posterior (or its mean)."""
        x = self._frames(batch)
        mean, logvar = self.vae.encoder(x.flatten(0, 1))
        if sample:
            mean = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=self.generator,
                                                                device=self.device)
        return mean.reshape(*x.shape[:2], -1)

    def _sequences(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        as_float = lambda key: torch.as_tensor(np.asarray(batch[key]), device=self.device).float()  # noqa: E731
        return {key: as_float(key) for key in ("action", "reward", "is_terminal", "is_first")}

    def _train_mdn(self, batch: Mapping[str, Any]) -> dict[str, Tensor] | None:
        z = self.encode(batch)
        seq = self._sequences(batch)
        self.mdn.train()
        loss, metrics = sequence_loss(self.mdn, z, seq["action"], seq["reward"], seq["is_terminal"],
                                      seq["is_first"], self.cfg.reward_scale, self.cfg.done_scale)
        return self._step(loss, self.mdn_opt, self.mdn, self.cfg.mdn_clip, metrics)

    def _step(self, loss: Tensor, opt: torch.optim.Optimizer, module: nn.Module, clip: float | None,
              metrics: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Apply the update unless the loss or a gradient is non-finite (then nothing changes; None)."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not bool(torch.isfinite(loss)) or not all(bool(torch.isfinite(g).all()) for g in grads):
            opt.zero_grad(set_to_none=True)
            log.warning("world_models: update %d skipped: non-finite loss or gradient (%s)", self.updates + 1,
                        ", ".join(f"{k} {float(v):.3g}" for k, v in metrics.items()))
            return None
        if clip is not None:
            nn.utils.clip_grad_value_(module.parameters(), clip)
        opt.step()
        return {k: v.detach() for k, v in metrics.items()}

    # --- C
    def _evolve(self, batch: Mapping[str, Any], iteration: int, unit: int) -> dict[str, float]:
        cfg = self.cfg
        if unit == 0 or self.evolution is None:
            start = self.controller.params.double().cpu().numpy() if iteration > 0 else None
            self.evolution = Evolution(self.controller.params.numel(), cfg.sigma0, cfg.population,
                                       seed=self.seed + iteration, x0=start)
        solutions = self.evolution.ask()
        if cfg.evolve_in == "dream":
            fitness, length = self._dream_fitness(batch, solutions)
        else:
            fitness, length = self._real_fitness(solutions)
        self.evolution.tell(fitness)
        with torch.no_grad():
            self.controller.params.copy_(torch.as_tensor(self.evolution.mean, dtype=torch.float32))
            self.controller.evolved.fill_(1)
        return {"c/fitness_mean": float(np.mean(fitness)), "c/fitness_max": float(np.max(fitness)),
                "c/fitness_min": float(np.min(fitness)), "c/sigma": self.evolution.sigma,
                "c/generation": float(self.evolution.generation), "c/episode_length": length}

    @torch.no_grad()
    def dream_starts(self, batch: Mapping[str, Any], count: int, first: bool) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """`count` real start states (z, (h, c)) drawn from a replayed batch: episode starts when `first` and
        the batch has any, else any step with M's state there."""
        z = self.encode(batch)
        seq = self._sequences(batch)
        (h, c), _ = self.mdn.observe(z, seq["action"], seq["is_first"])
        flat_first = seq["is_first"].flatten() > 0
        pool = torch.nonzero(flat_first)[:, 0] if first and bool(flat_first.any()) else torch.arange(
            flat_first.numel(), device=self.device)
        pick = pool[torch.randint(len(pool), (count,), generator=self.generator, device=self.device)]
        return z.flatten(0, 1)[pick], (h.flatten(0, 1)[pick], c.flatten(0, 1)[pick])

    def _dream_fitness(self, batch: Mapping[str, Any], solutions: np.ndarray) -> tuple[np.ndarray, float]:
        cfg = self.cfg
        self.mdn.eval()
        z0, state0 = self.dream_starts(batch, cfg.rollouts, cfg.dream_start == "first")
        params = torch.as_tensor(solutions, dtype=torch.float32, device=self.device)
        out = dream(self.mdn, params, z0, state0, cfg.dream_horizon, cfg.temperature, self.act_space.discrete,
                    self.generator)
        return out.returns.mean(1).double().cpu().numpy(), float(out.lengths.mean())

    def _real_fitness(self, solutions: np.ndarray) -> tuple[np.ndarray, float]:
        """Each candidate's mean return over `rollouts` episodes of the config's environment, one at a time."""
        from learner.envs import Env  # the environment of the run's config (gym or a simulated task)

        if self.run is None:
            raise RuntimeError("world_models.evolve_in real needs the run's config to build its environment")
        if self._real_env is None:
            self._real_env = Env(self.run, seed=self.seed + 2_000_000)
        env, fitness, lengths = self._real_env, [], []
        for candidate in solutions:
            view = nn.Module()
            view.encoder, view.memory = self.vae.encoder, self.mdn.memory
            view.controller = Controller(self.cfg.z, self.cfg.lstm, self.act_space).to(self.device)
            view.controller.params.copy_(torch.as_tensor(candidate, dtype=torch.float32))
            view.controller.evolved.fill_(1)
            policy = Policy.from_modules(self.cfg, self.space, self.act_space, view)
            returns = []
            for _ in range(self.cfg.rollouts):
                total, steps = episode(env, policy)
                returns.append(total)
                lengths.append(steps)
            fitness.append(np.mean(returns))
        return np.asarray(fitness), float(np.mean(lengths))

    # --- safety and state
    def refuse_nonfinite(self, refused: str) -> bool:
        bad = [name for module in ("vae", "mdn", "controller")
               for name, value in getattr(self, module).state_dict().items()
               if value.is_floating_point() and not bool(torch.isfinite(value).all())]
        if bad:
            log.error("%s: the model holds NaN or inf in %s after %d updates; the previous ones are kept",
                      refused, ", ".join(bad[:3]), self.updates)
        return bool(bad)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates,
                "vae": self.vae.state_dict(), "mdn": self.mdn.state_dict(), "controller": self.controller.state_dict(),
                "vae_opt": self.vae_opt.state_dict(), "mdn_opt": self.mdn_opt.state_dict(),
                "evolution": {"state": None if self.evolution is None else self.evolution.state()},
                "generator": {"state": self.generator.get_state()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.vae.load_state_dict(state["vae"])
        self.mdn.load_state_dict(state["mdn"])
        self.controller.load_state_dict(state["controller"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.mdn_opt.load_state_dict(state["mdn_opt"])
        evo = state["evolution"]["state"]
        self.evolution = None if evo is None else Evolution.from_state(evo)
        self.generator.set_state(state["generator"]["state"])
        self.updates = int(state["updates"])


def episode(env: Any, policy: Policy, mode: str = "mode") -> tuple[float, int]:
    """One episode of `env` (a `learner.envs.Env`) acting with `policy`: its return and length."""
    obs, total, steps = env.reset(), 0.0, 0
    policy.reset()
    while True:
        policy.act(obs, mode=mode)
        total += float(obs["reward"])
        if obs["is_last"]:
            return total, steps
        obs = env.step(policy.last_action[0])
        steps += 1


@torch.no_grad()
def dream_video(agent: WorldModels, batch: Mapping[str, Any], context: int) -> tuple[np.ndarray, np.ndarray]:
    """(truth, prediction) uint8 (B, T, 64, 64, 3): V's reconstruction for the first `context` frames, then M's
    own predictions at the configured temperature, fed the recorded actions, decoded by V. A new episode
    inside the sequence cannot be predicted: there the truth's z restarts the dream."""
    cfg, mdn = agent.cfg, agent.mdn
    x = agent._frames(batch)
    b, t = x.shape[:2]
    mean, _ = agent.vae.encoder(x.flatten(0, 1))
    truth_z = mean.reshape(b, t, -1)
    seq = agent._sequences(batch)
    generator = torch.Generator(device=agent.device).manual_seed(VIDEO_SEED)
    state = mdn.memory.initial(b, agent.device)
    z, zs = truth_z[:, 0], []
    for i in range(t):
        restart = (seq["is_first"][:, i] > 0) | torch.tensor(i < context, device=agent.device)
        z = torch.where(restart[:, None], truth_z[:, i], z)
        keep = (1.0 - seq["is_first"][:, i])[:, None]
        state = (state[0] * keep, state[1] * keep)
        zs.append(z)
        state = mdn.memory(z, seq["action"][:, i], state)
        mix, _, _ = mdn.heads(state[0])
        z = mdn_sample(mix, cfg.temperature, torch.rand(z.shape, generator=generator, device=agent.device),
                       torch.randn(z.shape, generator=generator, device=agent.device))
    pred = agent.vae.decoder(torch.stack(zs, 1).flatten(0, 1)).reshape(b, t, 3, 64, 64)
    to_uint8 = lambda v: (v.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()  # noqa: E731
    return to_uint8(x), to_uint8(pred)
