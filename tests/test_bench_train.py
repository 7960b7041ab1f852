"""The training-step benchmark: a tiny run writes its table, JSON and plot; the reference is skipped with a note
where mace-torch cannot be imported."""

from __future__ import annotations

import json
import sys

import pytest

from tdn.bench import train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_run_writes_results(tmp_path):
    result = train_step.main(["--quick", "--out", str(tmp_path), "--backends", "cp", "cg", "--reps", "1",
                              "--warmup", "0", "--references", "mace-e3nn", "--mace-python", sys.executable,
                              "--mace-pythonpath", str(tmp_path / "nothing")])  # fmt: skip
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"tdn-cp", "tdn-cg"}
    for row in rows.values():
        assert row["size"] == "accuracy_cpu" and row["steps_per_s"] > 0
    stem = tmp_path / "train_step_cpu_quick"
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["rows"] == result["rows"]
    table = stem.with_suffix(".md").read_text()
    assert "| accuracy_cpu | float32 |" in table
    assert stem.with_suffix(".png").stat().st_size > 1000
    # mace-torch is not importable from an empty PYTHONPATH here (tdn's own e3nn is not mace's): a note, no row
    assert any("mace" in note for note in result["notes"])


def test_the_batch_is_ten_molecules_of_known_elements():
    molecules = train_step.batch_molecules()
    assert len(molecules) == 10
    assert {int(z) for m in molecules for z in m.numbers} <= set(train_step.ELEMENTS)
    assert all(m.arrays["forces"].shape == (len(m), 3) for m in molecules)
