"""Benchmark of the noise couplings of the flow matching estimator.

Every coupling variant is trained on the same simulations of each task; reported per
variant: C2ST against sbibm's reference posteriors (averaged over observations),
training wall time per epoch, velocity evaluations per sample when drawing with the
default adaptive solver, and sampling time (interleaved between variants, as a
ratio to independent pairing). See ``benchmarks/README.md``.

Run from the repository root, e.g. ``python -m benchmarks.coupling --quick``.
"""

from __future__ import annotations

__all__ = ["VARIANTS", "main", "to_markdown"]

import argparse
import functools
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sbi.inference import NPE, NeuralInference
from torch.distributions import Distribution

from benchmarks.run import (
    RESULTS_DIR,
    EstimatorSpec,
    NullTracker,
    Settings,
    run_and_report,
)
from benchmarks.tasks import TASK_NAMES
from sbi_fm_plugin import flow_matching_nn

#: Coupling options of each variant, passed to `flow_matching_nn`.
VARIANT_OPTIONS: dict[str, dict[str, Any]] = {
    "independent": {"coupling": "none"},
    "exact-blind": {"coupling": "exact", "coupling_condition_ratio": 0.0},
    "exact-r1": {"coupling": "exact", "coupling_condition_ratio": 1.0},
    "exact-r10": {"coupling": "exact", "coupling_condition_ratio": 10.0},
    "exact-r100": {"coupling": "exact", "coupling_condition_ratio": 100.0},
    "sinkhorn-r1": {"coupling": "sinkhorn", "coupling_condition_ratio": 1.0},
    "sinkhorn_log-r1": {"coupling": "sinkhorn_log", "coupling_condition_ratio": 1.0},
    "partial-r1": {"coupling": "partial", "coupling_condition_ratio": 1.0},
}
DEFAULT_VARIANTS = (
    "independent",
    "exact-blind",
    "exact-r1",
    "exact-r10",
    "exact-r100",
    "sinkhorn-r1",
    "partial-r1",
)


def _build(options: dict[str, Any], prior: Distribution) -> NeuralInference:
    return NPE(
        prior,
        density_estimator=flow_matching_nn(**options),
        tracker=NullTracker(),
        show_progress_bars=False,
    )


VARIANTS: dict[str, EstimatorSpec] = {
    name: EstimatorSpec(name, functools.partial(_build, options), is_ode=True)
    for name, options in VARIANT_OPTIONS.items()
}


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Parses command-line flags into the settings of the shared harness."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.coupling",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASK_NAMES,
        default=("two_moons", "gaussian_linear_uniform"),
    )
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS))
    parser.add_argument("--observations", nargs="+", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="End-to-end check with tiny budgets, not meaningful numbers.",
    )
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("--out-md", type=Path, default=None)
    args = parser.parse_args(argv)

    stem = "coupling_quick" if args.quick else "coupling"
    return Settings(
        tasks=tuple(args.tasks),
        budgets=(args.budget or (500 if args.quick else 10_000),),
        estimators=tuple(args.variants or DEFAULT_VARIANTS),
        observations=tuple(args.observations or ((1,) if args.quick else (1, 2, 3))),
        seed=args.seed,
        quick=args.quick,
        max_num_epochs=3 if args.quick else None,
        num_c2st_samples=500 if args.quick else 10_000,
        num_timing_samples=200 if args.quick else 10_000,
        num_log_prob_points=100 if args.quick else 1000,
        repeats=args.repeats or (1 if args.quick else 3),
        c2st_classifier="rf",
        cache_dir=None,
        out_json=args.out_json or RESULTS_DIR / f"{stem}.json",
        out_md=args.out_md or RESULTS_DIR / f"{stem}.md",
    )


def _ratio_to_independent(record: dict[str, Any], baseline: dict[str, Any]) -> Any:
    # Median of per-round ratios, as the main harness does against nsf.
    if "sample" not in record or "sample" not in baseline:
        return None
    rounds = zip(record["sample"]["all_s"], baseline["sample"]["all_s"], strict=True)
    return statistics.median(s / b for s, b in rounds)


def to_markdown(report: dict[str, Any]) -> str:
    """Formats a coupling report as a Markdown table."""
    meta = report["metadata"]
    s = meta["settings"]
    lines = [
        f"sbi {meta['sbi']}, torch {meta['torch']} ({meta['torch_threads']} thread), "
        f"{meta['date']}, seed {s['seed']}, observations {s['observations']}, "
        f"{s['num_timing_samples']} samples, {s['repeats']} timing rounds"
        + (" — QUICK MODE, numbers are meaningless" if s["quick"] else ""),
        "",
        (
            "| task | sims | coupling | C2ST | train s | epochs | s/epoch | "
            "NFE/sample | sample s | sample ×independent |"
        ),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    baselines = {
        (r["task"], r["budget"]): r
        for r in report["results"]
        if r["estimator"] == "independent"
    }
    for r in report["results"]:
        head = f"| {r['task']} | {r['budget']} | {r['estimator']} |"
        if r.get("error"):
            lines.append(head + f" FAILED: {r['error'][:60]} |" + " |" * 6)
            continue
        train = r["train"]
        baseline = baselines.get((r["task"], r["budget"]), {})
        ratio = _ratio_to_independent(r, baseline)
        cells = [
            f"{r['c2st']['mean']:.3f} ± {r['c2st']['std']:.3f}",
            f"{train['wall_s']:.1f}",
            str(train["epochs"]),
            f"{train['wall_s'] / train['epochs']:.2f}",
            f"{r['nfe']['sample_evals_per_sample']:.1f}",
            f"{r['sample']['median_s']:.3f}",
            "–" if ratio is None else f"{ratio:.2f}",
        ]
        lines.append(head + " " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the coupling benchmark; returns 1 if any variant failed."""
    return run_and_report(parse_args(argv), VARIANTS, to_markdown)


if __name__ == "__main__":
    sys.exit(main())
