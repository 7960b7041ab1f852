"""scripts/bench_md.py --quick: runs on a CPU and writes JSON, markdown and PNG with machine, date and commit."""

from __future__ import annotations

import json

import pytest
import torch

from tdn.bench import md as bench_md


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_writes_results(tmp_path, restore_threads):
    result = bench_md.main(["--quick", "--device", "cpu", "--backends", "cp:shared", "--out", str(tmp_path)])
    name = "md_cpu_quick"
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["meta"]["git"]["commit"] and data["meta"]["date"] and data["meta"]["machine"]["cpu"]
    rows = [r for r in data["rows"] if r["impl"] == "tdn-cp:shared"]
    assert {(r["atoms"], r["dtype"]) for r in rows} == {(n, d) for n in (32, 108) for d in ("float32", "float64")}
    for row in rows:
        assert row["step_ms"] > 0 and row["neighbor_list_builds"] == 1 and row["neighbors_per_atom"] > 10
    engine = [r for r in data["rows"] if r["impl"] == "tdn-cp:shared engine"]  # whole MD steps of tdn.dynamics
    assert {(r["atoms"], r["dtype"]) for r in engine} == {(r["atoms"], r["dtype"]) for r in rows}
    for row in engine:
        assert row["step_ms"] > 0 and row["neighbor_list_builds"] >= 1 and row["missed_rebuilds"] == 0
    mace_rows = [r for r in data["rows"] if r["impl"].startswith("mace-")]
    assert mace_rows or any("skipped" in note for note in data["notes"])  # the reference runs or says why not
    text = (tmp_path / f"{name}.md").read_text()
    assert "tdn-cp:shared ms" in text and "tdn-cp:shared engine ms" in text and "commit" in text
    assert "GPU figures are still to be measured" in text
    assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert result["config"]["preset"] == "tiny"


def test_sizes_must_be_fcc_supercells():
    with pytest.raises(ValueError, match="4 n"):
        bench_md.cu_fcc(100)
    assert len(bench_md.cu_fcc(864)) == 864


def test_mace_widths_match_the_preset():
    cfg = bench_md.MDBenchConfig(preset="mace-medium")
    widths = bench_md.mace_widths(cfg)
    assert widths["hidden_irreps"] == "128x0e+128x1o"
    assert widths["max_ell"] == 3 and widths["correlation"] == 3 and widths["num_interactions"] == 2
    assert widths["r_max"] == 5.0
