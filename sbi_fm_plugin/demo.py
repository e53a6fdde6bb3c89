r"""A short demonstration: NPE with flow matching on a linear Gaussian simulator.

Run with `python -m sbi_fm_plugin.demo`. It trains `NPE(density_estimator=
"flow_matching")` on 2,000 simulations of :math:`x \sim \mathcal{N}(\theta,
0.5^2 I)` with prior :math:`\theta \sim \mathcal{N}(0, I)`, whose posterior is known,
prints what the posterior learned next to the exact answer and a simulation-based
calibration (SBC) summary, and saves a pairplot of posterior samples to
`flow_matching_demo.png`.
"""

__all__ = ["MemoryTracker", "main"]

import time
import warnings
from pathlib import Path

import torch


def main(
    num_simulations: int = 2000,
    seed: int = 0,
    num_sbc_datasets: int = 200,
    image: str | Path = "flow_matching_demo.png",
) -> None:
    r"""Trains, samples, evaluates and calibrates a flow matching posterior, and
    prints a summary.

    Args:
        num_simulations: Training budget.
        seed: Seed of the simulations and the training.
        num_sbc_datasets: Number of simulated data sets in the SBC check.
        image: Where to save the pairplot.
    """
    import matplotlib

    matplotlib.use("Agg")
    from sbi.analysis import pairplot
    from sbi.diagnostics import check_sbc, run_sbc
    from sbi.inference import NPE
    from sbi.utils.metrics import c2st

    torch.manual_seed(seed)
    dim, noise = 3, 0.5
    prior = torch.distributions.MultivariateNormal(torch.zeros(dim), torch.eye(dim))
    theta = prior.sample((num_simulations,))
    x = theta + noise * torch.randn_like(theta)

    x_o = torch.tensor([[0.5, -1.0, 1.5]])
    shrink = 1 / (1 + noise**2)
    exact = torch.distributions.MultivariateNormal(
        shrink * x_o[0], noise**2 * shrink * torch.eye(dim)
    )

    inference = NPE(prior, density_estimator="flow_matching", tracker=MemoryTracker())
    start = time.perf_counter()
    inference.append_simulations(theta, x).train()
    training_time = time.perf_counter() - start
    posterior = inference.build_posterior()

    start = time.perf_counter()
    samples = posterior.sample((10_000,), x=x_o, show_progress_bars=False)
    sampling_time = time.perf_counter() - start
    reference = exact.sample((10_000,))
    log_p = posterior.log_prob(reference[:1000], x=x_o, norm_posterior=False)
    error = (log_p - exact.log_prob(reference[:1000])).abs()

    epochs = inference.summary["epochs_trained"][-1]
    print(
        f"\nTrained on {num_simulations} simulations: {epochs} epochs, "
        f"{training_time:.1f} s; 10,000 samples in {sampling_time:.2f} s."
    )
    print(f"Observation x_o = {x_o[0].tolist()}")
    print("              posterior mean           posterior std")
    for name, mean, std in (
        ("flow matching", samples.mean(0), samples.std(0)),
        ("exact", exact.mean, exact.stddev),
    ):
        print(f"{name:>13}  {_format(mean)}  {_format(std)}")
    print(
        f"C2ST against exact samples: {c2st(samples, reference).item():.3f} "
        "(0.5 is indistinguishable)"
    )
    print(
        f"log_prob error against the exact density: median {error.median():.3f}, "
        f"mean {error.mean():.3f} nats"
    )

    num_posterior_samples = 100
    thetas = prior.sample((num_sbc_datasets,))
    xs = thetas + noise * torch.randn_like(thetas)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # sbi caps its sampling batches for many observations, and says so.
        warnings.filterwarnings("ignore", "Capping max_sampling_batch_size")
        ranks, dap = run_sbc(
            thetas, xs, posterior, num_posterior_samples, show_progress_bar=True
        )
    checks = check_sbc(ranks, thetas, dap, num_posterior_samples)
    print(
        f"\nSBC on {num_sbc_datasets} simulated data sets "
        f"({time.perf_counter() - start:.1f} s):"
    )
    print(
        f"  KS p-values of the ranks per parameter: {_format(checks['ks_pvals'])} "
        "(small values flag miscalibration)"
    )
    print(
        "  C2ST of the data-averaged posterior against the prior: "
        f"{_format(checks['c2st_dap'])} (0.5 is calibrated)"
    )

    figure, _ = pairplot(
        [samples[:2000], reference[:2000]],
        labels=[f"theta_{i}" for i in range(dim)],
        figsize=(6, 6),
        upper="contour",
        diag="kde",
    )
    figure.suptitle("flow matching (blue) and exact (green) posterior")
    figure.savefig(image, dpi=100)
    print(f"\nPairplot saved to {Path(image).resolve()}")


class MemoryTracker:
    r"""Keeps sbi's training metrics in memory instead of writing TensorBoard logs."""

    log_dir = None

    def __init__(self) -> None:
        self.metrics: dict[str, list[float]] = {}

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        self.metrics.setdefault(name, []).append(value)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for name, value in metrics.items():
            self.log_metric(name, value, step)

    def log_params(self, params: dict) -> None:
        pass

    def add_figure(self, name: str, figure: object, step: int | None = None) -> None:
        pass

    def flush(self) -> None:
        pass


def _format(values: torch.Tensor) -> str:
    return "[" + ", ".join(f"{value:6.3f}" for value in values.tolist()) + "]"


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
