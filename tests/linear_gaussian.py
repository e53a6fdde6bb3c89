"""A linear Gaussian problem whose posterior has a closed form."""

import torch

D = 3
NOISE = 0.5
x_o = torch.tensor([[0.5, -1.0, 1.5]])
prior = torch.distributions.MultivariateNormal(torch.zeros(D), torch.eye(D))


def simulate(theta):
    return theta + NOISE * torch.randn_like(theta)


def analytic_posterior(x):
    """Prior N(0, I), likelihood N(theta, NOISE^2 I), one observation `x` (1, D)."""
    shrink = 1 / (1 + NOISE**2)
    return torch.distributions.MultivariateNormal(
        shrink * x[0], NOISE**2 * shrink * torch.eye(D)
    )
