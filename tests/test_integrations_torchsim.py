"""tdn through torch-sim: the ModelInterface (one graph for a mixed batch, equal to the calculator per structure),
bad input named by structure, ``tdn-md --engine torchsim`` and ``tdn-relax``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.io import read, write
from helpers import small_model

import tdn
from tdn import TDNCalculator
from tdn.runtime import AtomsTooCloseError, GeometryError

pytest.importorskip("torch_sim")
from torch_sim.models.interface import validate_model_outputs  # noqa: E402

from tdn.integrations.torchsim import TDNTorchSimModel, state_from_atoms  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ELEMENTS = [1, 6, 8, 13, 14, 26, 29]  # Si and Fe: torch-sim's validate_model_outputs builds Si and Fe crystals
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def model(dtype: str = "float64") -> torch.nn.Module:
    return small_model(seed=1, elements=ELEMENTS, cutoff=4.0, dtype=dtype)


def skewed_crystal() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
    atoms.set_cell(np.array(atoms.cell) @ np.array([[1.0, 0.08, 0.0], [0.0, 1.04, 0.1], [0.05, 0.0, 0.97]]),
                   scale_atoms=True)  # fmt: skip
    atoms.rattle(0.05, seed=1)
    return atoms


def slab() -> Atoms:
    atoms = fcc111("Al", (2, 2, 3), vacuum=4.0)
    atoms.rattle(0.05, seed=2)
    return atoms


def mixed() -> list[Atoms]:
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.02, seed=3)
    return [skewed_crystal(), ethanol, slab()]


# ------------------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_sim_validates_the_model(dtype):
    ts_model = TDNTorchSimModel(model(dtype), compute_stress=False, compute_forces=False)
    validate_model_outputs(ts_model, ts_model.device, ts_model.dtype)  # sets both flags and checks the outputs
    assert ts_model.compute_stress and ts_model.compute_forces


@pytest.mark.parametrize("neighbor_list", ["vesin", "torch"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mixed_batch_equals_the_calculator_per_structure(dtype, neighbor_list):
    structures = mixed()
    ts_model = TDNTorchSimModel(model(dtype), neighbor_list=neighbor_list)
    state = state_from_atoms(structures, ts_model)
    assert torch.is_tensor(state.pbc) and state.pbc.shape == (3, 3)  # mixed periodicity: one row per system
    out = ts_model(state)
    assert out["energy"].shape == (3,) and out["forces"].shape == (state.n_atoms, 3)
    assert out["stress"].shape == (3, 3, 3)
    assert out["energy"].dtype == getattr(torch, dtype)
    calc = TDNCalculator(model(dtype), default_dtype=dtype)
    tol, start = TOLERANCE[dtype], 0
    for k, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = calc
        stop = start + len(atoms)
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        assert abs(out["energy"][k].item() - energy) <= tol * abs(energy), k
        assert np.abs(out["forces"][start:stop].double().numpy() - forces).max() <= tol * np.abs(forces).max(), k
        if atoms.pbc.all():
            stress = atoms.get_stress(voigt=False)
            assert np.abs(out["stress"][k].double().numpy() - stress).max() <= tol * np.abs(stress).max(), k
        else:
            assert not out["stress"][k].any()  # defined for fully periodic cells only
        start = stop


def test_the_skin_list_is_reused_and_equals_a_fresh_one():
    """Small moves reuse the pairs within cutoff + skin (one build), a move beyond skin / 2 (made in place in the
    state's own tensor) rebuilds that structure's pairs only, a changed cell all; the results equal a list built at
    every call."""
    reused, fresh = TDNTorchSimModel(model(), skin=0.5), TDNTorchSimModel(model(), skin=0.0)
    state = state_from_atoms(mixed(), reused)
    g = torch.Generator().manual_seed(0)

    def check() -> None:
        out, reference = reused(state), fresh(state)
        for key in ("energy", "forces", "stress"):
            torch.testing.assert_close(out[key], reference[key], rtol=1e-12, atol=1e-12)

    for _ in range(3):
        state.positions = state.positions + 0.02 * torch.randn(state.positions.shape, generator=g, dtype=torch.float64)
        check()
    neighbors = reused.neighbors
    assert reused.neighbor_list_builds == 1 and fresh.neighbor_list_builds == 3 and neighbors.system_builds == 3
    first = len(mixed()[0]) + 2  # an atom of the second structure (the molecule)
    state.positions[first] += torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64)  # in place, past skin / 2
    check()
    assert reused.neighbor_list_builds == 2 and neighbors.system_builds == 4
    state.cell = state.cell * 1.001
    state.positions = state.positions * 1.0005
    check()
    assert reused.neighbor_list_builds == 3 and neighbors.system_builds == 7
    with pytest.raises(ValueError, match="skin"):
        TDNTorchSimModel(model(), skin=-0.1)


def test_groups_of_structures_give_the_one_graph_numbers(monkeypatch):
    """On a CPU the batch is evaluated in groups of at most CPU_GROUP_ATOMS atoms: with groups of one or two
    structures the energies, forces and stress equal one call on the whole graph, and a problem still names its
    structure counted over the whole batch."""
    from tdn.integrations import batch

    assert batch._groups([5, 5, 20, 3], 10) == [(0, 2), (2, 3), (3, 4)]
    assert batch._groups([5, 5], None) == [(0, 2)]
    ts_model = TDNTorchSimModel(model())
    structures = mixed() + mixed()[:1]
    state = state_from_atoms(structures, ts_model)
    monkeypatch.setattr(batch, "CPU_GROUP_ATOMS", 10**9)
    whole = ts_model(state)
    monkeypatch.setattr(batch, "CPU_GROUP_ATOMS", len(structures[0]) + len(structures[1]))
    grouped = ts_model(state)
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(grouped[key], whole[key], rtol=1e-12, atol=1e-12)
    positions = state.positions.clone()
    last = sum(len(a) for a in structures[:3])
    positions[last + 1] = positions[last]  # two atoms of structure 3 (a later group) on top of each other
    with pytest.raises(AtomsTooCloseError, match="structure 3"):
        ts_model(_with(state, positions=positions))


def test_a_float64_state_around_a_float32_model():
    """``state_dtype="float64"``: torch-sim integrates float64 states; the float32 model sees the positions rounded to
    float32 and its results come back as float64, equal to what it gives on a float32 state."""
    structures = mixed()
    wide = TDNTorchSimModel(model("float32"), state_dtype="float64")
    narrow = TDNTorchSimModel(model("float32"))
    assert wide.dtype == torch.float64 and narrow.dtype == torch.float32
    state = state_from_atoms(structures, wide)
    assert state.positions.dtype == torch.float64
    out, reference = wide(state), narrow(state_from_atoms(structures, narrow))
    for key in ("energy", "forces", "stress"):
        assert out[key].dtype == torch.float64
        torch.testing.assert_close(out[key], reference[key].double(), rtol=0, atol=0)


def test_compute_flags_are_honoured():
    structures = mixed()
    both = TDNTorchSimModel(model())
    reference = both(state_from_atoms(structures, both))
    energy_only = TDNTorchSimModel(model(), compute_forces=False, compute_stress=False)
    out = energy_only(state_from_atoms(structures, energy_only))
    assert set(out) == {"energy"}
    torch.testing.assert_close(out["energy"], reference["energy"], rtol=1e-12, atol=0)
    no_stress = TDNTorchSimModel(model(), compute_stress=False)
    out = no_stress(state_from_atoms(structures, no_stress))
    assert set(out) == {"energy", "forces"}
    torch.testing.assert_close(out["forces"], reference["forces"], rtol=1e-12, atol=1e-14)


def test_pbc_as_bool_and_as_tensor():
    ts_model = TDNTorchSimModel(model())
    crystals = [skewed_crystal(), bulk("Cu", "fcc", a=3.7, cubic=True)]
    state = state_from_atoms(crystals, ts_model)
    assert state.pbc is True
    reference = ts_model(state)
    fields = {name: getattr(state, name) for name in ("positions", "cell", "atomic_numbers", "system_idx")}
    for pbc in (torch.tensor(True), torch.tensor([True, True, True]), torch.ones(2, 3, dtype=torch.bool)):
        out = ts_model({**fields, "pbc": pbc})
        torch.testing.assert_close(out["forces"], reference["forces"], rtol=0, atol=0)
        torch.testing.assert_close(out["stress"], reference["stress"], rtol=0, atol=0)
    older = {**fields, "pbc": True, "batch": fields["system_idx"]}  # torch-sim before 0.3 named system_idx batch
    del older["system_idx"]
    torch.testing.assert_close(ts_model(older)["energy"], reference["energy"], rtol=0, atol=0)
    molecules = ts_model({**fields, "pbc": False})  # the same atoms without periodic images: other energies
    assert not torch.allclose(molecules["energy"], reference["energy"])
    assert not molecules["stress"].any()


def _with(state, **changes):
    fields = {name: getattr(state, name) for name in ("positions", "cell", "pbc", "atomic_numbers", "system_idx")}
    return {**fields, **changes}


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ("float32 positions", ValueError, r"positions are float32 but the model runs in float64"),
        ("float32 cell", ValueError, r"mixed dtypes: positions are float64 but the cell is float32"),
        ("unknown element", KeyError, r"structure 1: element Au \(Z=79\) of atom 2 is not one the model"),
        ("empty structure", ValueError, r"structure 1 is empty"),
        ("non-finite position", GeometryError, r"structure 2: non-finite position of atom 3"),
        ("atoms on top of each other", AtomsTooCloseError, r"^structure 1: atoms 0 and 4 are 0 Å apart"),
        ("zero cell", ValueError, r"structure 0: pbc is True along a but cell vector a is \[0.0, 0.0, 0.0\]"),
    ],
)
def test_bad_input_names_the_structure(change, error, message):
    ts_model = TDNTorchSimModel(model())
    structures = mixed()
    state = state_from_atoms(structures, ts_model)
    ptr = np.cumsum([0] + [len(a) for a in structures])
    positions, numbers = state.positions.clone(), state.atomic_numbers.clone()
    if change == "float32 positions":
        bad = _with(state, positions=positions.float(), cell=state.cell.float())
    elif change == "float32 cell":
        bad = _with(state, cell=state.cell.float())
    elif change == "unknown element":
        numbers[ptr[1] + 2] = 79
        bad = _with(state, atomic_numbers=numbers)
    elif change == "empty structure":  # three cells, no atom of structure 1
        keep = state.system_idx != 1
        bad = _with(state, positions=positions[keep], atomic_numbers=numbers[keep], system_idx=state.system_idx[keep])
    elif change == "non-finite position":
        positions[ptr[2] + 3, 1] = float("nan")
        bad = _with(state, positions=positions)
    elif change == "atoms on top of each other":
        positions[ptr[1] + 4] = positions[ptr[1]]
        bad = _with(state, positions=positions)
    else:
        cell = state.cell.clone()
        cell[0] = 0.0
        bad = _with(state, cell=cell)
    with pytest.raises(error, match=message):
        ts_model(bad)


def test_calculate_batch_is_the_one_graph_path():
    structures = mixed() + [bulk("Cu", "fcc", a=3.6, cubic=True)]
    calc = TDNCalculator(model(), default_dtype="float64", neighbor_list="torch")
    results = calc.calculate_batch(structures, properties=("energy", "forces", "stress"), batch_size=3)
    for atoms, result in zip(structures, results):
        single = atoms.copy()
        single.calc = TDNCalculator(model(), default_dtype="float64")
        assert result["energy"] == pytest.approx(single.get_potential_energy(), rel=1e-10)
        assert np.abs(result["forces"] - single.get_forces()).max() < 1e-10
        assert np.abs(result["energies"] - single.get_potential_energies()).max() < 1e-10
        assert ("stress" in result) == bool(atoms.pbc.all())
        if atoms.pbc.all():
            assert np.abs(result["stress"] - single.get_stress()).max() < 1e-10


# ------------------------------------------------------------------------------------------------ command lines
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A model file, a 2-structure file (two Cu cells) and a file with a slab."""
    path = tmp_path_factory.mktemp("torchsim")
    tdn.save_model(model("float64"), path / "model.pt")
    first = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    first.rattle(0.03, seed=0)
    second = bulk("Cu", "fcc", a=3.65, cubic=True)
    second.rattle(0.03, seed=1)
    write(path / "two.xyz", [first, second])
    surface = slab()
    surface.info.clear()  # fcc111's adsorbate_info: not for extxyz
    write(path / "slab.xyz", [first, surface])
    return path


def run_md(files, out, *extra):
    from tdn.md import main

    return main([str(files / "two.xyz"), "--model", str(files / "model.pt"), "--engine", "torchsim", "--device",
                 "cpu", "--dtype", "float64", "--steps", "10", "--log-interval", "5", "--traj-interval", "5",
                 "--no-progress", "-o", str(out), *extra])  # fmt: skip


def test_md_writes_every_structure(files, tmp_path, capsys):
    from tdn.md import read_log

    assert run_md(files, tmp_path / "run", "--ensemble", "nvt-langevin") == 0
    assert "2 structures x 10 steps with torch-sim" in capsys.readouterr().out
    for name, natoms in (("000", 8), ("001", 4)):
        directory = tmp_path / "run" / name
        meta, names, values = read_log(directory / "md.log")
        assert meta["natoms"] == str(natoms) and meta["ensemble"] == "nvt-langevin"
        assert values[:, 0].tolist() == [0, 5, 10]
        assert np.isfinite(values).all() or np.isnan(values[0, -1])  # steps/s of the first row is nan
        frames = read(directory / "trajectory.extxyz", ":")
        assert len(frames) == 3 and len(frames[0]) == natoms
        assert (directory / "thermo.png").stat().st_size > 0


def test_md_nve_follows_ase(files, tmp_path):
    """The same velocity Verlet as ASE's (units of time, masses, momenta): the energies of the two engines agree."""
    from tdn.md import main, read_log

    common = ["--model", str(files / "model.pt"), "--device", "cpu", "--dtype", "float64", "--steps", "10",
              "--log-interval", "5", "--no-progress", "--no-plot", "--seed", "3"]  # fmt: skip
    assert main([str(files / "two.xyz"), "--index", "0", "--engine", "torchsim", "-o", str(tmp_path / "ts"),
                 *common]) == 0  # fmt: skip
    assert main([str(files / "two.xyz"), "--index", "0", "--engine", "ase", "-o", str(tmp_path / "ase"), *common]) == 0
    _, _, torch_sim = read_log(tmp_path / "ts" / "000" / "md.log")
    _, _, ase = read_log(tmp_path / "ase" / "md.log")
    np.testing.assert_allclose(torch_sim[:, 2:6], ase[:, 2:6], rtol=1e-7, atol=1e-7)  # Epot, Ekin, Etot, T
    assert abs(ase[-1, 2] - ase[0, 2]) > 1e-4  # the atoms did move


def test_md_refusals_name_the_problem(files, tmp_path, capsys):
    from tdn.md import main

    assert run_md(files, tmp_path / "a", "--ensemble", "npt") == 2
    assert "--ensemble npt is not available with --engine torchsim" in capsys.readouterr().err
    argv = [str(files / "slab.xyz"), "--model", str(files / "model.pt"), "--engine", "torchsim", "--device", "cpu",
            "--steps", "2", "-o", str(tmp_path / "b")]  # fmt: skip
    assert main(argv) == 2
    assert re.search(r"structure 001 has pbc=\[True, True, False\]", capsys.readouterr().err)
    assert not (tmp_path / "b").exists()


def test_relaxation_lowers_fmax_below_the_threshold(files, tmp_path, capsys):
    from tdn.integrations.torchsim_relax import main

    crystal = bulk("Cu", "fcc", a=3.75, cubic=True)
    crystal.rattle(0.1, seed=4)
    water = molecule("H2O")
    water.rattle(0.1, seed=5)
    write(tmp_path / "in.xyz", [crystal, water])
    out = tmp_path / "relaxed"
    argv = [str(tmp_path / "in.xyz"), "--model", str(files / "model.pt"), "--fmax", "0.05", "--max-steps", "400",
            "--device", "cpu", "--dtype", "float64", "--no-progress", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| 000 | Cu4 |" in printed and "| 001 | H2O |" in printed
    relaxed = read(out / "relaxed.extxyz", ":")
    assert len(relaxed) == 2 and (out / "summary.md").read_text().count("| yes |") == 2
    calc = TDNCalculator(files / "model.pt", default_dtype="float64")
    for before, after in zip((crystal, water), relaxed):
        assert after.info["relax_converged"]
        start = before.copy()
        start.calc = calc
        assert np.linalg.norm(start.get_forces(), axis=1).max() > 0.05  # there was something to relax
        after.calc = calc
        assert np.linalg.norm(after.get_forces(), axis=1).max() < 0.05
    assert abs(relaxed[0].get_volume() - crystal.get_volume()) > 1e-3  # the cell relaxed too
    stress = relaxed[0].get_stress(voigt=False) * relaxed[0].get_volume() / len(relaxed[0])  # the cell forces
    assert np.linalg.norm(stress, axis=1).max() < 0.05


def test_d3_dispersion_as_the_calculator_adds_it():
    """dispersion="d3bj" adds the same D3 energy, forces and stress as TDNCalculator(dispersion="d3bj")."""
    pytest.importorskip("torch_dftd", reason="D3 needs torch-dftd (the d3 extra)")
    structures = mixed()
    plain = TDNTorchSimModel(model("float64"))
    with_d3 = TDNTorchSimModel(model("float64"), dispersion="d3bj", functional="pbe")
    state = state_from_atoms(structures, with_d3)
    out, bare = with_d3(state), plain(state)
    calc = TDNCalculator(model("float64"), default_dtype="float64", dispersion="d3bj", functional="pbe")
    start = 0
    for k, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = calc
        stop = start + len(atoms)
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        assert abs(out["energy"][k].item() - energy) <= 1e-9 * abs(energy), k
        assert abs(out["energy"][k].item() - bare["energy"][k].item()) > 1e-4  # D3 is there at all
        assert np.abs(out["forces"][start:stop].numpy() - forces).max() <= 1e-9 * np.abs(forces).max(), k
        if atoms.pbc.all():
            stress = atoms.get_stress(voigt=False)
            assert np.abs(out["stress"][k].numpy() - stress).max() <= 1e-9 * np.abs(stress).max(), k
        start = stop
    with pytest.raises(ValueError, match="give dispersion='d3bj' too"):
        TDNTorchSimModel(model("float64"), functional="pbe")
