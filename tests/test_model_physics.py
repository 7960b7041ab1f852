"""Physics of the assembled model for every tensor-product backend: symmetries, batching, derivatives, cutoff."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from helpers import ase_graph, small_model
from torch_geometric.data import Batch, Data

import tdn.tp
from tdn.models import UnknownElementError
from tdn.o3 import random_rotation

BACKENDS = ("cg", "cp", "gaunt", "grid")

pytestmark = pytest.mark.usefixtures("one_thread")

ELEMENTS = [1, 6, 8, 29]
CUTOFF = 3.0


def backend(kind: str) -> str:
    if kind not in tdn.tp.BACKENDS:
        pytest.skip(f"tensor-product backend {kind!r} is not importable from tdn.tp yet")
    return kind


# cp replaces the CG tensor by CP factors with relative error <= 1e-4 (the default tol): the model is then
# equivariant only to about that level, so its symmetry checks get a matching tolerance. Derivative checks
# (forces, stress) are exact for every backend: the model is conservative whatever the tensor product.
SYMMETRY_RTOL = {"cp": 2e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str = "cg", rtol: float = 1e-10) -> None:
    """``max |actual - expected| <= rtol * max(|expected|, 1)`` with the backend's symmetry tolerance."""
    rtol = max(rtol, SYMMETRY_RTOL.get(kind, 0.0))
    scale = max(float(expected.detach().abs().max()), 1.0 if kind not in SYMMETRY_RTOL else 1e-30)
    error = float((actual - expected).detach().abs().max())
    assert error <= rtol * scale, f"max error {error:.3e} > {rtol:.1e} x {scale:.3e}"


def make_graph(atoms: Atoms, cutoff: float = CUTOFF) -> Data:
    return ase_graph(atoms, cutoff)


def tiny_model(kind: str = "cg", seed: int = 0, **overrides):
    options = dict(
        tp=backend(kind),
        cutoff=CUTOFF,
        elements=ELEMENTS,
        radial_mlp=[8, 8],
        avg_num_neighbors=4.0,
        atomic_energies=[-1.0, -2.0, -3.0, -4.0],
    )
    return small_model(seed, **{**options, **overrides})


def run(model, atoms_or_graphs, **kwargs):
    """The model's output, plus "interaction": the energy minus the E0 sum, per graph (where symmetry errors show)."""
    if isinstance(atoms_or_graphs, Atoms):
        atoms_or_graphs = [make_graph(atoms_or_graphs)]
    batch = Batch.from_data_list(list(atoms_or_graphs))
    out = model(batch, **kwargs)
    e0 = model.atomic_energies[model.element_index(batch.atomic_numbers)]
    out["interaction"] = out["energy"] - torch.zeros_like(out["energy"]).index_add(0, batch.batch, e0)
    return out


# --------------------------------------------------------------------------------------------- structures
def methanol() -> Atoms:
    atoms = molecule("CH3OH")
    atoms.rattle(0.05, seed=1)
    return atoms


def slab() -> Atoms:
    atoms = fcc111("Cu", size=(2, 2, 2), vacuum=3.0, a=3.8)
    atoms.pbc = (True, True, False)
    atoms += Atoms("OH", positions=[[1.0, 1.0, atoms.positions[:, 2].max() + 1.8], [1.3, 1.2, 0.0]])
    atoms.positions[-1, 2] = atoms.positions[-2, 2] + 0.97
    atoms.rattle(0.05, seed=2)
    return atoms


def triclinic_bulk() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.7) * (2, 1, 1)
    atoms.set_cell(atoms.cell.array + np.array([[0.0, 0.1, 0.2], [0.1, 0.0, -0.1], [0.2, 0.0, 0.05]]), scale_atoms=True)
    atoms.numbers[1] = 8
    atoms.rattle(0.08, seed=3)
    return atoms


STRUCTURES = {"molecule": methanol, "slab": slab, "bulk": triclinic_bulk}


