import pytest
import torch
from gaussian import random_gaussian_velocity

from sbi_fm_plugin import ode
from sbi_fm_plugin.ode import SolverError, SolverOptions

D, E = 3, 2
TIGHT = SolverOptions(rtol=1e-6, atol=1e-6)


@pytest.fixture
def target():
    gaussian = random_gaussian_velocity(D, E)
    x = torch.randn(E)
    distribution = gaussian.distribution(x)

    def velocity(theta_t, t):
        batch = theta_t.shape[:-1]
        v = gaussian(
            theta_t.reshape(-1, D), x.expand(batch.numel(), E), t.expand(batch.numel())
        )
        return v.reshape(theta_t.shape)

    return velocity, distribution


@pytest.mark.parametrize(
    "options",
    [SolverOptions(), SolverOptions(method="rk4", num_steps=20)],
    ids=["dopri5", "rk4"],
)
def test_samples_match_analytic_gaussian(target, options):
    velocity, distribution = target
    samples = ode.sample(velocity, torch.randn(20_000, D), options)

    torch.testing.assert_close(samples.mean(0), distribution.mean, atol=0.03, rtol=0)
    torch.testing.assert_close(
        torch.cov(samples.T), distribution.covariance_matrix, atol=0.03, rtol=0
    )


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_log_prob_matches_analytic_gaussian(target, method):
    velocity, distribution = target
    theta = distribution.sample((100,))
    options = TIGHT.replace(method=method, num_steps=50)

    torch.testing.assert_close(
        ode.log_prob(velocity, theta, options),
        distribution.log_prob(theta),
        atol=2e-3,
        rtol=0,
    )


def test_sample_and_log_prob_is_consistent(target):
    velocity, distribution = target
    theta, log_p = ode.sample_and_log_prob(velocity, torch.randn(100, D), TIGHT)

    torch.testing.assert_close(log_p, distribution.log_prob(theta), atol=2e-3, rtol=0)


def test_hutchinson_is_unbiased(target):
    velocity, distribution = target
    theta = distribution.sample((4,))
    exact = ode.log_prob(velocity, theta, SolverOptions())

    # Each of the 2,000 copies gets its own probe.
    estimates = ode.log_prob(
        velocity, theta.expand(2000, 4, D), SolverOptions(), divergence="hutchinson"
    )
    mean = estimates.mean(0)
    error = estimates.std(0) / 2000**0.5

    assert estimates.std(0).min() > 0
    assert ((mean - exact).abs() < 4 * error + 1e-3).all()


def test_log_prob_gradient_matches_analytic(target):
    velocity, distribution = target
    theta = distribution.sample((5,)).requires_grad_()
    (grad,) = torch.autograd.grad(
        ode.log_prob(velocity, theta, SolverOptions()).sum(), theta
    )

    reference = theta.detach().requires_grad_()
    (expected,) = torch.autograd.grad(distribution.log_prob(reference).sum(), reference)
    torch.testing.assert_close(grad, expected, atol=5e-3, rtol=5e-3)


def test_diverging_field_raises_within_cap():
    calls = []

    def velocity(theta, t):
        calls.append(1)
        # Backwards in time, this blows up before t = 0.
        return -(theta**3)

    with pytest.raises(SolverError, match="max_nfe=50"):
        ode.sample(velocity, torch.full((4, 2), 3.0), SolverOptions(max_nfe=50))
    assert len(calls) == 50


def test_non_finite_result_raises():
    def velocity(theta, t):
        return torch.full_like(theta, float("nan"))

    with pytest.raises(SolverError, match="non-finite"):
        ode.sample(velocity, torch.randn(4, 2), SolverOptions(method="euler"))


@pytest.mark.parametrize(
    "options, error",
    [
        ({"method": "dopri6"}, ValueError),
        ({"rtol": 0.0}, ValueError),
        ({"atol": -1e-5}, ValueError),
        ({"rtol": "1e-5"}, TypeError),
        ({"num_steps": 0}, ValueError),
        ({"num_steps": 2.5}, TypeError),
        ({"max_nfe": -3}, ValueError),
    ],
)
def test_bad_solver_options(options, error):
    name = next(iter(options))
    with pytest.raises(error, match=f"`{name}`"):
        SolverOptions(**options)


def test_replace_rejects_unknown_options():
    with pytest.raises(TypeError, match="tolerance"):
        SolverOptions().replace(tolerance=1e-3)
