"""sbi's own trainers, builders and posteriors with the flow matching estimator."""

import inspect
import pickle
import warnings

import pytest
import torch
from linear_gaussian import NOISE, D, analytic_posterior, simulate, x_o
from saved import saved_copies
from sbi.inference import NLE, NPE, DirectPosterior
from sbi.inference.posteriors.posterior_parameters import MCMCPosteriorParameters
from sbi.neural_nets import likelihood_nn, posterior_nn
from sbi.utils.metrics import c2st

import sbi_fm_plugin  # noqa: F401 (registers "flow_matching")
from sbi_fm_plugin import FlowMatchingEstimator, flow_matching_nn
from sbi_fm_plugin.build import (
    COUPLING_DEFAULTS,
    DEFAULT_WIDTH,
    ESTIMATOR_DEFAULTS,
    NETWORK_DEFAULTS,
    SOLVER_DEFAULTS,
)


def test_names_are_registered():
    theta, x = torch.randn(50, 2), torch.randn(50, 4)
    for factory in (posterior_nn, likelihood_nn):
        estimator = factory("flow_matching")(theta, x)
        assert isinstance(estimator, FlowMatchingEstimator)


def test_npe_posterior_matches_analytic(trained):
    _, posterior = trained
    reference = analytic_posterior(x_o)

    samples = posterior.sample((2000,), x=x_o, show_progress_bars=False)
    assert c2st(samples, reference.sample((2000,))).item() <= 0.6

    theta = reference.sample((500,))
    log_p = posterior.log_prob(theta, x=x_o, norm_posterior=False)
    expected = reference.log_prob(theta)
    # Achieved with seed 0: median 0.16, mean 0.20, correlation 0.986.
    error = (log_p - expected).abs()
    assert error.median() < 0.25
    assert error.mean() < 0.35
    assert torch.corrcoef(torch.stack((log_p, expected)))[0, 1] > 0.95


def test_posterior_survives_pickle_and_torch_save(trained):
    _, posterior = trained
    torch.manual_seed(3)
    expected = posterior.sample((100,), x=x_o, show_progress_bars=False)
    for copy in saved_copies(posterior):
        assert isinstance(copy, DirectPosterior)
        torch.manual_seed(3)
        assert torch.equal(
            copy.sample((100,), x=x_o, show_progress_bars=False), expected
        )


def test_map_differentiates_log_prob(trained):
    _, posterior = trained
    posterior.set_default_x(x_o)
    theta_map = posterior.map(
        num_iter=30,
        num_init_samples=50,
        num_to_optimize=2,
        show_progress_bars=False,
    )
    expected = analytic_posterior(x_o).mean
    torch.testing.assert_close(theta_map[0], expected, atol=0.2, rtol=0)


def test_validation_loss_is_reproducible(trained):
    inference, _ = trained
    estimator = inference._neural_net.eval()
    theta, x = torch.randn(64, D), torch.randn(64, D)
    assert torch.equal(estimator.loss(theta, x), estimator.loss(theta, x))


@pytest.mark.slow
@pytest.mark.parametrize(
    "dim, max_c2st, min_correlation",
    # Achieved with seed 0 in 20-D: C2ST 0.578, correlation 0.957.
    [(5, 0.55, 0.95), (20, 0.6, 0.93)],
)
def test_npe_accuracy_with_more_simulations(dim, max_c2st, min_correlation):
    prior = torch.distributions.MultivariateNormal(torch.zeros(dim), torch.eye(dim))
    theta = prior.sample((10_000,))
    x = theta + NOISE * torch.randn_like(theta)
    x_o = simulate(prior.sample((1,)))
    shrink = 1 / (1 + NOISE**2)
    reference = torch.distributions.MultivariateNormal(
        shrink * x_o[0], NOISE**2 * shrink * torch.eye(dim)
    )

    inference = NPE(prior, density_estimator="flow_matching", show_progress_bars=False)
    inference.append_simulations(theta, x).train()
    posterior = inference.build_posterior()

    samples = posterior.sample((5000,), x=x_o, show_progress_bars=False)
    assert c2st(samples, reference.sample((5000,))).item() <= max_c2st

    theta = reference.sample((500,))
    log_p = posterior.log_prob(theta, x=x_o, norm_posterior=False)
    expected = reference.log_prob(theta)
    assert torch.corrcoef(torch.stack((log_p, expected)))[0, 1] > min_correlation
    assert (log_p - expected).abs().median() < 0.1 * dim


