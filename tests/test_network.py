import pytest
import torch

from sbi_fm_plugin.network import ACTIVATIONS, FourierTimeEmbedding, Mish, VelocityMLP


def test_fourier_time_embedding():
    embedding = FourierTimeEmbedding(8)
    t = torch.rand(3, 5)
    e = embedding(t)

    assert e.shape == (3, 5, 9)
    torch.testing.assert_close(e[..., 0], t)
    torch.testing.assert_close(e[..., 1:5] ** 2 + e[..., 5:] ** 2, torch.ones(3, 5, 4))


def test_mish_matches_torch():
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(Mish()(x), torch.nn.functional.mish(x))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("layer_norm", [True, False])
def test_velocity_mlp_shapes_and_gradients(activation, layer_norm):
    net = VelocityMLP(
        3, 4, width=16, depth=2, activation=activation, layer_norm=layer_norm
    )
    theta_t, x, t = torch.randn(10, 3), torch.randn(10, 4), torch.rand(10)

    v = net(theta_t, x, t)
    assert v.shape == (10, 3)

    v.square().sum().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_velocity_mlp_broadcasts_shared_inputs():
    net = VelocityMLP(2, 3, width=16, depth=2).eval()
    theta_t, x, t = torch.randn(5, 4, 2), torch.randn(4, 3), torch.tensor(0.3)

    shared = net(theta_t, x, t)
    expanded = net(theta_t, x.expand(5, 4, 3), t.expand(5, 4))

    torch.testing.assert_close(shared, expanded)
