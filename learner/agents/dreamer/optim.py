"""Optimisers of the two recipes.

2024 ("LaProp"): one optimiser for every parameter: adaptive gradient clipping per tensor, then
RMS scaling, then momentum, with a linear warm-up. 2023: Adam per part (world model, actor,
critic), each with its own learning rate, epsilon and global-norm clip.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from core.config.agent import DreamerConfig


class LaProp(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Tensor], lr: float, agc: float, pmin: float, beta1: float,
                 beta2: float, eps: float, warmup: int) -> None:
        defaults = dict(lr=lr, agc=agc, pmin=pmin, beta1=beta1, beta2=beta2, eps=eps, warmup=warmup)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if not self.state[p]:
                    self.state[p] = {"step": torch.zeros((), device=p.device), "m": torch.zeros_like(p),
                                     "v": torch.zeros_like(p)}
            states = [self.state[p] for p in params]
            # Adaptive gradient clipping: |g| <= agc * max(pmin, |p|), per tensor.
            pnorm = torch._foreach_norm(params)
            gnorm = torch._foreach_norm(grads)
            factors = [torch.clamp(group["agc"] * torch.clamp(pn, min=group["pmin"]) / (gn + 1e-12), max=1.0)
                       for pn, gn in zip(pnorm, gnorm)]
            grads = torch._foreach_mul(grads, factors)
            step = states[0]["step"] + 1
            for s in states:
                s["step"] = step
            b1, b2 = group["beta1"], group["beta2"]
            vs = [s["v"] for s in states]
            ms = [s["m"] for s in states]
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
            vhat = torch._foreach_div(vs, 1 - b2 ** step)
            denom = torch._foreach_add(torch._foreach_sqrt(vhat), group["eps"])
            updates = torch._foreach_div(grads, denom)
            torch._foreach_mul_(ms, b1)
            torch._foreach_add_(ms, updates, alpha=1 - b1)
            warm = torch.clamp(step / max(1, group["warmup"]), max=1.0) if group["warmup"] else 1.0
            lr = group["lr"] * warm / (1 - b1 ** step)
            torch._foreach_add_(params, torch._foreach_mul(ms, -lr))


class PartsAdam:
    """2023: one Adam per part; each part's gradients are clipped to a global norm first."""

    def __init__(self, parts: dict[str, tuple[list[nn.Parameter], float, float, float]]) -> None:
        self.parts = {name: (params, clip) for name, (params, lr, eps, clip) in parts.items()}
        self.optimizers = {name: torch.optim.Adam(params, lr=lr, eps=eps)
                           for name, (params, lr, eps, clip) in parts.items()}

    def step(self) -> dict[str, Tensor]:
        norms = {}
        for name, (params, clip) in self.parts.items():
            norms[name] = torch.nn.utils.clip_grad_norm_(params, clip)
            self.optimizers[name].step()
        return norms

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def make_optimizer(cfg: DreamerConfig, world_model: nn.Module, actor: nn.Module, critic: nn.Module):
    """LaProp over all parameters (2024) or per-part Adam (2023)."""
    if cfg.optimizer == "laprop":
        params = [*world_model.parameters(), *actor.parameters(), *critic.parameters()]
        return LaProp(params, cfg.lr, cfg.agc, cfg.agc_pmin, cfg.beta1, cfg.beta2, cfg.eps, cfg.warmup)
    return PartsAdam({
        "world_model": (list(world_model.parameters()), cfg.model_lr, cfg.model_eps, cfg.model_clip),
        "actor": (list(actor.parameters()), cfg.ac_lr, cfg.ac_eps, cfg.ac_clip),
        "critic": (list(critic.parameters()), cfg.critic_lr or cfg.ac_lr, cfg.ac_eps, cfg.ac_clip),
    })
