"""Discovery of density estimators through the entry-point group, without an import.

Most tests run a fresh interpreter, because what matters is what happens in a process
that never imported the plugin. Extra distributions are made visible to it by
putting their metadata on `PYTHONPATH`.
"""

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

GROUP = "sbi.density_estimators"
DISABLE = "SBI_DISABLE_PLUGIN_AUTOLOAD"


def run_python(code, tmp_path, extra_path=(), **env):
    """Runs `code`, a string or a sequence of strings each indented its own way."""
    parts = [code] if isinstance(code, str) else code
    code = "\n".join(textwrap.dedent(part) for part in parts)
    environment = {k: v for k, v in os.environ.items() if k != DISABLE}
    environment |= env
    paths = [str(p) for p in extra_path]
    if environment.get("PYTHONPATH"):
        paths.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", code],
        check=False,
        cwd=tmp_path,  # sbi's trainers write logs to the working directory.
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result


def fake_distribution(root: Path, name: str, entry_points: dict, module: str = ""):
    """Metadata of an installed distribution, and optionally its module."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n"
    )
    lines = [f"[{GROUP}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    if module:
        (root / f"{name}_module.py").write_text(textwrap.dedent(module))
    return root


TRAIN_NPE = """
    import torch
    from sbi.inference import NPE
    prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    theta = prior.sample((100,))
    npe = NPE(prior, density_estimator={name!r}, show_progress_bars=False)
    estimator = npe.append_simulations(theta, theta + 0.1).train(
        max_num_epochs=1, show_train_summary=False
    )
    print("trained", type(estimator).__name__)
