import itertools
import warnings

import pytest
import torch
from torch.testing import assert_close

from sbi_fm_plugin import FlowMatchingEstimator, VelocityMLP
from sbi_fm_plugin.build import build_flow_matching
from sbi_fm_plugin.coupling import COUPLINGS, Coupler, CouplingOptions

OT_METHODS = ("exact", "sinkhorn", "sinkhorn_log", "partial")


def _candidates(theta, x, seed, num_draws=1, noise_factor=1):
    # Independent pairing with the same seed returns the draws that a coupling
    # chooses from, in their initial order.
    coupler = Coupler(CouplingOptions("none", noise_factor=noise_factor))
    generator = torch.Generator().manual_seed(seed)
    return coupler(theta, x, generator, num_draws)


def _couple(options, theta, x, seed, num_draws=1):
    generator = torch.Generator().manual_seed(seed)
    return Coupler(options)(theta, x, generator, num_draws)


def _owners(noise, candidates):
    # Index of the candidate that each returned draw is.
    distances = (noise.unsqueeze(1) - candidates.unsqueeze(0)).abs().sum(-1)
    assert distances.min(dim=1).values.max() == 0
    return distances.argmin(dim=1)


def _cost(theta, candidates, x, owners, weight):
    return (
        (theta - candidates[owners]).square().sum(-1)
        + weight * (x - x[owners]).square().sum(-1)
    ).sum()


@pytest.mark.parametrize("weight", [0.0, 0.7])
@pytest.mark.parametrize("n", [2, 4, 6])
def test_exact_coupling_is_the_brute_force_optimal_assignment(n, weight):
    theta, x = torch.randn(n, 2), torch.randn(n, 3)
    options = CouplingOptions("exact", condition_weight=weight, condition_ratio=0.0)

    candidates = _candidates(theta, x, seed=1)[0]
    noise = _couple(options, theta, x, seed=1)[0]
    owners = _owners(noise, candidates)

    assert sorted(owners.tolist()) == list(range(n))
    best = min(
        _cost(theta, candidates, x, torch.tensor(p), weight)
        for p in itertools.permutations(range(n))
    )
    assert_close(_cost(theta, candidates, x, owners, weight), best)


@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_log"])
def test_sinkhorn_plan_has_uniform_marginals(method):
    options = CouplingOptions(method, tol=1e-7, max_iter=1000)
    cost = torch.rand(30, 45)

    plan = Coupler(options).plan(cost / cost.mean())

    assert plan.shape == (30, 45)
    assert_close(
        plan.sum(1), torch.full((30,), 1 / 30, dtype=plan.dtype), atol=1e-6, rtol=0
    )
    assert_close(
        plan.sum(0), torch.full((45,), 1 / 45, dtype=plan.dtype), atol=1e-6, rtol=0
    )


def test_partial_plan_moves_the_requested_mass():
    plan = Coupler(CouplingOptions("partial", mass=0.6)).plan(torch.rand(20, 20))

    assert_close(plan.sum().item(), 0.6)
    assert (plan.sum(1) <= 1 / 20 + 1e-12).all()


@pytest.mark.parametrize("method", OT_METHODS)
def test_couplings_shorten_the_paths(method):
    theta, x = 2 * torch.randn(128, 2), torch.randn(128, 1)
    options = CouplingOptions(method, condition_ratio=0.0, max_iter=1000)

    independent = _candidates(theta, x, seed=0, num_draws=2)
    coupled = _couple(options, theta, x, seed=0, num_draws=2)

    assert coupled.shape == (2, 128, 2)
    shortening = (coupled - theta).square().sum(-1).mean() / (
        (independent - theta).square().sum(-1).mean()
    )
    assert shortening < 0.5


def test_a_large_condition_weight_keeps_noise_within_a_condition():
    # Two discrete conditions: only pairs with equal x may swap their noise.
    theta = torch.randn(40, 2)
    x = (torch.arange(40) % 2).float().unsqueeze(1)
    candidates = _candidates(theta, x, seed=3)[0]

    aware = _couple(CouplingOptions("exact", condition_ratio=100.0), theta, x, 3)[0]
    blind = _couple(CouplingOptions("exact", condition_ratio=0.0), theta, x, 3)[0]

    aware_owners = _owners(aware, candidates)
    assert (x[aware_owners] == x).all()
    assert (aware_owners != torch.arange(40)).any()
    assert (x[_owners(blind, candidates)] != x).any()


def test_noise_factor_chooses_among_more_draws():
    theta, x = torch.randn(64, 2), torch.randn(64, 1)

    one = _couple(CouplingOptions("exact", condition_ratio=0.0), theta, x, 7)[0]
    options = CouplingOptions("exact", condition_ratio=0.0, noise_factor=4)
    four = _couple(options, theta, x, 7)[0]

    assert four.shape == (64, 2)
    assert len(four.unique(dim=0)) > 48
    assert (four - theta).square().sum() < (one - theta).square().sum()


# Sinkhorn may stop short on a batch this small; the fallback is reproducible too.
@pytest.mark.filterwarnings("ignore:Coupling:RuntimeWarning")
@pytest.mark.parametrize("method", COUPLINGS)
def test_couplings_are_reproducible_and_leave_inputs_alone(method):
    theta, x = torch.randn(16, 3), torch.randn(16, 2)
    before = theta.clone(), x.clone()

    first = _couple(CouplingOptions(method), theta, x, seed=5, num_draws=3)
    second = _couple(CouplingOptions(method), theta, x, seed=5, num_draws=3)

    assert_close(first, second, rtol=0, atol=0)
    assert_close((theta, x), before, rtol=0, atol=0)


