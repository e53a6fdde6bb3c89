r"""Conditional flow matching on the linear probability path.

Time runs from data to noise: :math:`t = 0` is the data and :math:`t = 1` the standard
normal base, as in sbi and lampe. A pair :math:`(\theta, \epsilon)` with
:math:`\epsilon \sim \mathcal{N}(0, I)` is joined by

.. math:: \theta_t = (1 - t) \theta + (\sigma_{\min} + (1 - \sigma_{\min}) t) \epsilon ,

whose velocity :math:`u_t = (1 - \sigma_{\min}) \epsilon - \theta` the network
regresses,

.. math:: \ell(\theta, x) = \mathbb{E}_{t, \epsilon}
    \| v_\phi(\theta_t, x, t) - u_t \|^2 / D .

Times are drawn as :math:`t = 1 - u^{1 + \alpha}` with :math:`u \sim
\mathcal{U}(0, 1)` and :math:`\alpha > -1`, that is from the density :math:`p(t)
\propto (1 - t)^{-\alpha / (1 + \alpha)}`: uniform for :math:`\alpha = 0`, favouring
the noise for :math:`\alpha > 0` and the data for :math:`\alpha < 0`. BayesFlow's
`time_power_law_alpha` draws :math:`t' = u^{1 + \alpha}` with the data at
:math:`t' = 1`; since :math:`t = 1 - t'`, the same :math:`\alpha` gives the same
schedule here.

References:
    | Flow Matching for Generative Modeling (Lipman et al., 2023)
    | https://arxiv.org/abs/2210.02747

    | Flow Matching for Scalable Simulation-Based Inference (Dax et al., 2023)
    | https://arxiv.org/abs/2305.17161
"""

__all__ = ["flow_matching_loss", "interpolate", "sample_times", "target_velocity"]

from collections.abc import Callable

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor, Tensor], Tensor]


def sample_times(
    shape: torch.Size,
    alpha: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    uniform_fraction: float = 0.0,
) -> Tensor:
    r"""Draws times :math:`t = 1 - u^{1 + \alpha}`, :math:`u \sim \mathcal{U}(0, 1)`,
    mixed with uniform times.

    Args:
        shape: Shape of the returned tensor.
        alpha: Exponent :math:`\alpha > -1`.
        generator: Optional source of randomness.
        device: Device of the returned tensor.
        dtype: Floating point type of the returned tensor.
        uniform_fraction: Probability that a time is uniform instead.

    Returns:
        Times in :math:`[0, 1)`.

    Example:
        >>> sample_times(torch.Size([3])).shape
        torch.Size([3])
    """
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    t = 1 - u ** (1 + alpha)
    if uniform_fraction > 0:
        v = torch.rand((2, *shape), generator=generator, device=device, dtype=dtype)
        t = torch.where(v[0] < uniform_fraction, v[1], t)

    return t


def interpolate(theta: Tensor, noise: Tensor, t: Tensor, sigma_min: float) -> Tensor:
    r"""Returns :math:`\theta_t`, with `t` broadcast over the last dimension.

    Args:
        theta: Data, with shape :math:`(*, D)`.
        noise: Base draws, with shape :math:`(*, D)`.
        t: Times, with shape :math:`(*)`.
        sigma_min: Standard deviation of the path at the data.
    """
    t = t.unsqueeze(-1)

    return (1 - t) * theta + (sigma_min + (1 - sigma_min) * t) * noise


def target_velocity(theta: Tensor, noise: Tensor, sigma_min: float) -> Tensor:
    r"""Returns :math:`u_t = (1 - \sigma_{\min}) \epsilon - \theta`."""
    return (1 - sigma_min) * noise - theta


def flow_matching_loss(
    velocity: Velocity,
    theta: Tensor,
    x: Tensor,
    alpha: float = 0.0,
    sigma_min: float = 0.0,
    generator: torch.Generator | None = None,
    num_draws: int = 1,
    uniform_fraction: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    r"""Returns the per-sample conditional flow matching loss.

    Args:
        velocity: A function :math:`v(\theta_t, x, t)`.
        theta: Data, with shape :math:`(N, D)`.
        x: Conditions (or their embeddings), with shape :math:`(N, E)`.
        alpha: Exponent of the time schedule.
        sigma_min: Standard deviation of the path at the data.
        generator: Optional source of the times and the noise.
        num_draws: Number of (time, noise) draws per pair, whose losses are
            averaged: more draws lower the variance of the gradient for little
            more than the cost of a larger batch.
        uniform_fraction: Fraction of uniform times mixed into the schedule.
        noise: Base draws paired with `theta`, with shape :math:`(num\_draws, N, D)`,
            for example coupled by optimal transport; standard normal draws by
            default.

    Returns:
        The loss of each pair, with shape :math:`(N,)`.

    Example:
        >>> v = lambda theta_t, x, t: torch.zeros_like(theta_t)
        >>> flow_matching_loss(v, torch.randn(4, 2), torch.randn(4, 3)).shape
        torch.Size([4])
    """
    shape = (num_draws, *theta.shape)
    t = sample_times(
        shape[:2], alpha, generator, theta.device, theta.dtype, uniform_fraction
    )
    if noise is None:
        noise = torch.randn(
            shape, generator=generator, device=theta.device, dtype=theta.dtype
        )

    theta_t = interpolate(theta, noise, t, sigma_min)
    u = target_velocity(theta, noise, sigma_min)

    return (velocity(theta_t, x, t) - u).square().mean(dim=(0, -1))
