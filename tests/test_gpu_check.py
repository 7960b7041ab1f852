"""scripts/gpu_check.sh: the dry run (the GPU run's plumbing on the CPU at tiny sizes) packs every step's log, its
results and a summary in which every step is ok, and never writes into docs/benchmarks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ("pytest", "bench_tp", "bench_conv", "bench_md", "bench_md_float64", "bench_md_large", "profile_step",
         "bench_neighbors", "bench_engines")
RESULTS = ("tp", "conv", "md", "md_float64", "md_large", "profile", "neighbors", "engines")

needs_tools = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("bash", "timeout", "tar")), reason="needs bash, timeout and tar"
)


def step_status(summary: str) -> dict[str, str]:
    """``{step: status}`` from the step table of summary.txt."""
    rows = [line.split() for line in summary.splitlines()]
    return {row[0]: row[1] for row in rows if len(row) > 1 and row[0] in (*STEPS, "env")}


@needs_tools
@pytest.mark.slow
def test_dry_run_packs_every_step(tmp_path):
    before = sorted(p.name for p in (ROOT / "docs" / "benchmarks").iterdir())
    out = tmp_path / "out"  # given relative to the caller's directory, which the script leaves
    # limits x4 and a 20-minute budget: the plumbing is under test, not the speed of a CPU shared with other tests
    env = {**os.environ, "GPU_CHECK_BUDGET": "1200", "GPU_CHECK_DRY_SCALE": "4"}
    run = subprocess.run(["bash", str(SCRIPT), "out", "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=1500, env=env)  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.txt"]  # few files come back

    summary = (out / "summary.txt").read_text()
    assert step_status(summary) == {"env": "skipped", **dict.fromkeys(STEPS, "ok")}, summary
    assert "mode=dry-run" in summary

    unpacked = tmp_path / "unpacked"
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        tar.extractall(unpacked, filter="data")
    assert (unpacked / "summary.txt").read_text() == summary
    for step in STEPS:
        assert (unpacked / "logs" / f"{step}.log").stat().st_size > 0, step
    for stem in RESULTS:
        for ext in ("json", "md", "png"):
            assert (unpacked / "results" / f"{stem}_dryrun.{ext}").stat().st_size > 0, (stem, ext)
        meta = json.loads((unpacked / "results" / f"{stem}_dryrun.json").read_text())["meta"]
        assert meta["device"] == "cpu" and "gpu" not in meta["machine"]

    junit = ET.parse(unpacked / "logs" / "pytest_gpu.xml").getroot()
    suite = junit if junit.tag == "testsuite" else junit.find("testsuite")
    assert int(suite.get("tests")) >= 10  # the GPU tests' bodies ran on the CPU, not only skipped
    assert int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0
    assert sorted(p.name for p in (ROOT / "docs" / "benchmarks").iterdir()) == before


@needs_tools
def test_usage_errors():
    for args in ([], ["--dry-run"], ["a", "b"], ["out", "--fast"]):
        run = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
        assert run.returncode == 2 and "usage" in run.stderr, args
