"""A conditional Gaussian target whose flow matching velocity is known exactly."""

import torch
from torch import Tensor, nn


class GaussianVelocity(nn.Module):
    r"""Exact marginal velocity of the linear path from :math:`N(A x + b, \Sigma)`
    at :math:`t = 0` to :math:`N(0, I)` at :math:`t = 1`.

    With :math:`a = 1 - t` and :math:`S = a^2 \Sigma + t^2 I`,
    :math:`v(\theta_t, x, t) = (t I - a \Sigma) S^{-1} (\theta_t - a m) - m`.
    """

    def __init__(self, A: Tensor, b: Tensor, cov: Tensor):
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("b", b)
        self.register_buffer("cov", cov)

    def mean(self, x: Tensor) -> Tensor:
        return x @ self.A.T + self.b

    def distribution(self, x: Tensor) -> torch.distributions.MultivariateNormal:
        return torch.distributions.MultivariateNormal(self.mean(x), self.cov)

    def forward(self, theta_t: Tensor, x: Tensor, t: Tensor) -> Tensor:
        eye = torch.eye(len(self.cov), dtype=self.cov.dtype, device=self.cov.device)
        t = t[:, None, None]
        a = 1 - t
        m = self.mean(x)
        S = a**2 * self.cov + t**2 * eye
        M = (t * eye - a * self.cov) @ torch.linalg.inv(S)
        return (M @ (theta_t - a[..., 0] * m).unsqueeze(-1)).squeeze(-1) - m


def random_gaussian_velocity(D: int, E: int, seed: int = 0) -> GaussianVelocity:
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(D, E, generator=generator) / E**0.5
    b = torch.randn(D, generator=generator)
    L = torch.randn(D, D, generator=generator) / D**0.5 + torch.eye(D)
    return GaussianVelocity(A, b, L @ L.T / 2)
