r"""Building a flow matching estimator from a first batch, as sbi's builders do.

sbi calls a builder as `build(batch_x=theta, batch_y=x, **kwargs)` to infer shapes and
fit the z-scoring. `posterior_nn` and `likelihood_nn` always pass `hidden_features=50`,
`num_transforms=5`, `num_bins=10` and `num_components=10`, whether the user set them or
not. Here `hidden_features` sets the network width unless it is sbi's placeholder 50
(then the default width applies) or `width` is given; the other three describe
normalizing flows and mixtures and are ignored.
"""

__all__ = ["build_flow_matching"]

import dataclasses
import inspect

import torch
from torch import Tensor, nn

from ._checks import check_count
from ._sbi import standardizing_net, z_score_parser, z_standardization
from .estimator import FlowMatchingEstimator
from .network import ACTIVATIONS, VelocityMLP
from .ode import SolverOptions

SBI_PLACEHOLDER_WIDTH = 50


def _defaults(function: object, names: tuple[str, ...]) -> dict[str, object]:
    parameters = inspect.signature(function).parameters
    return {name: parameters[name].default for name in names}


#: Options of the velocity network, with their defaults.
NETWORK_DEFAULTS = _defaults(
    VelocityMLP,
    (
        "depth",
        "activation",
        "dropout",
        "layer_norm",
        "time_features",
        "time_scale",
        "context_every_block",
    ),
)
DEFAULT_WIDTH = _defaults(VelocityMLP, ("width",))["width"]

#: Options of the estimator, with their defaults.
ESTIMATOR_DEFAULTS = _defaults(
    FlowMatchingEstimator,
    (
        "time_power_law_alpha",
        "time_uniform_fraction",
        "sigma_min",
        "num_draws",
        "divergence",
        "exact_divergence_max_dim",
        "ema_decay",
    ),
)

#: Options of the ODE solver, with their defaults.
SOLVER_DEFAULTS = {
    field.name: field.default for field in dataclasses.fields(SolverOptions)
}

IGNORED = ("num_transforms", "num_bins", "num_components")


def build_flow_matching(
    batch_x: Tensor,
    batch_y: Tensor,
    z_score_x: str | None = "independent",
    z_score_y: str | None = "independent",
    hidden_features: int = SBI_PLACEHOLDER_WIDTH,
    embedding_net: nn.Module | None = None,
    width: int | None = None,
    velocity_net: nn.Module | None = None,
    **options: object,
) -> FlowMatchingEstimator:
    r"""Builds a flow matching estimator of :math:`p(x | y)` sized and z-scored from a
    batch.

    Args:
        batch_x: Batch of the modelled variable (:math:`\theta` for NPE), with shape
            :math:`(N, *input\_shape)`.
        batch_y: Batch of the condition (:math:`x` for NPE), with shape
            :math:`(N, *condition\_shape)`.
        z_score_x: How to z-score `batch_x`: `none` (or None), `independent`, or
            `structured` (one mean and standard deviation for all dimensions).
        z_score_y: How to z-score `batch_y`, same options.
        hidden_features: Width of the velocity network, unless it is 50.
        embedding_net: Embedding network of the condition.
        width: Width of the velocity network (128 by default).
        velocity_net: A velocity network to use instead of :class:`VelocityMLP`.
        options: Network options (`depth`, `activation`, `dropout`, `layer_norm`,
            `time_features`, `time_scale`, `context_every_block`; see
            :class:`VelocityMLP`), estimator options (`time_power_law_alpha`,
            `time_uniform_fraction`, `sigma_min`, `num_draws`, `divergence`,
            `exact_divergence_max_dim`, `ema_decay`; see
            :class:`FlowMatchingEstimator`) and solver options (`method`, `rtol`,
            `atol`, `num_steps`, `max_nfe`; see :class:`SolverOptions`).
            `num_transforms`, `num_bins` and `num_components` are accepted and
            ignored.

    Returns:
        An untrained estimator.

    Example:
        >>> theta, x = torch.randn(100, 2), torch.randn(100, 3)
        >>> estimator = build_flow_matching(theta, x, width=32, depth=2)
        >>> estimator.sample((5,), x[:1]).shape
        torch.Size([5, 1, 2])
    """
    for name in IGNORED:
        options.pop(name, None)
    known = NETWORK_DEFAULTS | ESTIMATOR_DEFAULTS | SOLVER_DEFAULTS
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(
            f"Unknown flow matching option(s) {unknown}; expected some of "
            f"{sorted(set(known) | {'width', 'velocity_net', 'embedding_net'})}."
        )
    options = known | options

    _check_batches(batch_x, batch_y)
    embedding_net = nn.Identity() if embedding_net is None else embedding_net
    embedding_net = _prepend_z_score(embedding_net, batch_y, z_score_y, "z_score_y")
    theta_mean, theta_std = _fit_z_score(batch_x, z_score_x)

    if velocity_net is None:
        if width is None:
            placeholder = hidden_features == SBI_PLACEHOLDER_WIDTH
            width = DEFAULT_WIDTH if placeholder else hidden_features
        velocity_net = _velocity_mlp(batch_x, batch_y, embedding_net, width, options)
    elif not isinstance(velocity_net, nn.Module):
        raise TypeError(
            f"Expected `velocity_net` to be an nn.Module, got {type(velocity_net)}."
        )

    return FlowMatchingEstimator(
        velocity_net,
        input_shape=batch_x.shape[1:],
        condition_shape=batch_y.shape[1:],
        embedding_net=embedding_net,
        theta_mean=theta_mean,
        theta_std=theta_std,
        solver=SolverOptions(**{name: options[name] for name in SOLVER_DEFAULTS}),
        **{name: options[name] for name in ESTIMATOR_DEFAULTS},
    )


