r"""The one place that knows sbi's internals.

Everything this package takes from sbi beyond its documented user interface, and the
link into sbi's table of density estimator builders, goes through this module, so that
a new sbi release needs changes here only. Supported: sbi 0.27.
"""

__all__ = [
    "ConditionalDensityEstimator",
    "register_builder",
    "standardizing_net",
    "z_score_parser",
    "z_standardization",
]

from collections.abc import Callable

from sbi.neural_nets.estimators import ConditionalDensityEstimator
from sbi.utils.sbiutils import standardizing_net, z_score_parser, z_standardization


def register_builder(name: str, builder: Callable) -> None:
    r"""Makes `name` a density estimator of `posterior_nn`, `likelihood_nn` and the
    trainers that take a string, such as `NPE(density_estimator=name)`.

    sbi looks names up in `sbi.neural_nets.factory.model_builders` when it builds the
    network, so adding an entry there is all it takes.
    """
    from sbi.neural_nets import factory

    factory.model_builders[name] = builder
