"""Faults a user meets when running a model, exercised as a user would (the public API and the ``tdn-md`` command
line): atoms on top of each other, MD runs that blow up, mistakes in tdn-md's input, and huge flat systems that
crash vesin's cell list. Each checks the message, and that no file the user had was changed."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixBondLength
from ase.io import write

import tdn
from tdn import TDNCalculator
from tdn.md import main, read_log
from tdn.md_checks import BlowupMonitor, MDBlowupError, UsageError
from tdn.models import build_model
from tdn.runtime import AtomsTooCloseError

pytestmark = [pytest.mark.usefixtures("one_thread")]

ELEMENTS = [1, 6, 8, 29]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(tp="cp", tp_weights="shared", preset="tiny", elements=ELEMENTS, cutoff=3.5,
                        avg_num_neighbors=10.0)
    path = tmp_path_factory.mktemp("faults_model") / "tiny.pt"
    tdn.save_model(model, path)
    return path


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Content and modification time of every file under ``root``."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def cli(structure: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [str(structure), "--model", str(model), "--no-progress", "--no-plot", "-o", str(out), *extra]


# --------------------------------------------------------------------------------------------- atoms too close


def test_atoms_on_top_of_each_other_are_named(model_file):
    atoms = molecule("H2O")
    atoms += Atoms("H", positions=[atoms.positions[1]])  # a duplicated hydrogen: atoms 1 and 3
    atoms.calc = TDNCalculator(model_file)
    with pytest.raises(AtomsTooCloseError, match=r"atoms 1 and 3 are 0 Å apart, closer than 0.1 Å"):
        atoms.get_potential_energy()  # was NaN, silently
    atoms.positions[3, 0] += 0.05
    with pytest.raises(ValueError, match=r"atoms 1 and 3 are 0.05 Å apart"):
        atoms.get_forces()
    atoms.positions[3, 0] += 0.5  # 0.55 Å: unusual, but allowed
    assert np.isfinite(atoms.get_forces()).all()


def test_an_atom_on_a_periodic_image_is_named(model_file):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.positions[1] = atoms.positions[0] + atoms.cell[0] + [0.02, 0.0, 0.0]  # on the image of atom 0
    atoms.calc = TDNCalculator(model_file, default_dtype="float64")
    with pytest.raises(AtomsTooCloseError, match=r"atoms [01] and [01] \(periodic image \[-?1, 0, 0\]\) are 0.02 Å"):
        atoms.get_forces()


def test_batch_names_the_structure_and_the_pair(model_file):
    good = bulk("Cu", "fcc", a=3.6, cubic=True)
    bad = good.copy()
    bad.positions[3] = bad.positions[2]
    calc = TDNCalculator(model_file)
    with pytest.raises(AtomsTooCloseError, match=r"^structure 2: atoms 2 and 3 are 0 Å apart"):
        calc.calculate_batch([good, good, bad, good], batch_size=2)
    results = calc.calculate_batch([good, good], batch_size=2)
    assert all(np.isfinite(r["forces"]).all() for r in results)


# --------------------------------------------------------------------------------------------- blow-ups


@pytest.mark.parametrize("engine", ["ase", "torch"])
def test_blowing_up_run_is_warned(model_file, structure, tmp_path, capsys, engine):
    out = tmp_path / "run"
    argv = cli(structure, model_file, out, "--timestep", "50", "--steps", "40", "--log-interval", "2")
    assert main([*argv, "--engine", engine]) == 0  # warned, not stopped: the run goes to its end
    err = capsys.readouterr().err
    assert re.search(r"tdn-md: warning: step \d+: temperature \S+ K is above the limit of 5000 K", err), err
    assert "--stop-on-blowup" in err and "Traceback" not in err
    _, _, values = read_log(out / "md.log")
    assert values[-1, 0] == 40 and values[:, 5].max() > 5000


@pytest.mark.parametrize("engine", ["ase", "torch"])
def test_blowing_up_run_is_stopped_on_request(model_file, structure, tmp_path, capsys, engine):
    run = ["--timestep", "50", "--steps", "40", "--log-interval", "2", "--engine", engine, "--stop-on-blowup"]
    out = tmp_path / "temperature"
    assert main(cli(structure, model_file, out, *run, "--max-temperature", "2000")) == 1
    err = capsys.readouterr().err
    assert re.search(r"tdn-md: stopped: step (\d+): temperature \S+ K is above the limit of 2000 K", err), err
    _, _, values = read_log(out / "md.log")  # written up to the step that stopped the run
    assert values[-1, 0] < 40 and values[-1, 5] > 2000 and (values[:-1, 5] <= 2000).all()

    out = tmp_path / "drift"
    assert main(cli(structure, model_file, out, *run, "--max-energy-drift", "0.05", "--max-temperature", "1e9")) == 1
    err = capsys.readouterr().err
    assert re.search(r"tdn-md: stopped: step \d+: total energy drifted by \S+ eV/atom .* limit of 0.05 eV/atom", err)


def test_non_finite_energy_always_stops_a_run():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = SinglePointCalculator(atoms, energy=float("nan"), forces=np.zeros((len(atoms), 3)))
    dyn = SimpleNamespace(nsteps=7, dt=2.0 * units.fs)
    monitor = BlowupMonitor(dyn, atoms, max_temperature=1e9, max_energy_drift=1e9, stop=False)  # warn-only limits
    with pytest.raises(MDBlowupError, match=r"step 7: the energy or the temperature is no longer finite.* 2 fs"):
        monitor()


@pytest.mark.parametrize("engine", ["ase", "torch"])
def test_atoms_colliding_during_a_run_stop_it(model_file, tmp_path, capsys, engine):
    dimer = Atoms("CuCu", positions=[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    dimer.set_velocities([[0.975 / units.fs, 0.0, 0.0], [-0.975 / units.fs, 0.0, 0.0]])  # 0.05 Å apart after 1 fs
    path = tmp_path / "dimer.extxyz"
    write(path, dimer)
    before = path.read_bytes()
    argv = cli(path, model_file, tmp_path / "run", "--init-temperature", "-1", "--steps", "5", "--log-interval", "1")
    assert main([*argv, "--engine", engine]) == 1
    err = capsys.readouterr().err
    assert re.search(r"tdn-md: stopped: step 1: atoms [01] and [01] are 0.0\d+ Å apart", err), err
    assert "Traceback" not in err and path.read_bytes() == before


# --------------------------------------------------------------------------------------------- input mistakes


@pytest.fixture
def inputs(tmp_path, structure) -> dict[str, Path]:
    """Files of a user's working directory: a good structure, a molecule, an Au structure, one with two atoms at
    the same place, a file that is not a structure."""
    files = {"structure": tmp_path / "cu.extxyz", "water": tmp_path / "water.xyz", "gold": tmp_path / "au.xyz",
             "twins": tmp_path / "twins.xyz", "garbage": tmp_path / "garbage.xyz"}  # fmt: skip
    files["structure"].write_bytes(structure.read_bytes())
    write(files["water"], molecule("H2O"))
    write(files["gold"], bulk("Au", "fcc", a=4.08))
    write(files["twins"], Atoms("CO", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    files["garbage"].write_text("this is not\na structure\n")
    bonded = bulk("Cu", "fcc", a=3.6, cubic=True)
    bonded.set_constraint(FixBondLength(0, 1))
    files["bonded"] = tmp_path / "bonded.traj"  # .traj keeps the constraint
    write(files["bonded"], bonded)
    return files


# (id, what the user typed after the good structure and options: "{name}" is a file of ``inputs`` and a leading
# file replaces the structure, the message expected)
CASES = [
    ("missing-model", ["--model", "{missing}"], r"--model \S*missing\.pt: no such file"),
    ("not-a-model", ["--model", "{water}"], r"--model \S*water\.xyz is not a tdn model file: give one written"),
    ("broken-model", ["--model", "{broken}"], r"--model \S*broken\.pt cannot be loaded as a tdn model"),
    ("missing-structure", ["{nothing}"], r"structure file \S*nothing\.xyz does not exist"),
    ("unreadable-structure", ["{garbage}"], r"cannot read structure file \S*garbage\.xyz"),
    ("index-past-the-end", ["--index", "5"], r"--index 5 is out of range: \S*cu\.extxyz has 1 frame"),
    ("index-before-the-start", ["--index", "-2"], r"--index -2 is out of range"),
    ("index-not-a-frame", ["--index", "1:3"], r"--index must be one frame number"),
    ("negative-timestep", ["--timestep", "-1"], r"--timestep must be a finite number > 0 fs, got -1.0"),
    ("nan-timestep", ["--timestep", "nan"], r"--timestep must be a finite number > 0 fs, got nan"),
    ("negative-temperature", ["--temperature", "-5"], r"--temperature must be a finite number >= 0 K"),
    ("negative-steps", ["--steps", "-1"], r"--steps must be a finite number >= 0"),
    ("negative-friction", ["--friction", "-0.1"], r"--friction must be a finite number >= 0"),
    ("zero-log-interval", ["--log-interval", "0"], r"--log-interval must be a finite number >= 1"),
    ("negative-skin", ["--skin", "-1"], r"--skin must be a finite number >= 0 Å"),
    ("zero-max-temperature", ["--max-temperature", "0"], r"--max-temperature must be a finite number > 0 K"),
    ("npt-molecule", ["{water}", "--ensemble", "npt-iso"], r"npt-iso needs a fully periodic cell, but \S*water\.xyz"),
    ("torch-nose-hoover", ["--engine", "torch", "--ensemble", "nvt-nose-hoover"], r"not available with --engine torch"),
    ("torch-constraint", ["{bonded}", "--engine", "torch"], r"the torch engine supports FixAtoms constraints only"),
    ("unknown-element", ["{gold}"], r"\S*au\.xyz \(frame -1\): element Au \(Z=79\) of atom 0"),
    ("atoms-on-top", ["{twins}"], r"\S*twins\.xyz \(frame -1\): atoms 0 and 1 are 0 Å apart"),
    ("bad-device", ["--device", "abacus"], r"--device 'abacus' is not a torch device"),
]


@pytest.mark.parametrize(("typed", "message"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_input_mistakes_end_with_one_message_and_exit_code_2(model_file, inputs, tmp_path, capsys, typed, message):
    files = {name: str(path) for name, path in inputs.items()}
    files |= {"missing": str(tmp_path / "missing.pt"), "nothing": str(tmp_path / "nothing.xyz")}
    files["broken"] = str(tmp_path / "broken.pt")
    torch.save({"format": "something else"}, files["broken"])
    extra = [word.format(**files) for word in typed]
    structure = extra.pop(0) if not extra[0].startswith("-") else files["structure"]
    out = tmp_path / "run"
    argv = [structure, "--model", str(model_file), "--steps", "2", "--no-progress", "-o", str(out), *extra]
    before = snapshot(tmp_path) | snapshot(model_file.parent)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tdn-md: error: ") and re.search(message, err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    assert snapshot(tmp_path) | snapshot(model_file.parent) == before and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(model_file, inputs, tmp_path, capsys):
    argv = cli(inputs["structure"], model_file, tmp_path / "run", "--device", "cuda")
    assert main(argv) == 2
    assert "--device cuda: no CUDA device is available here; use --device cpu" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--timestep", "abc"], ["--ensemble", "nvt"], ["--steps", "2.5"]])
def test_unparsable_options_exit_2(model_file, inputs, tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as exit_info:
        main(cli(inputs["structure"], model_file, tmp_path / "run", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "tdn-md: error: argument" in err and "Traceback" not in err


def test_debug_shows_the_traceback(model_file, inputs, tmp_path):
    argv = cli(inputs["structure"], tmp_path / "missing.pt", tmp_path / "run", "--debug")
    with pytest.raises(UsageError, match="no such file"):
        main(argv)


def test_non_empty_output_directory_needs_overwrite(model_file, inputs, tmp_path, capsys):
    out = tmp_path / "previous"
    out.mkdir()
    (out / "md.log").write_text("the log of an earlier run\n")
    (out / "thermo.png").write_bytes(b"an earlier plot")
    (out / "notes.txt").write_text("mine")
    argv = [str(inputs["structure"]), "--model", str(model_file), "--steps", "2", "--no-progress", "-o", str(out)]
    before = snapshot(tmp_path)
    assert main([*argv, "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"output directory \S*previous is not empty \(md\.log, notes\.txt, thermo\.png\): choose "
                     r"another -o, or pass --overwrite", err), err  # fmt: skip
    assert snapshot(tmp_path) == before

    assert main([*argv, "--no-plot", "--overwrite"]) == 0
    assert read_log(out / "md.log")[2][:, 0].tolist() == [0]  # the new run's log (one line at step 0)
    assert not (out / "thermo.png").exists()  # the earlier run's plot does not pass for this run's
    assert (out / "notes.txt").read_text() == "mine"  # what is not a run's output stays

    (tmp_path / "a-file").write_text("x")
    assert main(cli(inputs["structure"], model_file, tmp_path / "a-file")) == 2
    assert "output directory" in capsys.readouterr().err and (tmp_path / "a-file").read_text() == "x"


# --------------------------------------------------------------------------------------------- neighbour list


def test_huge_flat_systems_do_not_kill_the_process():
    """vesin's cell list dies of SIGFPE on flat systems spanning ~1e6 Å (and crawls on mixed-periodic ones with a
    far atom): run in a child process, so that a crash fails this test instead of killing pytest. Molecules, slabs
    and wires are split into pieces vesin handles and match ASE; a periodic cell it cannot handle is refused with a
    message; a periodic cell on the edge of its limit still runs."""
    script = textwrap.dedent(
        """
        import numpy as np
        import torch
        from ase import Atoms
        from ase.neighborlist import neighbor_list as ase_neighbor_list
        from tdn.data.neighbors import NeighborListError, neighbor_list, neighbor_list_device

        as_set = lambda i, j, s: set(zip(np.asarray(i).tolist(), np.asarray(j).tolist(),
                                         map(tuple, np.asarray(s).round().astype(int).tolist())))
        cases = [
            Atoms("CO", positions=[[0, 0, 0], [1e6, 0, 0]]),
            Atoms("COCO", positions=[[0, 0, 0], [1.1, 0, 0], [1e6, 0, 0], [1e6, 1.2, 0]]),
            Atoms("COH", positions=[[0, 0, 0], [6e4, 6e4, 0], [6e4, 6e4 + 1.0, 0]]),
            Atoms("CO", positions=[[0, 0, 0], [1.0, 3e3, 3e3]], cell=[10, 10, 10], pbc=[True, False, False]),
            Atoms("COH", positions=[[0, 0, 0], [1, 1, 1], [2, 2, 3e4]], cell=[10, 10, 10], pbc=[True, True, False]),
            Atoms("C4", positions=np.random.default_rng(0).random((4, 3)) * [1000, 1000, 8], cell=[1000, 1000, 8],
                  pbc=True),  # 200 x 200 x 1 cells of 5 Å: rescaled to 1 along c, which vesin still runs
        ]
        for atoms in cases:
            cutoff = 5.0 if len(atoms) == 4 and atoms.pbc.all() else 3.5
            ref = as_set(*ase_neighbor_list("ijS", atoms, cutoff))
            mine = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
            dev = neighbor_list_device(torch.tensor(atoms.positions), torch.tensor(atoms.cell.array), atoms.pbc,
                                       cutoff)
            assert as_set(*mine) == ref == as_set(*dev), (atoms, as_set(*mine), ref)
        n = 200000  # a dense chain 5e5 Å long: ASE cannot build it (memory), the count is known
        chain = neighbor_list(np.c_[np.arange(n) * 2.5, np.zeros((n, 2))], np.zeros((3, 3)), False, 3.5)
        assert len(chain[0]) == 2 * (n - 1) and (np.abs(chain[0] - chain[1]) == 1).all()
        for cell in ([[1e6, 0, 0], [0, 3, 0], [0, 0, 3]], [2000, 2000, 8]):
            atoms = Atoms("CO", positions=[[0, 0, 0], [1.0, 1.0, 2.0]], cell=cell, pbc=True)
            try:
                neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 5.0)
            except NeighborListError as err:
                assert "SIGFPE" in str(err) and "not supported" in str(err), err
            else:
                raise AssertionError(f"no error for {cell}")
        print("same as ASE")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode} (-8: SIGFPE): {result.stderr[-3000:]}"
    assert result.stdout.strip() == "same as ASE"
