r"""The flow matching density estimator, as sbi's trainers and posteriors use it.

The estimator works on z-scored parameters :math:`z = (\theta - \mu) / \sigma`, with
the density :math:`\log p(\theta | x) = \log p(z | x) - \sum \log \sigma`. The
condition is z-scored and embedded once per call; the velocity network then sees
:math:`(z_t, e(x), t)` at every ODE step. Time runs from data (:math:`t = 0`) to
noise (:math:`t = 1`); see :mod:`sbi_fm_plugin.path` and :mod:`sbi_fm_plugin.ode`.
"""

__all__ = ["FlowMatchingEstimator"]

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from . import ode
from ._checks import check_count
from ._sbi import (
    ConditionalDensityEstimator,
    progress_requested,
    refuse_atomic_loss,
)
from .coupling import Coupler, CouplingOptions
from .ode import SolverOptions
from .path import flow_matching_loss

DIVERGENCES = ("auto",) + ode.DIVERGENCES


class FlowMatchingEstimator(ConditionalDensityEstimator):
    r"""A conditional density estimator :math:`p(\theta | x)` trained by flow matching.

    Args:
        net: The velocity network. Networks with a true `broadcasts_inputs`
            attribute (such as :class:`VelocityMLP`) are called with inputs whose
            leading dimensions broadcast; any other module is called as
            `net(theta_t, x, t)` with shapes :math:`(N, D)`, :math:`(N, E)` and
            :math:`(N,)` and must return :math:`(N, D)`.
        input_shape: Event shape of :math:`\theta`.
        condition_shape: Event shape of :math:`x`.
        embedding_net: Maps conditions to embeddings of :math:`E` features; include
            the z-scoring of :math:`x` in it. Defaults to the identity.
        theta_mean: Mean :math:`\mu` used to z-score :math:`\theta`.
        theta_std: Standard deviation :math:`\sigma` used to z-score :math:`\theta`.
        time_power_law_alpha: Exponent of the training time schedule, with the
            meaning of BayesFlow's option of the same name
            (see :func:`sbi_fm_plugin.path.sample_times`).
        time_uniform_fraction: Fraction of training times drawn uniformly instead of
            from the power law.
        sigma_min: Standard deviation of the probability path at the data.
        num_draws: Number of (time, noise) draws per pair in the loss.
        solver: Default solver options, overridable in each call.
        divergence: `exact`, `hutchinson`, or `auto` for exact up to
            `exact_divergence_max_dim` parameters and Hutchinson above.
        exact_divergence_max_dim: The largest dimension with exact divergence under
            `auto`.
        eval_seed: Seed of the times and noise of the loss in `eval()` mode, which
            makes validation losses comparable from epoch to epoch.
        ema_decay: Decay of the exponential moving average of the weights of the
            velocity and embedding networks, updated at every training loss and used
            in `eval()` mode (validation, sampling, densities); None turns it off.
        coupling: How the loss pairs noise with the parameters of a batch
            (see :mod:`sbi_fm_plugin.coupling`); independently by default.

    Note:
        `state_dict` keys and pickles stay loadable across 0.x releases: an
        estimator saved by one release loads in the next, and attributes added
        since it was saved get their defaults on load.
    """

    def __init__(
        self,
        net: nn.Module,
        input_shape: Sequence[int],
        condition_shape: Sequence[int],
        embedding_net: nn.Module | None = None,
        theta_mean: Tensor | float = 0.0,
        theta_std: Tensor | float = 1.0,
        time_power_law_alpha: float = -0.8,
        time_uniform_fraction: float = 0.3,
        sigma_min: float = 0.0,
        num_draws: int = 4,
        solver: SolverOptions | None = None,
        divergence: str = "auto",
        exact_divergence_max_dim: int = 32,
        eval_seed: int = 0,
        ema_decay: float | None = 0.999,
        coupling: CouplingOptions | None = None,
    ) -> None:
        super().__init__(net, torch.Size(input_shape), torch.Size(condition_shape))

        check_options(
            time_power_law_alpha=time_power_law_alpha,
            time_uniform_fraction=time_uniform_fraction,
            sigma_min=sigma_min,
            num_draws=num_draws,
            divergence=divergence,
            exact_divergence_max_dim=exact_divergence_max_dim,
            ema_decay=ema_decay,
        )

        self._embedding_net = nn.Identity() if embedding_net is None else embedding_net
        theta_mean = torch.as_tensor(theta_mean, dtype=torch.get_default_dtype())
        theta_std = torch.as_tensor(theta_std, dtype=torch.get_default_dtype())
        self.register_buffer("theta_mean", theta_mean.expand(self.input_shape).clone())
        self.register_buffer("theta_std", theta_std.expand(self.input_shape).clone())

        self.time_power_law_alpha = float(time_power_law_alpha)
        self.time_uniform_fraction = float(time_uniform_fraction)
        self.sigma_min = float(sigma_min)
        self.num_draws = num_draws
        self.solver = SolverOptions() if solver is None else solver
        self.divergence = divergence
        self.exact_divergence_max_dim = exact_divergence_max_dim
        self.eval_seed = eval_seed
        self.ema_decay = ema_decay
        self.coupling = CouplingOptions() if coupling is None else coupling
        if not isinstance(self.coupling, CouplingOptions):
            raise TypeError(
                "Expected `coupling` to be CouplingOptions or None, got "
                f"{type(coupling).__name__}."
            )
        self._coupler = Coupler(self.coupling)
        self.ema = None
        if ema_decay is not None:
            modules = nn.ModuleDict(self._trained_modules())
            self.ema = copy.deepcopy(modules).requires_grad_(False)
            self.register_buffer("ema_updates", torch.zeros(()))

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)

        # Attributes added after 0.1.0, missing from estimators pickled before.
        if "coupling" not in state:
            self.coupling = CouplingOptions()
        if "_coupler" not in state:
            self._coupler = Coupler(self.coupling)

    @property
    def embedding_net(self) -> nn.Module:
        r"""The condition embedding network, z-scoring included."""
        return self._embedding_net

    @property
    def input_features(self) -> int:
        return self.input_shape.numel()

    def loss(self, input: Tensor, condition: Tensor) -> Tensor:
        r"""Returns the conditional flow matching loss of each pair.

        In `eval()` mode, times and noise come from a generator seeded with
        `eval_seed`, so the loss is a deterministic function of its inputs.

        Args:
            input: Parameters, with shape :math:`(B, *input\_shape)`.
            condition: Conditions, with shape :math:`(B, *condition\_shape)`.

        Returns:
            The losses, with shape :math:`(B,)`.
        """
        input = self._check(input, "input", self.input_shape, batch_dims=(1,))
        condition = self._check(
            condition, "condition", self.condition_shape, batch_dims=(1,)
        )
        if input.shape[0] != condition.shape[0]:
            raise ValueError(
                "Expected `input` and `condition` to have the same batch size, got "
                f"{input.shape[0]} and {condition.shape[0]}."
            )

        generator = None
        if not self.training:
            generator = torch.Generator(device=input.device).manual_seed(self.eval_seed)
        elif self.ema is not None and torch.is_grad_enabled():
            self._update_ema()

        z = self._standardize(input)
        averaged = self._averaged
        embedding = self._embed(condition, averaged)
        context = self._context_of(embedding, averaged)
        noise = None
        if self.coupling.method != "none":
            # The cost compares conditions by their embeddings; the coupling is a
            # choice of pairs, not something to differentiate.
            noise = self._coupler(
                z.detach(), embedding.detach(), generator, self.num_draws
            )

        return flow_matching_loss(
            self._velocity(averaged),
            z,
            context,
            self.time_power_law_alpha,
            self.sigma_min,
            generator,
            self.num_draws,
            self.time_uniform_fraction,
            noise,
        )

    def log_prob(self, input: Tensor, condition: Tensor, **options: object) -> Tensor:
        r"""Returns the log-density of the inputs given the conditions.

        Gradients flow to the inputs, and in training mode to the parameters; in
        `eval()` mode the weight averages are used (see `ema_decay`).

        Note:
            With gradients enabled, the graph through every solver step is kept for
            the backward pass, which makes the call several times slower. Wrap it
            in `torch.no_grad()` when no gradient is needed, as sbi's posteriors do.

        Args:
            input: Parameters, with shape :math:`(S, B, *input\_shape)`,
                :math:`(B, *input\_shape)` or :math:`(*input\_shape)`.
            condition: Conditions, with shape :math:`(S, B, *condition\_shape)`,
                :math:`(B, *condition\_shape)` or :math:`(*condition\_shape)`.
                Batch sizes broadcast as in sbi.
            options: Overrides of the solver options (see
                :class:`SolverOptions`) and of `divergence`. Large requests are
                solved `chunk_size` points at a time; with `show_progress_bars`
                left at None, a progress bar shows when an sbi function up the call
                stack was asked for progress bars.

        Returns:
            The log-densities, with shape :math:`(S, B)`.

        Raises:
            ValueError: For inputs or conditions of the wrong shape or with
                non-finite values, and when called by the atomic loss of sbi's
                multi-round NPE-C, which is not supported.
        """
        refuse_atomic_loss()
        solver, divergence = self._options(options)
        input = self._check(input, "input", self.input_shape, batch_dims=(0, 1, 2))
        condition = self._check(
            condition, "condition", self.condition_shape, batch_dims=(0, 1, 2)
        )
        if input.dim() == len(self.input_shape):
            input = input.unsqueeze(0)
        if condition.dim() == len(self.condition_shape):
            condition = condition.unsqueeze(0)
        self._check_sample_dims(input, condition)

        try:
            input, condition, _ = self._broadcast_and_align(input, condition)
        except RuntimeError as err:
            raise ValueError(str(err)) from err

        averaged = self._averaged
        with self._deterministic():
            # A condition without sample dimension comes back expanded: embed it once.
            condition = condition[0] if condition.stride(0) == 0 else condition
            context = self._context(condition, averaged)
            log_p = ode.log_prob(
                self._velocity(averaged),
                self._standardize(input).flatten(end_dim=1),
                context.flatten(end_dim=-2),
                solver,
                divergence,
            )

        return log_p.reshape(input.shape[:2]) - self.theta_std.log().sum()

    def sample(
        self, sample_shape: torch.Size, condition: Tensor, **options: object
    ) -> Tensor:
        r"""Draws parameters given the conditions.

        Note:
            Samples are drawn without gradient tracking.

        Args:
            sample_shape: Shape of the draws per condition.
            condition: Conditions, with shape :math:`(B, *condition\_shape)` or
                :math:`(*condition\_shape)` for one condition.
            options: Overrides of the solver options, as for :meth:`log_prob`.

        Returns:
            The samples, with shape :math:`(*sample\_shape, B, *input\_shape)`.
        """
        solver, _ = self._options(options)
        averaged = self._averaged
        with torch.no_grad(), self._deterministic():
            sample_shape, context, noise = self._prepare_sampling(
                sample_shape, condition, averaged
            )
            z = ode.sample(self._velocity(averaged), noise, context, solver)

        return self._unstandardize(z).reshape(
            sample_shape + context.shape[:1] + self.input_shape
        )

    def sample_and_log_prob(
        self, sample_shape: torch.Size, condition: Tensor, **options: object
    ) -> tuple[Tensor, Tensor]:
        r"""Draws parameters and their log-densities in one ODE solve.

        Note:
            Samples and log-densities are computed without gradient tracking.

        Args:
            sample_shape: Shape of the draws per condition.
            condition: Conditions, with shape :math:`(B, *condition\_shape)` or
                :math:`(*condition\_shape)` for one condition.
            options: Overrides of the solver options and of `divergence`, as
                for :meth:`log_prob`.

        Returns:
            The samples, with shape :math:`(*sample\_shape, B, *input\_shape)`, and
            their log-densities, with shape :math:`(*sample\_shape, B)`.
        """
        solver, divergence = self._options(options)
        averaged = self._averaged
        with torch.no_grad(), self._deterministic():
            sample_shape, context, noise = self._prepare_sampling(
                sample_shape, condition, averaged
            )
            z, log_p = ode.sample_and_log_prob(
                self._velocity(averaged), noise, context, solver, divergence
            )

        batch_shape = sample_shape + context.shape[:1]
        theta = self._unstandardize(z).reshape(batch_shape + self.input_shape)
        log_p = log_p - self.theta_std.log().sum()

        return theta, log_p.reshape(batch_shape)

    def _check_sample_dims(self, input: Tensor, condition: Tensor) -> None:
        # sbi broadcasts batch sizes, not sample sizes: a condition's sample size
        # must be 1 or that of the input.
        has_sample_dim = condition.dim() > len(self.condition_shape) + 1
        num_samples = input.shape[0] if input.dim() > len(self.input_shape) + 1 else 1
        if has_sample_dim and condition.shape[0] not in (1, num_samples):
            raise ValueError(
                "Expected `condition` with sample size 1 or that of `input` "
                f"({num_samples}), got `input` with shape {tuple(input.shape)} and "
                f"`condition` with shape {tuple(condition.shape)}."
            )

    def _prepare_sampling(
        self, sample_shape: torch.Size, condition: Tensor, averaged: bool
    ) -> tuple[torch.Size, Tensor, Tensor]:
        try:
            sample_shape = torch.Size(sample_shape)
        except TypeError as err:
            raise TypeError(
                "Expected `sample_shape` to be a sequence of ints, got "
                f"{sample_shape!r}."
            ) from err
        if any(size < 1 for size in sample_shape):
            raise ValueError(
                f"Expected `sample_shape` with sizes >= 1, got {tuple(sample_shape)}."
            )
        condition = self._check(
            condition, "condition", self.condition_shape, batch_dims=(0, 1)
        )
        if condition.dim() == len(self.condition_shape):
            condition = condition.unsqueeze(0)

        context = self._context(condition, averaged)
        # Draw i is conditioned on condition i % B, as `ode.sample` expects.
        noise = torch.randn(
            (sample_shape.numel() * condition.shape[0], self.input_features),
            dtype=context.dtype,
            device=context.device,
        )

        return sample_shape, context, noise

    def _options(self, options: dict[str, object]) -> tuple[SolverOptions, str]:
        options = dict(options)
        divergence = options.pop("divergence", self.divergence)
        _check_divergence(divergence)
        if divergence == "auto":
            small = self.input_features <= self.exact_divergence_max_dim
            divergence = "exact" if small else "hutchinson"

        solver = self.solver.replace(**options)
        if solver.show_progress_bars is None:
            solver = solver.replace(show_progress_bars=progress_requested())

        return solver, divergence

    def _check(
        self, tensor: Tensor, name: str, event_shape: torch.Size, batch_dims: tuple
    ) -> Tensor:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"Expected `{name}` to be a Tensor, got {type(tensor)}.")
        if not tensor.is_floating_point():
            raise TypeError(
                f"Expected `{name}` to be a floating point tensor, got {tensor.dtype}. "
                f"Convert it with `{name}.float()`."
            )
        if tensor.device != self.theta_mean.device:
            raise ValueError(
                f"Expected `{name}` on {self.theta_mean.device}, where the estimator "
                f"is, got {tensor.device}."
            )

        event_dims = len(event_shape)
        trailing = tuple(tensor.shape[tensor.dim() - event_dims :])
        if tensor.dim() - event_dims not in batch_dims or trailing != event_shape:
            leading = " or ".join(
                str(("*",) * n + tuple(event_shape)) for n in batch_dims
            )
            raise ValueError(
                f"Expected `{name}` with shape {leading}, where * are batch "
                f"dimensions, got {tuple(tensor.shape)}."
            )
        if tensor.numel() == 0:
            raise ValueError(
                f"Expected `{name}` to be non-empty, got shape {tuple(tensor.shape)}."
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"Expected `{name}` to be finite, got NaN or inf values.")

        # Floating point inputs of another precision follow the estimator's, in
        # whose range they must lie.
        converted = tensor.to(self.theta_mean.dtype)
        if converted is not tensor and not torch.isfinite(converted).all():
            raise ValueError(
                f"Expected `{name}` to be finite in {converted.dtype}, the estimator's "
                f"precision, got {tensor.dtype} values beyond its range."
            )
        return converted

    def _standardize(self, theta: Tensor) -> Tensor:
        z = (theta - self.theta_mean) / self.theta_std
        return z.flatten(start_dim=z.dim() - len(self.input_shape))

    def _unstandardize(self, z: Tensor) -> Tensor:
        theta = z.unflatten(-1, self.input_shape)
        return theta * self.theta_std + self.theta_mean

    def _context(self, condition: Tensor, averaged: bool) -> Tensor:
        # Embeds the conditions, then does the velocity network's work that depends
        # on the condition only, once per condition.
        batch_shape = condition.shape[: condition.dim() - len(self.condition_shape)]
        condition = condition.reshape(-1, *self.condition_shape)
        x = ode.evaluate_padded(
            lambda c: self._context_of(self._embed(c, averaged), averaged), condition
        )

        return x.reshape(*batch_shape, -1)

    def _embed(self, condition: Tensor, averaged: bool) -> Tensor:
        # Conditions with shape (N, *condition_shape) to embeddings (N, E).
        return self._module("embedding_net", averaged)(condition).flatten(1)

    def _context_of(self, embedding: Tensor, averaged: bool) -> Tensor:
        net = self._module("net", averaged)
        return net.context(embedding) if _splits_condition(net) else embedding

    @torch.no_grad()
    def _update_ema(self) -> None:
        # The usual warm-up keeps the random initialisation from lingering.
        self.ema_updates += 1
        n = self.ema_updates
        weight = 1 - ((1 + n) / (10 + n)).clamp(max=self.ema_decay)

        for name, module in self._trained_modules().items():
            ema = self.ema[name]
            for average, parameter in zip(
                ema.parameters(), module.parameters(), strict=True
            ):
                average.lerp_(parameter, weight)
            for average, buffer in zip(ema.buffers(), module.buffers(), strict=True):
                average.copy_(buffer)

    @property
    def _averaged(self) -> bool:
        # Outside training, the weight averages stand in for the trained modules;
        # in training mode, gradients must reach the trained weights.
        return self.ema is not None and not self.training

    def _trained_modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, "embedding_net": self._embedding_net}

    def _module(self, name: str, averaged: bool) -> nn.Module:
        if averaged:
            return self.ema[name]
        return self._trained_modules()[name]

    def _call_net(
        self, theta_t: Tensor, x: Tensor, t: Tensor, averaged: bool
    ) -> Tensor:
        net = self._module("net", averaged)
        if _splits_condition(net):
            return net.velocity(theta_t, x, t)
        if getattr(net, "broadcasts_inputs", False):
            return net(theta_t, x, t)

        batch_shape = theta_t.shape[:-1]
        v = net(
            theta_t.reshape(-1, theta_t.shape[-1]),
            x.expand(*batch_shape, x.shape[-1]).reshape(-1, x.shape[-1]),
            t.expand(batch_shape).reshape(-1),
        )
        return v.reshape(theta_t.shape)

    def _velocity(self, averaged: bool) -> ode.Field:
        return lambda theta_t, x, t: self._call_net(theta_t, x, t, averaged)

    @contextlib.contextmanager
    def _deterministic(self) -> Iterator[None]:
        # Dropout would make the ODE right-hand side random and the solver useless,
        # whatever mode the caller left the estimator in.
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            yield
        finally:
            for module, mode in modes:
                module.training = mode


