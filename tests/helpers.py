"""Builders shared by several test modules: plain functions and constants (the fixtures are in conftest.py).

Test modules import it as ``from helpers import ...`` (pytest puts tests/ on ``sys.path``: it has no __init__.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list
from torch_geometric.data import Data

from tdn.models import TDNModel, build_model

# ------------------------------------------------------------------------------------------------ models
# A small untrained float64 model: cg, 4 channels, messages l <= 2, hidden features l <= 1, 2 layers, correlation 2.
SMALL_MODEL = dict(
    tp="cg",
    lmax=2,
    lmax_hidden=1,
    channels=4,
    num_layers=2,
    correlation=2,
    radial_mlp=[8],
    readout_mlp=4,
    dtype="float64",
)


def small_model(seed: int = 0, **options) -> TDNModel:
    """``build_model(**SMALL_MODEL, **options)`` (``options`` win) after ``torch.manual_seed(seed)``, in eval mode."""
    torch.manual_seed(seed)
    return build_model(**{**SMALL_MODEL, **options}).eval()


# ------------------------------------------------------------------------------------------------ graphs
def ase_graph(atoms: Atoms, cutoff: float) -> Data:
    """The graph of docs/CONTRACTS.md, built with ASE's neighbour list (float64)."""
    i, j, shifts = neighbor_list("ijS", atoms, cutoff)
    return Data(
        pos=torch.tensor(atoms.positions, dtype=torch.float64),
        atomic_numbers=torch.tensor(atoms.numbers, dtype=torch.long),
        edge_index=torch.tensor(np.stack([i, j]), dtype=torch.long),
        unit_shifts=torch.tensor(shifts, dtype=torch.float64),
        cell=torch.tensor(atoms.cell.array, dtype=torch.float64).view(1, 3, 3),
        pbc=torch.tensor(atoms.pbc, dtype=torch.bool).view(1, 3),
        natoms=torch.tensor([len(atoms)]),
    )


# ------------------------------------------------------------------------------------------------ training
SAMPLE = Path(__file__).resolve().parents[1] / "datasets" / "sample"  # the bundled sample (scripts/make_sample.py)
MOLECULES = SAMPLE / "molecules.xyz"
needs_sample = pytest.mark.skipif(not MOLECULES.is_file(), reason="bundled sample not generated")

# Config overrides for a tiny training run on the bundled molecules: 8 / 4 / 4 structures.
SAMPLE_DATA = [
    "data=extxyz",
    f"data.train={MOLECULES}",
    "data.train_size=8",
    "data.val_size=4",
    "data.test_size=4",
]

# Lightning without progress bars, model summaries or sanity checks, logging every step (tests read the logs).
QUIET_TRAINER = [
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
]

# A tiny model for training runs: 4 channels, l <= 1, correlation 2.
TINY_MODEL = [
    "model.channels=4",
    "model.lmax=1",
    "model.correlation=2",
    "model.num_bessel=4",
    "model.radial_mlp=[8]",
    "model.readout_mlp=4",
]
