"""Benchmark of flow matching posterior estimation against sbi's NSF and FMPE.

For every task and simulation budget, one seeded training set is simulated and each
requested estimator is trained on it with sbi's default training settings. Reported
per estimator: C2ST against sbibm's reference posteriors, training time and epochs,
sampling and log-prob times (interleaved between estimators, as medians and as
ratios to NSF), velocity-network evaluations of the ODE-based estimators, and peak
resident-memory growth. See ``benchmarks/README.md``.

Run from the repository root, e.g. ``python -m benchmarks.run --quick``.
"""

from __future__ import annotations

__all__ = [
    "ESTIMATORS",
    "main",
    "parse_args",
    "run_and_report",
    "run_benchmark",
    "to_markdown",
    "write_report",
]

import argparse
import contextlib
import ctypes
import gc
import importlib
import importlib.metadata
import inspect
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sbi
import torch
from sbi.inference import FMPE, NPE, NeuralInference
from sbi.inference.posteriors.base_posterior import NeuralPosterior
from sbi.utils.metrics import c2st
from threadpoolctl import threadpool_limits
from torch import Tensor, nn
from torch.distributions import Distribution

from benchmarks.tasks import TASK_NAMES, Task, get_task

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_TASKS = ("two_moons", "gaussian_linear_uniform")


class NullTracker:
    """A tracker for sbi trainers that discards everything.

    sbi's default tracker writes TensorBoard files to ``./sbi-logs``; the benchmark
    needs none of them.
    """

    @property
    def log_dir(self) -> str | None:
        return None

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def add_figure(self, name: str, figure: Any, step: int | None = None) -> None:
        pass

    def flush(self) -> None:
        pass


def _build_nsf(prior: Distribution) -> NeuralInference:
    return NPE(
        prior,
        density_estimator="nsf",
        tracker=NullTracker(),
        show_progress_bars=False,
    )


def _build_fmpe(prior: Distribution) -> NeuralInference:
    return FMPE(prior, tracker=NullTracker(), show_progress_bars=False)


def _build_flow_matching(prior: Distribution) -> NeuralInference:
    # Installing the plugin is enough; the import also covers environments where
    # its start-up hook is switched off.
    importlib.import_module("sbi_fm_plugin")
    return NPE(
        prior,
        density_estimator="flow_matching",
        tracker=NullTracker(),
        show_progress_bars=False,
    )


@dataclass(frozen=True)
class EstimatorSpec:
    """How to build one estimator.

    Attributes:
        name: Command-line name.
        build: Returns an untrained sbi inference object for a prior.
        is_ode: Whether samples come from integrating a velocity network, in which
            case network evaluations are counted.
    """

    name: str
    build: Callable[[Distribution], NeuralInference]
    is_ode: bool


ESTIMATORS: dict[str, EstimatorSpec] = {
    spec.name: spec
    for spec in (
        EstimatorSpec("nsf", _build_nsf, is_ode=False),
        EstimatorSpec("fmpe", _build_fmpe, is_ode=True),
        EstimatorSpec("flow_matching", _build_flow_matching, is_ode=True),
    )
}


@dataclass(frozen=True)
class Settings:
    """Resolved benchmark settings (command-line flags plus mode presets)."""

    tasks: tuple[str, ...]
    budgets: tuple[int, ...]
    estimators: tuple[str, ...]
    observations: tuple[int, ...]
    seed: int
    quick: bool
    max_num_epochs: int | None
    num_c2st_samples: int
    num_timing_samples: int
    num_log_prob_points: int
    repeats: int
    c2st_classifier: str
    cache_dir: Path | None
    out_json: Path
    out_md: Path


