r"""Time-conditioned velocity networks.

The velocity network maps a point on the probability path, the condition embedding
and the time to a velocity,

.. math:: v_\phi(\theta_t, x, t) \in \mathbb{R}^D ,

with the argument order `(theta_t, x, t)` used everywhere in this package. Time enters
through Gaussian Fourier features (Tancik et al., 2020, arXiv:2006.10739), as in
BayesFlow's flow matching network (Radev et al., 2023, arXiv:2306.16015).
"""

__all__ = ["FourierTimeEmbedding", "VelocityMLP"]

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn


class Mish(nn.Module):
    r"""Mish, :math:`x \tanh(\mathrm{softplus}(x))` (Misra, 2019, arXiv:1908.08681).

    Written out rather than taken from `nn.Mish`, whose fused backward has no batching
    rule: the vectorised exact divergence would fall back to a slow loop.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.tanh(nn.functional.softplus(x))


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "mish": Mish,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
}


class FourierTimeEmbedding(nn.Module):
    r"""Embeds a time :math:`t \in [0, 1]` as :math:`(t, \sin 2\pi w t, \cos 2\pi w t)`.

    The frequencies :math:`w \sim \mathcal{N}(0, s^2)` are drawn once and stored as a
    buffer, so that they move with the module and are saved with it.

    Args:
        features: Size of the embedding, an odd number is rounded down to even before
            the identity feature is appended.
        scale: Standard deviation :math:`s` of the frequencies.
        seed: Seed of the generator that draws the frequencies.

    Example:
        >>> embedding = FourierTimeEmbedding(32)
        >>> embedding(torch.rand(5)).shape
        torch.Size([5, 33])
    """

    def __init__(self, features: int = 32, scale: float = 1.0, seed: int = 0) -> None:
        super().__init__()

        generator = torch.Generator().manual_seed(seed)
        frequencies = torch.randn(features // 2, generator=generator) * scale
        self.register_buffer("frequencies", frequencies)

    @property
    def features(self) -> int:
        return 2 * len(self.frequencies) + 1

    def forward(self, t: Tensor) -> Tensor:
        r"""
        Args:
            t: Times, with shape :math:`(*)`.

        Returns:
            The embeddings, with shape :math:`(*, F)`.
        """
        t = t.unsqueeze(-1)
        angles = 2 * math.pi * t * self.frequencies

        return torch.cat((t, angles.sin(), angles.cos()), dim=-1)


class ResidualBlock(nn.Module):
    r"""A residual block :math:`h + \mathrm{drop}(a(W \mathrm{LN}(h) + c))`, where
    :math:`c` is a projection of the time and condition context, or zero."""

    def __init__(
        self, width: int, activation: str, dropout: float, layer_norm: bool
    ) -> None:
        super().__init__()

        self.norm = nn.LayerNorm(width) if layer_norm else nn.Identity()
        self.linear = nn.Linear(width, width)
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, c: Tensor | float = 0.0) -> Tensor:
        return h + self.dropout(self.activation(self.linear(self.norm(h)) + c))


class VelocityMLP(nn.Module):
    r"""A residual MLP on :math:`\theta_t`, the time embedding and the condition
    embedding.

    The first layer is split into one linear map per input, which is the same as one
    linear map of their concatenation. Every residual block also receives a
    projection of the condition, through one hidden layer, and a linear projection of
    the time embedding. The work that depends on the condition only is done once per
    condition by :meth:`context`, and :meth:`velocity` does the rest, whose cost per
    point and time is the blocks and a few small maps of the time features: during an
    ODE solve each trajectory can thus be at its own time, and the condition is
    processed once for all its draws. Inputs only need to broadcast against each
    other.

    Args:
        input_features: Size :math:`D` of :math:`\theta_t`.
        condition_features: Size :math:`E` of the condition embedding.
        width: Width of the hidden layers.
        depth: Number of residual blocks.
        activation: One of `mish`, `gelu`, `silu`, `relu`, `elu`, `tanh`.
        dropout: Dropout probability inside the residual blocks.
        layer_norm: Whether the residual blocks normalise their input.
        time_features: Size of the Fourier time embedding.
        time_scale: Standard deviation of the Fourier frequencies.
        context_every_block: Whether every block also receives the time and the
            condition (as in FiLM-style conditioning), rather than only the first
            layer.

    Example:
        >>> net = VelocityMLP(2, 3, width=16, depth=2)
        >>> net(torch.randn(10, 2), torch.randn(10, 3), torch.rand(10)).shape
        torch.Size([10, 2])
    """

    #: The network accepts inputs whose leading dimensions merely broadcast.
    broadcasts_inputs = True

    def __init__(
        self,
        input_features: int,
        condition_features: int,
        width: int = 128,
        depth: int = 3,
        activation: str = "gelu",
        dropout: float = 0.05,
        layer_norm: bool = True,
        time_features: int = 32,
        time_scale: float = 1.0,
        context_every_block: bool = True,
    ) -> None:
        super().__init__()

        self.width = width
        self.time_embedding = FourierTimeEmbedding(time_features, time_scale)
        self.input_layer = nn.Linear(input_features, width)
        self.condition_layer = nn.Linear(condition_features, width, bias=False)
        contexts = 1 + depth if context_every_block else 1
        self.time_layer = nn.Linear(
            self.time_embedding.features, contexts * width, bias=False
        )
        self.activation = ACTIVATIONS[activation]()
        self.blocks = nn.ModuleList(
            ResidualBlock(width, activation, dropout, layer_norm) for _ in range(depth)
        )
        self.context_layer = None
        if context_every_block:
            self.context_layer = nn.Linear(width, depth * width, bias=False)
        self.output_layer = nn.Linear(width, input_features)

    def context(self, x: Tensor) -> Tensor:
        r"""
        Args:
            x: Condition embeddings, with shape :math:`(*, E)`.

        Returns:
            What the velocity needs of the condition, with shape :math:`(*, C)`.
        """
        h = self.condition_layer(x)
        if self.context_layer is None:
            return h

        return torch.cat((h, self.context_layer(self.activation(h))), dim=-1)

    def velocity(self, theta_t: Tensor, context: Tensor, t: Tensor) -> Tensor:
        r"""
        Args:
            theta_t: Points on the path, with shape :math:`(*, D)`.
            context: The :meth:`context` of their conditions, with shape
                :math:`(*, C)`.
            t: Times, with shape :math:`(*)`.

        Returns:
            The velocities, with shape :math:`(*, D)`.
        """
        # One small product per block rather than one of all blocks at once and a
        # split: the slices of the latter are not contiguous, which slows the rest.
        time = self.time_embedding(t)
        contexts = [
            c + nn.functional.linear(time, weight)
            for c, weight in zip(
                context.split(self.width, dim=-1),
                self.time_layer.weight.split(self.width),
                strict=True,
            )
        ]
        h = self.activation(self.input_layer(theta_t) + contexts[0])

        rest = contexts[1:] or [0.0] * len(self.blocks)
        for block, c in zip(self.blocks, rest, strict=True):
            h = block(h, c)

        return self.output_layer(h)

    def forward(self, theta_t: Tensor, x: Tensor, t: Tensor) -> Tensor:
        r"""
        Args:
            theta_t: Points on the path, with shape :math:`(*, D)`.
            x: Condition embeddings, with shape :math:`(*, E)`.
            t: Times, with shape :math:`(*)`.

        Returns:
            The velocities, with shape :math:`(*, D)`.
        """
        return self.velocity(theta_t, self.context(x), t)
