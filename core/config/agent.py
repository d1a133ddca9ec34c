"""Config blocks of the learning side: the Dreamer agent, the replay store and the training loop.

Every value of the DreamerV3 recipe is a field. `dreamer.recipe` and `dreamer.size` fill every field
the file leaves out, before validation, so a resolved config always shows the concrete values a run
used, and any single value can still be overridden. The recipes are DreamerV3's two versions (2024,
2023) and its ancestors Dreamer v1 (2020) and DreamerV2 (2021): one implementation, named variants
(docs/lineage.md). v1 and v2 bring their own dimensions unless the file names a `size`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from core.config.base import Block, FieldError
from core.config.transformer import TransformerConfig

# Official 2024 size presets (deter, hidden, classes, cnn depth, units); `tiny` is ours, for tests.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"deter": 64, "hidden": 32, "classes": 4, "stoch": 8, "cnn_depth": 4, "units": 32},
    "size1m": {"deter": 512, "hidden": 64, "classes": 4, "cnn_depth": 4, "units": 64},
    "size12m": {"deter": 2048, "hidden": 256, "classes": 16, "cnn_depth": 16, "units": 256},
    "size25m": {"deter": 3072, "hidden": 384, "classes": 24, "cnn_depth": 24, "units": 384},
    "size50m": {"deter": 4096, "hidden": 512, "classes": 32, "cnn_depth": 32, "units": 512},
    "size100m": {"deter": 6144, "hidden": 768, "classes": 48, "cnn_depth": 48, "units": 768},
    "size200m": {"deter": 8192, "hidden": 1024, "classes": 64, "cnn_depth": 64, "units": 1024},
}

# What DreamerV3's two versions share (the latents, heads, critic and optimiser settings).
_V3_SHARED: dict[str, Any] = {
    "latent": "categorical",
    "act": "silu",
    "free_nats_placement": "step",
    "actor_dist": "bounded",
    "actor_baseline": True,
    "return_norm": True,
    "slow_critic_every": 1,
    "slow_critic_rate": 0.02,
    "slow_critic_reg": 1.0,
    "unimix": 0.01,
    "free_nats": 1.0,
    "mlp_layers": 3, "head_layers": 1, "ac_layers": 3, "horizon": 333, "entropy": 3e-4, "cont_scale": 1.0,
    "model_lr": 1e-4, "model_eps": 1e-8, "model_clip": 1000.0, "ac_lr": 3e-5, "critic_lr": None,
    "ac_eps": 1e-5, "ac_clip": 100.0, "act_noise": 0.0,
}

# The two published recipes; see ../shared/reference/dreamer_recipe.md for where each value comes from.
RECIPES: dict[str, dict[str, Any]] = {
    "2024": {
        "norm": "rms",
        "gru_blocks": 8,
        "gru_input_layers": True,
        "encoder": "pool",
        "cnn_mults": [2, 3, 4, 4],
        "bins": "symexp",
        "kl_dyn": 1.0,
        "kl_rep": 0.1,
        "retnorm_debias": False,
        "critic_bootstrap": "fast",
        "actor_grad_continuous": "reinforce",
        "policy_out_scale": 0.01,
        "repval_scale": 0.3,
        "optimizer": "laprop",
        "replay_context": True,
        "init_fan": "in",
        "imag_cont": "prob",
        "gru_norm": "rms",
        **_V3_SHARED,
    },
    "2023": {
        "norm": "layer",
        "gru_blocks": 1,
        "gru_input_layers": False,
        "encoder": "stride",
        "cnn_mults": [1, 2, 4, 8],
        "bins": "symlog",
        "kl_dyn": 0.5,
        "kl_rep": 0.1,
        "retnorm_debias": False,
        "critic_bootstrap": "fast",
        "actor_grad_continuous": "dynamics",
        "policy_out_scale": 1.0,
        "repval_scale": 0.0,
        "optimizer": "adam",
        "replay_context": False,
        "init_fan": "avg",
        "imag_cont": "mode",
        "gru_norm": "layer",
        **_V3_SHARED,
    },
    # Dreamer v1 (danijar/dreamer): Gaussian latents, ELU MLPs without norms, KL with free nats after
    # averaging, per-part Adam, a tanh-normal actor trained by backprop through the dynamics on the
    # lambda-returns themselves (no baseline, no return normalisation), no slow critic, noise 0.3.
    "v1": {
        "norm": "none", "gru_norm": "none", "act": "elu", "gru_blocks": 1, "gru_input_layers": False,
        "encoder": "stride", "cnn_mults": [1, 2, 4, 8], "bins": "symlog", "init_fan": "avg",
        "latent": "gaussian", "unimix": 0.0,
        "kl_dyn": 0.5, "kl_rep": 0.5,  # together the plain KL(post || prior), gradients to both sides
        "free_nats": 3.0, "free_nats_placement": "mean",
        "retnorm_debias": False, "return_norm": False,
        "critic_bootstrap": "fast", "slow_critic_every": 1, "slow_critic_rate": 1.0, "slow_critic_reg": 0.0,
        "actor_grad_continuous": "dynamics", "actor_dist": "tanh_normal", "actor_baseline": False,
        "policy_out_scale": 1.0, "repval_scale": 0.0, "optimizer": "adam", "replay_context": False,
        "imag_cont": "mode",
        "mlp_layers": 2, "head_layers": 2, "ac_layers": 4,  # reward 2 x 400, actor 4 x 400 (value: 3 officially)
        "horizon": 100, "entropy": 0.0, "cont_scale": 10.0,  # gamma 0.99
        "model_lr": 6e-4, "model_eps": 1e-7, "model_clip": 100.0, "ac_lr": 8e-5, "critic_lr": None,
        "ac_eps": 1e-7, "ac_clip": 100.0, "act_noise": 0.3,  # TF's Adam epsilon
    },
    # DreamerV2 (danijar/dreamerv2): 32 x 32 categoricals (straight-through), KL balancing 0.8, ELU MLPs
    # without norms but a LayerNorm GRU, REINFORCE (discrete) / dynamics (continuous), a slow critic
    # copied every 100 updates that bootstraps the returns and is the REINFORCE baseline, Adam per part.
    # Values that differ by domain come from DOMAINS (`dreamer.domain`).
    "v2": {
        "norm": "none", "gru_norm": "layer", "act": "elu", "gru_blocks": 1, "gru_input_layers": False,
        "encoder": "stride", "cnn_mults": [1, 2, 4, 8], "bins": "symlog", "init_fan": "avg",
        "latent": "categorical", "unimix": 0.0,
        "kl_dyn": 0.8, "kl_rep": 0.2, "free_nats_placement": "mean",
        "retnorm_debias": False, "return_norm": False,
        "critic_bootstrap": "slow", "slow_critic_every": 100, "slow_critic_rate": 1.0, "slow_critic_reg": 0.0,
        "actor_grad_continuous": "dynamics", "actor_dist": "bounded", "actor_baseline": True,
        "policy_out_scale": 1.0, "repval_scale": 0.0, "optimizer": "adam", "replay_context": False,
        "imag_cont": "mode",
        "mlp_layers": 4, "head_layers": 4, "ac_layers": 4, "horizon": 100, "entropy": 1e-4, "cont_scale": 1.0,
        "free_nats": 1.0, "model_lr": 3e-4, "model_eps": 1e-5, "model_clip": 100.0, "ac_lr": 8e-5,
        "critic_lr": 8e-5, "ac_eps": 1e-5, "ac_clip": 100.0, "act_noise": 0.0,
    },
}

# Dimensions of v1 and v2 (their papers' DMC models), used unless the file names a `size`.
RECIPE_DIMS: dict[str, dict[str, int]] = {
    "v1": {"deter": 200, "hidden": 200, "stoch": 30, "classes": 2, "units": 400, "cnn_depth": 32},
    "v2": {"deter": 200, "hidden": 200, "stoch": 32, "classes": 32, "units": 400, "cnn_depth": 48},
}

# DreamerV2's per-domain values (`dreamer.domain`; configs.yaml dmc_vision/dmc_proprio and atari). The
# 0.8/0.2 balance is kept under atari's KL scale 0.1.
DOMAINS: dict[str, dict[str, Any]] = {
    "dmc": {},
    "atari": {"free_nats": 0.0, "entropy": 1e-3, "horizon": 1000, "model_lr": 2e-4, "ac_lr": 4e-5,
              "critic_lr": 1e-4, "kl_dyn": 0.08, "kl_rep": 0.02, "cont_scale": 5.0, "deter": 600, "hidden": 600},
}

# Optimiser settings for a step budget. The official values (lr 4e-5, 1000 warm-up updates) were
# chosen for runs of a million env steps; at 10k steps (~5k updates) the 2024 actor barely moves
# with them (bench/actor_updates.py measures it; bench/README.md has the curves). `small` is ours.
# The 2023 recipe's Adam rates learn at these budgets as they are, so its `small` changes nothing.
BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    "faithful": {"2024": {}, "2023": {}, "v1": {}, "v2": {}},
    "small": {"2024": {"lr": 3e-4, "warmup": 100}, "2023": {}, "v1": {}, "v2": {}},
}

SizeName = Literal["tiny", "size1m", "size12m", "size25m", "size50m", "size100m", "size200m"]


class DreamerConfig(Block):
    """Dreamer (v1, V2, V3). Fields left out of a file come from `recipe` and `size` (and v2's `domain`)."""

    recipe: Literal["2024", "2023", "v1", "v2"] = Field(
        "2024", description="which published recipe fills unset fields: 2024 / 2023 = DreamerV3's two versions; "
        "v1 = Dreamer (2020), v2 = DreamerV2 (2021), with their own dimensions unless `size` is set. v1 and v2 were "
        "published with batch 50 x 50 and 16 x 50: set train.batch_size / batch_length (docs/lineage.md)"
    )
    domain: Literal["dmc", "atari"] = Field(
        "dmc", description="v2 only: the per-domain values of DreamerV2 (dmc: free nats 1, entropy 1e-4, gamma "
        "0.99, Adam 3e-4 / 8e-5 / 8e-5; atari: free nats 0, entropy 1e-3, gamma 0.999, Adam 2e-4 / 4e-5 / 1e-4, "
        "KL scale 0.1, continuation scale 5, deter 600)"
    )
    size: SizeName = Field("size1m", description="model size preset that fills unset dimensions")
    budget: Literal["faithful", "small"] = Field(
        "faithful", description="optimiser preset: faithful = the official values (for ~1M-step runs); small = "
        "for runs of ~10k-100k env steps (2024: lr 3e-4, warm-up 100; 2023: as faithful)"
    )
    # --- dimensions (from `size`)
    deter: int = Field(ge=8, description="recurrent (deterministic) state size")
    hidden: int = Field(ge=8, description="hidden units inside the sequence model")
    stoch: int = Field(32, ge=1, description="number of latents: categoricals, or Gaussian dimensions")
    classes: int = Field(ge=2, description="classes per categorical latent")
    cnn_depth: int = Field(ge=1, description="CNN base channels (layer i has depth x cnn_mults[i] channels)")
    units: int = Field(ge=8, description="units of the MLPs (encoder, decoder, heads)")
    mlp_layers: int = Field(ge=1, description="layers of the vector encoder/decoder MLPs")
    head_layers: int = Field(ge=1, description="hidden layers of the reward and continuation heads")
    ac_layers: int = Field(ge=1, description="hidden layers of the actor and critic")
    # --- architecture (from `recipe`)
    norm: Literal["rms", "layer", "none"] = Field(
        description="normalisation layer after each Linear/Conv (always computed in float32); none = no norm (v1, v2)"
    )
    gru_norm: Literal["rms", "layer", "none"] = Field(
        description="normalisation inside the sequence model's GRU (v2: a LayerNorm GRU under norm-free MLPs)"
    )
    act: Literal["silu", "elu"] = Field(description="activation of the MLPs and the RSSM's layers (the CNNs keep SiLU)")
    latent: Literal["categorical", "gaussian"] = Field(
        description="RSSM latents: categorical = `stoch` one-hot categoricals of `classes`, straight-through "
        "gradients (v2, v3); gaussian = `stoch` Gaussians, std softplus + min_std, reparameterised (v1, PlaNet)"
    )
    min_std: float = Field(0.1, gt=0, description="latent: gaussian: floor of the latents' standard deviation")
    gru_blocks: int = Field(ge=1, description="blocks of the block-diagonal GRU (1 = a plain GRU)")
    gru_input_layers: bool = Field(description="deter, stoch and action each pass Linear+Norm+SiLU before the GRU")
    dynamics: Literal["rssm", "transformer"] = Field(
        "rssm", description="the world model's sequence model: rssm = the GRU's deterministic path; transformer = "
        "a causal transformer over one token per step (latent + action), its settings in `transformer` (STORM-like; "
        "posteriors from the observation alone; no dreamer.compile, no exploration)"
    )
    transformer: TransformerConfig = Field(
        default_factory=TransformerConfig, description="the transformer sequence model (dynamics: transformer)"
    )
    encoder: Literal["pool", "stride"] = Field(
        description="image encoder and decoder: pool = stride-1 5x5 conv + 2x2 max-pool, decoder from a block-linear "
        "spatial projection to a sigmoid (2024); stride = 4x4 stride-2 convs, unbounded decoder output (2023)"
    )
    init_fan: Literal["in", "avg"] = Field(
        description="weight init: truncated normal with std sqrt(1/fan), fan = fan_in (2024) or the mean of fan_in "
        "and fan_out (2023); biases 0"
    )
    cnn_mults: list[int] = Field(
        min_length=1, description="channel multipliers per CNN layer; each layer halves the resolution"
    )
    image_keys: str = Field("image", description="regex: observation keys encoded by the CNN (full match)")
    vector_keys: str = Field(".*", description="regex: other observation keys encoded by the symlog MLP (full match)")
    # --- distributions and losses
    unimix: float = Field(ge=0, lt=1, description="uniform mixture in latent and discrete-action categoricals")
    free_nats: float = Field(ge=0, description="free nats on the KL summed over latents (where: free_nats_placement)")
    free_nats_placement: Literal["step", "mean"] = Field(
        description="where the free nats apply: step = to each (batch, time) KL (DreamerV3 2023/2024; PlaNet "
        "applies them so too); mean = once, to the KL averaged over batch and time (Dreamer v1; DreamerV2's "
        "free_avg). Either way no gradient flows while the KL is below them"
    )
    kl_dyn: float = Field(ge=0, description="scale of KL(sg(post) || prior)")
    kl_rep: float = Field(ge=0, description="scale of KL(post || sg(prior))")
    bins: Literal["symexp", "symlog"] = Field(
        description="two-hot bin spacing: symexp (2024, weights in raw space) or even in symlog space (2023)"
    )
    num_bins: int = Field(255, ge=3, description="two-hot bins of the reward and critic heads")
    bin_limit: float = Field(20.0, gt=0, description="bins span symlog space [-limit, limit]")
    dec_scale: float = Field(1.0, ge=0, description="decoder loss scale")
    reward_scale: float = Field(1.0, ge=0, description="reward loss scale")
    cont_scale: float = Field(ge=0, description="continuation loss scale")
    actor_scale: float = Field(1.0, ge=0, description="actor loss scale")
    critic_scale: float = Field(1.0, ge=0, description="critic loss scale")
    repval_scale: float = Field(ge=0, description="critic loss on replay sequences (reaches the world model); 0 = off")
    # --- behaviour
    horizon: int = Field(ge=2, description="discount horizon; gamma = 1 - 1/horizon (100: gamma 0.99)")
    lam: float = Field(0.95, ge=0, le=1, description="lambda of the lambda-returns")
    imag_horizon: int = Field(15, ge=1, description="imagination steps")
    entropy: float = Field(ge=0, description="actor entropy bonus")
    actor_grad_continuous: Literal["reinforce", "dynamics", "both"] = Field(
        description="actor gradient for continuous actions: REINFORCE (2024) or backprop through the dynamics "
        "(2023, v1, v2); both = actor_grad_mix x dynamics + (1 - actor_grad_mix) x REINFORCE (DreamerV2's 'both'). "
        "Discrete actions always use REINFORCE"
    )
    actor_grad_mix: float = Field(0.1, ge=0, le=1, description="actor_grad_continuous: both: the dynamics share")
    actor_dist: Literal["bounded", "tanh_normal"] = Field(
        description="continuous action distribution: bounded = mean tanh(m), std 0.1..1 by a sigmoid, samples "
        "unsquashed (v2, v3); tanh_normal = tanh of a Normal with mean 5 tanh(m / 5), std softplus(s + "
        "softplus^-1(5)) + 1e-4 (v1)"
    )
    actor_baseline: bool = Field(
        description="subtract the critic's value of s_t from the return in the actor's objective (v1: no, the "
        "lambda-returns themselves are maximised)"
    )
    act_noise: float = Field(
        ge=0, le=2, description="std of the Gaussian noise added to continuous actions while collecting (act mode "
        "'sample'; v1: 0.3); for discrete actions the chance of a random action. None when evaluating"
    )
    policy_out_scale: float = Field(gt=0, description="init scale of the actor's output layer")
    imag_cont: Literal["prob", "mode"] = Field(
        description="imagined continuation in the returns: the head's probability (2024) or its mode, 0 or 1 "
        "with no gradient (2023: with dynamics backprop a probability lets the actor learn to 'end' imagined "
        "episodes of a negative-reward task)"
    )
    return_norm: bool = Field(description="divide advantages by the return scale below (v3); v1 and v2 do not")
    retnorm_rate: float = Field(0.01, gt=0, le=1, description="EMA rate of the return percentile range")
    retnorm_limit: float = Field(1.0, gt=0, description="floor of the return scale")
    retnorm_low: float = Field(5.0, ge=0, lt=100, description="low percentile of lambda-returns")
    retnorm_high: float = Field(95.0, gt=0, le=100, description="high percentile of lambda-returns")
    retnorm_debias: bool = Field(description="bias-correct the return-range EMA")
    slow_critic_rate: float = Field(gt=0, le=1, description="EMA rate of the slow critic per update (1 = a copy)")
    slow_critic_every: int = Field(ge=1, description="updates between slow-critic updates (v2: a copy every 100)")
    slow_critic_reg: float = Field(ge=0, description="weight of the slow-critic regulariser")
    critic_bootstrap: Literal["fast", "slow"] = Field(
        description="critic that bootstraps the lambda-returns and is the actor's baseline (v2: slow)"
    )
    replay_context: bool = Field(
        description="start replayed sequences from stored posterior latents, refreshed after updates"
    )
    # --- exploration (the `explore` block holds its settings)
    explore: Literal["none", "plan2explore", "cascade"] = Field(
        "none", description="reward-free exploration: plan2explore = an ensemble's disagreement drives an explorer "
        "actor-critic that acts while collecting; cascade = a population of such explorers over deployments "
        "(docs/lineage.md); the task actor-critic stays separate"
    )
    # --- optimisation
    optimizer: Literal["laprop", "adam"] = Field(
        description="laprop: one optimiser, AGC then RMS scaling then momentum (2024); adam: per-part Adam (2023)"
    )
    lr: float = Field(4e-5, gt=0, description="LaProp learning rate")
    agc: float = Field(0.3, gt=0, description="LaProp adaptive gradient clipping ratio")
    agc_pmin: float = Field(1e-3, gt=0, description="AGC floor on parameter norms")
    beta1: float = Field(0.9, ge=0, lt=1, description="LaProp momentum")
    beta2: float = Field(0.999, ge=0, lt=1, description="LaProp RMS decay")
    eps: float = Field(1e-20, gt=0, description="LaProp epsilon")
    warmup: int = Field(1000, ge=0, description="linear learning-rate warm-up, updates")
    model_lr: float = Field(gt=0, description="Adam (2023, v1, v2): world model learning rate")
    model_eps: float = Field(gt=0, description="Adam: world model epsilon")
    model_clip: float = Field(gt=0, description="Adam: world model gradient-norm clip")
    ac_lr: float = Field(gt=0, description="Adam: actor learning rate, and the critic's unless critic_lr is set")
    critic_lr: float | None = Field(gt=0, description="Adam: critic learning rate; null = ac_lr")
    ac_eps: float = Field(gt=0, description="Adam: actor and critic epsilon")
    ac_clip: float = Field(gt=0, description="Adam: actor and critic gradient-norm clip")
    # --- compute
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="compute dtype: auto = bfloat16 autocast on CUDA, float32 on CPU; bfloat16 on CPU "
        "needs AVX512-BF16/AMX to pay off. Norms, distributions, KL and two-hot stay float32"
    )
    compile: Literal["auto", "off", "cell", "full"] = Field(
        "auto", description="torch.compile: cell = each recurrent step (observed, imagined) compiled once and reused "
        "(float32 CPU: ~1 min the first time, seconds from the cache after); full = the whole update (~10 min on a "
        "2-core CPU); auto = cell on CPU for sizes above tiny when a C++ compiler is found, else off; true/false "
        "read as full/off"
    )
    threads: int = Field(
        0, ge=0, description="torch CPU threads of the learner; 0 = one per CPU this process may use (its affinity "
        "mask, capped by its cgroup's CPU quota). Whatever the count, reverie-learner makes idle OpenMP threads sleep "
        "instead of spinning (OMP_WAIT_POLICY=PASSIVE unless the environment sets a wait policy), so that other busy "
        "processes slow an update by their share of the CPU, not many times over (learner/compute.py)"
    )
    keep_heap: bool = Field(
        True, description="keep freed memory in the learner process for reuse (glibc malloc: no mmap, no trim), so "
        "an update's large tensors are not page-faulted in afresh each time (2x faster updates on CPU); the "
        "process's resident memory stays at its peak. Linux only"
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_presets(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if isinstance(data.get("recipe"), int):  # YAML reads `recipe: 2024` as a number
            data = {**data, "recipe": str(data["recipe"])}
        if isinstance(data.get("compile"), bool):  # the field was a bool: older files and policy blobs
            data = {**data, "compile": "full" if data["compile"] else "off"}
        # An unknown (or non-string) name fills from the default, so that the field's own error is
        # the only one reported, not a missing key for every value the preset would have supplied.
        recipe, size = data.get("recipe", "2024"), data.get("size", "size1m")
        known = recipe if isinstance(recipe, str) and recipe in RECIPES else "2024"
        filled = dict(RECIPES[known])
        filled.update(SIZES[size] if isinstance(size, str) and size in SIZES else SIZES["size1m"])
        if known in RECIPE_DIMS and "size" not in data:  # v1 / v2: their own dimensions
            filled.update(RECIPE_DIMS[known])
        domain = data.get("domain", "dmc")
        if known == "v2" and isinstance(domain, str) and domain in DOMAINS:
            filled.update(DOMAINS[domain])
        budget = data.get("budget", "faithful")
        if isinstance(budget, str) and budget in BUDGETS:
            filled.update(BUDGETS[budget][known])
        filled.update(data)
        return filled

    @model_validator(mode="after")
    def _checks(self) -> DreamerConfig:
        if self.deter % self.gru_blocks:
            raise FieldError("deter", f"a multiple of gru_blocks ({self.gru_blocks})", self.deter)
        if min(self.cnn_mults) < 1:
            raise FieldError("cnn_mults", "channel multipliers of at least 1", self.cnn_mults)
        if self.retnorm_low >= self.retnorm_high:
            raise FieldError("retnorm_low", f"a percentile below retnorm_high ({self.retnorm_high})", self.retnorm_low)
        if self.dynamics == "transformer" and self.compile in ("cell", "full"):
            raise FieldError("compile", "auto or off with dynamics: transformer (its update has no recurrent step to "
                             "compile)", self.compile)
        if self.dynamics == "transformer" and self.latent != "categorical":
            raise FieldError("latent", "categorical with dynamics: transformer", self.latent)
        if self.dynamics == "transformer" and self.explore != "none":
            raise FieldError("explore", "none with dynamics: transformer (exploration steps the RSSM)", self.explore)
        return self

    @property
    def gamma(self) -> float:
        return 1.0 - 1.0 / self.horizon


class ReplayConfig(Block):
    chunk_length: int = Field(1024, ge=2, description="steps per chunk file")
    compress: bool = Field(False, description="zip-compress chunk files (smaller, slower to write and read)")
    ram_steps: int = Field(
        1_000_000, ge=1, description="steps kept in memory (and sampled from); older chunks stay on disk"
    )
    disk_steps: int | None = Field(
        None, ge=1, description="steps kept on disk; the oldest chunk files are deleted beyond it; null = no cap"
    )
    online: bool = Field(
        True, description="fill each batch first with the sequences not yet trained on, oldest first (FIFO)"
    )
    recency: float = Field(0.0, ge=0, le=1, description="share of the remaining batch drawn favouring recent steps")


class TrainConfig(Block):
    steps: int = Field(100_000, ge=1, description="environment (policy) steps of a run")
    train_ratio: float = Field(
        512.0, description="replayed steps per policy step (batch x length per update); with robots "
        "(reverie-learner serve) per received step, and < 0 trains unthrottled"
    )
    batch_size: int = Field(16, ge=1, description="sequences per batch")
    batch_length: int = Field(64, ge=2, description="steps per sequence")
    prefill: int = Field(2500, ge=0, description="random-action policy steps before training starts")
    eval_every: int = Field(10_000, ge=0, description="policy steps between evaluation rounds; 0 = none")
    eval_episodes: int = Field(
        10, ge=1, description="episodes per evaluation round, run once with sampled actions (eval/return, as the "
        "official agent acts) and once with the mode action (eval/return_mode)"
    )
    log_every: int = Field(1000, ge=1, description="policy steps between metric rows")
    video_every: int = Field(1, ge=0, description="write videos every Nth evaluation round; 0 = never")
    checkpoint_every: int = Field(5000, ge=1, description="policy steps between checkpoints")

    @model_validator(mode="after")
    def _ratio(self) -> TrainConfig:
        if not math.isfinite(self.train_ratio) or self.train_ratio == 0:
            raise FieldError("train_ratio", "a finite, non-zero number (< 0: unthrottled, serve only)",
                             self.train_ratio)
        return self
