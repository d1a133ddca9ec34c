"""World Models' parts with real torch and the real `cma` package: V's loss with free bits, M's mixture density
(NLL and temperature sampling), the CMA-ES wrapper (sign, optimum, exact resume through the checkpoint
encoding) and the batched dream rollouts (shapes, done handling, common random numbers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.agents.world_models import controller
from core.tensor_tree import flatten_state, unflatten_state
from learner.agents.world_models.dream import dream
from learner.agents.world_models.evolution import Evolution
from learner.agents.world_models.mdn_rnn import MDNRNN, Mixture, mdn_nll, mdn_sample, sequence_loss
from learner.agents.world_models.vae import VAE, kl_divergence, vae_loss


# --- V
def test_vae_maps_64x64_frames_to_z_and_back() -> None:
    vae = VAE(z=8, depth=4)
    with torch.no_grad():
        recon, mean, logvar = vae(torch.rand(5, 3, 64, 64))
    assert recon.shape == (5, 3, 64, 64) and mean.shape == logvar.shape == (5, 8)
    assert float(recon.min()) >= 0 and float(recon.max()) <= 1  # a sigmoid decoder


def test_vae_kl_under_the_tolerance_costs_a_constant_and_passes_no_gradient() -> None:
    z, tol = 4, 0.5
    x = torch.rand(3, 3, 64, 64)
    recon = torch.rand(3, 3, 64, 64)
    # Frame 0: KL far under 0.5 x 4 nats; frame 1: far over; frame 2: none at all.
    mean = torch.tensor([[0.1, 0.0, 0.0, 0.0], [3.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    logvar = torch.zeros(3, z, requires_grad=True)
    loss, metrics = vae_loss(x, recon, mean, logvar, tol)
    kl = kl_divergence(mean, logvar).detach()
    assert kl[0] < tol * z < kl[1]
    rec = (recon - x).square().flatten(1).sum(-1).mean()
    expected = rec + (tol * z + float(kl[1]) + tol * z) / 3
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert float(metrics["v/kl"]) == pytest.approx(float(kl.mean()), rel=1e-6)
    loss.backward()
    assert torch.all(mean.grad[0] == 0) and torch.all(mean.grad[2] == 0)  # clamped: no gradient
    np.testing.assert_allclose(mean.grad[1].numpy(), (mean[1] / 3).detach().numpy(), rtol=1e-6)  # d KL / d mu = mu


# --- M
def test_mdn_with_one_gaussian_is_the_gaussian_nll() -> None:
    gen = torch.Generator().manual_seed(0)
    mean, logstd = torch.randn(6, 4, 1, generator=gen), torch.randn(6, 4, 1, generator=gen) * 0.5
    target = torch.randn(6, 4, generator=gen)
    nll = mdn_nll(Mixture(torch.randn(6, 4, 1, generator=gen), mean, logstd), target)
    expected = -torch.distributions.Normal(mean[..., 0], logstd[..., 0].exp()).log_prob(target)
    torch.testing.assert_close(nll, expected, rtol=1e-6, atol=1e-6)


def test_mdn_nll_of_a_mixture_is_the_log_of_the_weighted_densities() -> None:
    logits = torch.tensor([[[0.3, -1.0, 2.0]]])
    mean, logstd = torch.tensor([[[0.0, 1.0, -2.0]]]), torch.tensor([[[0.0, -0.5, 0.3]]])
    target = torch.tensor([[0.4]])
    weights = torch.softmax(logits, -1)
    density = (weights * torch.distributions.Normal(mean, logstd.exp()).log_prob(target[..., None]).exp()).sum(-1)
    torch.testing.assert_close(mdn_nll(Mixture(logits, mean, logstd), target), -density.log())


def test_mdn_sampling_at_temperature_towards_zero_gives_the_mean() -> None:
    gen = torch.Generator().manual_seed(1)
    shape = (64, 5)
    uniform, normal = torch.rand(shape, generator=gen), torch.randn(shape, generator=gen)
    one = Mixture(torch.zeros(*shape, 1), torch.randn(*shape, 1, generator=gen), torch.zeros(*shape, 1))
    torch.testing.assert_close(mdn_sample(one, 1e-12, uniform, normal), one.mean[..., 0], rtol=0, atol=1e-5)
    # Several Gaussians: tau -> 0 picks the most likely one, whatever the uniform draw, and returns its mean.
    many = Mixture(torch.randn(*shape, 5, generator=gen), torch.randn(*shape, 5, generator=gen), torch.zeros(*shape, 5))
    best = many.mean.gather(-1, many.logits.argmax(-1, keepdim=True))[..., 0]
    torch.testing.assert_close(mdn_sample(many, 1e-6, uniform, normal), best, rtol=0, atol=1e-2)
    # tau = 1: the std is the model's own.
    spread = mdn_sample(one, 1.0, uniform, normal) - one.mean[..., 0]
    torch.testing.assert_close(spread, normal)


def test_m_loss_counts_only_transitions_inside_an_episode() -> None:
    torch.manual_seed(0)
    model = MDNRNN(z=3, act_dim=2, units=8, mixtures=2)
    z, action = torch.randn(2, 6, 3), torch.rand(2, 6, 2)
    reward, terminal, first = torch.randn(2, 6), torch.zeros(2, 6), torch.zeros(2, 6)
    first[:, 0] = 1
    first[0, 3] = 1  # a new episode starts at step 3 of sequence 0
    base, _ = sequence_loss(model, z, action, reward, terminal, first, 1.0, 10.0)
    # The action before an episode start predicts nothing (M's state restarts there), and the reward of a
    # first step is no target: changing them leaves the loss as it was.
    action2, reward2 = action.clone(), reward.clone()
    action2[0, 2] += 5.0
    reward2[0, 3] += 100.0
    torch.testing.assert_close(sequence_loss(model, z, action2, reward2, terminal, first, 1.0, 10.0)[0], base)
    reward2[0, 4] += 1.0  # the reward of the step after it is one
    assert float(sequence_loss(model, z, action2, reward2, terminal, first, 1.0, 10.0)[0]) > float(base)


# --- CMA-ES
def rosenbrock_fitness(x: np.ndarray) -> np.ndarray:
    """Minus the Rosenbrock function: maximised (0) at x = 1."""
    return -np.sum(100.0 * (x[:, 1:] - x[:, :-1] ** 2) ** 2 + (1.0 - x[:, :-1]) ** 2, axis=1)


def test_cma_es_maximises_a_10d_rosenbrock_to_its_optimum() -> None:
    evo = Evolution(10, 0.5, 16, seed=0)
    for _ in range(1500):
        evo.tell(rosenbrock_fitness(evo.ask()))
        if rosenbrock_fitness(evo.mean[None])[0] > -1e-10:
            break
    np.testing.assert_allclose(evo.mean, np.ones(10), atol=1e-5)
    # The sign: it climbed to the maximum; a minimiser of this fitness would run away from x = 1.
    assert rosenbrock_fitness(evo.mean[None])[0] > rosenbrock_fitness(np.zeros((1, 10)))[0]


def test_cma_es_refuses_fitness_that_does_not_fit_the_population() -> None:
    evo = Evolution(3, 0.1, 6, seed=0)
    with pytest.raises(RuntimeError, match="before ask"):
        evo.tell(np.zeros(6))
    evo.ask()
    with pytest.raises(ValueError, match="population of 6"):
        evo.tell(np.zeros(5))
    with pytest.raises(ValueError, match="non-finite fitness for candidates \\[2\\]"):
        evo.tell(np.array([0, 0, np.nan, 0, 0, 0]))


def test_cma_es_resumed_from_its_checkpoint_encoding_asks_exactly_what_it_would_have() -> None:
    # 39 dimensions, 5 generations: the covariance has been decomposed (its eigenvectors in column-major
    # memory) and is shared by the strategy and its sampler; a resume that loses either drifts here.
    straight, first = Evolution(39, 0.1, 6, seed=3), Evolution(39, 0.1, 6, seed=3)
    for _ in range(5):
        straight.tell(rosenbrock_fitness(straight.ask()))
        first.tell(rosenbrock_fitness(first.ask()))
    tensors, skeleton = flatten_state({"evolution": first.state()})  # what a checkpoint writes: no pickle
    resumed = Evolution.from_state(unflatten_state(tensors, skeleton)["evolution"])
    assert resumed.generation == straight.generation == 5
    for _ in range(20):
        a, b = straight.ask(), resumed.ask()
        np.testing.assert_array_equal(a, b)
        straight.tell(rosenbrock_fitness(a))
        resumed.tell(rosenbrock_fitness(b))
    np.testing.assert_array_equal(straight.mean, resumed.mean)
    assert straight.sigma == resumed.sigma
    np.testing.assert_array_equal(straight.es.C, resumed.es.C)


def test_cma_es_state_between_ask_and_tell_is_refused() -> None:
    evo = Evolution(3, 0.1, 6, seed=0)
    evo.ask()
    with pytest.raises(RuntimeError, match="between generations"):
        evo.state()


# --- dreams
def _m(done_bias: float, z: int = 3, act_dim: int = 2, units: int = 8) -> MDNRNN:
    torch.manual_seed(0)
    model = MDNRNN(z, act_dim, units, mixtures=2)
    with torch.no_grad():
        model.head.weight[-1].zero_()
        model.head.bias[-1] = done_bias  # the done logit
    return model


def _starts(r: int, z: int = 3, units: int = 8) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    state = (torch.randn(r, units, generator=gen), torch.randn(r, units, generator=gen))
    return torch.randn(r, z, generator=gen), state


def test_dream_rolls_out_the_population_as_one_batch_with_shapes_per_candidate_and_rollout() -> None:
    model, (z0, state0) = _m(-30.0), _starts(4)
    params = torch.randn(5, controller.parameter_count(3, 8, 2), generator=torch.Generator().manual_seed(2))
    out = dream(model, params, z0, state0, horizon=7, tau=1.0, discrete=False,
                generator=torch.Generator().manual_seed(0))
    assert out.returns.shape == out.lengths.shape == (5, 4)
    assert torch.all(out.lengths == 7)  # the done head says never
    # Batched = one candidate at a time, given the same noise (common random numbers across candidates).
    for p in range(5):
        one = dream(model, params[p:p + 1], z0, state0, 7, 1.0, False, torch.Generator().manual_seed(0))
        torch.testing.assert_close(one.returns[0], out.returns[p], rtol=1e-5, atol=1e-5)
    # Identical candidates share their starts and noise, so they score identically.
    same = dream(model, params[:1].repeat(3, 1), z0, state0, 7, 1.0, False, torch.Generator().manual_seed(1))
    assert torch.all(same.returns == same.returns[0])


def test_dream_stops_counting_rewards_after_m_says_the_episode_ended() -> None:
    z0, state0 = _starts(6)
    params = torch.zeros(2, controller.parameter_count(3, 8, 2))
    ended = _m(30.0)  # done with probability 1 after the first step
    out = dream(ended, params, z0, state0, horizon=9, tau=1.0, discrete=False, generator=torch.Generator())
    assert torch.all(out.lengths == 1)
    h = ended.memory(z0, torch.zeros(6, 2), state0)[0]  # C with zero weights acts 0
    torch.testing.assert_close(out.returns, ended.heads(h)[1].expand(2, 6))  # the first step's reward only


def test_dream_with_discrete_actions_feeds_m_one_hot_actions() -> None:
    model, (z0, state0) = _m(-30.0), _starts(2)
    out = dream(model, torch.randn(3, controller.parameter_count(3, 8, 2)), z0, state0, 4, 1.0, True,
                torch.Generator())
    assert out.returns.shape == (3, 2) and torch.isfinite(out.returns).all()
    weight, bias = controller.split(torch.tensor([[0.0] * 22 + [0.0, 1.0]]), 11, 2)
    action = controller.act(torch.randn(1, 4, 11), weight, bias, discrete=True)
    assert torch.equal(action, torch.tensor([[[0.0, 1.0]] * 4]))
    assert math.isclose(float(action.sum()), 4.0)
