r"""Time and peak memory of sbi's batched requests: an SBC run and `log_prob_batched`.

A linear Gaussian problem (3 parameters, prior N(0, I), x = theta + 0.5 noise) is
learned by sbi's `nsf` and by `flow_matching` from the same simulations; then, for
each, sbi's `run_sbc` draws `--num-samples` posterior samples for each of
`--num-observations` observations (through `sample_batched`), and
`log_prob_batched` evaluates `--num-log-prob-points` points per observation.
Reported: wall time, peak growth of resident memory, and sbi's SBC check (KS
p-values of the ranks, per parameter).

    python -m benchmarks.batched [--num-observations 1000] [--num-samples 1000]
        [--num-log-prob-points 100]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sbi.diagnostics import check_sbc, run_sbc
from sbi.inference import NPE

from benchmarks.run import RESULTS_DIR, NullTracker, _metadata, measure_peak_rss

DIM, NOISE = 3, 0.5


def _train(
    name: str, prior: torch.distributions.Distribution, args: argparse.Namespace
) -> Any:
    torch.manual_seed(args.seed)
    theta = prior.sample((200 if args.quick else 2000,))
    x = theta + NOISE * torch.randn_like(theta)
    inference = NPE(
        prior, density_estimator=name, tracker=NullTracker(), show_progress_bars=False
    )
    start = time.perf_counter()
    inference.append_simulations(theta, x).train(
        **({"max_num_epochs": 3} if args.quick else {})
    )
    return inference.build_posterior(), time.perf_counter() - start


def _measure(name: str, posterior: Any, args: argparse.Namespace) -> dict[str, Any]:
    prior = posterior.prior
    torch.manual_seed(args.seed + 1)
    thetas = prior.sample((args.num_observations,))
    xs = thetas + NOISE * torch.randn_like(thetas)
    record: dict[str, Any] = {"estimator": name}

    with warnings.catch_warnings():
        # sbi warns about the size of the request and caps its sampling batches.
        warnings.simplefilter("ignore")
        with measure_peak_rss() as memory:
            start = time.perf_counter()
            ranks, dap = run_sbc(
                thetas,
                xs,
                posterior,
                num_posterior_samples=args.num_samples,
                show_progress_bar=False,
            )
            record["sbc_s"] = time.perf_counter() - start
    record["sbc_peak_mb"] = memory.growth_mb
    checks = check_sbc(ranks, thetas, dap, num_posterior_samples=args.num_samples)
    record["sbc_ks_pvals"] = checks["ks_pvals"].tolist()

    points = prior.sample((args.num_log_prob_points, args.num_observations))
    with torch.no_grad(), measure_peak_rss() as memory:
        start = time.perf_counter()
        posterior.log_prob_batched(points, xs, norm_posterior=False)
        record["log_prob_s"] = time.perf_counter() - start
    record["log_prob_peak_mb"] = memory.growth_mb

    return record


def to_markdown(report: dict[str, Any]) -> str:
    """Formats the records as a Markdown table."""
    settings = report["metadata"]["settings"]
    title = (
        f"{settings['num_observations']} observations x {settings['num_samples']} "
        f"samples (SBC), x {settings['num_log_prob_points']} points (log_prob), "
        f"{report['metadata']['date']}"
    )
    header = (
        "| estimator | train s | SBC s | SBC peak MB | log_prob_batched s "
        "| log_prob peak MB | SBC KS p-values |"
    )
    lines = [title, "", header, "|---|---:|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        pvals = " / ".join(f"{p:.2f}" for p in r["sbc_ks_pvals"])
        lines.append(
            f"| {r['estimator']} | {r['train_s']:.1f} | {r['sbc_s']:.1f} | "
            f"{r['sbc_peak_mb']:.0f} | {r['log_prob_s']:.1f} | "
            f"{r['log_prob_peak_mb']:.0f} | {pvals} |"
        )

    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batched", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--num-observations", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-log-prob-points", type=int, default=100)
    parser.add_argument("--estimators", nargs="+", default=("nsf", "flow_matching"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Train on 200 simulations for 4 epochs: checks the script, not numbers.",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "batched")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    prior = torch.distributions.MultivariateNormal(torch.zeros(DIM), torch.eye(DIM))
    results = []
    for name in args.estimators:
        posterior, train_s = _train(name, prior, args)
        record = {"train_s": train_s} | _measure(name, posterior, args)
        print(record, flush=True)
        results.append(record)

    report = {"metadata": _metadata(args), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    table = to_markdown(report)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
