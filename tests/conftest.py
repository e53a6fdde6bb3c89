import pytest
import torch
from linear_gaussian import prior, simulate
from sbi.inference import NPE

import sbi_fm_plugin  # noqa: F401 (registers "flow_matching")

# Small operations run many times slower with two threads on a shared machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_tmp_cwd(tmp_path, monkeypatch):
    # sbi's trainers write TensorBoard logs to ./sbi-logs.
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """NPE with flow matching, trained on the linear Gaussian problem."""
    torch.manual_seed(0)
    theta = prior.sample((3000,))

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("logs"))
        inference = NPE(
            prior, density_estimator="flow_matching", show_progress_bars=False
        )
        inference.append_simulations(theta, simulate(theta)).train(max_num_epochs=300)

    return inference, inference.build_posterior()