def test_nle_with_mcmc_matches_analytic():
    dim = 2
    prior = torch.distributions.MultivariateNormal(torch.zeros(dim), torch.eye(dim))
    theta = prior.sample((2000,))
    x = theta + NOISE * torch.randn_like(theta)
    # MCMC evaluates the likelihood thousands of times: a cheap fixed-step solver
    # keeps the test short (the default adaptive one reached C2ST 0.50 with 500
    # samples, in minutes).
    builder = flow_matching_nn("likelihood", method="midpoint", num_steps=4)
    inference = NLE(prior, density_estimator=builder, show_progress_bars=False)
    inference.append_simulations(theta, x).train(max_num_epochs=100)
    posterior = inference.build_posterior(
        posterior_parameters=MCMCPosteriorParameters(
            method="slice_np_vectorized",
            num_chains=20,
            warmup_steps=20,
            init_strategy="proposal",
        )
    )

    x_o = torch.tensor([[0.5, -1.0]])
    samples = posterior.sample((400,), x=x_o, show_progress_bars=False)

    shrink = 1 / (1 + NOISE**2)
    reference = torch.distributions.MultivariateNormal(
        shrink * x_o[0], NOISE**2 * shrink * torch.eye(dim)
    )
    torch.testing.assert_close(samples.mean(0), reference.mean, atol=0.12, rtol=0)
    score = c2st(samples, reference.sample((400,))).item()
    print(f"NLE with slice sampling: C2ST {score:.3f}")
    assert score <= 0.62


def test_typed_options_match_the_builder_defaults():
    parameters = inspect.signature(flow_matching_nn).parameters
    typed = {
        name: p.default
        for name, p in parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    known = NETWORK_DEFAULTS | ESTIMATOR_DEFAULTS | SOLVER_DEFAULTS | COUPLING_DEFAULTS
    assert typed == known | {"width": DEFAULT_WIDTH, "velocity_net": None}


def test_typed_builder_builds_for_npe_and_nle_without_warnings():
    prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    theta, x = torch.randn(50, 2), torch.randn(50, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        npe_builder = flow_matching_nn(width=32, depth=2, rtol=1e-4, z_score_x=None)
        nle_builder = flow_matching_nn("likelihood", width=16, z_score_theta=None)
        NPE(prior, density_estimator=npe_builder)
        NLE(prior, density_estimator=nle_builder)

    posterior_estimator = pickle.loads(pickle.dumps(npe_builder))(theta, x)
    assert posterior_estimator.input_shape == (2,)
    assert posterior_estimator.condition_shape == (5,)
    assert posterior_estimator.net.width == 32
    assert posterior_estimator.solver.rtol == 1e-4

    likelihood_estimator = nle_builder(theta, x)
    assert likelihood_estimator.input_shape == (5,)
    assert likelihood_estimator.condition_shape == (2,)
    # z-scoring follows the variable, not its role: x is z-scored, theta is not.
    torch.testing.assert_close(likelihood_estimator.theta_mean, x.mean(0))
    assert isinstance(likelihood_estimator.embedding_net, torch.nn.Identity)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"estimate": "joint"}, "`estimate`"),
        ({"z_score_x": "robust"}, "`z_score_x`"),
        ({"dropout": 1.5}, "`dropout`"),
        ({"rtol": -1.0}, "`rtol`"),
        ({"method": "rk45"}, "`method`"),
        ({"time_power_law_alpha": -2.0}, "`time_power_law_alpha`"),
        ({"num_draws": 0}, "`num_draws`"),
        ({"divergence": "approximate"}, "`divergence`"),
    ],
)
def test_typed_options_are_checked_up_front(options, match):
    with pytest.raises(ValueError, match=match):
        flow_matching_nn(**options)
