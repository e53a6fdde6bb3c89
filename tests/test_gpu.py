"""The estimator on CUDA gives what it gives on the CPU (run with `-m gpu`)."""

import copy

import pytest
import torch

from sbi_fm_plugin import build_flow_matching

pytestmark = pytest.mark.gpu


def test_cuda_matches_cpu():
    theta, x = torch.randn(200, 3), torch.randn(200, 4)
    cpu = build_flow_matching(theta, x, width=32, depth=2).eval()
    cuda = copy.deepcopy(cpu).to("cuda")

    points, conditions = torch.randn(50, 3), torch.randn(50, 4)
    torch.testing.assert_close(
        cuda.log_prob(points.cuda(), conditions.cuda()).cpu(),
        cpu.log_prob(points, conditions),
        atol=1e-3,
        rtol=0,
    )
    # CUDA generators draw other numbers than CPU ones: compare determinism only.
    loss = cuda.loss(points.cuda(), conditions.cuda())
    assert torch.equal(loss, cuda.loss(points.cuda(), conditions.cuda()))

    samples = cuda.sample((1000,), conditions[:2].cuda())
    assert samples.device.type == "cuda" and samples.shape == (1000, 2, 3)
    assert torch.isfinite(samples).all()

    with pytest.raises(ValueError, match="cuda"):
        cuda.log_prob(points, conditions)
