"""torch.compile of the energy network (TDNModel.compile_energy): same energies, forces and stress as eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list
from torch_geometric.data import Batch, Data

from tdn.models import build_model

pytest.importorskip("tdn.nn.product", reason="tdn.nn.product (the product basis, issue B) is not written yet")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def graph(atoms, cutoff=3.0) -> Batch:
    i, j, shifts = neighbor_list("ijS", atoms, cutoff)
    data = Data(
        pos=torch.tensor(atoms.positions),
        atomic_numbers=torch.tensor(atoms.numbers),
        edge_index=torch.tensor(np.stack([i, j])),
        unit_shifts=torch.tensor(shifts, dtype=torch.float64),
        cell=torch.tensor(atoms.cell.array).view(1, 3, 3),
    )
    return Batch.from_data_list([data])


def structures():
    crystal = bulk("Cu", "fcc", a=3.7, cubic=True)
    crystal.numbers[0] = 8
    crystal.rattle(0.05, seed=0)
    mol = molecule("CH3CH2OH")
    mol.rattle(0.05, seed=1)
    return [graph(crystal), graph(mol)]


def model_pair(**options):
    torch.manual_seed(0)
    settings = dict(
        tp="cg",
        lmax=2,
        channels=4,
        correlation=2,
        cutoff=3.0,
        elements=[1, 6, 8, 29],
        radial_mlp=[8],
        readout_mlp=4,
        dtype="float64",
    )
    settings.update(options)
    eager = build_model(**settings).eval()
    torch.manual_seed(0)
    compiled = build_model(**settings).eval()
    return eager, compiled


def compare(eager, compiled):
    for batch in structures():  # two sizes: the second call must not fail (dynamic shapes)
        expected = eager(batch, compute_stress=True)
        got = compiled(batch, compute_stress=True)
        for key in ("energy", "node_energy", "forces", "virials"):
            assert torch.allclose(got[key], expected[key], rtol=1e-10, atol=1e-10), key


# correlation 1: from order 2 on, ProductBasis groups the nodes by element with a host sync (bincount), a graph
# break (compilation still works, in pieces, but takes minutes on a small CPU). fullgraph=True here asserts that
# the rest of the energy network has no graph break at all.
SMALL = dict(num_layers=2, correlation=1, lmax=1, lmax_hidden=1)


def test_compiled_energy_traces_without_graph_breaks():
    """Dynamo capture only (backend "eager", fullgraph: a graph break is an error): seconds on any CPU.
    AOTAutograd and code generation are covered by the slow tests below."""
    eager, compiled = model_pair(**SMALL)
    compiled.compile_energy(backend="eager", fullgraph=True)
    compare(eager, compiled)


@pytest.mark.slow
def test_compiled_energy_with_inductor():
    """The default backend (Inductor, C++ code generation on a CPU); a one-layer model keeps the compile short."""
    eager, compiled = model_pair(num_layers=1, correlation=1, lmax=1)
    compiled.compile_energy(fullgraph=True)
    compare(eager, compiled)


@pytest.mark.slow
def test_compiled_energy_cannot_train_on_forces():
    """A force or stress loss needs double backward, which AOTAutograd does not support (see compile_energy).
    This check fails, as a reminder to update the docs, once PyTorch supports it."""
    _, compiled = model_pair(num_layers=1, correlation=1, lmax=1)
    compiled.compile_energy(backend="aot_eager", fullgraph=True).train()
    with pytest.raises(RuntimeError, match="double backward|donated buffer"):
        compiled(structures()[0], compute_stress=True)["forces"].square().sum().backward()
