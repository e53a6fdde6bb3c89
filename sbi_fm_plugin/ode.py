r"""Sampling and log-densities through the probability flow ODE.

A velocity field :math:`v(\theta, c, t)` carries the data at :math:`t = 0` to the
standard normal base at :math:`t = 1`, given a condition :math:`c`. Samples integrate
the ODE backwards from base draws, and the instantaneous change of variables (Chen et
al., 2018, arXiv:1806.07366) gives the log-density of a point :math:`\theta_0` by
integrating forwards,

.. math:: \log p_0(\theta_0) = \log \mathcal{N}(\theta_1; 0, I)
    + \int_0^1 \nabla \cdot v(\theta_t, c, t) \, dt .

The divergence is exact (one vector-Jacobian product per dimension, all through one
forward pass) or Hutchinson's estimate :math:`\epsilon^\top J \epsilon` with
Rademacher probes :math:`\epsilon` drawn once per trajectory (Grathwohl et al., 2019,
arXiv:1810.01367).

The adaptive methods `dopri5` and `bosh3` control the step size of every trajectory on
its own: each row of a batch has its own time, step size and number of steps, and rows
leave the batch when they reach the end. A point's result therefore does not depend on
the other points in its batch, and easy trajectories do not pay for hard ones. The
other methods, and these two with `per_sample_steps=False`, are torchdiffeq's, which
takes one step size for the whole batch.
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
from tqdm.auto import tqdm

from ._checks import check_count, check_real

#: A velocity field, called as `v(theta, c, t)` with shapes (n, D), (n, C) and (n,).
Field = Callable[[Tensor, Tensor, Tensor], Tensor]
#: A right-hand side, called as `f(y, t, rows)` for the rows `rows` of the batch.
RightHandSide = Callable[[Tensor, Tensor, Tensor], Tensor]

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
        per_sample_steps: Whether `dopri5` and `bosh3` choose the step size of each
            trajectory on its own, which makes results independent of the batch.
            Otherwise, and for the other adaptive methods, the worst trajectory of
            the batch sets one step size for all.
        chunk_size: The most trajectories solved at once; larger requests are
            solved chunk by chunk, so that memory does not grow with their size.
        show_progress_bars: Whether requests of several chunks show a progress bar;
            None leaves it to the caller (see the estimator's methods).

    Example:
        >>> SolverOptions().replace(method="rk4", num_steps=10).method
        'rk4'
    """

    method: str = "dopri5"
    rtol: float = 1e-4
    atol: float = 1e-4
    num_steps: int = 20
    max_nfe: int = 10_000
    per_sample_steps: bool = True
    chunk_size: int = 16_384
    show_progress_bars: bool | None = None

    def __post_init__(self) -> None:
        methods = ADAPTIVE_METHODS + FIXED_METHODS
        if self.method not in methods:
            raise ValueError(
                f"Expected `method` to be one of {methods}, got {self.method!r}."
            )

        for name in ("rtol", "atol"):
            value = getattr(self, name)
            check_real(name, value)
            if not value > 0:
                raise ValueError(f"Expected `{name}` > 0, got {value!r}.")

        check_count("num_steps", self.num_steps)
        check_count("max_nfe", self.max_nfe)
        check_count("chunk_size", self.chunk_size)
        if not isinstance(self.per_sample_steps, bool):
            raise TypeError(
                "Expected `per_sample_steps` to be a bool, got "
                f"{self.per_sample_steps!r}."
            )
        if self.show_progress_bars is not None and not isinstance(
            self.show_progress_bars, bool
        ):
            raise TypeError(
                "Expected `show_progress_bars` to be a bool or None, got "
                f"{self.show_progress_bars!r}."
            )

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


