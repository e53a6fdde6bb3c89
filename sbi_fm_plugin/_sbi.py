r"""The one place that knows sbi's internals.

Everything this package takes from sbi beyond its documented user interface, and the
link into sbi's table of density estimator builders, goes through this module, so that
a new sbi release needs changes here only (and, for the name of the module that holds
the table, in the start-up hook `_sbi_fm_plugin_autoload`). Supported: sbi 0.27.
"""

__all__ = [
    "ENTRY_POINT_GROUP",
    "SUPPORTED_SBI",
    "ConditionalDensityEstimator",
    "load_entry_points",
    "progress_requested",
    "refuse_atomic_loss",
    "register_builder",
    "standardizing_net",
    "z_score_parser",
    "z_standardization",
]

import importlib
import inspect
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint, entry_points, version
from types import FrameType

SUPPORTED_SBI = "0.27"

#: Entry-point group in which packages publish sbi density estimator builders.
ENTRY_POINT_GROUP = "sbi.density_estimators"


def _sbi_version() -> str:
    try:
        return version("sbi")
    except Exception:  # noqa: BLE001
        return "(unknown version)"


try:
    from sbi.neural_nets.estimators import ConditionalDensityEstimator
    from sbi.utils.sbiutils import standardizing_net, z_score_parser, z_standardization
except ImportError as error:
    raise ImportError(
        f"sbi_fm_plugin supports sbi {SUPPORTED_SBI}, but the installed sbi "
        f"{_sbi_version()} lacks what it needs ({error}). Install a supported "
        f"version, e.g. `pip install 'sbi=={SUPPORTED_SBI}.*'`."
    ) from error

TABLE_MODULE = "sbi.neural_nets.factory"
TABLE_NAME = "model_builders"

# sbi's multi-round NPE-C evaluates `log_prob` on atoms in this method.
ATOMIC_LOSS_MODULE = "sbi.inference.trainers.npe.npe_c"
ATOMIC_LOSS_METHOD = ("NPE_C", "_log_prob_proposal_posterior_atomic")

# Reentrant: loading an entry point may import a package that registers itself.
_lock = threading.RLock()
_builtin: frozenset[str] | None = None
_origins: dict[str, str] = {}
_seen: set[tuple[str, str]] = set()
_warned: set[str] = set()
_rejected: set[tuple[str, int]] = set()


def _builder_table() -> dict[str, Callable] | None:
    global _builtin

    try:
        table = getattr(importlib.import_module(TABLE_MODULE), TABLE_NAME)
    except (ImportError, AttributeError):
        table = None
    if not isinstance(table, dict):
        _warn_once(
            f"sbi {_sbi_version()} has no table of density estimator builders at "
            f"{TABLE_MODULE}.{TABLE_NAME}, so names such as 'flow_matching' cannot "
            f"be registered; sbi_fm_plugin supports sbi {SUPPORTED_SBI}. Pass a "
            "builder instead, e.g. `NPE(prior, density_estimator=flow_matching_nn())`."
        )
        return None
    if _builtin is None:
        # The first look at the table, right after sbi created it when the start-up
        # hook is active, tells sbi's own estimators apart from added ones.
        _builtin = frozenset(table)
    return table


def register_builder(name: str, builder: Callable, origin: str | None = None) -> bool:
    r"""Makes `name` a density estimator of `posterior_nn`, `likelihood_nn` and the
    trainers that take a string, such as `NPE(density_estimator=name)`.

    sbi looks names up in `sbi.neural_nets.factory.model_builders` when it builds the
    network, so adding an entry there is all it takes. sbi's own estimators are never
    replaced, and a name already taken by another builder keeps it; both warn.
    Registering the same builder again does nothing.

    Args:
        name: The estimator's name.
        builder: Called as `builder(batch_x=..., batch_y=..., **options)`.
        origin: Where the builder comes from, for warnings.

    Returns:
        Whether `name` now refers to `builder`.
    """
    origin = origin or f"{getattr(builder, '__module__', '?')}"
    with _lock:
        table = _builder_table()
        if table is None:
            return False
        if table.get(name) is builder:
            return True
        if (name, id(builder)) in _rejected:
            return False
        if name in _builtin or name in table:
            _rejected.add((name, id(builder)))
        if name in _builtin:
            _warn_once(
                f"Density estimator {name!r} from {origin} is not registered: sbi has "
                "a built-in estimator of that name, which is kept."
            )
            return False
        if name in table:
            _warn_once(
                f"Density estimator {name!r} from {origin} is not registered: the "
                f"name is taken by {_origins.get(name, 'another builder')}."
            )
            return False
        table[name] = builder
        _origins[name] = origin
        return True


