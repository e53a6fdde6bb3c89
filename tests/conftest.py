import pytest
import torch

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