"""


def test_installing_is_enough(tmp_path):
    result = run_python(
        [
            """
        import sys
        from sbi.neural_nets import factory
        assert "sbi_fm_plugin" in sys.modules, "discovery did not run"
        assert "flow_matching" in factory.model_builders
        # The start-up hook put sbi's own loader back in place.
        assert type(factory.__loader__).__name__ == "SourceFileLoader"
        assert factory.__spec__.loader is factory.__loader__
        """,
            TRAIN_NPE.format(name="flow_matching"),
        ],
        tmp_path,
    )
    assert "trained FlowMatchingEstimator" in result.stdout


def test_start_up_imports_neither_torch_nor_sbi(tmp_path):
    result = run_python(
        """
        import sys
        print(sorted(m for m in ("torch", "sbi", "sbi_fm_plugin") if m in sys.modules))
        print(any(type(f).__name__ == "_Finder" for f in sys.meta_path))
        """,
        tmp_path,
    )
    assert result.stdout.split("\n")[:2] == ["[]", "True"]


def test_environment_variable_switches_discovery_off(tmp_path):
    run_python(
        """
        import sys
        from sbi.neural_nets import factory
        assert "flow_matching" not in factory.model_builders
        assert "sbi_fm_plugin" not in sys.modules
        import sbi_fm_plugin
        assert factory.model_builders["flow_matching"] is sbi_fm_plugin.build_flow_matching
        """,
        tmp_path,
        **{DISABLE: "1"},
    )


def test_collision_with_a_built_in_keeps_sbi_estimator(tmp_path):
    site = fake_distribution(
        tmp_path / "site",
        "impostor",
        {"nsf": "impostor_module:build", "maf": "impostor_module:build"},
        module="""
        raise RuntimeError("a colliding entry point must not even be loaded")
        """,
    )
    result = run_python(
        """
        from sbi.neural_nets import factory
        from sbi.neural_nets.net_builders import build_maf, build_nsf
        assert factory.model_builders["nsf"] is build_nsf
        assert factory.model_builders["maf"] is build_maf
        assert "flow_matching" in factory.model_builders
        """,
        tmp_path,
        extra_path=[site],
    )
    for name in ("nsf", "maf"):
        assert f"'{name} = impostor_module:build'" in result.stderr
    assert "distribution 'impostor'" in result.stderr
    assert "built-in" in result.stderr


def test_broken_entry_point_warns_and_the_rest_works(tmp_path):
    site = fake_distribution(
        tmp_path / "site",
        "broken",
        {"missing": "no_such_module:build", "failing": "broken_module:build"},
        module="""
        raise ZeroDivisionError("boom at import")
        """,
    )
    result = run_python(
        [
            """
        from sbi.neural_nets import factory
        assert "missing" not in factory.model_builders
        assert "failing" not in factory.model_builders
        """,
            TRAIN_NPE.format(name="flow_matching"),
            TRAIN_NPE.format(name="nsf"),
        ],
        tmp_path,
        extra_path=[site],
    )
    assert "'missing = no_such_module:build'" in result.stderr
    assert "ModuleNotFoundError" in result.stderr
    assert "'failing = broken_module:build'" in result.stderr
    assert "ZeroDivisionError: boom at import" in result.stderr
    assert "distribution 'broken'" in result.stderr
    assert result.stdout.count("trained") == 2


def test_two_packages_claiming_one_name_keep_the_first(tmp_path):
    site = fake_distribution(
        tmp_path / "site",
        "other",
        {"flow_matching": "other_module:build"},
        module="""
        def build(batch_x, batch_y, **kwargs):
            raise AssertionError("must not be used")
        """,
    )
    result = run_python(
        """
        import warnings
        from sbi.neural_nets import factory
        import sbi_fm_plugin
        kept = factory.model_builders["flow_matching"].__module__
        assert kept in ("other_module", "sbi_fm_plugin.build"), kept
        # Idempotent: a second discovery finds nothing new and warns no more.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert sbi_fm_plugin.load_entry_points() == []
        assert not caught, caught
        """,
        tmp_path,
        extra_path=[site],
    )
    assert result.stderr.count("is not registered: the name is taken") == 1
    assert "distribution 'other'" in result.stderr


def test_missing_builder_table_warns_once(tmp_path):
    result = run_python(
        """
        import warnings
        from sbi.neural_nets import factory
        del factory.model_builders  # as in an sbi without the table
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import sbi_fm_plugin
            sbi_fm_plugin.load_entry_points()
            sbi_fm_plugin.register_builder("x", sbi_fm_plugin.build_flow_matching)
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1, messages
        print(messages[0])
        """,
        tmp_path,
        **{DISABLE: "1"},
    )
    assert "supports sbi 0.27" in result.stdout
    assert "flow_matching_nn" in result.stdout


@pytest.mark.slow
def test_an_installed_distribution_becomes_an_estimator(tmp_path):
    project = tmp_path / "project"
    (project / "tiny_estimator").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["hatchling"]
            build-backend = "hatchling.build"

            [project]
            name = "tiny-estimator"
            version = "0.1"

            [project.entry-points."{GROUP}"]
            tiny_maf = "tiny_estimator:build"
            """
        )
    )
    (project / "tiny_estimator" / "__init__.py").write_text(
        textwrap.dedent(
            """
            from sbi.neural_nets.net_builders import build_maf

            def build(batch_x, batch_y, **kwargs):
                return build_maf(batch_x, batch_y, hidden_features=8, num_transforms=1)
            """
        )
    )
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
        + ["--no-build-isolation", "--target", str(target), str(project)],
        check=True,
        timeout=300,
    )

    result = run_python(TRAIN_NPE.format(name="tiny_maf"), tmp_path, [target])

    assert "trained" in result.stdout


def test_wheel_carries_the_start_up_hook(tmp_path):
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
        + ["--no-build-isolation", "--wheel-dir", str(tmp_path), str(root)],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("sbi_fm_plugin-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        declared = archive.read(entry_points).decode()
    assert {"sbi_fm_plugin_autoload.pth", "_sbi_fm_plugin_autoload.py"} <= names
    assert f"[{GROUP}]\nflow_matching = sbi_fm_plugin.build:build_flow_matching" in (
        declared
    )
