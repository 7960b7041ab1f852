"""DDP with two CPU processes (gloo) through the real command line: Lightning starts the second process itself.

The test metrics of the 2-process run must equal those of the exported model evaluated in one process: the ranks
share one list of evaluation batches, repeated (padding) batches are left out, and sums and counts are all-reduced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import tdn
from tdn.data import TDNDataModule
from tdn.train.metrics import MetricSet
from tdn.train.resolvers import SAMPLE_DIR

MOLECULES = SAMPLE_DIR / "molecules.xyz"


@pytest.mark.slow
@pytest.mark.skipif(not MOLECULES.is_file(), reason="bundled sample not generated")
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_cpu_processes(tmp_path):
    out = tmp_path / "run"
    split = ["data.train_size=8", "data.val_size=3", "data.test_size=5", "data.eval_batch_size=2", "batch_size=4"]
    cmd = [
        sys.executable, "-m", "tdn.train.cli",
        "trainer=ddp", "trainer.accelerator=cpu", "devices=2", "dtype=float64",
        "data=extxyz", f"data.train={MOLECULES}", *split,
        "model.channels=4", "model.lmax=1", "model.correlation=2", "model.radial_mlp=[8]", "model.readout_mlp=4",
        "epochs=2", "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0",
        f"hydra.run.dir={out}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "exported model:" in proc.stdout
    for name in ("checkpoints/last.ckpt", "metrics.csv", "learning_curve.png", "model.pt"):
        assert (out / name).is_file(), name
    reported = json.loads((out / "test_metrics.json").read_text())

    # the same test split, evaluated with the exported model in this single process
    model = tdn.load_model(out / "model.pt")
    dm = TDNDataModule(
        train=str(MOLECULES),
        format="extxyz",
        train_size=8,
        val_size=3,
        test_size=5,
        batch_size=2,
        dtype="float64",
        seed=0,
    )
    metrics = MetricSet(["generic"])
    for batch in dm.test_dataloader():
        metrics.update(model(batch, compute_forces=True), batch)
    expected = {k: float(v) for k, v in metrics.compute().items()}
    for key, value in expected.items():
        assert reported[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
