"""Learning-curve records of a training run: the training clock (CPU / wall seconds of the training steps, carried
through a resume) and the exported snapshots after chosen epochs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import QUIET_TRAINER, SAMPLE_DATA, TINY_MODEL, needs_sample

import tdn
from tdn.train import compose, train
from tdn.train.callbacks import Snapshots
from tdn.train.errors import ConfigError

pytestmark = needs_sample

BASE = [
    *SAMPLE_DATA,
    *TINY_MODEL,
    "tp=cp",
    "batch_size=2",
    "test=false",
    "export=false",
    *QUIET_TRAINER,
]


def clock_column(run_dir: Path) -> list[float]:
    """``time/train_cpu_s`` of every epoch row of the run's metrics.csv, in order."""
    with (run_dir / "metrics.csv").open() as handle:
        return [float(row["time/train_cpu_s"]) for row in csv.DictReader(handle) if row.get("time/train_cpu_s")]


def test_snapshots_and_clock(tmp_path):
    result = train(compose([*BASE, "epochs=3", "snapshots.epochs=[1,3]"]), tmp_path / "run")
    index = json.loads((result.output_dir / "snapshots" / "index.json").read_text())
    assert [row["epoch"] for row in index] == [1, 3]
    assert [row["step"] for row in index] == [4, 12]  # 8 structures in batches of 2
    assert 0 < index[0]["train_cpu_s"] < index[1]["train_cpu_s"]
    assert 0 < index[0]["train_wall_s"] < index[1]["train_wall_s"]
    clock = clock_column(result.output_dir)
    assert len(clock) == 3 and clock == sorted(clock) and clock[0] > 0
    assert clock[2] == pytest.approx(index[1]["train_cpu_s"], rel=1e-6)
    first, last = (tdn.load_model(result.output_dir / "snapshots" / row["file"]) for row in index)
    changed = [not torch.equal(a, b) for a, b in zip(first.state_dict().values(), last.state_dict().values())]
    assert any(changed)  # two different points of the curve


def test_clock_continues_after_resume(tmp_path):
    half = train(compose([*BASE, "epochs=2"]), tmp_path / "run")
    before = clock_column(half.output_dir)
    train(compose([*BASE, "epochs=3", f"ckpt_path={half.last_checkpoint}"]), tmp_path / "run")
    after = clock_column(half.output_dir)
    assert after[:2] == before and after[2] > after[1]  # the resumed epoch adds to the saved clock


def test_every_n_epochs():
    snapshots = Snapshots("unused", epochs=[3], every_n_epochs=4)
    assert [e for e in range(1, 13) if snapshots.wanted(e)] == [3, 4, 8, 12]
    assert not any(Snapshots("unused").wanted(e) for e in range(1, 10))


def test_bad_snapshot_option(tmp_path):
    with pytest.raises(ConfigError, match="snapshots.every_n_epochs"):
        train(compose([*BASE, "snapshots.every_n_epochs=-1"]), tmp_path / "bad")