@dataclasses.dataclass(frozen=True)
class _Tableau:
    r"""An explicit embedded Runge-Kutta pair whose last stage is the next first one."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    error: tuple[float, ...]
    order: int


def _tableau(c: tuple, a: tuple, b: tuple, b_low: tuple, order: int) -> _Tableau:
    error = tuple(high - low for high, low in zip(b, b_low, strict=True))
    return _Tableau(c, a, b, error, order)


# Dormand and Prince (1980), and Bogacki and Shampine (1989).
TABLEAUS = {
    "dopri5": _tableau(
        c=(0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1),
        a=(
            (),
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
        ),
        b=(35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0),
        b_low=(
            5179 / 57600,
            0,
            7571 / 16695,
            393 / 640,
            -92097 / 339200,
            187 / 2100,
            1 / 40,
        ),
        order=5,
    ),
    "bosh3": _tableau(
        c=(0, 1 / 2, 3 / 4, 1),
        a=((), (1 / 2,), (0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
        b=(2 / 9, 1 / 3, 4 / 9, 0),
        b_low=(7 / 24, 1 / 4, 1 / 3, 1 / 8),
        order=3,
    ),
}


def _combine(weights: tuple[float, ...], ks: list[Tensor]) -> Tensor:
    terms = [w * k for w, k in zip(weights, ks, strict=False) if w != 0]
    return sum(terms[1:], terms[0])


def _rms(error: Tensor) -> Tensor:
    return error.square().mean(dim=-1).sqrt()


def _root(x: Tensor, order: int) -> Tensor:
    # Vectorised and scalar `pow` kernels differ in the last bit, so a row's step size
    # would depend on its position in the batch; in float64 the difference does not
    # survive the rounding back.
    return x.double().pow(1 / order).to(x.dtype)


def _integrate_per_sample(
    f: RightHandSide, y0: Tensor, t0: float, t1: float, options: SolverOptions
) -> Tensor:
    r"""An embedded Runge-Kutta solver with a step size per row of `y0`."""
    tableau = TABLEAUS[options.method]
    rtol, atol = options.rtol, options.atol
    span = t1 - t0

    # Each row runs through s in [0, 1], that is t = t0 + s (t1 - t0).
    def g(y: Tensor, s: Tensor, rows: Tensor) -> Tensor:
        return span * f(y, t0 + span * s, rows)

    rows = torch.arange(len(y0), device=y0.device)
    s = y0.new_zeros(len(y0))
    y = y0

    k1 = g(y, s, rows)
    # The step sizes are constants to autograd: gradients are those of the
    # discrete solution.
    with torch.no_grad():
        # The initial step of Hairer, Norsett and Wanner (1993), II.4, row by row.
        scale = atol + rtol * y.abs()
        d0, d1 = _rms(y / scale), _rms(k1 / scale)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
        d2 = _rms((g(y + h0[:, None] * k1, s + h0, rows) - k1) / scale) / h0
        d = torch.maximum(d1, d2)
        h1 = torch.where(
            d <= 1e-15, (h0 * 1e-3).clamp(min=1e-6), _root(0.01 / d, tableau.order)
        )
        h = torch.minimum(100 * h0, h1).clamp(max=1.0)

    done_rows, done_y = [], []
    while len(rows):
        last = h >= 1 - s
        h = torch.where(last, 1 - s, h)
        if (s + h <= s).any():
            raise SolverError(
                f"The step size of the ODE solver ({options.method}) underflowed at "
                f"t = {t0 + span * s[s + h <= s][0].item():.6g}. The velocity field "
                "may be diverging; try a fixed-step method such as `method='rk4'`."
            )

        ks = [k1]
        for c, a in zip(tableau.c[1:], tableau.a[1:], strict=True):
            ks.append(g(y + h[:, None] * _combine(a, ks), s + c * h, rows))
        y_new = y + h[:, None] * _combine(tableau.b, ks)
        error = h[:, None] * _combine(tableau.error, ks)

        with torch.no_grad():
            scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
            ratio = _rms(error / scale)
        accept = ratio <= 1
        factor = 0.9 / _root(ratio.clamp(min=1e-10), tableau.order)
        factor = torch.nan_to_num(factor, nan=0.2).clamp(0.2, 10)
        factor = torch.where(accept, factor, factor.clamp(max=1))

        s = torch.where(accept, s + h, s)
        y = torch.where(accept[:, None], y_new, y)
        k1 = torch.where(accept[:, None], ks[-1], k1)
        h = h * factor

        done = accept & last
        if done.any():
            done_rows.append(rows[done])
            done_y.append(y[done])
            keep = ~done
            rows, y, s, h, k1 = rows[keep], y[keep], s[keep], h[keep], k1[keep]

    order = torch.cat(done_rows).argsort()
    return torch.cat(done_y)[order]


def _max_rms_norm(error: Tensor) -> Tensor:
    # The shared step size is controlled by the worst trajectory, not the batch
    # average, so that each trajectory meets the tolerances on its own.
    return error.square().mean(dim=-1).sqrt().max()


def _integrate_shared(
    f: RightHandSide, y0: Tensor, t0: float, t1: float, options: SolverOptions
) -> Tensor:
    rows = torch.arange(len(y0), device=y0.device)
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
        return odeint(
            lambda t, y: f(y, t.expand(len(y)), rows),
            y0,
            t,
            method=options.method,
            **kwargs,
        )[-1]
    except AssertionError as err:
        raise SolverError(
            f"The ODE solver ({options.method}) failed: {err}. The velocity field may "
            "be diverging; try a fixed-step method such as `method='rk4'`."
        ) from err


def evaluate_padded(f: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    r"""Calls `f` on the rows of `tensors`, with the last row repeated to at least
    32 rows (more with many threads) and to a multiple of 16.

    Returns:
        The first rows of the result, as many as `tensors` have.
    """
    # NOTE: CPU BLAS kernels round differently for a handful of rows (per thread)
    # than for many, and vectorised kernels differently from their scalar tails. Either
    # can flip a step's acceptance and make a point's result depend on its batch.
    # Padding keeps each row's arithmetic the same on the CPU; other backends are not
    # covered.
    n = len(tensors[0])
    padded = max(32, 8 * torch.get_num_threads(), -(-n // 16) * 16)
    if n == padded:
        return f(*tensors)
    index = torch.arange(padded, device=tensors[0].device).clamp(max=n - 1)

    return f(*(tensor[index] for tensor in tensors))[:n]


def integrate(
    f: RightHandSide, y0: Tensor, t0: float, t1: float, options: SolverOptions
) -> Tensor:
    r"""Integrates :math:`dy/dt = f(y, t)` from `t0` to `t1`.

    Args:
        f: The right-hand side, called as `f(y, t, rows)` with the states and times
            of the rows `rows` of the batch, with shapes :math:`(n, K)`, :math:`(n,)`
            and :math:`(n,)`.
        y0: The initial states, with shape :math:`(N, K)`.
        t0: The initial time.
        t1: The final time.
        options: Solver options.

    Returns:
        The final states, with shape :math:`(N, K)`.

    Raises:
        SolverError: If the solver needs more than `options.max_nfe` evaluations
            for a chunk, its step size underflows, or the final state is not finite.
    """
    if len(y0) <= options.chunk_size:
        return _integrate_chunk(f, y0, t0, t1, options)

    results = []
    with tqdm(
        total=len(y0),
        disable=not options.show_progress_bars,
        unit="trajectories",
        desc="Solving the flow ODE",
        leave=False,
    ) as progress:
        for start in range(0, len(y0), options.chunk_size):
            chunk = y0[start : start + options.chunk_size]

            def shifted(
                y: Tensor, t: Tensor, rows: Tensor, start: int = start
            ) -> Tensor:
                return f(y, t, rows + start)

            results.append(_integrate_chunk(shifted, chunk, t0, t1, options))
            progress.update(len(chunk))

    return torch.cat(results)


def _integrate_chunk(
    f: RightHandSide, y0: Tensor, t0: float, t1: float, options: SolverOptions
) -> Tensor:
    nfe = 0

    def counted(y: Tensor, t: Tensor, rows: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        if nfe > options.max_nfe:
            raise SolverError(
                f"The ODE solver ({options.method}) needed more than `max_nfe="
                f"{options.max_nfe}` velocity evaluations. The velocity field may be "
                "diverging; otherwise raise `max_nfe`, loosen `rtol`/`atol`, or use "
                "a fixed-step method such as `method='rk4'`."
            )
        return evaluate_padded(f, y, t, rows)

    if options.per_sample_steps and options.method in TABLEAUS:
        y1 = _integrate_per_sample(counted, y0, t0, t1, options)
    else:
        y1 = _integrate_shared(counted, y0, t0, t1, options)

    if not torch.isfinite(y1).all():
        raise SolverError(
            f"The ODE solver ({options.method}) produced non-finite values after "
            f"{nfe} velocity evaluations. The velocity field is diverging."
        )

    return y1


def _gather(condition: Tensor, rows: Tensor) -> Tensor:
    # Row r of the batch belongs to condition r % M, as in a flattened (S, M) batch.
    if len(condition) == 1:
        return condition.expand(len(rows), -1)
    return condition[rows % len(condition)]


def _check_rows(name: str, tensor: Tensor, condition: Tensor) -> None:
    if tensor.dim() != 2 or condition.dim() != 2 or len(tensor) % len(condition):
        raise ValueError(
            f"Expected `{name}` with shape (N, D) and `condition` with shape (M, C), "
            f"where M divides N, got {tuple(tensor.shape)} and "
            f"{tuple(condition.shape)}."
        )


def _augmented_field(
    velocity: Field,
    condition: Tensor,
    like: Tensor,
    divergence: str,
    generator: torch.Generator | None = None,
) -> RightHandSide:
    r"""Returns the field of :math:`(\theta, \ell)`, :math:`d\ell/dt = \nabla \cdot v`.

    `like` has the shape, type and device of :math:`\theta`.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"Expected `divergence` to be one of {DIVERGENCES}, got {divergence!r}."
        )

    D = like.shape[-1]
    if divergence == "hutchinson":
        probes = torch.randint(
            0, 2, like.shape, generator=generator, device=like.device
        )
        probes = 2 * probes.to(like.dtype) - 1

    def f(y: Tensor, t: Tensor, rows: Tensor) -> Tensor:
        # Gradients through the solve (for `map()`, say) need the graph of the
        # divergence itself; without them, one graph serves D cheap backward passes.
        # Those measured faster than vectorising the D products with `vmap`, from 2
        # to 10 dimensions and 20 to 1000 rows.
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            theta = y[:, :-1]
            if not theta.requires_grad:
                theta = theta.detach().requires_grad_(True)
            v = velocity(theta, _gather(condition, rows), t)

            if divergence == "exact":
                div = 0.0
                for i in range(D):
                    cotangent = torch.zeros_like(v)
                    cotangent[:, i] = 1.0
                    (row,) = torch.autograd.grad(
                        v,
                        theta,
                        cotangent,
                        retain_graph=True,
                        create_graph=create_graph,
                    )
                    div = div + row[:, i]
            else:
                probe = probes[rows]
                (row,) = torch.autograd.grad(
                    v,
                    theta,
                    probe,
                    retain_graph=create_graph,
                    create_graph=create_graph,
                )
                div = (row * probe).sum(dim=-1)

        if not create_graph:
            v = v.detach()
        return torch.cat((v, div.unsqueeze(-1)), dim=-1)

    return f


