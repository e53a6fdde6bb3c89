"""sbi's diagnostics and batched requests on flow matching posteriors."""

import contextlib

import matplotlib
import torch
from linear_gaussian import NOISE, D, analytic_posterior, prior, simulate
from sbi.analysis import pairplot, plot_tarp, sbc_rank_plot
from sbi.diagnostics import check_sbc, check_tarp, run_sbc, run_tarp

matplotlib.use("Agg")

NUM_DATASETS = 200
NUM_SAMPLES = 100
# Data this noisy make the trained posteriors far too narrow: miscalibrated.
WRONG_NOISE = 8 * NOISE


@contextlib.contextmanager
def solver_options(posterior, **options):
    # The trained posterior is shared between tests: put its options back.
    estimator = posterior.posterior_estimator
    solver = estimator.solver
    estimator.solver = solver.replace(**options)
    try:
        yield
    finally:
        estimator.solver = solver


def datasets(noise=NOISE):
    torch.manual_seed(1)
    thetas = prior.sample((NUM_DATASETS,))
    return thetas, thetas + noise * torch.randn_like(thetas)


def sbc(posterior, thetas, xs, **kwargs):
    ranks, dap = run_sbc(
        thetas,
        xs,
        posterior,
        num_posterior_samples=NUM_SAMPLES,
        show_progress_bar=False,
        **kwargs,
    )
    return ranks, check_sbc(ranks, thetas, dap, num_posterior_samples=NUM_SAMPLES)


def test_sbc_ranks_are_uniform_for_a_trained_posterior(trained):
    _, posterior = trained
    ranks, checks = sbc(posterior, *datasets())

    assert ranks.shape == (NUM_DATASETS, D)
    # Three tests at once: a strict level keeps false alarms rare. (sbi's C2ST of
    # the ranks is left out: with 200 datasets it reads about 0.7 even here.)
    assert (checks["ks_pvals"] > 1e-3).all(), checks
    assert (checks["c2st_dap"] < 0.6).all(), checks

    figure, _ = sbc_rank_plot(ranks, NUM_SAMPLES, plot_type="hist", num_bins=10)
    figure.savefig("ranks.png")


def test_sbc_flags_an_overconfident_posterior(trained):
    _, posterior = trained
    _, checks = sbc(posterior, *datasets(noise=WRONG_NOISE))

    assert (checks["ks_pvals"] < 1e-6).all(), checks


def test_expected_coverage_from_log_prob(trained):
    _, posterior = trained

    def negative_log_prob(theta, x):
        return -posterior.log_prob(theta, x=x, norm_posterior=False)

    # Two ODE solves per data set: half of them keep the test short.
    thetas, xs = datasets()
    _, checks = sbc(posterior, thetas[:100], xs[:100], reduce_fns=negative_log_prob)
    assert checks["ks_pvals"].item() > 1e-3, checks

    thetas, xs = datasets(noise=WRONG_NOISE)
    _, checks = sbc(posterior, thetas[:100], xs[:100], reduce_fns=negative_log_prob)
    assert checks["ks_pvals"].item() < 1e-6, checks


def test_tarp_coverage_is_near_the_diagonal(trained):
    _, posterior = trained
    kwargs = {"num_posterior_samples": NUM_SAMPLES, "show_progress_bar": False}

    ecp, alpha = run_tarp(*datasets(), posterior, **kwargs)
    atc, ks_pval = check_tarp(ecp, alpha)
    assert abs(atc) < 0.02 and ks_pval > 0.05, (atc, ks_pval)
    assert (ecp - alpha).abs().max() < 0.1
    figure, _ = plot_tarp(ecp, alpha)
    figure.savefig("tarp.png")

    ecp, alpha = run_tarp(*datasets(noise=WRONG_NOISE), posterior, **kwargs)
    atc, ks_pval = check_tarp(ecp, alpha)
    assert ks_pval < 1e-3, (atc, ks_pval)
    assert (ecp - alpha).abs().max() > 0.3


def test_batched_sampling_and_densities_match_analytic(trained):
    _, posterior = trained
    torch.manual_seed(2)
    xs = simulate(prior.sample((20,)))

    # Small chunks: a request of 20 x 500 points goes through in 10 of them.
    with solver_options(posterior, chunk_size=1000):
        samples = posterior.sample_batched((500,), xs, show_progress_bars=False)
        theta = torch.stack([analytic_posterior(x[None]).sample((50,)) for x in xs], 1)
        log_p = posterior.log_prob_batched(theta, xs, norm_posterior=False)
    unchunked = posterior.log_prob_batched(theta, xs, norm_posterior=False)

    assert samples.shape == (500, 20, D)
    expected = torch.stack([analytic_posterior(x[None]).mean for x in xs])
    torch.testing.assert_close(samples.mean(0), expected, atol=0.15, rtol=0)
    analytic = torch.stack(
        [analytic_posterior(x[None]).log_prob(theta[:, i]) for i, x in enumerate(xs)],
        1,
    )
    assert log_p.shape == (50, 20)
    # As accurate as a single observation's densities (see test_sbi.py).
    assert (log_p - analytic).abs().median() < 0.25
    # Each point's result is independent of its companions, so chunks change nothing.
    torch.testing.assert_close(log_p, unchunked, atol=1e-4, rtol=0)


def test_progress_bars_follow_the_sbi_caller(trained, capfd):
    _, posterior = trained
    xs = simulate(prior.sample((8,)))
    bar = "Solving the flow ODE"

    with solver_options(posterior, chunk_size=200):
        capfd.readouterr()
        posterior.sample_batched((100,), xs, show_progress_bars=True)
        assert bar in capfd.readouterr().err

        posterior.sample_batched((100,), xs, show_progress_bars=False)
        posterior.log_prob_batched(torch.zeros(100, 8, D), xs, norm_posterior=False)
        assert bar not in capfd.readouterr().err

    with solver_options(posterior, chunk_size=200, show_progress_bars=True):
        posterior.log_prob_batched(torch.zeros(100, 8, D), xs, norm_posterior=False)
        assert bar in capfd.readouterr().err


def test_pairplot_of_posterior_samples(trained, tmp_path):
    _, posterior = trained
    samples = posterior.sample((2000,), x=simulate(prior.sample((1,))))
    figure, _ = pairplot(samples, labels=[f"$\\theta_{i}$" for i in range(D)])
    figure.savefig(tmp_path / "pairplot.png")

    assert (tmp_path / "pairplot.png").stat().st_size > 0
