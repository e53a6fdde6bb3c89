import pytest
import torch
from torch import nn

from sbi_fm_plugin import FlowMatchingEstimator, build_flow_matching
from sbi_fm_plugin.build import DEFAULT_WIDTH

theta = torch.randn(200, 2) * torch.tensor([3.0, 0.5]) + torch.tensor([1.0, -4.0])
x = torch.randn(200, 5) * 10


def width(estimator):
    return estimator.net.input_layer.out_features


def test_sbi_placeholders_are_accepted():
    estimator = build_flow_matching(
        theta, x, hidden_features=50, num_transforms=5, num_bins=10, num_components=10
    )
    assert isinstance(estimator, FlowMatchingEstimator)
    assert width(estimator) == DEFAULT_WIDTH


def test_hidden_features_sets_width_unless_placeholder():
    assert width(build_flow_matching(theta, x, hidden_features=64)) == 64
    assert width(build_flow_matching(theta, x, hidden_features=64, width=32)) == 32


def test_unknown_option_names_it():
    with pytest.raises(TypeError, match="widht"):
        build_flow_matching(theta, x, widht=32)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"width": 0}, "`width`"),
        ({"depth": -1}, "`depth`"),
        ({"activation": "swish"}, "`activation`"),
        ({"dropout": 1.5}, "`dropout`"),
        ({"method": "rk45"}, "`method`"),
        ({"rtol": -1.0}, "`rtol`"),
        ({"num_steps": 0}, "`num_steps`"),
        ({"sigma_min": 1.0}, "`sigma_min`"),
        ({"time_power_law_alpha": -1.0}, "`time_power_law_alpha`"),
        ({"time_uniform_fraction": 1.5}, "`time_uniform_fraction`"),
        ({"num_draws": 0}, "`num_draws`"),
        ({"ema_decay": 1.0}, "`ema_decay`"),
        ({"divergence": "trace"}, "`divergence`"),
        ({"z_score_x": "transform_to_unconstrained"}, "`z_score_x`"),
        ({"z_score_y": "robust"}, "`z_score_y`"),
    ],
)
def test_bad_option_values(options, match):
    with pytest.raises(ValueError, match=match):
        build_flow_matching(theta, x, **options)


@pytest.mark.parametrize(
    "batch_x, batch_y, error",
    [
        (theta.long(), x, TypeError),
        (theta, x[:10], ValueError),
        (theta[0], x[0], ValueError),
    ],
)
def test_bad_batches(batch_x, batch_y, error):
    with pytest.raises(error, match="batch_"):
        build_flow_matching(batch_x, batch_y)


def test_independent_z_scoring():
    estimator = build_flow_matching(theta, x)
    torch.testing.assert_close(estimator.theta_mean, theta.mean(0))
    torch.testing.assert_close(estimator.theta_std, theta.std(0))

    embedded = estimator.embedding_net(x)
    torch.testing.assert_close(embedded.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(embedded.std(0), torch.ones(5), atol=1e-5, rtol=0)


def test_structured_and_no_z_scoring():
    structured = build_flow_matching(theta, x, z_score_x="structured")
    assert structured.theta_mean.unique().numel() == 1
    assert structured.theta_std.unique().numel() == 1

    none = build_flow_matching(theta, x, z_score_x="none", z_score_y=None)
    assert torch.equal(none.theta_mean, torch.zeros(2))
    assert torch.equal(none.theta_std, torch.ones(2))
    assert torch.equal(none.embedding_net(x), x)


def test_embedding_net_sets_condition_features():
    embedding = nn.Sequential(nn.Linear(5, 7), nn.ReLU())
    estimator = build_flow_matching(theta, x, embedding_net=embedding)

    assert estimator.net.condition_layer.in_features == 7
    assert estimator.embedding_net[1] is embedding


def test_custom_velocity_net():
    class Velocity(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2 + 5 + 1, 2)

        def forward(self, theta_t, x, t):
            assert theta_t.dim() == 2 and x.dim() == 2 and t.dim() == 1
            return self.linear(torch.cat((theta_t, x, t[:, None]), dim=-1))

    estimator = build_flow_matching(theta, x, velocity_net=Velocity())
    assert estimator.sample((3, 4), x[:2]).shape == (3, 4, 2, 2)
    assert estimator.log_prob(theta[:6].view(3, 2, 2), x[:2]).shape == (3, 2)
    assert estimator.loss(theta, x).shape == (200,)

    with pytest.raises(TypeError, match="`velocity_net`"):
        build_flow_matching(theta, x, velocity_net=lambda theta_t, x, t: theta_t)
