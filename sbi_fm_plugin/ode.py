r"""Sampling and log-densities through the probability flow ODE.

A velocity field :math:`v(\theta, t)` carries the data at :math:`t = 0` to the standard
normal base at :math:`t = 1`. Samples integrate the ODE backwards from base draws, and
the instantaneous change of variables (Chen et al., 2018, arXiv:1806.07366) gives the
log-density of a point :math:`\theta_0` by integrating forwards,

.. math:: \log p_0(\theta_0) = \log \mathcal{N}(\theta_1; 0, I)
    + \int_0^1 \nabla \cdot v(\theta_t, t) \, dt .

The divergence is exact (one vector-Jacobian product per dimension, vectorised with
`torch.func.vmap`) or Hutchinson's estimate :math:`\epsilon^\top J \epsilon` with
Rademacher probes :math:`\epsilon` drawn once per trajectory (Grathwohl et al., 2019,
arXiv:1810.01367). Integration is done by torchdiffeq.
"""

__all__ = [
    "SolverError",
    "SolverOptions",
    "log_prob",
    "sample",
    "sample_and_log_prob",
]

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torchdiffeq import odeint

from ._checks import check_count

Field = Callable[[Tensor, Tensor], Tensor]

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
FIXED_METHODS = ("euler", "midpoint", "rk4")
DIVERGENCES = ("exact", "hutchinson")


class SolverError(RuntimeError):
    r"""Raised when the ODE solver cannot finish an integration."""


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    r"""Options of the ODE solver.

    Args:
        method: An adaptive method (`dopri5`, `dopri8`, `bosh3`, `adaptive_heun`) or a
            fixed-step one (`euler`, `midpoint`, `rk4`).
        rtol: Relative tolerance of adaptive methods.
        atol: Absolute tolerance of adaptive methods.
        num_steps: Number of steps of fixed-step methods over :math:`[0, 1]`.
        max_nfe: Number of velocity evaluations after which a solve is abandoned
            with a :class:`SolverError`.

    Example:
        >>> SolverOptions().replace(method="rk4", num_steps=10).method
        'rk4'
    """

    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    num_steps: int = 20
    max_nfe: int = 10_000

    def __post_init__(self) -> None:
        methods = ADAPTIVE_METHODS + FIXED_METHODS
        if self.method not in methods:
            raise ValueError(
                f"Expected `method` to be one of {methods}, got {self.method!r}."
            )

        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"Expected `{name}` to be a float, got {value!r}.")
            if not value > 0:
                raise ValueError(f"Expected `{name}` > 0, got {value!r}.")

        check_count("num_steps", self.num_steps)
        check_count("max_nfe", self.max_nfe)

    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS

    def replace(self, **overrides: object) -> "SolverOptions":
        r"""Returns a copy with some options replaced, validated like the original."""
        names = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"Unknown solver option(s) {unknown}; expected some of {sorted(names)}."
            )

        return dataclasses.replace(self, **overrides)


def _max_rms_norm(error: Tensor) -> Tensor:
    # The step size is controlled by the worst trajectory, not the batch average, so
    # that each trajectory meets the tolerances on its own.
    return error.square().mean(dim=-1).sqrt().max()


