"""The recurrent steps of an update as plain-tensor cells (`learner/agents/dreamer/cells.py`),
eager and torch.compile'd (`dreamer.compile: cell`).

The eager cells must sample exactly what stepping the RSSM one call at a time samples (their random
numbers are drawn beforehand, in the same order), and the compiled update must compute the same
losses and parameter updates as the eager one, to float tolerance. CPU, real torch and inductor.
"""

from __future__ import annotations

import logging

import pytest
import torch
from dreamer_helpers import FLAG_SPACE, make_batch, make_cfg, randomise_biases

from core.agents.spaces import ActSpace
from core.config.agent import DreamerConfig
from learner.agents.dreamer.agent import Dreamer, frozen
from learner.agents.dreamer.cells import Cells, compile_mode, compile_step

VECTOR_SPACE = {"pos": ((3,), "float32"), **FLAG_SPACE}
CPU = torch.device("cpu")


def _agent(recipe: str, act: ActSpace, compile: str, seed: int = 0) -> Dreamer:
    torch.manual_seed(seed)
    agent = Dreamer(make_cfg(recipe, compile=compile), VECTOR_SPACE, act)
    randomise_biases(agent.model)
    return agent


@pytest.mark.parametrize("recipe", ["2024", "2023"])
def test_observe_samples_what_stepping_samples(recipe):
    """observe() draws every step's uniforms at once: the posteriors must be bit-equal to calling
    obs_step step by step, each drawing its own (the order of the generator's numbers is kept)."""
    act = ActSpace(2, False)
    agent = _agent(recipe, act, "off")
    rssm = agent.wm.rssm
    batch = make_batch(VECTOR_SPACE, act, 3, 6)
    batch["is_first"][1, 3] = True
    data = agent.to_inputs(batch)
    embed = agent.wm.encoder(data)
    start = agent.initial_context(3)
    prev = torch.cat([start["action"][:, None], data["action"][:, :-1]], 1)
    torch.manual_seed(1)
    post, _ = rssm.observe(embed, prev, data["is_first"], start)
    torch.manual_seed(1)
    state, steps = start, []
    for t in range(6):
        state, _ = rssm.obs_step(state, prev[:, t], embed[:, t], data["is_first"][:, t])
        steps.append(state)
    for key in ("deter", "stoch", "logp"):
        # post_embed_part over the whole sequence vs per step: the same product, row by row
        torch.testing.assert_close(post[key], torch.stack([s[key] for s in steps], 1), rtol=0, atol=1e-6)
    assert torch.equal(post["stoch"], torch.stack([s["stoch"] for s in steps], 1))


@pytest.mark.parametrize("discrete", [False, True])
def test_imagine_samples_what_stepping_samples(discrete):
    """Cells.imagine draws the action's noise, then the prior sample's, outside the step: bit-equal
    to running the actor and img_step one after the other, each drawing its own."""
    act = ActSpace(3, discrete)
    agent = _agent("2024", act, "off")
    rssm, actor = agent.wm.rssm, agent.behavior.actor
    cells = Cells(rssm, actor, dynamics=False, compiled=False)
    start = rssm.initial(5, CPU)
    start["deter"] = torch.randn(5, rssm.deter)
    torch.manual_seed(2)
    with frozen(agent.wm):
        states, actions, outs = cells.imagine(start, 4)
        torch.manual_seed(2)
        state, ref_actions, ref_outs = start, [], []
        for _ in range(4):
            out = actor.params(rssm.feat(state))
            action = actor.dist(out).rsample()
            ref_outs.append(out)
            ref_actions.append(action)
            state = rssm.img_step(state, action)
    assert torch.equal(actions, torch.stack(ref_actions))
    assert torch.equal(outs, torch.stack(ref_outs))
    assert torch.equal(states["stoch"][-1], state["stoch"])
    assert torch.equal(states["deter"][-1], state["deter"])


