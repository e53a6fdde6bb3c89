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
    x = torch.randn(1, E)
    return gaussian, x, gaussian.distribution(x[0])


@pytest.mark.parametrize(
    "options",
    [SolverOptions(), SolverOptions(method="rk4", num_steps=20)],
    ids=["dopri5", "rk4"],
)
def test_samples_match_analytic_gaussian(target, options):
    velocity, x, distribution = target
    samples = ode.sample(velocity, torch.randn(20_000, D), x, options)

    torch.testing.assert_close(samples.mean(0), distribution.mean, atol=0.03, rtol=0)
    torch.testing.assert_close(
        torch.cov(samples.T), distribution.covariance_matrix, atol=0.03, rtol=0
    )


@pytest.mark.parametrize(
    "method, per_sample_steps",
    [("dopri5", True), ("dopri5", False), ("bosh3", True), ("rk4", False)],
)
def test_log_prob_matches_analytic_gaussian(target, method, per_sample_steps):
    velocity, x, distribution = target
    theta = distribution.sample((100,))
    options = TIGHT.replace(
        method=method, num_steps=50, per_sample_steps=per_sample_steps
    )

    torch.testing.assert_close(
        ode.log_prob(velocity, theta, x, options),
        distribution.log_prob(theta),
        atol=2e-3,
        rtol=0,
    )


def test_sample_and_log_prob_is_consistent(target):
    velocity, x, distribution = target
    theta, log_p = ode.sample_and_log_prob(velocity, torch.randn(100, D), x, TIGHT)

    torch.testing.assert_close(log_p, distribution.log_prob(theta), atol=2e-3, rtol=0)


def test_hutchinson_is_unbiased(target):
    velocity, x, distribution = target
    theta = distribution.sample((4,))
    exact = ode.log_prob(velocity, theta, x, SolverOptions())

    # Each of the 2,000 copies gets its own probe.
    estimates = ode.log_prob(
        velocity, theta.repeat(2000, 1), x, SolverOptions(), divergence="hutchinson"
    ).reshape(2000, 4)
    mean = estimates.mean(0)
    error = estimates.std(0) / 2000**0.5

    assert estimates.std(0).min() > 0
    assert ((mean - exact).abs() < 4 * error + 1e-3).all()


def test_log_prob_gradient_matches_analytic(target):
    velocity, x, distribution = target
    theta = distribution.sample((5,)).requires_grad_()
    (grad,) = torch.autograd.grad(
        ode.log_prob(velocity, theta, x, SolverOptions()).sum(), theta
    )

    reference = theta.detach().requires_grad_()
    (expected,) = torch.autograd.grad(distribution.log_prob(reference).sum(), reference)
    torch.testing.assert_close(grad, expected, atol=5e-3, rtol=5e-3)


def wavy_field(theta, c, t):
    # Fast in some places, slow in others, so that trajectories need different steps.
    return torch.sin(3 * theta.flip(-1) + c) * (1 + 4 * t.unsqueeze(-1)) - theta


def test_results_do_not_depend_on_the_batch():
    theta, c = torch.randn(50, 2) * 2, torch.randn(50, 2)
    batched = ode.log_prob(wavy_field, theta, c, SolverOptions())
    alone = torch.cat(
        [
            ode.log_prob(wavy_field, theta[i : i + 1], c[i : i + 1], SolverOptions())
            for i in range(0, 50, 7)
        ]
    )
    torch.testing.assert_close(alone, batched[::7], atol=1e-6, rtol=0)

    samples = ode.sample(wavy_field, theta, c, SolverOptions())
    first = ode.sample(wavy_field, theta[:2], c[:2], SolverOptions())
    torch.testing.assert_close(first, samples[:2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("per_sample_steps", [True, False])
def test_chunks_give_the_same_results(per_sample_steps, capfd):
    theta, c = torch.randn(50, 2) * 2, torch.randn(5, 2)
    whole = TIGHT.replace(per_sample_steps=per_sample_steps)
    chunked = whole.replace(chunk_size=8, show_progress_bars=True)

    capfd.readouterr()
    for function in (ode.sample, ode.log_prob):
        torch.testing.assert_close(
            function(wavy_field, theta, c, chunked),
            function(wavy_field, theta, c, whole),
            atol=1e-6 if per_sample_steps else 1e-4,
            rtol=0,
        )
    assert "Solving the flow ODE" in capfd.readouterr().err

    # Gradients flow through every chunk.
    theta.requires_grad_(True)
    ode.log_prob(wavy_field, theta, c, chunked).sum().backward()
    assert (theta.grad.abs().sum(-1) > 0).all()


def test_each_condition_serves_its_rows():
    theta, c = torch.randn(12, 2), torch.randn(3, 2)
    expanded = c.repeat(4, 1)
    torch.testing.assert_close(
        ode.log_prob(wavy_field, theta, c, SolverOptions()),
        ode.log_prob(wavy_field, theta, expanded, SolverOptions()),
    )
    with pytest.raises(ValueError, match="M divides N"):
        ode.sample(wavy_field, theta, torch.randn(5, 2), SolverOptions())


@pytest.mark.parametrize("per_sample_steps", [True, False])
def test_per_sample_and_shared_steps_agree(per_sample_steps):
    theta, c = torch.randn(30, 2), torch.randn(30, 2)
    options = SolverOptions(per_sample_steps=per_sample_steps, rtol=1e-5, atol=1e-5)
    reference = ode.log_prob(
        wavy_field, theta, c, SolverOptions(method="rk4", num_steps=500)
    )
    torch.testing.assert_close(
        ode.log_prob(wavy_field, theta, c, options), reference, atol=2e-3, rtol=0
    )


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri8"])
def test_nan_field_raises(method):
    def velocity(theta, c, t):
        return torch.where(t.unsqueeze(-1) < 0.5, float("nan"), theta)

    with pytest.raises(SolverError):
        ode.sample(
            velocity, torch.randn(4, 2), torch.zeros(1, 1), SolverOptions(method=method)
        )


def test_diverging_field_raises_within_cap():
    calls = []

    def velocity(theta, c, t):
        calls.append(1)
        # Backwards in time, this blows up before t = 0.
        return -(theta**3)

    with pytest.raises(SolverError, match="max_nfe=50"):
        ode.sample(
            velocity,
            torch.full((4, 2), 3.0),
            torch.zeros(1, 1),
            SolverOptions(max_nfe=50),
        )
    assert len(calls) == 50


def test_non_finite_result_raises():
    def velocity(theta, c, t):
        return torch.full_like(theta, float("nan"))

    with pytest.raises(SolverError, match="non-finite"):
        ode.sample(
            velocity,
            torch.randn(4, 2),
            torch.zeros(1, 1),
            SolverOptions(method="euler"),
        )


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
        ({"per_sample_steps": 1}, TypeError),
        ({"chunk_size": 0}, ValueError),
        ({"show_progress_bars": "yes"}, TypeError),
    ],
)
def test_bad_solver_options(options, error):
    name = next(iter(options))
    with pytest.raises(error, match=f"`{name}`"):
        SolverOptions(**options)


def test_replace_rejects_unknown_options():
    with pytest.raises(TypeError, match="tolerance"):
        SolverOptions().replace(tolerance=1e-3)
