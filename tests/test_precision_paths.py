"""Precision and mode faults that a GPU shows first, reproduced on the CPU: geometry under bf16 autocast and
without matmuls (TF32-proof), gaunt with bfloat16 inputs, models under ``torch.inference_mode``."""

from __future__ import annotations

import pytest
import torch
from ase.build import bulk
from helpers import ase_graph, small_model
from torch.overrides import TorchFunctionMode

import tdn
from tdn.models.geometry import cell_volume, strained_geometry

pytestmark = pytest.mark.usefixtures("one_thread")

MATMUL_FAMILY = {torch.matmul, torch.mm, torch.bmm, torch.einsum, torch.linalg.det, torch.Tensor.__matmul__,
                 torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.bmm, torch.tensordot, torch.linalg.matmul}


class RecordMatmuls(TorchFunctionMode):
    """Records calls of the ops that TF32 and autocast change (matrix products and determinants)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in MATMUL_FAMILY:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def periodic_graph(cutoff: float = 4.0):
    atoms = bulk("Cu", "fcc", a=3.6) * (3, 3, 3)  # a 10.8 Å cell: shifts of ~10 Å, where bf16 keeps 3 digits
    atoms.rattle(0.05, seed=0)
    return ase_graph(atoms, cutoff)


def test_geometry_uses_no_matmul_and_keeps_its_precision_under_bf16_autocast():
    graph = periodic_graph()
    pos, cell, shifts = graph.pos.float(), graph.cell.float(), graph.unit_shifts.float()
    batch_index = torch.zeros(pos.shape[0], dtype=torch.long)
    displacement = torch.zeros(1, 3, 3, requires_grad=True)
    exact_pos, exact_shift = strained_geometry(graph.pos, graph.cell, graph.unit_shifts, batch_index,
                                               graph.edge_index[0], displacement.double())  # fmt: skip
    with RecordMatmuls() as mode, torch.autocast("cpu", dtype=torch.bfloat16):
        got_pos, got_shift = strained_geometry(pos, cell, shifts, batch_index, graph.edge_index[0], displacement)
        volume = cell_volume(cell)
    assert mode.calls == []
    assert got_shift.dtype == torch.float32 and got_pos.dtype == torch.float32
    assert (got_shift.double() - exact_shift).abs().max() < 1e-5  # bf16 would be off by ~0.02 Å
    assert (got_pos.double() - exact_pos).abs().max() < 1e-5
    assert abs(volume.item() - abs(torch.linalg.det(graph.cell[0]).item())) < 1e-3


def test_model_edge_vectors_under_bf16_autocast_match_float32():
    """The model's whole forward under CPU bf16 autocast: the edge shifts reaching the network are float32-exact."""
    model = small_model(tp="cp", dtype="float32", elements=[29])
    graph = periodic_graph(3.0)
    seen = []
    network = model.node_energies
    model.node_energies = lambda pos, elements, edge_index, shift: seen.append(shift) or network(
        pos, elements, edge_index, shift
    )
    model(graph, compute_stress=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(graph, compute_stress=True)
    reference, mixed = seen
    assert mixed.dtype == torch.float32
    assert (mixed - reference).abs().max() <= 1e-6


@pytest.mark.parametrize("under_autocast", [False, True])
def test_gaunt_with_bfloat16_inputs(under_autocast):
    torch.manual_seed(0)
    tp = tdn.tp.build("gaunt", lmax=2, channels=4)
    x, y, w = torch.randn(6, 4, 9), torch.randn(6, 9), torch.randn(6, 4, 1)
    reference = tp(x, y, w)
    if under_autocast:  # float32 module and harmonics, bf16 features
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tp(x.bfloat16(), y, w)
    else:  # a bf16 module
        out = tp.to(torch.bfloat16)(x.bfloat16(), y.bfloat16(), w.bfloat16())
    assert out.dtype == torch.bfloat16 or under_autocast
    assert torch.isfinite(out).all()
    assert ((out.float() - reference).abs().max() / reference.abs().max()).item() < 3e-2


@pytest.mark.parametrize("kind", ["cg", "cp", "gaunt", "grid"])
def test_model_runs_under_inference_mode(kind):
    """Inference tensors keep no version counter: the per-tensor caches must not read it."""
    model = small_model(tp=kind, elements=[29])
    graph = periodic_graph(3.0)
    expected = model(graph, compute_forces=False)["energy"]
    with torch.inference_mode():
        inference_graph = graph.clone()  # tensors made here are inference tensors
        got = model(inference_graph, compute_forces=False)["energy"]
        again = model(inference_graph, compute_forces=False)["energy"]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again, expected, rtol=1e-12, atol=1e-12)
