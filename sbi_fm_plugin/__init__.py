r"""Flow matching density estimators for sbi.

Importing the package registers the estimator under the name `flow_matching`, so that
`NPE(prior, density_estimator="flow_matching")` and `posterior_nn("flow_matching")`
build it.
"""

__all__ = [
    "FlowMatchingEstimator",
    "SolverError",
    "SolverOptions",
    "VelocityMLP",
    "build_flow_matching",
]

from ._sbi import register_builder
from .build import build_flow_matching
from .estimator import FlowMatchingEstimator
from .network import VelocityMLP
from .ode import SolverError, SolverOptions

register_builder("flow_matching", build_flow_matching)