# --------------------------------------------------------------------------------------------- symmetries
@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("name", ["molecule", "slab", "bulk"])
def test_rotation_invariance_and_equivariance(kind, name):
    model = tiny_model(kind)
    atoms = STRUCTURES[name]()
    graph = make_graph(atoms)
    out = run(model, [graph], compute_stress=True)
    rotation = random_rotation(generator=torch.Generator().manual_seed(7))
    rotated = graph.clone()
    rotated.pos = graph.pos @ rotation.T
    rotated.cell = graph.cell @ rotation.T  # cell rows are lattice vectors; shifts stay the same integers
    out_r = run(model, [rotated], compute_stress=True)
    assert_close(out_r["interaction"], out["interaction"], kind)
    assert_close(out_r["forces"], out["forces"] @ rotation.T, kind)
    if name != "molecule":
        assert out["stress"].abs().max() > 1e-6
        assert_close(out_r["stress"][0], rotation @ out["stress"][0] @ rotation.T, kind)


@pytest.mark.parametrize("kind", BACKENDS)
def test_inversion(kind):
    model = tiny_model(kind)
    graph = make_graph(triclinic_bulk())
    out = run(model, [graph], compute_stress=True)
    inverted = graph.clone()
    inverted.pos, inverted.cell = -graph.pos, -graph.cell
    out_i = run(model, [inverted], compute_stress=True)
    assert_close(out_i["interaction"], out["interaction"], kind)
    assert_close(out_i["forces"], -out["forces"], kind)
    assert_close(out_i["stress"], out["stress"], kind)


@pytest.mark.parametrize(("kind", "correlation"), [(k, nu) for k in BACKENDS for nu in (1, 3, 4)])
def test_every_correlation_order(kind, correlation):
    model = tiny_model(kind, correlation=correlation)
    graph = make_graph(slab())
    rotation = random_rotation(generator=torch.Generator().manual_seed(5))
    rotated = graph.clone()
    rotated.pos, rotated.cell = graph.pos @ rotation.T, graph.cell @ rotation.T
    out, out_r = run(model, [graph]), run(model, [rotated])
    assert out["forces"].abs().max() > 0
    assert_close(out_r["interaction"], out["interaction"], kind)
    assert_close(out_r["forces"], out["forces"] @ rotation.T, kind)


def test_so3_paths_are_rotation_invariant():
    model = tiny_model("cg", paths="so3")
    graph = make_graph(methanol())
    rotation = random_rotation(generator=torch.Generator().manual_seed(3))
    rotated = graph.clone()
    rotated.pos = graph.pos @ rotation.T
    e, e_r = run(model, [graph])["energy"], run(model, [rotated])["energy"]
    assert torch.allclose(e, e_r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["cg", "cp"])
def test_permutation(kind):
    model = tiny_model(kind)
    atoms = slab()
    out = run(model, atoms)
    perm = np.random.default_rng(0).permutation(len(atoms))
    out_p = run(model, atoms[perm])
    assert torch.allclose(out_p["energy"], out["energy"], rtol=1e-10, atol=1e-10)
    assert torch.allclose(out_p["forces"], out["forces"][torch.as_tensor(perm)], atol=1e-10)
    assert torch.allclose(out_p["node_energy"], out["node_energy"][torch.as_tensor(perm)], atol=1e-10)


@pytest.mark.parametrize("kind", ["cg", "grid"])
def test_translation_and_wrapping(kind):
    model = tiny_model(kind)
    atoms = triclinic_bulk()
    out = run(model, atoms, compute_stress=True)
    moved = atoms.copy()
    moved.positions += np.array([0.3, -1.1, 2.5])
    moved.positions[0] += 2 * atoms.cell[0] - atoms.cell[2]  # lattice translation of one atom
    out_m = run(model, moved, compute_stress=True)
    moved.wrap()
    out_w = run(model, moved, compute_stress=True)
    for other in (out_m, out_w):
        assert torch.allclose(other["energy"], out["energy"], rtol=1e-10, atol=1e-10)
        assert torch.allclose(other["forces"], out["forces"], atol=1e-10)
        assert torch.allclose(other["stress"], out["stress"], atol=1e-10)