# Presets for flags left unset; quick mode only checks that everything runs.
_FULL_PRESET: dict[str, Any] = {
    "budgets": (1000, 10000),
    "observations": (1, 2, 3, 4, 5),
    "max_num_epochs": None,
    "num_c2st_samples": 10_000,
    "num_timing_samples": 10_000,
    "num_log_prob_points": 1000,
    "repeats": 5,
    "out_json": RESULTS_DIR / "results.json",
    "out_md": RESULTS_DIR / "results.md",
}
_QUICK_PRESET: dict[str, Any] = {
    "budgets": (500,),
    "observations": (1,),
    "max_num_epochs": 3,
    # Barely trained ODE estimators reject most samples outside a bounded prior,
    # which makes sampling the slowest part of the quick run.
    "num_c2st_samples": 500,
    "num_timing_samples": 200,
    "num_log_prob_points": 100,
    "repeats": 2,
    "out_json": RESULTS_DIR / "quick.json",
    "out_md": RESULTS_DIR / "quick.md",
}


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Parses command-line flags and fills unset ones from the mode's preset.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The resolved settings.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=None)
    parser.add_argument("--budgets", nargs="+", type=int, default=None)
    parser.add_argument(
        "--estimators", nargs="+", choices=tuple(ESTIMATORS), default=None
    )
    parser.add_argument(
        "--observations",
        nargs="+",
        type=int,
        default=None,
        help="sbibm observation numbers (1-10) for C2ST; the first one is used "
        "for timings, network evaluations and memory.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="End-to-end check with tiny budgets, not meaningful numbers.",
    )
    parser.add_argument(
        "--max-num-epochs",
        type=int,
        default=None,
        help="Passed to .train(); unset means sbi's default (quick: 3).",
    )
    parser.add_argument("--num-c2st-samples", type=int, default=None)
    parser.add_argument("--num-timing-samples", type=int, default=None)
    parser.add_argument("--num-log-prob-points", type=int, default=None)
    parser.add_argument(
        "--repeats", type=int, default=None, help="Interleaved timing repeats."
    )
    parser.add_argument(
        "--c2st-classifier",
        choices=("mlp", "rf"),
        default="rf",
        help="Classifier of sbi's c2st: its default random forest, or its MLP, "
        "close to sbibm's but 2-5x slower on this machine.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="Where the sbibm wheel is cached (default benchmarks/.cache).",
    )
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("--out-md", type=Path, default=None)
    args = parser.parse_args(argv)

    preset = _QUICK_PRESET if args.quick else _FULL_PRESET

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return preset[name] if value is None else value

    observations = tuple(pick("observations"))
    if args.quick and args.observations is not None:
        observations = observations[:1]
    if any(not 1 <= n <= 10 for n in observations):
        parser.error("--observations must be between 1 and 10.")
    budgets = tuple(pick("budgets"))
    if any(b < 10 for b in budgets):
        parser.error("--budgets must be at least 10.")

    return Settings(
        tasks=tuple(args.tasks or DEFAULT_TASKS),
        budgets=budgets,
        estimators=tuple(dict.fromkeys(args.estimators or ESTIMATORS)),
        observations=observations,
        seed=args.seed,
        quick=args.quick,
        max_num_epochs=pick("max_num_epochs"),
        num_c2st_samples=pick("num_c2st_samples"),
        num_timing_samples=pick("num_timing_samples"),
        num_log_prob_points=pick("num_log_prob_points"),
        repeats=max(1, pick("repeats")),
        c2st_classifier=args.c2st_classifier,
        cache_dir=args.cache_dir,
        out_json=pick("out_json"),
        out_md=pick("out_md"),
    )


def _derive_seed(base: int, *keys: object) -> int:
    """Returns a seed that depends on ``base`` and ``keys`` only.

    Each estimator gets its own seeds, so its numbers do not depend on which other
    estimators run before it.
    """
    text = "/".join(str(k) for k in (base, *keys))
    return zlib.crc32(text.encode())


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _current_rss() -> int | None:
    """Returns the resident set size in bytes, or None where /proc is missing."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def _max_rss() -> int:
    """Returns the process's high-water resident set size in bytes."""
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss if sys.platform == "darwin" else max_rss * 1024


