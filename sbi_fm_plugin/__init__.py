r"""Flow matching density estimators for sbi.

Installing the package makes `flow_matching` a density estimator of sbi, so that
`NPE(prior, density_estimator="flow_matching")`, `NLE(...)`, `posterior_nn` and
`likelihood_nn` build it, through the entry-point group `sbi.density_estimators` and
a start-up hook. Importing the package registers the name too, for environments where
the hook is switched off.
"""

__all__ = [
    "FlowMatchingEstimator",
    "SolverError",
    "SolverOptions",
    "VelocityMLP",
    "build_flow_matching",
    "flow_matching_nn",
    "load_entry_points",
]

import sys

from ._sbi import load_entry_points, register_builder
from .build import build_flow_matching, flow_matching_nn
from .estimator import FlowMatchingEstimator
from .network import VelocityMLP
from .ode import SolverError, SolverOptions

register_builder("flow_matching", build_flow_matching)

# When this package is what first imports sbi, the start-up hook leaves discovery to it.
_hook = sys.modules.get("_sbi_fm_plugin_autoload")
if _hook is not None and not _hook.disabled():
    load_entry_points()