# --------------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("kind", ["cg", "cp"])
def test_batched_equals_one_by_one(kind):
    model = tiny_model(kind)
    lone = Atoms("O", positions=[[0.0, 0.0, 0.0]])
    graphs = [make_graph(a) for a in (methanol(), slab(), lone, triclinic_bulk())]
    batched = run(model, graphs, compute_stress=True)
    start = 0
    for b, graph in enumerate(graphs):
        single = run(model, [graph], compute_stress=True)
        n = graph.num_nodes
        assert torch.allclose(batched["energy"][b], single["energy"][0], rtol=1e-12, atol=1e-12)
        assert torch.allclose(batched["node_energy"][start : start + n], single["node_energy"], atol=1e-12)
        assert torch.allclose(batched["forces"][start : start + n], single["forces"], atol=1e-12)
        assert torch.allclose(batched["stress"][b], single["stress"][0], atol=1e-12)
        assert torch.allclose(batched["virials"][b], single["virials"][0], atol=1e-12)
        start += n


def test_no_gradient_leaks_between_graphs():
    model = tiny_model("cg").train()
    graphs = [make_graph(methanol()), make_graph(triclinic_bulk())]
    batch = Batch.from_data_list(graphs)
    batch.pos.requires_grad_(True)
    out = model(batch, compute_forces=True, compute_stress=True)
    first = batch.batch == 0
    # energy and forces of graph 0 do not depend on the positions of graph 1, and vice versa
    (d_energy,) = torch.autograd.grad(out["energy"][0], batch.pos, retain_graph=True)
    assert d_energy[~first].abs().max() == 0 and d_energy[first].abs().max() > 0
    probe = torch.randn(out["forces"][first].shape, dtype=torch.float64)  # (plain sum: 0 by translation invariance)
    (d_forces,) = torch.autograd.grad((out["forces"][first] * probe).sum(), batch.pos, retain_graph=True)
    assert d_forces[~first].abs().max() == 0 and d_forces[first].abs().max() > 0
    (d_stress,) = torch.autograd.grad(out["stress"][1].sum(), batch.pos)
    assert d_stress[first].abs().max() == 0 and d_stress[~first].abs().max() > 0


# --------------------------------------------------------------------------------------------- derivatives
def energy_of(model, atoms: Atoms) -> float:
    return run(model, atoms, compute_forces=False)["energy"].item()


def assert_forces_match_finite_differences(model, atoms: Atoms, h: float = 1e-4) -> None:
    """Forces against central differences of the energy (float64), to 1e-5 of the largest force."""
    forces = run(model, atoms)["forces"].numpy()
    numeric = np.zeros_like(forces)
    for a in range(len(atoms)):
        for k in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[a, k] += h
            minus.positions[a, k] -= h
            numeric[a, k] = -(energy_of(model, plus) - energy_of(model, minus)) / (2 * h)
    assert np.abs(forces).max() > 1e-5
    assert np.abs(numeric - forces).max() <= 1e-5 * np.abs(forces).max()


@pytest.mark.parametrize("kind", BACKENDS)
def test_forces_and_stress_match_finite_differences(kind):
    model = tiny_model(kind)
    h = 1e-4
    for atoms in (slab()[:5] + Atoms("H", positions=[[0.5, 0.5, 8.0]]), triclinic_bulk()):
        assert_forces_match_finite_differences(model, atoms, h)

    # stress against finite strains (ASE's definition: sigma = (1/V) dE/d(strain))
    atoms = triclinic_bulk()
    stress = run(model, atoms, compute_stress=True)["stress"][0].numpy()
    volume = atoms.get_volume()
    numeric = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            energies = []
            for sign in (1, -1):
                strained = atoms.copy()
                strain = np.eye(3)
                strain[i, j] += sign * h / 2
                strain[j, i] += sign * h / 2
                strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
                energies.append(energy_of(model, strained))
            numeric[i, j] = (energies[0] - energies[1]) / (2 * h) / volume
    assert np.abs(stress).max() > 1e-4
    assert np.abs(numeric - stress).max() <= 1e-5 * np.abs(stress).max()


