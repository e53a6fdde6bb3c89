"""Input checking, solver failures, persistence, determinism and multi-round use."""

import copy
import math
import time

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from saved import saved_copies
from sbi.inference import NPE
from sbi.utils import RestrictedPrior, get_density_thresholder
from sbi.utils.metrics import c2st
from torch import Tensor, nn

from sbi_fm_plugin import (
    FlowMatchingEstimator,
    SolverError,
    SolverOptions,
    build_flow_matching,
    flow_matching_nn,
)
from sbi_fm_plugin.coupling import Coupler, CouplingOptions

D, E = 2, 3
CHEAP = {"method": "euler", "num_steps": 2}
NOISE = 0.5
x_o = torch.tensor([[0.5, -1.0]])

# The autouse fixture seeds and changes directory once per test, which is all the
# examples need.
PROPERTY = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def estimator():
    torch.manual_seed(1)
    return build_flow_matching(
        torch.randn(50, D), torch.randn(50, E), width=16, depth=1
    )


def simulate(theta):
    return theta + NOISE * torch.randn_like(theta)


def gaussian_prior():
    return torch.distributions.MultivariateNormal(torch.zeros(D), torch.eye(D))


def analytic_posterior(x):
    """Prior N(0, I), likelihood N(theta, NOISE^2 I)."""
    shrink = 1 / (1 + NOISE**2)
    return torch.distributions.MultivariateNormal(
        shrink * x[0], NOISE**2 * shrink * torch.eye(len(x[0]))
    )


# Arguments and what the estimator should make of them.

FLOATS = (torch.float32, torch.float64)
DEFECTS = ("dtype", "list", "trailing", "batch_dims", "empty", "nan", "inf", "range")


@st.composite
def arguments(draw, event_shape, batch_dims):
    """A tensor for an argument with event shape `event_shape` and a number of batch
    dimensions in `batch_dims`, with one of `DEFECTS` half of the time."""
    defect = draw(st.sampled_from(DEFECTS)) if draw(st.booleans()) else None
    if defect == "batch_dims":
        wrong = [n for n in range(max(batch_dims) + 2) if n not in batch_dims]
        num_batch_dims = draw(st.sampled_from(wrong))
    else:
        num_batch_dims = draw(st.sampled_from(batch_dims))
    batch_shape = draw(
        st.lists(st.integers(1, 3), min_size=num_batch_dims, max_size=num_batch_dims)
    )
    if defect == "empty" and batch_shape:
        batch_shape[draw(st.integers(0, len(batch_shape) - 1))] = 0
    trailing = event_shape
    if defect == "trailing":
        trailing = draw(
            st.lists(st.integers(1, 4), max_size=2)
            .map(tuple)
            .filter(lambda shape: shape != event_shape)
        )
    shape = (*batch_shape, *trailing)

    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if defect == "dtype":
        value = torch.randint(-3, 4, shape, generator=generator)
        return value.to(draw(st.sampled_from([torch.int64, torch.bool])))
    # Magnitudes up to a few hundred: near float32's limit, finite values overflow
    # inside the network, which the solver reports as a SolverError.
    scale = draw(st.sampled_from([1.0, 100.0]))
    dtype = torch.float64 if defect == "range" else draw(st.sampled_from(FLOATS))
    value = (scale * torch.randn(shape, generator=generator)).to(dtype)
    # 1e300 is finite in float64 but beyond the range of the estimator's float32.
    poison = {"nan": math.nan, "inf": draw(st.sampled_from([-1, 1])) * math.inf}
    poison["range"] = 1e300
    if defect in poison and value.numel():
        value.view(-1)[draw(st.integers(0, value.numel() - 1))] = poison[defect]

    return value.tolist() if defect == "list" else value


