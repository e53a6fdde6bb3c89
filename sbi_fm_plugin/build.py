r"""Building a flow matching estimator from a first batch, as sbi's builders do.

sbi calls a builder as `build(batch_x=theta, batch_y=x, **kwargs)` to infer shapes and
fit the z-scoring. `posterior_nn` and `likelihood_nn` always pass `hidden_features=50`,
`num_transforms=5`, `num_bins=10` and `num_components=10`, whether the user set them or
not. Here `hidden_features` sets the network width unless it is sbi's placeholder 50
(then the default width applies) or `width` is given; the other three describe
normalizing flows and mixtures and are ignored.
"""

__all__ = ["build_flow_matching", "flow_matching_nn"]

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from ._checks import check_count
from ._sbi import standardizing_net, z_score_parser, z_standardization
from .coupling import CouplingOptions
from .estimator import FlowMatchingEstimator, check_options
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

#: The builder's name of each field of :class:`CouplingOptions`: `coupling` for the
#: method, `coupling_<field>` for the others.
_COUPLING_NAMES = {
    field.name: "coupling" if field.name == "method" else f"coupling_{field.name}"
    for field in dataclasses.fields(CouplingOptions)
}
#: Options of the coupling, with their defaults.
COUPLING_DEFAULTS = {
    _COUPLING_NAMES[field.name]: field.default
    for field in dataclasses.fields(CouplingOptions)
}


def _coupling_options(options: dict) -> CouplingOptions:
    return CouplingOptions(
        **{field: options[name] for field, name in _COUPLING_NAMES.items()}
    )


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
            :class:`FlowMatchingEstimator`), solver options (`method`, `rtol`,
            `atol`, `num_steps`, `max_nfe`, `per_sample_steps`, `chunk_size`,
            `show_progress_bars`; see
            :class:`SolverOptions`) and coupling options (`coupling`, and
            `coupling_<field>` for the fields of :class:`CouplingOptions`).
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
    known = NETWORK_DEFAULTS | ESTIMATOR_DEFAULTS | SOLVER_DEFAULTS | COUPLING_DEFAULTS
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
        coupling=_coupling_options(options),
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
    _check_network_options(width, options)
    with torch.no_grad():
        condition_features = embedding_net(batch_y[:2]).flatten(start_dim=1).shape[1]

    return VelocityMLP(
        batch_x[0].numel(),
        condition_features,
        width=width,
        **{name: options[name] for name in NETWORK_DEFAULTS},
    )


def _check_network_options(width: int, options: dict) -> None:
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