def integrate(
    f: Field, y0: Tensor, t0: float, t1: float, options: SolverOptions
) -> Tensor:
    r"""Integrates :math:`dy/dt = f(t, y)` from `t0` to `t1`.

    Args:
        f: The right-hand side, called as `f(t, y)` with a scalar time tensor.
        y0: The initial state, with shape :math:`(*, K)`.
        t0: The initial time.
        t1: The final time.
        options: Solver options.

    Returns:
        The final state, with shape :math:`(*, K)`.

    Raises:
        SolverError: If the solver needs more than `options.max_nfe` evaluations,
            its step size underflows, or the final state is not finite.
    """
    nfe = 0

    def func(t: Tensor, y: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        if nfe > options.max_nfe:
            raise SolverError(
                f"The ODE solver ({options.method}) needed more than `max_nfe="
                f"{options.max_nfe}` velocity evaluations. The velocity field may be "
                "diverging; otherwise raise `max_nfe`, loosen `rtol`/`atol`, or use "
                "a fixed-step method such as `method='rk4'`."
            )
        return f(t, y)

    t = torch.tensor([t0, t1], dtype=y0.dtype, device=y0.device)
    if options.adaptive:
        kwargs = {
            "rtol": options.rtol,
            "atol": options.atol,
            "options": {"norm": _max_rms_norm},
        }
    else:
        kwargs = {"options": {"step_size": abs(t1 - t0) / options.num_steps}}

    try:
        y1 = odeint(func, y0, t, method=options.method, **kwargs)[-1]
    except AssertionError as err:
        raise SolverError(
            f"The ODE solver ({options.method}) failed: {err}. The velocity field may "
            "be diverging; try a fixed-step method such as `method='rk4'`."
        ) from err

    if not torch.isfinite(y1).all():
        raise SolverError(
            f"The ODE solver ({options.method}) produced non-finite values after "
            f"{nfe} velocity evaluations. The velocity field is diverging."
        )

    return y1


def _augmented_field(
    velocity: Field,
    like: Tensor,
    divergence: str,
    generator: torch.Generator | None = None,
) -> Field:
    r"""Returns the field of :math:`(\theta, \ell)`, :math:`d\ell/dt = \nabla \cdot v`.

    `like` has the shape, type and device of :math:`\theta`.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"Expected `divergence` to be one of {DIVERGENCES}, got {divergence!r}."
        )

    theta_shape = like.shape
    D = theta_shape[-1]
    if divergence == "exact":
        eye = torch.eye(D, dtype=like.dtype, device=like.device)
        cotangents = eye.view(D, *[1] * (len(theta_shape) - 1), D)
        cotangents = cotangents.expand(D, *theta_shape)
    else:
        probe = torch.randint(
            0, 2, theta_shape, generator=generator, device=like.device
        ).to(like.dtype)
        probe = 2 * probe - 1

    def f(t: Tensor, y: Tensor) -> Tensor:
        v, vjp = torch.func.vjp(lambda theta: velocity(theta, t), y[..., :-1])

        if divergence == "exact":
            (rows,) = torch.func.vmap(vjp)(cotangents)
            div = rows.diagonal(dim1=0, dim2=-1).sum(dim=-1)
        else:
            (row,) = vjp(probe)
            div = (row * probe).sum(dim=-1)

        return torch.cat((v, div.unsqueeze(-1)), dim=-1)

    return f


def standard_normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * (z.square().sum(dim=-1) + z.shape[-1] * math.log(2 * math.pi))


def sample(velocity: Field, noise: Tensor, options: SolverOptions) -> Tensor:
    r"""Carries base draws at :math:`t = 1` to samples at :math:`t = 0`.

    Args:
        velocity: The velocity :math:`v(\theta_t, t)`.
        noise: Standard normal draws, with shape :math:`(*, D)`.
        options: Solver options.

    Returns:
        The samples, with shape :math:`(*, D)`.
    """
    return integrate(lambda t, theta: velocity(theta, t), noise, 1.0, 0.0, options)


def log_prob(
    velocity: Field,
    theta: Tensor,
    options: SolverOptions,
    divergence: str = "exact",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Returns the log-density of points at :math:`t = 0`.

    Args:
        velocity: The velocity :math:`v(\theta_t, t)`.
        theta: The points, with shape :math:`(*, D)`.
        options: Solver options.
        divergence: `exact` or `hutchinson`.
        generator: Optional source of the Hutchinson probes.

    Returns:
        The log-densities, with shape :math:`(*)`.
    """
    f = _augmented_field(velocity, theta, divergence, generator)
    y0 = torch.cat((theta, theta.new_zeros(theta.shape[:-1] + (1,))), dim=-1)
    y1 = integrate(f, y0, 0.0, 1.0, options)

    return standard_normal_log_prob(y1[..., :-1]) + y1[..., -1]


def sample_and_log_prob(
    velocity: Field,
    noise: Tensor,
    options: SolverOptions,
    divergence: str = "exact",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Returns samples and their log-densities from one backward integration.

    Args:
        velocity: The velocity :math:`v(\theta_t, t)`.
        noise: Standard normal draws, with shape :math:`(*, D)`.
        options: Solver options.
        divergence: `exact` or `hutchinson`.
        generator: Optional source of the Hutchinson probes.

    Returns:
        The samples, with shape :math:`(*, D)`, and their log-densities, with shape
        :math:`(*)`.
    """
    f = _augmented_field(velocity, noise, divergence, generator)
    y1 = torch.cat((noise, noise.new_zeros(noise.shape[:-1] + (1,))), dim=-1)
    y0 = integrate(f, y1, 1.0, 0.0, options)

    return y0[..., :-1], standard_normal_log_prob(noise) - y0[..., -1]
