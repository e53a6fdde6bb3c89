"""Trains NPE on CUDA, compares the estimator with its CPU copy and times both.

Run as `python tests/gpu_check.py`; it prints a table and exits with 1 if CUDA and
CPU disagree, and with 0 (saying so) where CUDA is not available.
"""

import copy
import functools
import sys
import time
from collections.abc import Callable

import torch
from sbi.inference import NPE

import sbi_fm_plugin  # noqa: F401 (registers "flow_matching")

D = 2
NOISE = 0.5
NUM_TIMED = 100_000
LOG_PROB_ATOL = 1e-3


def timed(device: torch.device, function: Callable[[], torch.Tensor]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def check(device: str = "cuda") -> list[tuple[str, str, str, bool]]:
    """Returns rows (quantity, on `device`, on the CPU, whether they agree)."""
    device = torch.device(device)
    torch.manual_seed(0)
    # sbi wants the prior on the training device.
    prior = torch.distributions.MultivariateNormal(
        torch.zeros(D, device=device), torch.eye(D, device=device)
    )
    theta = prior.sample((2000,))
    x = theta + NOISE * torch.randn_like(theta)
    inference = NPE(
        prior,
        density_estimator="flow_matching",
        device=str(device),
        show_progress_bars=False,
    )
    estimator = inference.append_simulations(theta, x).train(max_num_epochs=20)
    estimator.eval()
    cpu = copy.deepcopy(estimator).cpu()
    rows = []

    on_device = next(estimator.parameters()).device
    rows.append(("trained on", str(on_device), "cpu", on_device.type == device.type))

    x_o = torch.tensor([[0.5, -1.0]])
    points = x_o / (1 + NOISE**2) + torch.randn(1000, D) * 0.5
    with torch.no_grad():
        log_p = estimator.log_prob(points.to(device), x_o.to(device)).cpu()
        cpu_log_p = cpu.log_prob(points, x_o)
    error = (log_p - cpu_log_p).abs().max().item()
    rows.append(
        (
            "log_prob of 1000 points",
            f"{log_p.mean():.4f}",
            f"{cpu_log_p.mean():.4f}",
            error <= LOG_PROB_ATOL,
        )
    )
    rows.append(("  max |difference|", f"{error:.2e}", "", error <= LOG_PROB_ATOL))

    # The devices draw different noise: compare the samples' moments.
    samples = estimator.sample((NUM_TIMED,), x_o.to(device))[:, 0].cpu()
    cpu_samples = cpu.sample((NUM_TIMED,), x_o)[:, 0]
    error = (samples.mean(0) - cpu_samples.mean(0)).abs().max().item()
    tolerance = 5 * (2 / NUM_TIMED) ** 0.5 * cpu_samples.std(0).max().item()
    rows.append(
        ("  sample mean max |difference|", f"{error:.2e}", "", error <= tolerance)
    )
    error = (samples.std(0) - cpu_samples.std(0)).abs().max().item()
    rows.append(
        ("  sample std max |difference|", f"{error:.2e}", "", error <= tolerance)
    )

    timings = {
        f"time: sample {NUM_TIMED:,} (s)": lambda e, c: e.sample((NUM_TIMED,), c),
        f"time: log_prob {NUM_TIMED:,} (s)": lambda e, c: e.log_prob(
            torch.randn(NUM_TIMED, D, device=c.device), c
        ),
    }
    for name, run in timings.items():
        with torch.no_grad():
            on_device = timed(device, functools.partial(run, estimator, x_o.to(device)))
            on_cpu = timed(torch.device("cpu"), functools.partial(run, cpu, x_o))
        rows.append((name, f"{on_device:.3f}", f"{on_cpu:.3f}", True))

    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("CUDA not available")
        return 0

    rows = check("cuda")
    width = max(len(row[0]) for row in rows)
    print(f"{'':{width}}  {'cuda':>10}  {'cpu':>10}  ok")
    for name, on_device, on_cpu, ok in rows:
        print(f"{name:{width}}  {on_device:>10}  {on_cpu:>10}  {'yes' if ok else 'NO'}")
    return 0 if all(row[3] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
