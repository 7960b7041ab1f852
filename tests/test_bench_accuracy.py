"""Smoke tests of the accuracy and expressivity benchmarks: their --quick modes on tiny budgets (tens of seconds)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tdn.bench import accuracy, expressivity
from tdn.o3 import path_list
from tdn.tp.base import inout_key
from tdn.train import compose

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # the reference data beside the checkout
needs_data = pytest.mark.skipif(not (DATA / "acac" / "train_300K.xyz").is_file(),
                                reason="real reference data (../shared/data) not present")
PNG = b"\x89PNG\r\n\x1a\n"


def test_expressivity_quick(tmp_path: Path) -> None:
    result = expressivity.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "expressivity_quick.png").read_bytes()[:8] == PNG
    markdown = (tmp_path / "expressivity_quick.md").read_text()
    assert "machine: CPU" in markdown and "commit" in markdown and "7L²" in markdown
    assert json.loads((tmp_path / "expressivity_quick.json").read_text())["rows"]
    assert not (tmp_path / "expressivity_cp_fits.json").exists()  # --quick writes no cache
    rows = {(r["backend"], r["paths"], r["lmax"]): r for r in result["rows"]}
    for L in expressivity.QUICK_LMAX:
        cg, cp, gaunt, grid = (rows[(k, "o3", L)] for k in ("cg", "cp", "gaunt", "grid"))
        assert cg["dist_M"] < 1e-12 and cg["equiv_f64"] < 1e-12 and cg["parity_f64"] < 1e-12
        assert cg["equiv_f32"] < 1e-5
        assert cp["dist_M"] == pytest.approx(cp["fit_error"], rel=1e-6) and cp["dist_M"] < 1e-3
        for g in (gaunt, grid):  # exact w.r.t. the Gaunt tensor, far from the CG map, even paths only
            assert g["dist_G"] < 1e-12 and g["equiv_f64"] < 1e-12 and g["dist_M"] > 0.1
            assert g["paths_active_odd"] == 0 and g["dist_M_degree"] > 0.05
        assert rows[("cg", "so3", L)]["paths_active_odd"] > 0
        assert "equiv_f64" not in rows[("gaunt", "so3", L)] and 0 < rows[("gaunt", "so3", L)]["odd_fraction"] < 1
        pairs = len({inout_key(path) for path in path_list(L, L, L, "o3")})
        assert cg["weights_per_channel"] == {"shared": 1, "degree": L + 1, "inout": pairs, "path": cg["num_paths"]}
        assert cp["weights_per_channel"] == {"shared": 1, "degree": L + 1, "inout": pairs}
    curve = result["cp_curve"]
    assert {(r["paths"], r["lmax"]) for r in curve} == {(p, L) for p in ("o3", "so3") for L in expressivity.QUICK_LMAX}
    assert all(0 <= r["rel_error"] < 1 for r in curve)


def test_curve_ranks_and_cache(tmp_path: Path) -> None:
    shipped = expressivity.shipped_square("o3")
    ranks = expressivity.curve_ranks(3, shipped.get(3, {}), 5)
    assert ranks == sorted(set(ranks)) and len(ranks) == 5 and ranks[0] < 63 < ranks[-1]
    cfg = {"seed": 0, "sweeps": 5, "points": 2, "cache": tmp_path / "fits.json"}
    first = expressivity.rank_curve([2], ["o3"], cfg, log=lambda line: None)
    again = expressivity.rank_curve([2], ["o3"], cfg, log=lambda line: None)
    assert not any(r["cached"] for r in first) and all(r["cached"] for r in again)
    assert [r["rel_error"] for r in first] == [r["rel_error"] for r in again]


def test_every_table_composes() -> None:
    """The overrides of every table and backend make a valid config (no data read, no training)."""
    runs = [(table, "cp") for table in accuracy.TABLES] + [("rmd17", v) for v in accuracy.VARIANTS if v != "cp"]
    for table, variant in runs:
        (dataset,) = accuracy.datasets(table, DATA, ("aspirin",), accuracy.BUDGETS["cpu"])
        cfg = compose(accuracy.run_overrides(dataset, variant, accuracy.BUDGETS["cpu"], seed=3))
        assert cfg.model.channels == 16 and cfg.batch_size == 10 and cfg.seed == 3 and cfg.data.seed == 3
        assert cfg.tp.kind == variant.split("-")[0]
    aspirin = accuracy.datasets("rmd17", DATA, ("aspirin",))[0]
    assert accuracy.epochs_for(aspirin, accuracy.BUDGETS["cpu"]) == 2  # 190 steps of 10 of 950 structures
    with pytest.raises(ValueError):
        accuracy.datasets("rmd17", DATA, ("caffeine",))


def test_targets() -> None:
    def row(mol: str, backend: str, force: float) -> dict:
        return {"dataset": mol, "backend": backend, "tests": {"test_01": {"forces_mae_meV_A": force}}}

    result = {"table": "rmd17", "datasets": [{"name": "aspirin"}, {"name": "ethanol"}],
              "rows": [row("aspirin", "cg", 100.0), row("aspirin", "cp", 109.0),
                       row("ethanol", "cg", 50.0), row("ethanol", "cp", 56.0)]}
    targets = accuracy.evaluate_targets(result)
    assert [t["pass"] for t in targets] == [True, False]
    result["rows"] += [{**row("aspirin", "cg", 120.0), "seed": 1}, {**row("aspirin", "cp", 100.0), "seed": 1}]
    aspirin = accuracy.evaluate_targets(result)[0]
    assert aspirin["ratio_of_means"] == pytest.approx(209 / 220) and aspirin["cg_seeds"] == {0: 100.0, 1: 120.0}
    assert "NOT met" in "\n".join(accuracy.targets_section(result))


@needs_data
def test_accuracy_quick_and_resume(tmp_path: Path) -> None:
    """A real (tiny) training run through the Hydra config on AcAc, with its extra 600 K test set, then a rerun
    that reuses it."""
    args = ["acac", "--quick", "--backends", "cp", "--out", str(tmp_path), "--work-dir", str(tmp_path / "work"),
            "--data-root", str(DATA)]
    result = accuracy.main(args)
    (row,) = result["rows"]
    assert "error" not in row, row.get("error")
    assert set(row["tests"]) == {"test_MD_300K", "test_MD_600K"}
    for metrics in row["tests"].values():
        assert metrics["forces_mae_meV_A"] > 0 and metrics["energy_mae_meV"] >= 0
    assert row["tests"]["test_MD_600K"]["structures"] == 8
    assert row["params"] > 0 and row["epochs"] == 1 and row["tp"]["kind"] == "cp" and row["tp"]["cp_ranks"]
    assert row["overrides"][0] == "experiment=accuracy_cpu"
    assert (tmp_path / "accuracy_acac_quick.png").read_bytes()[:8] == PNG
    markdown = (tmp_path / "accuracy_acac_quick.md").read_text()
    assert "machine: CPU" in markdown and "commit" in markdown and "not** the MACE-paper recipe" in markdown
    start = time.perf_counter()
    again = accuracy.main(args)  # resumed from the JSON: no training
    assert time.perf_counter() - start < 10
    assert again["rows"][0]["train_wall_s"] == row["train_wall_s"]
