"""The benchmark harness runs end to end; its numbers are checked elsewhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs(tmp_path):
    out_json, out_md = tmp_path / "quick.json", tmp_path / "quick.md"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick"]
        + ["--out-json", str(out_json), "--out-md", str(out_md)],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=600,
    )

    records = json.loads(out_json.read_text())["results"]
    assert {(r["task"], r["estimator"]) for r in records} == {
        (task, estimator)
        for task in ("two_moons", "gaussian_linear_uniform")
        for estimator in ("nsf", "fmpe", "flow_matching")
    }
    for record in records:
        assert record["error"] is None, record["error"]
        assert 0.5 <= record["c2st"]["mean"] <= 1.0
        assert record["sample"]["median_s"] > 0 and record["log_prob"]["median_s"] > 0

    flow_matching = [r for r in records if r["estimator"] == "flow_matching"]
    assert all(r["nfe"]["sample_calls"] > 0 for r in flow_matching)
    assert "flow_matching" in out_md.read_text()
    assert not (tmp_path / "sbi-logs").exists() and not (ROOT / "sbi-logs").exists()


def test_quick_coupling_benchmark_runs(tmp_path):
    out_json, out_md = tmp_path / "coupling.json", tmp_path / "coupling.md"
    variants = ["independent", "exact-r1", "sinkhorn-r1"]
    subprocess.run(
        [sys.executable, "-m", "benchmarks.coupling", "--quick", "--tasks", "two_moons"]
        + [
            "--variants",
            *variants,
            "--out-json",
            str(out_json),
            "--out-md",
            str(out_md),
        ],
        cwd=ROOT,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        check=True,
        timeout=600,
    )

    records = json.loads(out_json.read_text())["results"]
    assert [r["estimator"] for r in records] == variants
    for record in records:
        assert record["error"] is None, record["error"]
        assert record["nfe"]["sample_evals_per_sample"] > 0
    table = out_md.read_text()
    assert all(f"| {variant} |" in table for variant in variants)


def test_batched_benchmark_runs(tmp_path):
    out = tmp_path / "batched"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.batched", "--quick"]
        + ["--num-observations", "10", "--num-samples", "20"]
        + ["--num-log-prob-points", "5", "--out", str(out)],
        cwd=ROOT,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        check=True,
        timeout=600,
    )

    records = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [r["estimator"] for r in records] == ["nsf", "flow_matching"]
    for record in records:
        assert record["sbc_s"] > 0 and record["log_prob_s"] > 0
        assert len(record["sbc_ks_pvals"]) == 3
    assert "| flow_matching |" in out.with_suffix(".md").read_text()
