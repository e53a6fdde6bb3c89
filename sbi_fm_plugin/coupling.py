r"""Pairing base noise with the parameters of a training batch.

Flow matching may join a parameter :math:`z_i` with any base draw
:math:`\epsilon_j`. Independent pairing is the default. Minibatch optimal transport
(Tong et al., 2024, arXiv:2302.00482; Pooladian et al., 2023, arXiv:2304.14772) pairs
them by a plan :math:`P` that minimises :math:`\sum_{ij} P_{ij} C_{ij}`, which gives
straighter paths and cheaper ODE solves. For conditional estimation the cost also
compares conditions,

.. math:: C_{ij} = \| z_i - \epsilon_j \|^2 + w \, \| e(x_i) - e(x_j) \|^2 ,

where draw :math:`\epsilon_j` starts out paired with :math:`(z_j, x_j)`. Without the
second term (:math:`w = 0`) the plan moves noise between conditions, so that the
noise seen with a given :math:`x` is no longer standard normal while sampling draws
it from the standard normal (Cheng and Schwing, 2025, arXiv:2503.10636; Kerrigan et
al., 2024, arXiv:2404.04240). The weight :math:`w` keeps noise among pairs with
similar conditions; a large :math:`w` tends to independent pairing.

Only the noise is reordered or resampled: every :math:`(z_i, x_i)` stays as it came.
"""

__all__ = ["COUPLINGS", "Coupler", "CouplingOptions"]

import dataclasses
import math
import warnings

import torch
from torch import Tensor

from ._checks import check_count, check_real

COUPLINGS = ("none", "exact", "sinkhorn", "sinkhorn_log", "partial")


@dataclasses.dataclass(frozen=True)
class CouplingOptions:
    r"""Options of the coupling between noise and parameters.

    Args:
        method: `none` (independent pairs); `exact` (earth mover's distance, whose
            plan with equal weights is a permutation); `sinkhorn` or `sinkhorn_log`
            (entropic transport, the latter in the log domain, stable for small
            `reg`); `partial` (exact transport of the fraction `mass`, so that
            outliers may stay unmatched and keep their independent draw).
        reg: Entropic regularisation of the Sinkhorn methods, relative to the mean
            of the cost matrix.
        max_iter: Iteration cap of the Sinkhorn methods.
        tol: Stopping threshold of the Sinkhorn methods on the marginal error.
        mass: Fraction of the mass that `partial` transports, in (0, 1].
        condition_ratio: Weight :math:`w` of the distance between conditions,
            relative to the parameter-noise distance: with the ratio :math:`r`,
            :math:`w = r \bar{C}_\theta / \bar{C}_x`, the ratio of the mean squared
            distances in the batch. 0 ignores the conditions.
        condition_weight: A fixed weight :math:`w` instead, in the units of the
            embedded (z-scored) conditions.
        noise_factor: Number of noise draws per pair that the plan chooses from;
            1 draws as many as there are pairs.

    Warning:
        With `noise_factor` > 1 the chosen draws are the ones nearest to the data,
        so the noise seen in training is no longer standard normal.
    """

    method: str = "none"
    reg: float = 0.1
    max_iter: int = 1000
    tol: float = 1e-5
    mass: float = 0.9
    condition_ratio: float = 1.0
    condition_weight: float | None = None
    noise_factor: int = 1

    def __post_init__(self) -> None:
        if self.method not in COUPLINGS:
            raise ValueError(
                f"Expected `coupling` to be one of {COUPLINGS}, got {self.method!r}."
            )
        for name in ("reg", "tol"):
            check_real(f"coupling_{name}", getattr(self, name))
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"Expected `coupling_{name}` > 0, got {getattr(self, name)!r}."
                )
        check_real("coupling_mass", self.mass)
        if not 0 < self.mass <= 1:
            raise ValueError(f"Expected 0 < `coupling_mass` <= 1, got {self.mass!r}.")
        check_real("coupling_condition_ratio", self.condition_ratio)
        if not 0 <= self.condition_ratio < math.inf:
            raise ValueError(
                "Expected finite `coupling_condition_ratio` >= 0, got "
                f"{self.condition_ratio!r}."
            )
        if self.condition_weight is not None:
            check_real("coupling_condition_weight", self.condition_weight)
            if not 0 <= self.condition_weight < math.inf:
                raise ValueError(
                    "Expected finite `coupling_condition_weight` >= 0 or None, got "
                    f"{self.condition_weight!r}."
                )
        check_count("coupling_max_iter", self.max_iter)
        check_count("coupling_noise_factor", self.noise_factor)