def _two_updates(agent: Dreamer, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    metrics: dict[str, torch.Tensor] = {}
    for i in range(2):
        out, _ = agent.train(batch)
        metrics |= {f"{i}/{k}": torch.as_tensor(v).float() for k, v in out.items()}
    return metrics, {k: v.detach().clone() for k, v in agent.model.state_dict().items()}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports warn
@pytest.mark.parametrize("recipe, discrete", [
    ("2024", False),
    pytest.param("2023", True, marks=pytest.mark.slow),  # dynamics backprop, one-hot actions
])
def test_compiled_cells_update_as_the_eager_update(recipe, discrete):
    """dreamer.compile=cell: two updates from the same weights, seed and batch give the eager
    update's losses and parameters to float tolerance (the steps compute the same arithmetic,
    fused; a compiled step that sampled with its own random numbers would fail here)."""
    act = ActSpace(2, discrete)
    batch = make_batch(VECTOR_SPACE, act, 4, 8)
    eager_metrics, eager_params = _two_updates(_agent(recipe, act, "off"), batch)
    fast = _agent(recipe, act, "cell")
    fast_metrics, fast_params = _two_updates(fast, batch)
    assert fast.skipped == 0
    assert eager_metrics.keys() == fast_metrics.keys()
    _assert_same_updates((fast_metrics, fast_params), (eager_metrics, eager_params))


def _assert_same_updates(fast: tuple[dict, dict], eager: tuple[dict, dict]) -> None:
    """Two updates' losses and parameters agree to the compiled-vs-eager float tolerance."""
    (fast_metrics, fast_params), (eager_metrics, eager_params) = fast, eager
    for key, value in eager_metrics.items():
        torch.testing.assert_close(fast_metrics[key], value, rtol=1e-4, atol=1e-5, msg=key)
    for key, value in eager_params.items():
        torch.testing.assert_close(fast_params[key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_several_agents_in_one_process_all_run_compiled_cells(caplog):
    """Three agents of different shapes in one process (A/B runs, tests, adapt beside training) each
    keep their compiled steps: dynamo's cache is per code object, which every agent's cell shares,
    and its recompile limit used to cap all of their variants together, so a later agent's steps
    fell back to eager. Here the limit is 4, room for two agents' steps (two variants each), so
    that three agents show what five did at the default 8; each still updates as eager does."""
    agents = []
    with torch._dynamo.config.patch(recompile_limit=4), caplog.at_level(logging.WARNING):
        for dim in (1, 2, 3):
            act = ActSpace(dim, False)
            batch = make_batch(VECTOR_SPACE, act, 4, 8)
            fast = _agent("2024", act, "cell", seed=dim)
            agents.append((fast, _two_updates(fast, batch), _two_updates(_agent("2024", act, "off", seed=dim), batch)))
    assert not [r.message for r in caplog.records if "recompile_limit" in r.getMessage()
                or r.name == "learner.agents.dreamer.cells"]
    for fast, fast_updates, eager_updates in agents:
        assert not fast.cells.post.eager and not fast.cells.imag.eager
        _assert_same_updates(fast_updates, eager_updates)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_step_past_the_recompile_limit_says_so(caplog):
    """A step that needs more compiled variants than dynamo allows (here one, and two shapes) warns
    once, naming dreamer.compile and the limit, and runs eagerly: never a silent fallback."""

    def double(x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x * 2,)

    step = compile_step(double)
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level(logging.WARNING,
                                                                        logger="learner.agents.dreamer.cells"):
        for n in (2, 3, 3):
            assert torch.equal(step(torch.ones(n))[0], torch.full((n,), 2.0))
    assert step.eager
    warned = [r.message for r in caplog.records if r.name == "learner.agents.dreamer.cells"]
    assert len(warned) == 1 and "dreamer.compile" in warned[0] and "recompile_limit" in warned[0], warned


def test_compile_setting_resolves():
    """auto compiles the cells for a float32 CPU update above the tiny size (where a C++ compiler
    exists), else stays eager; the old boolean setting reads as full / off."""
    assert DreamerConfig.model_validate({"compile": True}).compile == "full"
    assert DreamerConfig.model_validate({"compile": False}).compile == "off"
    assert compile_mode(make_cfg(), CPU) == "off"  # tiny
    assert compile_mode(make_cfg(size="size1m", compile="off"), CPU) == "off"
    assert compile_mode(make_cfg(size="size1m", precision="bfloat16"), CPU) == "off"
    assert compile_mode(make_cfg(size="size1m", compile="full"), CPU) == "full"
    assert compile_mode(make_cfg(size="size1m"), torch.device("cuda")) == "off"
    assert compile_mode(make_cfg(size="size1m"), CPU) in ("cell", "off")  # cell where g++ is found
    with pytest.raises(ValueError, match="compile"):
        DreamerConfig.model_validate({"compile": "fast"})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_step_that_does_not_compile_runs_eagerly(caplog):
    """A step torch.compile cannot make one graph of (here a data-dependent branch) is reported once
    and then runs eagerly, with the eager result."""

    def branchy(x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x + 1 if bool(x.sum() > 0) else x - 1,)

    step = compile_step(branchy)
    x = torch.ones(3)
    with caplog.at_level(logging.WARNING, logger="learner.agents.dreamer.cells"):
        assert torch.equal(step(x)[0], x + 1)
        assert torch.equal(step(-x)[0], -x - 1)
    assert sum("compiling branchy failed" in r.message for r in caplog.records) == 1


def test_compile_cache_dir_keeps_a_chosen_folder(monkeypatch, tmp_path):
    """The compiled kernels go to the user's TORCHINDUCTOR_CACHE_DIR when set; torch's own default (a
    per-user folder in /tmp, filled in as soon as inductor loads) is replaced by ~/.cache/reverie."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from learner.agents.dreamer.cells import CACHE_ENV, compile_cache_dir

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert compile_cache_dir() == tmp_path
    monkeypatch.setenv(CACHE_ENV, default_cache_dir())
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache_dir() == tmp_path / ".cache" / "reverie" / "inductor"


def test_channels_last_update_as_the_contiguous_update():
    """The trainer keeps its convolution weights channels-last (NHWC kernels); one update from pixels
    gives the losses and parameters of the same model kept in the default (NCHW) layout."""
    space = {"image": ((16, 16, 3), "uint8"), **FLAG_SPACE}
    act = ActSpace(2, False)
    batch = make_batch(space, act, 2, 4)
    built = Dreamer(make_cfg(cnn_mults=[1, 2]), space, act)
    assert built.wm.decoder.cnn.net[1].weight.is_contiguous(memory_format=torch.channels_last)
    results = []
    for layout in (torch.channels_last, torch.contiguous_format):
        torch.manual_seed(0)
        agent = Dreamer(make_cfg(cnn_mults=[1, 2]), space, act)
        randomise_biases(agent.model)
        agent.model.to(memory_format=layout)
        conv = agent.wm.encoder.cnn.net[0].weight
        assert conv.is_contiguous(memory_format=layout)
        results.append(_two_updates(agent, batch))
    (fast_metrics, fast_params), (ref_metrics, ref_params) = results
    for key, value in ref_metrics.items():
        torch.testing.assert_close(fast_metrics[key], value, rtol=1e-4, atol=1e-5, msg=key)
    for key, value in ref_params.items():
        torch.testing.assert_close(fast_params[key], value, rtol=1e-4, atol=1e-6, msg=key)