def _release_free_memory() -> None:
    """Returns freed heap memory to the OS so that it does not hide new growth."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class MemoryGrowth:
    """Result of :func:`measure_peak_rss`, filled in when the block exits.

    Attributes:
        growth_bytes: Peak resident-memory growth in bytes.
    """

    growth_bytes: int | None = None

    @property
    def growth_mb(self) -> float | None:
        """Peak growth in MiB, None before the block has finished."""
        return None if self.growth_bytes is None else self.growth_bytes / 2**20


@contextlib.contextmanager
def measure_peak_rss(interval: float = 0.002) -> Iterator[MemoryGrowth]:
    """Measures the peak growth of resident memory while the block runs.

    A daemon thread polls the resident set size; the result is the peak minus the
    size at entry. Without /proc the growth of ``ru_maxrss`` is used instead, which
    only sees growth beyond the process's earlier high-water mark.

    Args:
        interval: Seconds between polls.

    Yields:
        The measurement, complete once the block has exited.
    """
    _release_free_memory()
    result = MemoryGrowth()
    baseline = _current_rss()
    baseline_max = _max_rss()
    peak = baseline or 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _current_rss() or 0)
            stop.wait(interval)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        if baseline is not None:
            peak = max(peak, _current_rss() or 0)
            result.growth_bytes = peak - baseline
        else:
            result.growth_bytes = _max_rss() - baseline_max


class ForwardCounter:
    """Counts forward calls of a module and the rows they process.

    Args:
        module: The velocity network.
        dim: Parameter dimension, to turn output sizes into row counts.
    """

    def __init__(self, module: nn.Module, dim: int) -> None:
        self.module = module
        self.dim = dim
        self.calls = 0
        self.rows = 0

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.calls += 1
        if isinstance(output, Tensor):
            self.rows += output.numel() // self.dim

    @contextlib.contextmanager
    def counting(self) -> Iterator[ForwardCounter]:
        """Counts within the block, starting from zero."""
        self.calls = self.rows = 0
        handle = self.module.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()


def velocity_net(posterior: NeuralPosterior) -> nn.Module | None:
    """Finds the velocity network of an ODE-based posterior.

    sbi's FMPE posterior keeps it at ``posterior.vector_field_estimator.net``; for
    estimators plugged into NPE it is ``posterior.posterior_estimator.net``, or the
    weight average ``posterior.posterior_estimator.ema["net"]`` that the plugin
    evaluates with. The plugin's ``VelocityMLP`` is called through its ``velocity``
    method, not ``forward``, so its output layer, called once per evaluation, is
    what is returned for it.

    Args:
        posterior: An sbi posterior.

    Returns:
        The network, or None if there is none.
    """
    for owner_name in ("vector_field_estimator", "posterior_estimator"):
        owner = getattr(posterior, owner_name, None)
        # The plugin evaluates with a moving average of the weights when it has one.
        average = getattr(owner, "ema", None)
        net = average["net"] if average is not None else getattr(owner, "net", None)
        if isinstance(net, nn.Module):
            return getattr(net, "output_layer", net)
    return None


def log_prob_kwargs(posterior: NeuralPosterior) -> dict[str, Any]:
    """Keyword arguments for the fastest exact ``log_prob`` of a posterior.

    NPE posteriors skip the Monte Carlo leakage correction (``norm_posterior``);
    sbi's vector-field posterior has no such correction and is given its default
    ODE settings explicitly, with the exact divergence rather than Hutchinson's
    stochastic trace estimate.

    Args:
        posterior: An sbi posterior.

    Returns:
        The keyword arguments, without ``theta`` and ``x``.
    """
    parameters = inspect.signature(posterior.log_prob).parameters
    if "norm_posterior" in parameters:
        return {"norm_posterior": False}
    if "ode_kwargs" in parameters:
        return {"ode_kwargs": {"exact": True}}
    return {}


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


@contextlib.contextmanager
def _quiet(caught: list[str]) -> Iterator[None]:
    """Silences sbi's prints and records its warnings (deduplicated) in ``caught``."""
    with (
        warnings.catch_warnings(record=True) as records,
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for record in records:
                message = f"{record.category.__name__}: {record.message}"
                if message not in caught:
                    caught.append(message)


@dataclass
class _Trained:
    """An estimator trained for one task and budget, plus its results so far."""

    name: str
    posterior: NeuralPosterior
    record: dict[str, Any]


def _train(
    spec: EstimatorSpec,
    task: Task,
    theta: Tensor,
    x: Tensor,
    settings: Settings,
    budget: int,
) -> _Trained:
    record: dict[str, Any] = {"warnings": []}
    train_kwargs: dict[str, Any] = {"show_train_summary": False}
    if settings.max_num_epochs is not None:
        train_kwargs["max_num_epochs"] = settings.max_num_epochs
    torch.manual_seed(_derive_seed(settings.seed, task.name, budget, spec.name))
    with _quiet(record["warnings"]):
        inference = spec.build(task.prior)
        inference.append_simulations(theta, x)
        cpu_start = time.process_time()
        with measure_peak_rss() as memory:
            wall, _ = _timed(lambda: inference.train(**train_kwargs))
        cpu = time.process_time() - cpu_start
        posterior = inference.build_posterior()
    summary = inference.summary
    record["train"] = {
        "wall_s": wall,
        "cpu_s": cpu,
        "epochs": int(summary["epochs_trained"][-1]),
        "best_validation_loss": float(summary["best_validation_loss"][-1]),
        "peak_rss_growth_mb": memory.growth_mb,
    }
    record["posterior_type"] = type(posterior).__name__
    record["log_prob_kwargs"] = log_prob_kwargs(posterior)
    return _Trained(spec.name, posterior, record)


def _evaluate_c2st(
    trained: _Trained, task: Task, settings: Settings, budget: int
) -> None:
    scores: dict[str, float] = {}
    n = settings.num_c2st_samples
    for num_observation in settings.observations:
        torch.manual_seed(
            _derive_seed(
                settings.seed, task.name, budget, trained.name, num_observation
            )
        )
        with _quiet(trained.record["warnings"]):
            samples = trained.posterior.sample(
                (n,), x=task.observation(num_observation), show_progress_bars=False
            )
        if not torch.isfinite(samples).all():
            raise FloatingPointError(
                f"Non-finite posterior samples for observation {num_observation}."
            )
        reference = task.reference_samples(num_observation)[:n]
        score = c2st(samples, reference, classifier=settings.c2st_classifier)
        scores[str(num_observation)] = float(score)
    values = list(scores.values())
    trained.record["c2st"] = {
        "per_observation": scores,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def _instrumented_pass(
    trained: _Trained,
    spec: EstimatorSpec,
    task: Task,
    x_o: Tensor,
    theta: Tensor,
    settings: Settings,
) -> None:
    """Measures memory and network evaluations; doubles as warm-up for timing."""
    posterior = trained.posterior
    n = settings.num_timing_samples
    kwargs = trained.record["log_prob_kwargs"]
    net = velocity_net(posterior) if spec.is_ode else None
    counter = ForwardCounter(net, task.dim_theta) if net is not None else None
    with _quiet(trained.record["warnings"]):
        with (
            counter.counting() if counter else contextlib.nullcontext(),
            measure_peak_rss() as memory,
        ):
            samples = posterior.sample((n,), x=x_o, show_progress_bars=False)
        sample_counts = (counter.calls, counter.rows) if counter else None
        trained.record["sample_peak_rss_growth_mb"] = memory.growth_mb
        with (
            counter.counting() if counter else contextlib.nullcontext(),
            measure_peak_rss() as memory,
        ):
            posterior.log_prob(theta, x=x_o, **kwargs)
        log_prob_counts = (counter.calls, counter.rows) if counter else None
        trained.record["log_prob_peak_rss_growth_mb"] = memory.growth_mb
    if spec.is_ode and counter is None:
        trained.record["warnings"].append("No velocity network found to count.")
    if sample_counts is not None and log_prob_counts is not None:
        trained.record["nfe"] = {
            "sample_calls": sample_counts[0],
            # Rows over returned samples also counts samples that were rejected
            # for leaving the prior support.
            "sample_evals_per_sample": sample_counts[1] / len(samples),
            "log_prob_calls": log_prob_counts[0],
            "log_prob_evals_per_point": log_prob_counts[1] / len(theta),
        }


def _interleaved_timings(
    trained: list[_Trained], x_o: Tensor, theta: Tensor, settings: Settings
) -> None:
    """Times sampling and log-prob in rounds that visit every estimator once.

    The visiting order rotates between rounds so that no estimator always runs
    right after another one. Ratios to NSF are medians of the per-round ratios,
    which cancels slow drifts of the machine's load.
    """
    n = settings.num_timing_samples
    times: dict[str, dict[str, list[float]]] = {
        t.name: {"sample": [], "log_prob": []} for t in trained
    }
    for round_ in range(settings.repeats):
        shift = round_ % len(trained)
        for t in trained[shift:] + trained[:shift]:
            kwargs = t.record["log_prob_kwargs"]
            with _quiet(t.record["warnings"]):
                seconds, _ = _timed(
                    lambda t=t: t.posterior.sample(
                        (n,), x=x_o, show_progress_bars=False
                    )
                )
                times[t.name]["sample"].append(seconds)
                seconds, _ = _timed(
                    lambda t=t, kwargs=kwargs: t.posterior.log_prob(
                        theta, x=x_o, **kwargs
                    )
                )
                times[t.name]["log_prob"].append(seconds)
    baseline = times.get("nsf")
    for t in trained:
        for op, seconds in times[t.name].items():
            entry: dict[str, Any] = {
                "median_s": statistics.median(seconds),
                "all_s": seconds,
                "ratio_to_nsf": None,
            }
            if baseline is not None:
                entry["ratio_to_nsf"] = statistics.median(
                    s / b for s, b in zip(seconds, baseline[op], strict=True)
                )
            t.record[op] = entry


def _run_task_budget(
    task: Task,
    budget: int,
    settings: Settings,
    estimators: dict[str, EstimatorSpec],
) -> list[dict[str, Any]]:
    """Trains and evaluates every estimator on one training set."""
    torch.manual_seed(_derive_seed(settings.seed, task.name, budget, "simulate"))
    theta, x = task.simulate(budget)
    first_observation = settings.observations[0]
    x_o = task.observation(first_observation)
    theta_eval = task.reference_samples(first_observation)[
        : settings.num_log_prob_points
    ]

    records: list[dict[str, Any]] = []
    trained: list[_Trained] = []
    for name in settings.estimators:
        spec = estimators[name]
        base = {"task": task.name, "budget": budget, "estimator": name}
        try:
            t = _train(spec, task, theta, x, settings, budget)
            _evaluate_c2st(t, task, settings, budget)
            _instrumented_pass(t, spec, task, x_o, theta_eval, settings)
        except Exception as error:  # noqa: BLE001 - one failure must not stop all.
            records.append(
                {
                    **base,
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(),
                }
            )
            continue
        t.record = {**base, "error": None, **t.record}
        trained.append(t)
        records.append(t.record)
    if trained:
        try:
            _interleaved_timings(trained, x_o, theta_eval, settings)
        except Exception as error:  # noqa: BLE001
            for t in trained:
                t.record["error"] = f"timing: {type(error).__name__}: {error}"
                t.record["traceback"] = traceback.format_exc()
    return records


def _warm_up(
    task: Task, settings: Settings, estimators: dict[str, EstimatorSpec]
) -> None:
    """Trains and queries every estimator once, briefly, before measuring.

    The first estimator to run would otherwise pay the process's one-off costs
    (lazy imports, first autograd and optimizer calls, allocator growth) in its
    training time and memory.
    """
    torch.manual_seed(settings.seed)
    theta, x = task.simulate(100)
    x_o = task.observation(settings.observations[0])
    for name in settings.estimators:
        # A broken estimator is reported by the real run, not here.
        with contextlib.suppress(Exception), _quiet([]):
            inference = estimators[name].build(task.prior)
            inference.append_simulations(theta, x).train(max_num_epochs=1)
            posterior = inference.build_posterior()
            posterior.sample((10,), x=x_o, show_progress_bars=False)
            posterior.log_prob(theta[:10], x=x_o, **log_prob_kwargs(posterior))


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=True,
        )
        return result.stdout.strip()
    return None


def _package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _metadata(settings: Settings) -> dict[str, Any]:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "sbi": sbi.__version__,
        "sbi_fm_plugin": _package_version("sbi-fm-plugin"),
        "settings": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(settings).items()
        },
    }


