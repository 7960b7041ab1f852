"""The batch, engine and neighbour-list benchmarks: quick runs write JSON, markdown and PNG with what they
measured."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("torch_sim")
pytest.importorskip("vesin_torch")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_neighbor_benchmark_writes_its_report(tmp_path):
    from tdn.bench import neighbors

    result = neighbors.main(["--quick", "--sizes", "108", "--out", str(tmp_path)])
    stem = tmp_path / "neighbors_cpu_quick"
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["meta"]["git"]["commit"] and saved["meta"]["date"] and saved["meta"]["machine"]["cpu"]
    timed = {row["impl"]: row for row in saved["rows"]}
    assert set(timed) == set(neighbors.IMPLS) and timed["tdn"]["ms"] > 0 and timed["vesin-torch"]["ms"] > 0
    agreement = {(row["system"], row["impl"]): row for row in result["agreement"]}
    systems = {system for system, _ in agreement}
    assert {"skewed triclinic 16", "small fcc primitive", "molecule C6H6", "slab (pbc TTF)"} <= systems
    for system in systems:  # tdn's lists and vesin agree with ASE everywhere, slab included
        for impl in ("tdn", "tdn device path", "vesin", "vesin-torch"):
            assert agreement[(system, impl)]["agrees"], (system, impl)
    text = stem.with_suffix(".md").read_text()
    assert "| 108 | 4652 |" in text and "Exact agreement with ASE" in text and saved["meta"]["date"] in text
    assert stem.with_suffix(".png").stat().st_size > 0


def test_a_wrong_list_is_reported_as_a_mismatch():
    from tdn.bench.neighbors import ase_triples, compare, cu_fcc

    atoms = cu_fcc(108)
    i, j, s = ase_triples(atoms, 5.0)
    assert compare((i, j, s), (i, j, s))["agrees"]
    report = compare((i[1:], j[1:], s[1:]), (i, j, s))
    assert not report["agrees"] and report["missing"] == 1 and report["extra"] == 0
    shifted = s.copy()
    shifted[0] += 1
    assert compare((i, j, shifted), (i, j, s))["extra"] == 1


def test_sorted_vesin_torch_has_the_order_of_tdn():
    from vesin_torch import NeighborList

    from tdn.bench.neighbors import cu_fcc
    from tdn.data.neighbors import neighbor_list_torch, sort_edges_torch

    atoms = cu_fcc(108)
    pos, cell = torch.tensor(atoms.positions), torch.tensor(np.array(atoms.cell))
    i, j, s = NeighborList(cutoff=5.0, full_list=True).compute(points=pos, box=cell, periodic=True, quantities="ijS")
    ours = neighbor_list_torch(pos, cell, torch.tensor([True] * 3), 5.0)
    for got, want in zip(sort_edges_torch(i.long(), j.long(), s.long(), len(atoms)), ours):
        assert torch.equal(got.long(), want.long())


def test_quick_batch_benchmark_writes_its_report(tmp_path):
    from tdn.bench import batch

    argv = ["--quick", "--systems", "1", "2", "--sizes", "32", "--out", str(tmp_path)]
    batch.main(argv)
    stem = tmp_path / "batch_cpu_quick"
    saved = json.loads(stem.with_suffix(".json").read_text())
    rows = {(r["systems"], r["method"]): r for r in saved["rows"]}
    assert set(rows) == {(s, m) for s in (1, 2) for m in batch.METHODS}
    for (systems, _), row in rows.items():
        assert "err" not in row and row["reps"] == 2
        # on the CPU the table reads process CPU time; the wall clock is kept beside it
        assert row["structure_steps_per_s"] == pytest.approx(systems / row["cpu_step_ms"] * 1e3)
        assert row["wall_structure_steps_per_s"] == pytest.approx(systems / row["step_ms"] * 1e3)
    text = stem.with_suffix(".md").read_text()
    assert "structure-steps per second" in text and "per process CPU second" in text
    ratio_line = next(line for line in text.splitlines() if line.startswith("| 1 | 32 |"))
    cpu_ratio = rows[(1, "calculator loop")]["cpu_step_ms"] / rows[(1, "torch-sim NVE")]["cpu_step_ms"]
    assert f"{cpu_ratio:.2f}x" in ratio_line
    assert saved["meta"]["git"]["commit"][:12] in text
    assert stem.with_suffix(".png").stat().st_size > 0


def test_quick_engine_benchmark_writes_its_report(tmp_path):
    from tdn.bench import engines

    result = engines.main(["--quick", "--dtypes", "float64", "--out", str(tmp_path)])
    stem = tmp_path / "engines_cpu_quick"
    saved = json.loads(stem.with_suffix(".json").read_text())
    rows = {(r["engine"], r["ensemble"]): r for r in saved["rows"]}
    assert set(rows) == {(e, s) for e in engines.ENGINES for s in engines.ENSEMBLES}
    for row in rows.values():
        assert "err" not in row and row["step_ms"] > 0 and row["cpu_ms"] > 0 and row["atoms"] == 32
    assert rows[("TorchDynamics", "nve")]["edges"] > rows[("torch-sim", "nve")]["edges"] > 0  # the skin's pairs
    assert len(saved["meta"]["load_average_start"]) == 3 and len(saved["meta"]["load_average_end"]) == 3
    for ratio in engines.ratios(result):
        ours, theirs = rows[("torch-sim", ratio["ensemble"])], rows[("TorchDynamics", ratio["ensemble"])]
        assert ratio["cpu_ms"] == pytest.approx(ours["cpu_ms"] / theirs["cpu_ms"])
    text = stem.with_suffix(".md").read_text()
    assert "torch-sim / TorchDynamics" in text and "load average" in text and saved["meta"]["date"] in text
    assert stem.with_suffix(".png").stat().st_size > 0
