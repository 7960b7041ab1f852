"""The tensor-product microbenchmark: a real ``--quick`` run, failure recording, and the shared helpers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tdn
from tdn.bench import common
from tdn.bench import tp as bench
from tdn.tp.cg import CGProduct

ROOT = Path(__file__).resolve().parents[1]
QUICK_LIMIT_S = 60.0


def test_quick_run(tmp_path: Path) -> None:
    """One real ``--quick`` run (a single test, so that pytest-xdist does not run it once per worker)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_tp.py"), "--quick", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "tp_cpu_quick.json").read_text())
    check_files_and_metadata(result, tmp_path)
    check_every_registered_backend(result)
    check_fields_are_sane(result)
    assert elapsed < QUICK_LIMIT_S, f"--quick took {elapsed:.0f} s (limit {QUICK_LIMIT_S:.0f} s)"


def check_files_and_metadata(result: dict, out: Path) -> None:
    assert (out / "tp_cpu_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "tp_cpu_quick.md").read_text()
    assert "machine: CPU" in markdown and "commit" in markdown and "Targets" in markdown
    meta = result["meta"]
    assert meta["machine"]["cpu"] and meta["date"] and meta["git"]["commit"]
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["copy_bandwidth"]["gb_per_s"] > 0
    assert "cuequivariance" in meta["cueq_status"].lower() or meta["cueq_status"] == "measured"


def check_every_registered_backend(result: dict) -> None:
    rows = result["rows"]
    assert {r["kind"] for r in rows if r["source"] == "tdn"} == set(tdn.tp.BACKENDS)
    assert sorted(result["meta"]["backends_registered"]) == sorted(tdn.tp.BACKENDS)
    cells = {(r["lmax"], r["channels"], r["edges"]) for r in rows}
    assert len(cells) >= 2
    for cell in cells:
        assert any(r["source"] == "e3nn" and (r["lmax"], r["channels"], r["edges"]) == cell for r in rows)
    shared_cg = [r for r in rows if r["kind"] == "cg" and r["weights"] == "shared"]
    assert len(shared_cg) == len(cells), "the exact path-shared column must be there"


def check_fields_are_sane(result: dict) -> None:
    for row in result["rows"]:
        name = f"{row['variant']} L={row['lmax']}"
        assert not row.get("errors"), f"{name}: {row.get('errors')}"
        for key in ("fwd_ms", "fwdbwd_ms", "speedup_fwd", "speedup_fwdbwd", "floor_fwd_ms", "floor_fwdbwd_ms"):
            assert row[key] > 0 and math.isfinite(row[key]), f"{name}: {key}={row[key]}"
        assert row["peak_mem_fwdbwd"] >= 0
        assert row["num_paths"] >= 1 and row["weights_per_channel"] >= 1
        assert row["equiv_err_f64"] < 1e-3 and row["equiv_err_f32"] < 1e-3, name
        if row["source"] == "e3nn":
            assert row["rel_err_vs_cg"] < 1e-12 and row["speedup_fwd"] == 1.0
        elif row["target_map"] == "gaunt":
            assert row["rel_err_vs_gaunt"] < 1e-10 and row["rel_err_vs_cg"] > 0.1, name
            assert row["paths_active_odd"] == 0
        else:
            assert row["rel_err_vs_cg"] < 1e-2, name
        if row["kind"] == "cg":
            assert row["rel_err_vs_cg"] < 1e-12 and row["non_cg_residual"] < 1e-12
            assert row["weights_per_channel"] == (row["num_paths"] if row["weights"] == "path" else 1)
        if row["kind"] == "cp":
            assert row["rank"] >= 1 and row["fit_error"] == pytest.approx(row["rel_err_vs_cg"], rel=0.5, abs=1e-6)


class _OutOfMemoryProduct(CGProduct):
    kind = "oom"

    def product(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")


class _BrokenBuild(CGProduct):
    kind = "broken"

    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError("this backend cannot be built")


def test_failures_are_recorded_per_cell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(tdn.tp.BACKENDS, "oom", _OutOfMemoryProduct)
    monkeypatch.setitem(tdn.tp.BACKENDS, "broken", _BrokenBuild)
    cfg = bench.BenchConfig(cells=[bench.Cell(1, 2, 8)], backends=("cg", "oom", "broken"), references=(),
                            warmup=0, reps=2, memory=False, name="failing")
    result = bench.run(cfg, out_dir=tmp_path, log=lambda line: None)
    rows = {r["variant"]: r for r in result["rows"]}
    assert "errors" not in rows["cg[path]"] and rows["cg[shared]"]["fwd_ms"] > 0
    assert rows["oom[path]"]["errors"]["forward"].startswith("OOM")
    assert rows["broken[path]"]["errors"]["build"].startswith("RuntimeError")
    assert "OOM" in (tmp_path / "failing.md").read_text()
    assert json.loads((tmp_path / "failing.json").read_text())["rows"][0]["variant"] == "cg[path]"


def test_memory_tracker_counts_tensors_created_in_the_call() -> None:
    x = torch.randn(1000, 1000, requires_grad=True)  # 4 MB input, not counted

    def step() -> None:
        y = x * 2  # 4 MB
        (y * y).sum().backward()

    peak, method = common.peak_memory(step, "cpu")
    assert method == common.CPU_MEMORY_METHOD
    assert 8e6 <= peak <= 3e7


def test_timing_and_json_helpers(tmp_path: Path) -> None:
    timing = common.time_call(lambda: torch.ones(10).sum(), "cpu", warmup=1, reps=5)
    assert timing["reps"] == 5 and 0 < timing["min_ms"] <= timing["median_ms"]
    path = common.write_json(tmp_path / "x.json", {"a": float("nan"), "b": (1, 2.5), "c": torch.float32})
    assert json.loads(path.read_text()) == {"a": None, "b": [1, 2.5], "c": "torch.float32"}
    assert common.describe_error(torch.OutOfMemoryError("CUDA out of memory")).startswith("OOM")
    assert common.markdown_table(["a", "b"], [[1, "x|y"]]).splitlines()[2] == "| 1 | x/y |"