def run_benchmark(
    settings: Settings,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    estimators: dict[str, EstimatorSpec] | None = None,
) -> dict[str, Any]:
    """Runs the benchmark.

    Args:
        settings: What to run, see :func:`parse_args`.
        on_progress: Called with the partial report after each task and budget, so
            that a long run can save what it has.
        estimators: Where the names in ``settings.estimators`` are looked up;
            :data:`ESTIMATORS` by default.

    Returns:
        A JSON-serialisable dict with ``metadata`` and a ``results`` list with one
        record per task, budget and estimator.
    """
    estimators = ESTIMATORS if estimators is None else estimators
    report: dict[str, Any] = {"metadata": _metadata(settings), "results": []}
    for task_name in settings.tasks:
        task = get_task(task_name, settings.cache_dir)
        _warm_up(task, settings, estimators)
        for budget in settings.budgets:
            report["results"].extend(
                _run_task_budget(task, budget, settings, estimators)
            )
            if on_progress is not None:
                on_progress(report)
    return report


def write_report(
    report: dict[str, Any],
    out_json: Path,
    out_md: Path,
    formatter: Callable[[dict[str, Any]], str] | None = None,
) -> str:
    """Writes the report as JSON and as a Markdown table.

    Args:
        report: Output of :func:`run_benchmark`, possibly partial.
        out_json: Path of the JSON file.
        out_md: Path of the Markdown file.
        formatter: Makes the table; :func:`to_markdown` by default.

    Returns:
        The Markdown table.
    """
    for path in (out_json, out_md):
        path.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    table = (formatter or to_markdown)(report)
    out_md.write_text(table)
    return table


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def to_markdown(report: dict[str, Any]) -> str:
    """Formats a benchmark report as a Markdown table.

    Args:
        report: Output of :func:`run_benchmark`.

    Returns:
        The table, with a header line naming the settings.
    """
    meta = report["metadata"]
    s = meta["settings"]
    lines = [
        f"sbi {meta['sbi']}, torch {meta['torch']} ({meta['torch_threads']} thread), "
        f"{meta['date']}, seed {s['seed']}, observations {s['observations']}, "
        f"{s['num_timing_samples']} samples, {s['num_log_prob_points']} log-prob "
        f"points, {s['repeats']} timing rounds"
        + (" — QUICK MODE, numbers are meaningless" if s["quick"] else ""),
        "",
        (
            "| task | sims | estimator | C2ST | train s | epochs | sample s | "
            "sample ×nsf | log_prob s | log_prob ×nsf | NFE sample | NFE log_prob | "
            "ΔRSS MB train/sample/log_prob |"
        ),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        head = f"| {r['task']} | {r['budget']} | {r['estimator']} |"
        if r.get("error") and "train" not in r:
            lines.append(head + f" FAILED: {r['error'][:60]} |" + " |" * 9)
            continue
        c2st_entry = r.get("c2st", {})
        sample = r.get("sample", {})
        log_prob = r.get("log_prob", {})
        nfe = r.get("nfe", {})
        memory = "/".join(
            _fmt(r["train"]["peak_rss_growth_mb"], ".0f")
            if key == "train"
            else _fmt(r.get(f"{key}_peak_rss_growth_mb"), ".0f")
            for key in ("train", "sample", "log_prob")
        )
        cells = [
            f"{c2st_entry['mean']:.3f} ± {c2st_entry['std']:.3f}"
            if c2st_entry
            else "–",
            _fmt(r["train"]["wall_s"], ".1f"),
            str(r["train"]["epochs"]),
            _fmt(sample.get("median_s"), ".3f"),
            _fmt(sample.get("ratio_to_nsf"), ".2f"),
            _fmt(log_prob.get("median_s"), ".3f"),
            _fmt(log_prob.get("ratio_to_nsf"), ".2f"),
            str(nfe.get("sample_calls", "–")),
            str(nfe.get("log_prob_calls", "–")),
            memory,
        ]
        line = head + " " + " | ".join(cells) + " |"
        if r.get("error"):
            line += f" FAILED: {r['error'][:60]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def run_and_report(
    settings: Settings,
    estimators: dict[str, EstimatorSpec] | None = None,
    formatter: Callable[[dict[str, Any]], str] | None = None,
) -> int:
    """Runs the benchmark on one thread, writing the report after each step.

    Args:
        settings: What to run.
        estimators: Where estimator names are looked up; :data:`ESTIMATORS` by
            default.
        formatter: Makes the Markdown table; :func:`to_markdown` by default.

    Returns:
        0 if every estimator ran on every task and budget, else 1.
    """
    # The benchmark shares its machine; one thread keeps timings comparable.
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        report = run_benchmark(
            settings,
            on_progress=lambda partial: write_report(
                partial, settings.out_json, settings.out_md, formatter
            ),
            estimators=estimators,
        )
    print(write_report(report, settings.out_json, settings.out_md, formatter), end="")
    failures = [r for r in report["results"] if r.get("error")]
    for r in failures:
        print(
            f"FAILED {r['task']}/{r['budget']}/{r['estimator']}: {r['error']}",
            file=sys.stderr,
        )
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark from the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        0 if every estimator ran on every task and budget, else 1.
    """
    return run_and_report(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