@pytest.mark.parametrize("kind", ["cg", "cp", "grid"])
def test_inout_weights_in_the_model(kind):
    """tp.weights="inout" in the assembled model: forces against finite differences, rotation equivariance, and the
    eval-mode convolution (one product per receiver on a CPU) equal to training mode's per-edge messages."""
    model = tiny_model(kind, tp_weights="inout")
    assert_forces_match_finite_differences(model, slab()[:5] + Atoms("H", positions=[[0.5, 0.5, 8.0]]))
    graph = make_graph(methanol())
    out = run(model, [graph])
    rotation = random_rotation(generator=torch.Generator().manual_seed(7))
    rotated = graph.clone()
    rotated.pos = graph.pos @ rotation.T
    assert_close(run(model, [rotated])["forces"], out["forces"] @ rotation.T, kind)
    trained = run(model.train(), [graph])
    assert_close(trained["forces"].detach(), out["forces"], "cg", rtol=1e-10)


def test_stress_sign_matches_ase():
    """ASE's numerical stress of a calculator wrapping the model has the model's sign and layout."""
    from ase.calculators.calculator import Calculator, all_changes
    from ase.calculators.fd import calculate_numerical_stress

    model = tiny_model("cg")

    class Wrapper(Calculator):
        implemented_properties = ["energy", "free_energy"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            self.results["energy"] = self.results["free_energy"] = energy_of(model, self.atoms)

    atoms = triclinic_bulk()
    atoms.calc = Wrapper()
    numeric = calculate_numerical_stress(atoms, eps=1e-5, voigt=False)
    stress = run(model, atoms, compute_stress=True)["stress"][0].numpy()
    assert np.abs(numeric - stress).max() <= 1e-6 * np.abs(stress).max()


def test_virials_are_minus_stress_times_volume():
    model = tiny_model("cg")
    atoms = triclinic_bulk()
    out = run(model, atoms, compute_stress=True)
    assert torch.allclose(out["virials"][0], -out["stress"][0] * atoms.get_volume(), atol=1e-12)
    mol = run(model, methanol(), compute_stress=True)
    assert mol["stress"].abs().max() == 0  # no volume: stress is zero, virials are still defined
    assert mol["virials"].abs().max() > 0


def test_training_mode_keeps_graph_for_force_loss():
    model = tiny_model("cg").train()
    out = run(model, triclinic_bulk(), compute_stress=True)
    loss = out["energy"].sum() + out["forces"].square().sum() + out["stress"].square().sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("kind", ["cg", "grid"])
def test_lone_atom_energy_is_e0(kind):
    model = tiny_model(kind)
    for z, e0 in zip(ELEMENTS, [-1.0, -2.0, -3.0, -4.0]):
        out = run(model, Atoms(numbers=[z], positions=[[0.1, 0.2, 0.3]]), compute_stress=True)
        assert out["energy"][0].item() == pytest.approx(e0, abs=1e-12)
        assert out["forces"].abs().max() == 0
        assert out["stress"].abs().max() == 0
    # a shift is added to every atom, lone or not
    model.set_statistics(shift=0.5)
    out = run(model, Atoms("Cu", positions=[[0.0, 0.0, 0.0]]))
    assert out["energy"][0].item() == pytest.approx(-4.0 + 0.5, abs=1e-12)


@pytest.mark.parametrize("kind", ["cg", "cp"])
def test_energy_continuous_as_neighbour_crosses_cutoff(kind):
    model = tiny_model(kind)
    far = run(model, Atoms("CuO", positions=[[0, 0, 0], [0, 0, CUTOFF + 1.0]]))["energy"].item()
    assert far == pytest.approx(-4.0 - 3.0, abs=1e-12)
    previous_gap = None
    for eps in (1e-1, 1e-2, 1e-3):
        inside = run(model, Atoms("CuO", positions=[[0, 0, 0], [0, 0, CUTOFF - eps]]))
        gap = abs(inside["energy"].item() - far)
        if previous_gap is not None:
            assert gap < previous_gap * 0.02  # vanishes at least like eps^2 (the envelope: eps^3)
        previous_gap = gap
        assert inside["forces"].abs().max() < 100 * eps**2
    assert previous_gap < 1e-8
    outside = run(model, Atoms("CuO", positions=[[0, 0, 0], [0, 0, CUTOFF + 1e-9]]))
    assert outside["energy"].item() == pytest.approx(far, abs=1e-14)


def test_unknown_element_is_a_clear_error():
    model = tiny_model("cg")
    with pytest.raises(UnknownElementError, match=r"\[79\]") as info:
        run(model, Atoms("CuAu", positions=[[0, 0, 0], [0, 0, 2.0]]))
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert "[1, 6, 8, 29]" in str(info.value)


def test_molecule_without_cell_or_shifts():
    model = tiny_model("cg")
    graph = make_graph(methanol())
    bare = Data(pos=graph.pos, atomic_numbers=graph.atomic_numbers, edge_index=graph.edge_index)
    a, b = model(bare), run(model, [graph])
    assert torch.allclose(a["energy"], b["energy"]) and torch.allclose(a["forces"], b["forces"])
    two = model(Batch.from_data_list([bare, bare]), compute_stress=True)
    assert two["energy"].shape == (2,) and torch.allclose(two["energy"], b["energy"].expand(2))
    assert two["stress"].shape == (2, 3, 3) and two["stress"].abs().max() == 0


def test_float32_input_to_float64_model_and_back():
    model = tiny_model("cg")
    graph = make_graph(methanol())
    reference = model(graph)
    graph32 = graph.clone()
    graph32.pos, graph32.cell, graph32.unit_shifts = graph.pos.float(), graph.cell.float(), graph.unit_shifts.float()
    assert torch.allclose(model(graph32)["energy"], reference["energy"], rtol=1e-6)
    model32 = model.float()
    assert model32(graph32)["energy"].dtype == torch.float32
    assert torch.allclose(model32(graph32)["energy"].double(), reference["energy"], rtol=1e-4)


@pytest.mark.parametrize("kind", ["cg", "cp"])
def test_repeated_calls_reuse_element_grouping_without_host_checks(kind, monkeypatch):
    """An MD step passes the same atomic_numbers tensor every time: the element index and the product basis's
    element grouping are built once (they sync the host), and an in-place change of the numbers is seen."""
    from tdn.contractions import ElementGroups

    built = []
    original = ElementGroups.__init__

    def counting_init(self, element_index, num_elements):
        built.append(element_index)
        original(self, element_index, num_elements)

    monkeypatch.setattr(ElementGroups, "__init__", counting_init)
    model = tiny_model(kind)
    graph = make_graph(triclinic_bulk())
    first = model(graph)
    assert len(built) == 1  # one grouping for both layers
    again = model(graph)
    assert len(built) == 1 and model.element_index(graph.atomic_numbers) is built[0]
    torch.testing.assert_close(again["forces"], first["forces"], rtol=0, atol=0)
    fresh = model(make_graph(triclinic_bulk()))  # a new tensor with the same numbers: rebuilt, same result
    assert len(built) == 2
    torch.testing.assert_close(fresh["forces"], first["forces"], rtol=0, atol=0)
    graph.atomic_numbers[1] = 29  # in place: the O becomes Cu
    changed = model(graph)
    assert len(built) == 3 and not torch.allclose(changed["energy"], first["energy"])
    graph.atomic_numbers[1] = 79
    with pytest.raises(UnknownElementError, match=r"\[79\]"):
        model(graph)