class Coupler:
    r"""Draws base noise for a batch, paired with it as the options say.

    A plan that fails (Sinkhorn that does not reach `tol` within `max_iter`, or a
    plan with NaN) falls back to independent pairs for that batch, with one warning
    per coupler; `fallbacks` counts such batches.

    Note:
        The Sinkhorn methods run on the device of the batch, in float64. Exact and
        partial transport run on the CPU in float64, which costs a transfer per
        batch on a GPU.

    Args:
        options: The coupling options.

    Example:
        >>> coupler = Coupler(CouplingOptions("exact"))
        >>> theta, x = torch.randn(8, 2), torch.randn(8, 3)
        >>> coupler(theta, x, num_draws=4).shape
        torch.Size([4, 8, 2])
    """

    def __init__(self, options: CouplingOptions) -> None:
        self.options = options
        self.fallbacks = 0

    def __call__(
        self,
        theta: Tensor,
        x: Tensor,
        generator: torch.Generator | None = None,
        num_draws: int = 1,
    ) -> Tensor:
        r"""Returns noise paired with `theta`.

        Args:
            theta: Parameters (z-scored), with shape :math:`(N, D)`.
            x: Conditions (embedded), with shape :math:`(N, E)`.
            generator: Source of the noise and of draws from a plan.
            num_draws: Number of independent couplings, one per draw of the loss.

        Returns:
            Noise, with shape :math:`(num\_draws, N, D)`; row :math:`i` of each draw
            goes with :math:`(\theta_i, x_i)`.
        """
        n, k = theta.shape[0], self.options.noise_factor
        candidates = torch.randn(
            (num_draws, k * n, theta.shape[1]),
            generator=generator,
            device=theta.device,
            dtype=theta.dtype,
        )
        if self.options.method == "none":
            return candidates[:, :n]

        x_cost = _squared_distances(x, x).repeat(1, k)
        noise = torch.empty_like(candidates[:, :n])
        for d in range(num_draws):
            index = self._choose(theta, candidates[d], x_cost, generator)
            noise[d] = candidates[d, index]

        return noise

    def _choose(
        self,
        theta: Tensor,
        candidates: Tensor,
        x_cost: Tensor,
        generator: torch.Generator | None,
    ) -> Tensor:
        # Index of the candidate for each row; candidate j carries the condition of
        # row j % N, and the own candidate of row i is candidate i.
        theta_cost = _squared_distances(theta, candidates)
        cost = theta_cost + self._condition_weight(theta_cost, x_cost) * x_cost
        # The Sinkhorn regularisation is relative to the scale of the cost.
        cost = cost / cost.mean().clamp(min=torch.finfo(cost.dtype).tiny)

        own = torch.arange(len(theta), device=theta.device)
        plan = self.plan(cost)
        if plan is None:
            return own
        if self.options.method == "exact":
            index = plan.argmax(dim=1)
            if len(index.unique()) == len(index):
                return index.to(theta.device)

        return _sample_rows(plan.to(theta.device), own, generator)

    def _condition_weight(self, theta_cost: Tensor, x_cost: Tensor) -> float:
        if self.options.condition_weight is not None:
            return self.options.condition_weight
        mean = x_cost.mean()
        if self.options.condition_ratio == 0 or not mean > 0:
            return 0.0

        return self.options.condition_ratio * float(theta_cost.mean() / mean)

    def plan(self, cost: Tensor) -> Tensor | None:
        r"""Returns the transport plan between uniform weights for a cost matrix.

        For `exact` with more columns than rows (:math:`M > N`), every column can
        take the mass of one row, :math:`1 / N`, which makes the plan an
        assignment of each row to a column of its own.

        Args:
            cost: Costs, with shape :math:`(N, M)`.

        Returns:
            The plan, with shape :math:`(N, M)` and rows summing to :math:`1 / N`
            (at most, for `partial`), or None after a failure, which is counted and
            warned about once.
        """
        # POT takes over a second to import; only couplings that need it pay for it.
        import ot

        options = self.options
        if not torch.isfinite(cost).all():
            return self._fall_back("the transport cost has non-finite values")

        n, m = cost.shape
        if options.method in ("exact", "partial"):
            cost = cost.detach().cpu().double()
        else:
            cost = cost.detach().double()
        a = torch.full((n,), 1 / n, dtype=cost.dtype, device=cost.device)
        b = torch.full((m,), 1 / m, dtype=cost.dtype, device=cost.device)

        converged = True
        with warnings.catch_warnings():
            # Convergence is judged below, with a message of this package.
            warnings.simplefilter("ignore")
            if options.method == "exact" and m > n:
                b = a[:1].expand(m)
                mass = float(min(a.sum(), b.sum()))
                plan = ot.partial.partial_wasserstein(a, b, cost, m=mass)
            elif options.method == "exact":
                plan = ot.emd(a, b, cost)
            elif options.method == "partial":
                plan = ot.partial.partial_wasserstein(a, b, cost, m=options.mass)
            else:
                plan, log = ot.sinkhorn(
                    a,
                    b,
                    cost,
                    options.reg,
                    method=options.method,
                    numItermax=options.max_iter,
                    stopThr=options.tol,
                    log=True,
                )
                errors = log["err"]
                converged = len(errors) > 0 and float(errors[-1]) <= options.tol

        plan = torch.as_tensor(plan)
        if not converged:
            return self._fall_back(
                f"Sinkhorn did not reach `coupling_tol`={options.tol} within "
                f"`coupling_max_iter`={options.max_iter} iterations"
            )
        if not (torch.isfinite(plan).all() and plan.sum() > 0):
            return self._fall_back("the transport plan has non-finite values")

        return plan

    def _fall_back(self, reason: str) -> None:
        self.fallbacks += 1
        if self.fallbacks == 1:
            warnings.warn(
                f"Coupling {self.options.method!r} failed on a batch ({reason}); "
                "such batches are trained with independent pairs. Raising "
                "`coupling_max_iter` or `coupling_reg` helps Sinkhorn converge.",
                RuntimeWarning,
                stacklevel=5,
            )


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    return (a.unsqueeze(1) - b.unsqueeze(0)).square().sum(dim=-1)


def _sample_rows(
    plan: Tensor, own: Tensor, generator: torch.Generator | None
) -> Tensor:
    # Row i follows the plan with the probability of the mass it transports, and
    # keeps its own draw otherwise (rows that partial transport leaves out).
    plan = plan.clamp(min=0).to(torch.float64)
    mass = plan.sum(dim=1)
    share = (mass * len(own)).clamp(max=1)

    rows = plan / mass.clamp(min=torch.finfo(plan.dtype).tiny).unsqueeze(1)
    rows = torch.where(mass.unsqueeze(1) > 0, rows, 1.0)
    chosen = torch.multinomial(rows, 1, generator=generator).squeeze(1)
    follow = torch.rand(len(own), generator=generator, device=plan.device) < share

    return torch.where(follow.to(own.device), chosen.to(own.device), own)