def _check_batches(batch_x: Tensor, batch_y: Tensor) -> None:
    for name, batch in (("batch_x", batch_x), ("batch_y", batch_y)):
        if not isinstance(batch, Tensor) or not batch.is_floating_point():
            raise TypeError(
                f"Expected `{name}` to be a floating point Tensor, got "
                f"{getattr(batch, 'dtype', type(batch))}."
            )
        if batch.dim() < 2 or len(batch) == 0:
            raise ValueError(
                f"Expected `{name}` with shape (N, *event_shape), N >= 1, got "
                f"{tuple(batch.shape)}."
            )
    if len(batch_x) != len(batch_y):
        raise ValueError(
            "Expected `batch_x` and `batch_y` of the same length, got "
            f"{len(batch_x)} and {len(batch_y)}."
        )


def _z_score_flags(z_score: str | None, name: str) -> tuple[bool, bool]:
    if z_score not in (None, "none", "independent", "structured"):
        raise ValueError(
            f"Expected `{name}` to be 'none', 'independent' or 'structured', got "
            f"{z_score!r}."
        )
    return z_score_parser(z_score)


def _fit_z_score(batch: Tensor, z_score: str | None) -> tuple[Tensor, Tensor]:
    enabled, structured = _z_score_flags(z_score, "z_score_x")
    if not enabled:
        return torch.zeros(()), torch.ones(())

    return z_standardization(batch, structured)


def _prepend_z_score(
    embedding_net: nn.Module, batch: Tensor, z_score: str | None, name: str
) -> nn.Module:
    enabled, structured = _z_score_flags(z_score, name)
    if not enabled:
        return embedding_net

    return nn.Sequential(standardizing_net(batch, structured), embedding_net)


def _velocity_mlp(
    batch_x: Tensor,
    batch_y: Tensor,
    embedding_net: nn.Module,
    width: int,
    options: dict,
) -> VelocityMLP:
    if options["activation"] not in ACTIVATIONS:
        raise ValueError(
            f"Expected `activation` to be one of {sorted(ACTIVATIONS)}, got "
            f"{options['activation']!r}."
        )
    check_count("width", width)
    for name in ("depth", "time_features"):
        check_count(name, options[name])
    if not 0 <= options["dropout"] < 1:
        raise ValueError(f"Expected 0 <= `dropout` < 1, got {options['dropout']!r}.")

    with torch.no_grad():
        condition_features = embedding_net(batch_y[:2]).flatten(start_dim=1).shape[1]

    return VelocityMLP(
        batch_x[0].numel(),
        condition_features,
        width=width,
        **{name: options[name] for name in NETWORK_DEFAULTS},
    )
