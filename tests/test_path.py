import pytest
import torch

from sbi_fm_plugin.path import (
    flow_matching_loss,
    interpolate,
    sample_times,
    target_velocity,
)


@pytest.mark.parametrize("alpha", [-0.5, 0.0, 1.0])
def test_sample_times_follow_power_law(alpha):
    t = sample_times(torch.Size([200_000]), alpha)

    assert t.min() >= 0 and t.max() <= 1
    # P(t <= s) = 1 - (1 - s)^(1 / (1 + alpha))
    for s in (0.1, 0.5, 0.9):
        expected = 1 - (1 - s) ** (1 / (1 + alpha))
        assert abs((t <= s).float().mean().item() - expected) < 5e-3


def test_uniform_fraction_mixes_schedules():
    t = sample_times(torch.Size([200_000]), alpha=-0.8, uniform_fraction=0.3)

    # P(t <= s) = 0.3 s + 0.7 (1 - (1 - s)^5)
    for s in (0.05, 0.3, 0.8):
        expected = 0.3 * s + 0.7 * (1 - (1 - s) ** 5)
        assert abs((t <= s).float().mean().item() - expected) < 5e-3


@pytest.mark.parametrize("sigma_min", [0.0, 1e-3])
def test_path_ends_and_velocity(sigma_min):
    theta, noise = torch.randn(7, 3), torch.randn(7, 3)

    torch.testing.assert_close(
        interpolate(theta, noise, torch.zeros(7), sigma_min), theta + sigma_min * noise
    )
    torch.testing.assert_close(
        interpolate(theta, noise, torch.ones(7), sigma_min), noise
    )

    # The target is the time derivative of the path.
    t, h = torch.rand(7, dtype=torch.float64), 1e-6
    theta, noise = theta.double(), noise.double()
    derivative = (
        interpolate(theta, noise, t + h, sigma_min)
        - interpolate(theta, noise, t - h, sigma_min)
    ) / (2 * h)
    torch.testing.assert_close(derivative, target_velocity(theta, noise, sigma_min))


def test_loss_of_exact_conditional_velocity_is_zero():
    # With one data point, the conditional velocity is the marginal one.
    theta = torch.tensor([[0.5, -1.0]])

    def velocity(theta_t, x, t):
        t = t.unsqueeze(-1)
        noise = (theta_t - (1 - t) * theta) / t
        return noise - theta

    for num_draws in (1, 3):
        loss = flow_matching_loss(
            velocity, theta.expand(64, 2), torch.zeros(64, 1), num_draws=num_draws
        )
        assert loss.shape == (64,)
        assert loss.max() < 1e-6


def test_more_draws_lower_the_loss_variance():
    theta, x = torch.randn(2000, 2), torch.zeros(2000, 1)

    def velocity(theta_t, x, t):
        return torch.zeros_like(theta_t)

    one = flow_matching_loss(velocity, theta, x)
    eight = flow_matching_loss(velocity, theta, x, num_draws=8)
    torch.testing.assert_close(one.mean(), eight.mean(), atol=0.1, rtol=0)
    assert eight.var() < one.var() / 2