def problem(value, event_shape, batch_dims):
    """The exception that `value` alone calls for, if any."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        return TypeError
    num_batch_dims = value.dim() - len(event_shape)
    trailing = tuple(value.shape[value.dim() - len(event_shape) :])
    if num_batch_dims not in batch_dims or trailing != event_shape:
        return ValueError
    if value.numel() == 0 or not torch.isfinite(value.float()).all():
        return ValueError
    return None


def problems_of(**specs):
    """The problems of each argument, given as (value, event_shape, batch_dims)."""
    problems = {name: problem(*spec) for name, spec in specs.items()}
    return {name: kind for name, kind in problems.items() if kind is not None}


def snapshot(values):
    return [v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for v in values]


def assert_unchanged(values, before):
    for value, original in zip(values, before, strict=True):
        if isinstance(value, Tensor):
            assert value.dtype == original.dtype
            torch.testing.assert_close(value, original, rtol=0, atol=0, equal_nan=True)
        else:
            assert repr(value) == repr(original)


def check_outcome(call, named, problems, expected_shape):
    """Runs `call`; with problems, expects one of their errors naming its argument,
    else a finite float32 result of `expected_shape`."""
    before = snapshot(named.values())
    try:
        result = call()
    except (ValueError, TypeError) as err:
        assert problems, f"valid arguments raised {err!r}"
        assert any(
            f"`{name}`" in str(err) and isinstance(err, kind)
            for name, kind in problems.items()
        ), f"{err!r} for problems {problems}"
    else:
        assert not problems, f"expected an error for {problems}, got a result"
        assert result.shape == expected_shape
        assert result.dtype == torch.float32
        assert torch.isfinite(result).all()
    assert_unchanged(named.values(), before)


def sample_and_batch_size(value):
    # Without sample dimension, one draw; without batch dimension, one condition.
    return {1: (1, 1), 2: (1, len(value)), 3: tuple(value.shape[:2])}[value.dim()]


@PROPERTY
@given(
    input=arguments((D,), (0, 1, 2)),
    condition=arguments((E,), (0, 1, 2)),
    training=st.booleans(),
)
@example(  # sample sizes that do not broadcast
    input=torch.randn(4, 5, D), condition=torch.randn(3, 5, E), training=False
)
@example(  # finite in float64, not in float32
    input=torch.full((D,), 1e300, dtype=torch.float64),
    condition=torch.randn(E),
    training=False,
)
def test_log_prob_checks_its_arguments(estimator, input, condition, training):
    problems = problems_of(
        input=(input, (D,), (0, 1, 2)), condition=(condition, (E,), (0, 1, 2))
    )
    expected_shape = None
    if not problems:
        num_samples, input_batch = sample_and_batch_size(input)
        condition_samples, condition_batch = sample_and_batch_size(condition)
        batch = max(input_batch, condition_batch)
        batches_broadcast = {input_batch, condition_batch} <= {1, batch}
        if not batches_broadcast or condition_samples not in (1, num_samples):
            problems = {"input": ValueError, "condition": ValueError}
        expected_shape = (num_samples, batch)

    estimator.train(training)
    check_outcome(
        lambda: estimator.log_prob(input, condition, **CHEAP),
        {"input": input, "condition": condition},
        problems,
        expected_shape,
    )


sample_shapes = st.one_of(
    st.lists(st.integers(1, 3), max_size=2).map(tuple),
    st.lists(st.integers(-2, 3), min_size=1, max_size=2).map(tuple),
    st.sampled_from([3, "3", None, (2.5,), [1, "2"]]),
)


def sample_shape_problem(sample_shape):
    if not isinstance(sample_shape, tuple | list) or not all(
        isinstance(size, int) for size in sample_shape
    ):
        return TypeError
    return ValueError if any(size < 1 for size in sample_shape) else None


@PROPERTY
@given(sample_shape=sample_shapes, condition=arguments((E,), (0, 1)))
@example(sample_shape=(-1,), condition=torch.randn(E))
@example(sample_shape=(2, 0), condition=torch.randn(E))
def test_sample_checks_its_arguments(estimator, sample_shape, condition):
    problems = problems_of(condition=(condition, (E,), (0, 1)))
    if sample_shape_problem(sample_shape):
        problems["sample_shape"] = sample_shape_problem(sample_shape)
    expected_shape = None
    if not problems:
        batch = len(condition) if condition.dim() == 2 else 1
        expected_shape = (*sample_shape, batch, D)

    check_outcome(
        lambda: estimator.sample(sample_shape, condition, **CHEAP),
        {"sample_shape": sample_shape, "condition": condition},
        problems,
        expected_shape,
    )


@PROPERTY
@given(
    input=arguments((D,), (1,)),
    condition=arguments((E,), (1,)),
    training=st.booleans(),
)
def test_loss_checks_its_arguments(estimator, input, condition, training):
    problems = problems_of(input=(input, (D,), (1,)), condition=(condition, (E,), (1,)))
    if not problems and len(input) != len(condition):
        problems = {"input": ValueError, "condition": ValueError}

    estimator.train(training)
    check_outcome(
        lambda: estimator.loss(input, condition),
        {"input": input, "condition": condition},
        problems,
        None if problems else (len(input),),
    )


# Solver failures end in SolverError, within the evaluation budget.


def blown_up_estimator():
    estimator = build_flow_matching(
        torch.randn(50, D), torch.randn(50, E), width=16, depth=1
    ).eval()
    with torch.no_grad():
        for parameter in estimator.parameters():
            parameter.mul_(1e6)
        for parameter in estimator.ema.parameters():
            parameter.mul_(1e6)
    return estimator


@pytest.mark.parametrize(
    "options",
    [
        {"method": "dopri5"},
        {"method": "dopri5", "per_sample_steps": False},
        {"method": "bosh3"},
        {"method": "dopri8"},
        {"method": "adaptive_heun"},
        {"method": "rk4"},
        {"method": "euler"},
    ],
    ids=lambda options: "-".join(str(value) for value in options.values()),
)
@pytest.mark.parametrize("call", ["sample", "log_prob", "sample_and_log_prob"])
def test_blown_up_network_ends_in_solver_error(options, call):
    estimator = blown_up_estimator()
    max_nfe = 200
    # The estimator evaluates the weight average, whose output layer runs once per
    # velocity evaluation.
    evaluations = []
    estimator.ema["net"].output_layer.register_forward_hook(
        lambda *_: evaluations.append(1)
    )
    arguments = {
        "sample": ((10,), torch.randn(2, E)),
        "log_prob": (torch.randn(10, D), torch.randn(10, E)),
        "sample_and_log_prob": ((10,), torch.randn(E)),
    }[call]

    with pytest.raises(SolverError, match=f"\\({options['method']}\\)"):
        getattr(estimator, call)(*arguments, max_nfe=max_nfe, **options)
    assert 0 < len(evaluations) <= max_nfe


class SingularVelocity(nn.Module):
    """A field that blows up at t = 0.5, which adaptive steps cannot cross."""

    def forward(self, theta_t, x, t):
        return (1 + 0 * theta_t) / (t - 0.5).abs()[:, None]


@pytest.mark.parametrize("per_sample_steps", [True, False])
@pytest.mark.parametrize("call", ["sample", "log_prob"])
def test_step_size_underflow_is_a_solver_error(per_sample_steps, call):
    # The cap is far beyond what the underflow takes, so the latter must be found.
    solver = SolverOptions(max_nfe=100_000, per_sample_steps=per_sample_steps)
    estimator = FlowMatchingEstimator(SingularVelocity(), (D,), (E,), solver=solver)
    arguments = {
        "sample": ((4,), torch.randn(E)),
        "log_prob": (torch.randn(4, D), torch.randn(E)),
    }[call]

    with pytest.raises(SolverError, match="underflow"):
        getattr(estimator, call)(*arguments)


# Persistence.


def trained_estimator(steps=20, **options):
    theta, x = torch.randn(50, D) * 2 + 1, torch.randn(50, E)
    estimator = build_flow_matching(theta, x, width=16, depth=1, **options)
    optimizer = torch.optim.Adam(estimator.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        estimator.train().loss(theta, x).mean().backward()
        optimizer.step()
    return estimator.eval()


def assert_same_outputs(estimator, other):
    # The same weights and operations on the same device give the same bits.
    theta, x = torch.randn(5, D), torch.randn(5, E)
    torch.testing.assert_close(
        other.log_prob(theta, x), estimator.log_prob(theta, x), atol=0, rtol=0
    )
    torch.manual_seed(7)
    expected = estimator.sample((10,), x)
    torch.manual_seed(7)
    torch.testing.assert_close(other.sample((10,), x), expected, atol=0, rtol=0)


def test_state_dict_loads_into_a_fresh_estimator():
    torch.manual_seed(1)
    estimator = trained_estimator()
    torch.manual_seed(2)
    fresh = build_flow_matching(
        torch.randn(50, D), torch.randn(50, E), width=16, depth=1
    ).eval()
    theta, x = torch.randn(5, D), torch.randn(5, E)
    assert not torch.allclose(fresh.log_prob(theta, x), estimator.log_prob(theta, x))

    fresh.load_state_dict(estimator.state_dict())
    assert_same_outputs(estimator, fresh)


def test_torch_save_and_load_to_cpu(tmp_path):
    estimator = trained_estimator()
    torch.save(estimator, tmp_path / "estimator.pt")
    loaded = torch.load(
        tmp_path / "estimator.pt", map_location="cpu", weights_only=False
    )

    assert isinstance(loaded, FlowMatchingEstimator)
    assert_same_outputs(estimator, loaded)


def test_pickles_without_later_attributes_still_train_and_sample():
    estimator = trained_estimator(steps=2)
    old = copy.deepcopy(estimator)
    # Estimators pickled before these attributes existed lack them.
    del old.__dict__["coupling"], old.__dict__["_coupler"]

    for loaded in saved_copies(old):
        assert loaded.coupling == CouplingOptions()
        assert isinstance(loaded._coupler, Coupler)
        assert loaded._coupler.options is loaded.coupling
        assert_same_outputs(estimator, loaded)

        theta, x = torch.randn(8, D), torch.randn(8, E)
        loaded.train().loss(theta, x).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in loaded.net.parameters())
        samples = loaded.eval().sample((4,), x)
        assert samples.shape == (4, 8, D) and torch.isfinite(samples).all()


@pytest.mark.gpu
def test_estimator_saved_on_cuda_loads_on_cpu(tmp_path):
    theta, x = torch.randn(200, D), torch.randn(200, E)
    estimator = build_flow_matching(theta, x, width=16, depth=1).cuda()
    optimizer = torch.optim.Adam(estimator.parameters(), lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        estimator.train().loss(theta.cuda(), x.cuda()).mean().backward()
        optimizer.step()
    estimator.eval()

    torch.save(estimator, tmp_path / "estimator.pt")
    loaded = torch.load(
        tmp_path / "estimator.pt", map_location="cpu", weights_only=False
    )
    cpu_copy = copy.deepcopy(estimator).cpu()

    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    assert_same_outputs(cpu_copy, loaded)
    points, conditions = torch.randn(50, D), torch.randn(50, E)
    torch.testing.assert_close(
        loaded.log_prob(points, conditions),
        estimator.log_prob(points.cuda(), conditions.cuda()).cpu(),
        atol=1e-3,
        rtol=0,
    )


# Determinism.


def train_npe(seed, **options):
    torch.manual_seed(seed)
    prior = gaussian_prior()
    theta = prior.sample((500,))
    inference = NPE(
        prior, density_estimator=flow_matching_nn(**options), show_progress_bars=False
    )
    inference.append_simulations(theta, simulate(theta)).train(max_num_epochs=3)
    posterior = inference.build_posterior()

    torch.manual_seed(seed + 1)
    samples = posterior.sample((100,), x=x_o, show_progress_bars=False)
    return inference.summary, samples


@pytest.mark.parametrize("coupling", ["none", "exact"])
def test_seeded_npe_training_is_reproducible(coupling):
    summary, samples = train_npe(3, coupling=coupling)
    other_summary, other_samples = train_npe(3, coupling=coupling)

    assert len(summary["training_loss"]) > 1
    assert other_summary["training_loss"] == summary["training_loss"]
    assert other_summary["validation_loss"] == summary["validation_loss"]
    torch.testing.assert_close(other_samples, samples, rtol=0, atol=0)


# Multi-round inference.


def first_round(num_simulations, max_num_epochs, **options):
    prior = gaussian_prior()
    theta = prior.sample((num_simulations,))
    inference = NPE(
        prior, density_estimator=flow_matching_nn(**options), show_progress_bars=False
    )
    inference.append_simulations(theta, simulate(theta)).train(
        max_num_epochs=max_num_epochs
    )
    return prior, inference, inference.build_posterior().set_default_x(x_o)


def test_truncated_sequential_npe_matches_analytic():
    prior, inference, posterior = first_round(
        1000, 50, width=64, depth=2, method="rk4", num_steps=8
    )
    # sbi's default of a million draws to place the threshold is for cheap flows.
    accept_reject_fn = get_density_thresholder(
        posterior, quantile=1e-3, num_samples_to_estimate_support=5000
    )
    proposal = RestrictedPrior(prior, accept_reject_fn, sample_with="rejection")
    # The region of 99.9% posterior mass holds most of the prior, not all of it.
    assert accept_reject_fn(prior.sample((1000,))).float().mean() < 0.99
    theta = proposal.sample((1000,), print_rejected_frac=False)

    inference.append_simulations(theta, simulate(theta), proposal=proposal)
    inference.train(force_first_round_loss=True, max_num_epochs=50)
    samples = inference.build_posterior().sample(
        (1000,), x=x_o, show_progress_bars=False
    )

    reference = analytic_posterior(x_o).sample((1000,))
    assert c2st(samples, reference).item() <= 0.6


def test_atomic_npe_c_is_refused_up_front():
    _, inference, posterior = first_round(200, 2, width=16, depth=1)
    theta = posterior.sample((200,), show_progress_bars=False)
    inference.append_simulations(theta, simulate(theta), proposal=posterior)

    start = time.perf_counter()
    with pytest.raises(ValueError, match="atomic loss") as error:
        inference.train(max_num_epochs=2)
    assert time.perf_counter() - start < 5
    assert "RestrictedPrior" in str(error.value)
    assert "force_first_round_loss=True" in str(error.value)

    inference.train(force_first_round_loss=True, max_num_epochs=2)
    assert len(inference.summary["epochs_trained"]) == 2