def standard_normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * (z.square().sum(dim=-1) + z.shape[-1] * math.log(2 * math.pi))


def sample(
    velocity: Field, noise: Tensor, condition: Tensor, options: SolverOptions
) -> Tensor:
    r"""Carries base draws at :math:`t = 1` to samples at :math:`t = 0`.

    Args:
        velocity: The velocity :math:`v(\theta_t, c, t)`.
        noise: Standard normal draws, with shape :math:`(N, D)`.
        condition: Conditions, with shape :math:`(M, C)`, where :math:`M` divides
            :math:`N`; draw :math:`i` is conditioned on row :math:`i \bmod M`.
        options: Solver options.

    Returns:
        The samples, with shape :math:`(N, D)`.
    """
    _check_rows("noise", noise, condition)

    def f(theta: Tensor, t: Tensor, rows: Tensor) -> Tensor:
        return velocity(theta, _gather(condition, rows), t)

    return integrate(f, noise, 1.0, 0.0, options)


def log_prob(
    velocity: Field,
    theta: Tensor,
    condition: Tensor,
    options: SolverOptions,
    divergence: str = "exact",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Returns the log-density of points at :math:`t = 0`.

    Args:
        velocity: The velocity :math:`v(\theta_t, c, t)`.
        theta: The points, with shape :math:`(N, D)`.
        condition: Conditions, with shape :math:`(M, C)`, where :math:`M` divides
            :math:`N`; point :math:`i` is conditioned on row :math:`i \bmod M`.
        options: Solver options.
        divergence: `exact` or `hutchinson`.
        generator: Optional source of the Hutchinson probes.

    Returns:
        The log-densities, with shape :math:`(N,)`.
    """
    _check_rows("theta", theta, condition)
    f = _augmented_field(velocity, condition, theta, divergence, generator)
    y0 = torch.cat((theta, theta.new_zeros(len(theta), 1)), dim=-1)
    y1 = integrate(f, y0, 0.0, 1.0, options)

    return standard_normal_log_prob(y1[:, :-1]) + y1[:, -1]


def sample_and_log_prob(
    velocity: Field,
    noise: Tensor,
    condition: Tensor,
    options: SolverOptions,
    divergence: str = "exact",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Returns samples and their log-densities from one backward integration.

    Args:
        velocity: The velocity :math:`v(\theta_t, c, t)`.
        noise: Standard normal draws, with shape :math:`(N, D)`.
        condition: Conditions, with shape :math:`(M, C)`, where :math:`M` divides
            :math:`N`; draw :math:`i` is conditioned on row :math:`i \bmod M`.
        options: Solver options.
        divergence: `exact` or `hutchinson`.
        generator: Optional source of the Hutchinson probes.

    Returns:
        The samples, with shape :math:`(N, D)`, and their log-densities, with shape
        :math:`(N,)`.
    """
    _check_rows("noise", noise, condition)
    f = _augmented_field(velocity, condition, noise, divergence, generator)
    y1 = torch.cat((noise, noise.new_zeros(len(noise), 1)), dim=-1)
    y0 = integrate(f, y1, 1.0, 0.0, options)

    return y0[:, :-1], standard_normal_log_prob(noise) - y0[:, -1]