def test_sinkhorn_capped_at_one_iteration_warns_once_and_pairs_independently():
    theta, x = torch.randn(32, 2), torch.randn(32, 1)
    coupler = Coupler(CouplingOptions("sinkhorn", max_iter=1))

    with pytest.warns(RuntimeWarning, match="coupling_max_iter") as caught:
        noise = coupler(theta, x, torch.Generator().manual_seed(0), 3)

    assert len(caught) == 1
    assert coupler.fallbacks == 3
    assert_close(noise, _candidates(theta, x, seed=0, num_draws=3))


@pytest.mark.parametrize("method", OT_METHODS)
def test_overflowing_cost_falls_back_to_finite_noise(method):
    theta, x = torch.randn(8, 2), torch.full((8, 1), 1e30)
    x[::2] = -1e30
    coupler = Coupler(CouplingOptions(method))

    with pytest.warns(RuntimeWarning, match="non-finite"):
        noise = coupler(theta, x, torch.Generator().manual_seed(0))

    assert torch.isfinite(noise).all()
    assert_close(noise, _candidates(theta, x, seed=0))


def _estimator(method, **options):
    theta, x = torch.randn(64, 2), torch.randn(64, 3)
    return (
        build_flow_matching(theta, x, width=16, depth=1, coupling=method, **options),
        theta,
        x,
    )


@pytest.mark.parametrize("method", COUPLINGS)
def test_batch_of_one_trains(method):
    estimator, theta, x = _estimator(method)

    loss = estimator.loss(theta[:1], x[:1])
    loss.sum().backward()

    assert loss.shape == (1,) and torch.isfinite(loss).all()


def test_estimator_trains_on_through_failed_couplings():
    estimator, theta, x = _estimator("sinkhorn", coupling_max_iter=1)
    optimizer = torch.optim.Adam(estimator.parameters(), lr=1e-3)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            optimizer.zero_grad()
            loss = estimator.loss(theta, x).mean()
            loss.backward()
            optimizer.step()
            assert torch.isfinite(loss)

    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert len(messages) == 1 and "independent pairs" in messages[0]
    assert estimator._coupler.fallbacks == 5 * estimator.num_draws


@pytest.mark.parametrize("method", OT_METHODS)
def test_estimator_loss_with_coupling_is_reproducible(method):
    estimator, theta, x = _estimator(method)

    estimator.eval()
    assert_close(estimator.loss(theta, x), estimator.loss(theta, x), rtol=0, atol=0)
    estimator.train()
    torch.manual_seed(2)
    first = estimator.loss(theta, x)
    torch.manual_seed(2)
    assert_close(estimator.loss(theta, x), first, rtol=0, atol=0)


def _posterior_mean_error(**options):
    # theta ~ N(0, I), x = theta + N(0, 0.5^2 I): theta | x ~ N(0.8 x, 0.2 I).
    torch.manual_seed(0)
    theta = torch.randn(2000, 2)
    x = theta + 0.5 * torch.randn_like(theta)
    estimator = build_flow_matching(theta, x, width=64, depth=2, **options)
    optimizer = torch.optim.Adam(estimator.parameters(), lr=3e-3)
    for _ in range(30):
        for batch in torch.randperm(2000).split(200):
            optimizer.zero_grad()
            estimator.loss(theta[batch], x[batch]).mean().backward()
            optimizer.step()

    x_o = torch.tensor([[1.0, -0.5]])
    samples = estimator.sample((4000,), x_o)[:, 0]
    return (samples.mean(0) - 0.8 * x_o[0]).norm().item()


def test_condition_blind_coupling_biases_the_posterior_and_awareness_reduces_it():
    # Transport that ignores x gives each x noise skewed towards its parameters,
    # which sampling from the standard normal never sees (Cheng and Schwing, 2025).
    independent = _posterior_mean_error(coupling="none")
    blind = _posterior_mean_error(coupling="exact", coupling_condition_ratio=0.0)
    aware = _posterior_mean_error(coupling="exact", coupling_condition_ratio=10.0)

    assert independent < 0.1
    assert blind > 0.4
    assert aware < blind / 2


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"method": "greedy"}, ValueError, "`coupling`"),
        ({"reg": 0.0}, ValueError, "`coupling_reg`"),
        ({"tol": -1.0}, ValueError, "`coupling_tol`"),
        ({"mass": 1.5}, ValueError, "`coupling_mass`"),
        ({"mass": "all"}, TypeError, "`coupling_mass`"),
        ({"condition_ratio": -1.0}, ValueError, "`coupling_condition_ratio`"),
        ({"condition_weight": float("inf")}, ValueError, "`coupling_condition_weight`"),
        ({"max_iter": 0}, ValueError, "`coupling_max_iter`"),
        ({"noise_factor": 2.0}, TypeError, "`coupling_noise_factor`"),
    ],
)
def test_bad_options_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        CouplingOptions(**options)


def test_estimator_refuses_a_coupling_of_the_wrong_type():
    net = VelocityMLP(2, 3, width=8, depth=1)
    with pytest.raises(TypeError, match="`coupling`"):
        FlowMatchingEstimator(net, (2,), (3,), coupling="exact")


@pytest.mark.gpu
@pytest.mark.parametrize("method", OT_METHODS)
def test_couplings_on_cuda(method):
    theta, x = torch.randn(64, 2, device="cuda"), torch.randn(64, 3, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)

    noise = Coupler(CouplingOptions(method))(theta, x, generator, 2)

    assert noise.device == theta.device and torch.isfinite(noise).all()