def load_entry_points() -> list[str]:
    r"""Registers every builder of the entry-point group `sbi.density_estimators`.

    An entry point `name = "module:builder"` makes `name` a density estimator of sbi,
    as :func:`register_builder` does. An entry point that fails to load, or collides
    with another name, warns and is skipped. Entry points already seen are skipped, so
    calling this again only picks up new ones.

    Returns:
        The names registered by this call.
    """
    registered = []
    with _lock:
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            key = (entry_point.name, entry_point.value)
            if key in _seen:
                continue
            _seen.add(key)
            origin = _describe(entry_point)
            if _builder_table() is None:
                break
            if entry_point.name in _builtin:
                # Not even loaded: a built-in must not depend on a third party's import.
                warnings.warn(
                    f"Ignoring {origin}: sbi has a built-in density estimator named "
                    f"{entry_point.name!r}, which is kept.",
                    stacklevel=2,
                )
                continue
            try:
                builder = entry_point.load()
            except Exception as error:  # noqa: BLE001
                warnings.warn(
                    f"Could not load {origin}: {type(error).__name__}: {error}",
                    stacklevel=2,
                )
                continue
            if not callable(builder):
                warnings.warn(
                    f"Ignoring {origin}: expected a callable builder, got "
                    f"{type(builder).__name__}.",
                    stacklevel=2,
                )
                continue
            if register_builder(entry_point.name, builder, origin):
                registered.append(entry_point.name)
    return registered


def refuse_atomic_loss() -> None:
    r"""Raises if the call comes from the atomic loss of sbi's multi-round NPE-C.

    That loss evaluates `log_prob`, an ODE solve with gradients through every step,
    on `num_atoms` parameters per training pair at every step, which makes training
    prohibitively slow. Nothing else in sbi reaches the estimator from that method,
    so the caller's code object identifies it exactly; the module is looked up, not
    imported, since a loss that runs has imported it.

    Raises:
        ValueError: If sbi's atomic loss is among the callers.
    """
    class_name, method_name = ATOMIC_LOSS_METHOD
    trainer = getattr(sys.modules.get(ATOMIC_LOSS_MODULE), class_name, None)
    atomic_loss = getattr(getattr(trainer, method_name, None), "__code__", None)
    if atomic_loss is None:
        return

    for frame in _callers():
        if frame.f_code is atomic_loss:
            raise ValueError(
                "The atomic loss of sbi's multi-round NPE-C is not supported by flow "
                "matching estimators: it solves an ODE with gradients for every atom "
                "at every training step. Use truncated sequential NPE instead: draw "
                "the next round from `RestrictedPrior(prior, get_density_thresholder("
                "posterior), sample_with='rejection')` (from `sbi.utils`), pass it as "
                "`proposal` to `append_simulations`, and train with "
                "`train(force_first_round_loss=True)`."
            )


def progress_requested() -> bool:
    r"""Whether the sbi function that called into this package was asked to show
    progress bars.

    sbi passes `show_progress_bars` down to its samplers, not to the estimator, so
    the innermost sbi frame that has it as a local variable tells.
    """
    for frame in _callers():
        module = frame.f_globals.get("__name__", "")
        if module.startswith("sbi.") and "show_progress_bars" in frame.f_locals:
            return bool(frame.f_locals["show_progress_bars"])

    return False


def _callers() -> Iterator[FrameType]:
    # The frames of the call stack, innermost first.
    frame = inspect.currentframe()
    while frame is not None:
        yield frame
        frame = frame.f_back


def _warn_once(message: str) -> None:
    # Warnings of discovery reach the user from an import, where the usual
    # once-per-location rule would not apply; this keeps each message to one.
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _describe(entry_point: EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    dist = "an unknown distribution" if dist is None else f"distribution {dist.name!r}"
    return (
        f"entry point '{entry_point.name} = {entry_point.value}' "
        f"(group '{ENTRY_POINT_GROUP}', {dist})"
    )