def flow_matching_nn(
    estimate: Literal["posterior", "likelihood"] = "posterior",
    z_score_theta: str | None = "independent",
    z_score_x: str | None = "independent",
    embedding_net: nn.Module | None = None,
    *,
    width: int = 128,
    depth: int = 3,
    activation: str = "gelu",
    dropout: float = 0.05,
    layer_norm: bool = True,
    context_every_block: bool = True,
    time_features: int = 32,
    time_scale: float = 1.0,
    time_power_law_alpha: float = -0.8,
    time_uniform_fraction: float = 0.3,
    num_draws: int = 4,
    ema_decay: float | None = 0.999,
    sigma_min: float = 0.0,
    method: str = "dopri5",
    rtol: float = 1e-4,
    atol: float = 1e-4,
    per_sample_steps: bool = True,
    num_steps: int = 20,
    max_nfe: int = 10_000,
    chunk_size: int = 16_384,
    show_progress_bars: bool | None = None,
    divergence: str = "auto",
    exact_divergence_max_dim: int = 32,
    coupling: str = "none",
    coupling_reg: float = 0.1,
    coupling_max_iter: int = 1000,
    coupling_tol: float = 1e-5,
    coupling_mass: float = 0.9,
    coupling_condition_ratio: float = 1.0,
    coupling_condition_weight: float | None = None,
    coupling_noise_factor: int = 1,
    velocity_net: nn.Module | None = None,
) -> Callable[[Tensor, Tensor], FlowMatchingEstimator]:
    r"""Returns a builder of flow matching estimators for sbi's trainers, the typed
    counterpart of `posterior_nn("flow_matching", ...)` and
    `likelihood_nn("flow_matching", ...)`.

    Options are checked here, before any training.

    Args:
        estimate: `posterior` for NPE, where the estimator models :math:`\theta`
            given :math:`x`; `likelihood` for NLE, where it models :math:`x` given
            :math:`\theta`.
        z_score_theta: How to z-score :math:`\theta`: `none` (or None),
            `independent`, or `structured` (one mean and standard deviation for all
            dimensions).
        z_score_x: How to z-score :math:`x`, same options.
        embedding_net: Embedding of the condition (:math:`x` for the posterior,
            :math:`\theta` for the likelihood), trained jointly.
        width: Width of the residual velocity MLP.
        depth: Number of its residual blocks.
        activation: `gelu`, `mish`, `silu`, `relu`, `elu` or `tanh`.
        dropout: Dropout inside the residual blocks, off when sampling and
            evaluating.
        layer_norm: Whether each block starts with a layer normalisation.
        context_every_block: Whether every block also receives the time and the
            condition, not only the first layer.
        time_features: Size of the Fourier time embedding.
        time_scale: Frequency scale of the Fourier time embedding.
        time_power_law_alpha: Training times are :math:`1 - u^{1 + \alpha}`,
            :math:`u \sim U(0, 1)`; negative values favour times near the data.
        time_uniform_fraction: Fraction of training times drawn uniformly instead.
        num_draws: (time, noise) draws per training pair, averaged in the loss.
        ema_decay: Decay of the moving average of the weights used for validation,
            sampling and densities; None turns it off.
        sigma_min: Width of the probability path at the data.
        method: ODE solver: adaptive `dopri5`, `dopri8`, `bosh3`, `adaptive_heun`,
            or fixed-step `euler`, `midpoint`, `rk4`.
        rtol: Relative tolerance of adaptive solvers, per trajectory.
        atol: Absolute tolerance of adaptive solvers, per trajectory.
        per_sample_steps: Whether `dopri5` and `bosh3` choose each trajectory's step
            size on its own, which makes results independent of the batch.
        num_steps: Steps of fixed-step solvers.
        max_nfe: Velocity evaluations after which a solve stops with a
            :class:`~sbi_fm_plugin.SolverError`.
        chunk_size: The most points sampled or evaluated at once; larger requests
            go chunk by chunk, so memory does not grow with them.
        show_progress_bars: Whether requests of several chunks show a progress bar;
            None shows one when the sbi function that called the estimator was
            asked for progress bars.
        divergence: `exact`, `hutchinson`, or `auto` for exact up to
            `exact_divergence_max_dim` parameters.
        exact_divergence_max_dim: See `divergence`.
        coupling: How training pairs noise with parameters: `none` (independent),
            or minibatch optimal transport, `exact`, `sinkhorn`, `sinkhorn_log` or
            `partial` (see :class:`~sbi_fm_plugin.coupling.CouplingOptions`).
        coupling_reg: Entropic regularisation of the Sinkhorn couplings.
        coupling_max_iter: Iteration cap of the Sinkhorn couplings.
        coupling_tol: Stopping threshold of the Sinkhorn couplings.
        coupling_mass: Fraction of the mass that `partial` transports.
        coupling_condition_ratio: Weight of the distance between conditions in the
            transport cost, relative to the distance between parameters and noise;
            0 ignores the conditions.
        coupling_condition_weight: A fixed weight of that distance instead.
        coupling_noise_factor: Noise draws per pair that the coupling chooses from.
        velocity_net: A velocity network to use instead of :class:`VelocityMLP`;
            the network options above then do not apply.

    Returns:
        A builder, called by sbi as `builder(batch_theta, batch_x)`, and picklable:
        pass it as `NPE(prior, density_estimator=builder)`, or as
        `NLE(prior, density_estimator=builder)` for `estimate="likelihood"`.

    Example:
        >>> theta, x = torch.randn(100, 2), torch.randn(100, 3)
        >>> builder = flow_matching_nn(width=64)
        >>> builder(theta, x).sample((5,), x[:1]).shape
        torch.Size([5, 1, 2])
        >>> flow_matching_nn("likelihood")(theta, x).input_shape
        torch.Size([3])
    """
    if estimate not in ("posterior", "likelihood"):
        raise ValueError(
            f"Expected `estimate` to be 'posterior' or 'likelihood', got {estimate!r}."
        )
    for name, z_score in (("z_score_theta", z_score_theta), ("z_score_x", z_score_x)):
        _z_score_flags(z_score, name)
    if embedding_net is not None and not isinstance(embedding_net, nn.Module):
        raise TypeError(
            f"Expected `embedding_net` to be an nn.Module, got {type(embedding_net)}."
        )

    arguments = dict(locals())
    options = {name: arguments[name] for name in NETWORK_DEFAULTS}
    options |= {name: arguments[name] for name in ESTIMATOR_DEFAULTS}
    options |= {name: arguments[name] for name in SOLVER_DEFAULTS}
    options |= {name: arguments[name] for name in COUPLING_DEFAULTS}
    if velocity_net is None:
        _check_network_options(width, options)
    check_options(**{name: options[name] for name in ESTIMATOR_DEFAULTS})
    SolverOptions(**{name: options[name] for name in SOLVER_DEFAULTS})
    _coupling_options(options)

    if estimate == "posterior":
        z_score_modelled, z_score_condition = z_score_theta, z_score_x
    else:
        z_score_modelled, z_score_condition = z_score_x, z_score_theta
    options |= {
        "z_score_x": z_score_modelled,
        "z_score_y": z_score_condition,
        "embedding_net": embedding_net,
        "width": width,
        "velocity_net": velocity_net,
    }
    return functools.partial(_build_from_pairs, estimate == "likelihood", options)


def _build_from_pairs(
    likelihood: bool, options: dict, batch_theta: Tensor, batch_x: Tensor
) -> FlowMatchingEstimator:
    # sbi's trainers call the builder with (theta, x) whatever is modelled.
    if likelihood:
        return build_flow_matching(batch_x=batch_x, batch_y=batch_theta, **options)
    return build_flow_matching(batch_x=batch_theta, batch_y=batch_x, **options)