def _splits_condition(net: nn.Module) -> bool:
    # A network may split off its work on the condition as `context(x)`, used as
    # `velocity(theta_t, context, t)`; see `VelocityMLP`.
    return callable(getattr(net, "context", None)) and callable(
        getattr(net, "velocity", None)
    )


def check_options(
    time_power_law_alpha: float,
    time_uniform_fraction: float,
    sigma_min: float,
    num_draws: int,
    divergence: str,
    exact_divergence_max_dim: int,
    ema_decay: float | None,
) -> None:
    r"""Raises for an out-of-range option of :class:`FlowMatchingEstimator`."""
    if not time_power_law_alpha > -1:
        raise ValueError(
            f"Expected `time_power_law_alpha` > -1, got {time_power_law_alpha!r}."
        )
    if not 0 <= time_uniform_fraction <= 1:
        raise ValueError(
            "Expected 0 <= `time_uniform_fraction` <= 1, got "
            f"{time_uniform_fraction!r}."
        )
    if not 0 <= sigma_min < 1:
        raise ValueError(f"Expected 0 <= `sigma_min` < 1, got {sigma_min!r}.")
    check_count("num_draws", num_draws)
    if isinstance(exact_divergence_max_dim, bool) or not isinstance(
        exact_divergence_max_dim, int
    ):
        raise TypeError(
            "Expected `exact_divergence_max_dim` to be an int, got "
            f"{exact_divergence_max_dim!r}."
        )
    if ema_decay is not None and not 0 < ema_decay < 1:
        raise ValueError(f"Expected 0 < `ema_decay` < 1 or None, got {ema_decay!r}.")
    _check_divergence(divergence)


def _check_divergence(divergence: str) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"Expected `divergence` to be one of {DIVERGENCES}, got {divergence!r}."
        )
