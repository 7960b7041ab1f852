"""Committees: TDNCalculator([...]) gives the mean and the variances of its members on one shared graph, refuses
members that cannot share it; tdn-md logs the force spread and stops or writes uncertain frames; tdn-train trains a
committee in one command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.io import read
from ase.md.verlet import VelocityVerlet
from helpers import SAMPLE_DATA, TINY_MODEL, needs_sample, small_model
from syncs import count_syncs

import tdn
from tdn import TDNCalculator
from tdn.md import initialise_velocities, main, read_log
from tdn.md_spread import SPREAD_COLUMN, UNCERTAIN_NAME, SpreadMonitor, SpreadStop

ELEMENTS = [1, 6, 8, 13, 29]
CUTOFF = 3.5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def members():
    return [small_model(seed, elements=ELEMENTS, cutoff=CUTOFF) for seed in range(3)]


@pytest.fixture(scope="module")
def member_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("committee")
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = tdn.models.build_model(tp="cp", tp_weights="shared", preset="tiny", elements=[29], cutoff=3.5,
                                       avg_num_neighbors=10.0)
        paths.append(folder / f"m{seed}.pt")
        tdn.save_model(model, paths[-1])
    return paths


def crystal():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.numbers[::3] = 13
    atoms.rattle(0.08, seed=1)
    return atoms


@pytest.mark.parametrize("make", [crystal, lambda: molecule("CH3CH2OH")], ids=["periodic", "molecule"])
def test_committee_gives_the_mean_and_variances_of_its_members(members, make):
    atoms = make()
    singles = []
    for model in members:
        single = atoms.copy()
        single.calc = TDNCalculator(model, default_dtype="float64")
        singles.append(single)
    energy = np.array([s.get_potential_energy() for s in singles])
    forces = np.stack([s.get_forces() for s in singles])
    assert energy.var() > 1e-6 and forces.var(axis=0).max() > 1e-6, "the members must disagree"
    atoms.calc = calc = TDNCalculator(members, default_dtype="float64")
    assert atoms.get_potential_energy() == pytest.approx(energy.mean(), abs=1e-10)
    assert np.abs(atoms.get_forces() - forces.mean(axis=0)).max() < 1e-10
    energies = np.stack([s.get_potential_energies() for s in singles]).mean(axis=0)
    assert np.abs(atoms.get_potential_energies() - energies).max() < 1e-10
    assert np.abs(calc.get_property("energy_comm", atoms) - energy).max() < 1e-10
    assert calc.get_property("energy_var", atoms) == pytest.approx(energy.var(), abs=1e-12)
    assert np.abs(calc.get_property("forces_comm", atoms) - forces).max() < 1e-10
    forces_var = calc.get_property("forces_var", atoms)
    assert np.abs(forces_var - forces.var(axis=0)).max() < 1e-12
    spread = np.sqrt(((forces - forces.mean(axis=0)) ** 2).sum(axis=2).mean(axis=0)).max()  # max_k rms |dF_k|
    assert calc.get_property("force_spread", atoms) == pytest.approx(spread, rel=1e-10)
    if atoms.pbc.all():
        stress = np.stack([s.get_stress() for s in singles])
        assert np.abs(atoms.get_stress() - stress.mean(axis=0)).max() < 1e-10
        assert np.abs(calc.get_property("stress_comm", atoms) - stress).max() < 1e-10
        assert np.abs(calc.get_property("stress_var", atoms) - stress.var(axis=0)).max() < 1e-12
        stresses = np.stack([s.get_stresses() for s in singles]).mean(axis=0)
        assert np.abs(atoms.get_stresses() - stresses).max() < 1e-10
    else:
        with pytest.raises(PropertyNotImplementedError):
            calc.get_property("stress_var", atoms)


def test_members_share_one_graph_and_one_transfer(members, monkeypatch):
    atoms = crystal()
    calc = TDNCalculator(members, default_dtype="float64", skin=0.5)
    calc.exact_pairs = False  # the accelerator's path (the CPU default selects the pairs within the cutoff)
    atoms.calc = calc
    seen = []
    for model in members:
        node_energies = model.node_energies
        monkeypatch.setattr(model, "node_energies",
                            lambda *args, f=node_energies: seen.append(args) or f(*args))  # fmt: skip
    atoms.get_forces()
    atoms.positions += 0.02
    with count_syncs() as syncs:
        atoms.get_forces()
    assert syncs.count <= 1, syncs.events
    assert calc.neighbor_list_builds == 1 and len(seen) == 2 * len(members)
    assert all(args[0] is seen[-1][0] and args[2] is seen[0][2] for args in seen[-len(members) :])  # pos, edges
    assert all(args[1] is seen[0][1] for args in seen)  # one element-index tensor: the elements agree


def test_element_order_may_differ(members):
    atoms = crystal()
    reordered = small_model(7, elements=ELEMENTS[::-1], cutoff=CUTOFF)
    atoms.calc = TDNCalculator([members[0], reordered], default_dtype="float64")
    single = atoms.copy()
    single.calc = TDNCalculator(reordered, default_dtype="float64")
    assert atoms.calc.get_property("energy_comm", atoms)[1] == pytest.approx(single.get_potential_energy(), abs=1e-10)


def test_members_that_cannot_share_a_graph_are_refused(members, tmp_path):
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    tdn.save_model(members[0], paths[0])
    tdn.save_model(small_model(1, elements=ELEMENTS, cutoff=4.0), paths[1])
    with pytest.raises(ValueError, match=r"share the cutoff.*a\.pt\) has 3\.5 Å, model 1 \(.*b\.pt\) 4\.0 Å"):
        TDNCalculator(paths, default_dtype="float64")
    other = small_model(1, elements=[1, 6, 8, 13, 79], cutoff=CUTOFF)
    with pytest.raises(ValueError, match=r"same elements.*only in the first: \[29\], only in model 1: \[79\]"):
        TDNCalculator([members[0], other], default_dtype="float64")
    with pytest.raises(ValueError, match="empty list"):
        TDNCalculator([])


def test_one_model_in_a_list_is_a_plain_calculator(members):
    atoms = crystal()
    atoms.calc = TDNCalculator([members[0]], default_dtype="float64")
    single = atoms.copy()
    single.calc = TDNCalculator(members[0], default_dtype="float64")
    assert atoms.get_potential_energy() == single.get_potential_energy()
    assert "forces_var" not in atoms.calc.results and atoms.calc.model is members[0]


def test_code_running_one_bare_model_refuses_a_committee(members):
    calc = TDNCalculator(members, default_dtype="float64")
    with pytest.raises(ValueError, match="committee of 3 models"):
        calc.calculate_batch([crystal()])
    assert calc.e0_kind == members[0].config.e0_kind


# ---------------------------------------------------------------------------------------------- MD


def test_spread_monitor_writes_or_stops(members, tmp_path):
    atoms = crystal()
    atoms.calc = TDNCalculator(members, default_dtype="float64")
    initialise_velocities(atoms, 300, seed=0)
    dyn = VelocityVerlet(atoms, timestep=1.0)
    writer = SpreadMonitor(atoms, threshold=1e-9, action="write", path=tmp_path / "w.extxyz")
    logger = SpreadMonitor(atoms)  # no threshold: the column only
    dyn.attach(writer, 2, dyn)
    dyn.run(4)
    frames = read(tmp_path / "w.extxyz", index=":")
    assert [f.info["step"] for f in frames] == [0, 2, 4] and writer.frames == 3
    assert frames[-1].info["force_spread"] == pytest.approx(logger.values()[0])
    assert np.allclose(frames[-1].positions, atoms.positions)
    stopper = SpreadMonitor(atoms, threshold=1e-9, action="stop", path=tmp_path / "s.extxyz")
    with pytest.raises(SpreadStop, match=r"step 4: .* above --max-force-spread 1e-09 eV/Å"):
        stopper(dyn)
    assert len(read(tmp_path / "s.extxyz", index=":")) == 1
    high = SpreadMonitor(atoms, threshold=1e3, action="stop", path=tmp_path / "none.extxyz")
    high(dyn)
    assert not (tmp_path / "none.extxyz").exists()


def md_args(structure, files, out, *extra):
    return [str(structure), "--model", str(files[0]), "--committee", *map(str, files[1:]), "--steps", "4",
            "--log-interval", "2", "--dtype", "float64", "--no-progress", "--no-plot", "-o", str(out),
            *extra]  # fmt: skip


def test_md_logs_the_spread_and_writes_uncertain_frames(member_files, structure, tmp_path):
    out = tmp_path / "write"
    assert main(md_args(structure, member_files, out, "--max-force-spread", "1e-9", "--on-spread", "write")) == 0
    _, names, values = read_log(out / "md.log")
    assert names[-1] == SPREAD_COLUMN and values.shape[0] == 3 and (values[:, -1] > 0).all()
    frames = read(out / UNCERTAIN_NAME, index=":")
    assert [f.info["step"] for f in frames] == [0, 2, 4]
    assert np.allclose([f.info["force_spread"] for f in frames], values[:, -1], rtol=1e-5)


def test_md_stops_on_a_large_spread(member_files, structure, tmp_path, capsys):
    out = tmp_path / "stop"
    assert main(md_args(structure, member_files, out, "--max-force-spread", "1e-9")) == 1
    assert "stopped: step 0: the committee's force spread" in capsys.readouterr().err
    assert len(read(out / UNCERTAIN_NAME, index=":")) == 1
    assert read_log(out / "md.log")[2].shape[0] == 1


def test_md_committee_options_are_checked(member_files, structure, tmp_path, capsys):
    plain = [str(structure), "--model", str(member_files[0]), "-o", str(tmp_path / "x")]
    assert main([*plain, "--max-force-spread", "0.1"]) == 2
    assert "--max-force-spread needs a committee" in capsys.readouterr().err
    assert main([*plain, "--committee", str(member_files[1]), "--engine", "torch"]) == 2
    assert "--committee runs with --engine ase only" in capsys.readouterr().err
    assert main([*plain, "--committee", str(tmp_path / "missing.pt")]) == 2
    assert "--committee" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- training

TINY_TRAINING = [
    *SAMPLE_DATA,
    "batch_size=4",
    *TINY_MODEL,
    "model.lmax_hidden=1",
    "epochs=1",
    "loggers=[csv]",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
]


@needs_sample
def test_train_a_committee_in_one_command(tmp_path):
    from tdn.train import compose, train
    from tdn.train.committee import committee_models

    result = train(compose([*TINY_TRAINING, "committee.size=2", "seed=3"]), tmp_path / "run")
    listing = json.loads((tmp_path / "run" / "committee.json").read_text())
    assert listing["models"] == ["member_0/model.pt", "member_1/model.pt"] and listing["seeds"] == [3, 4]
    assert [r.output_dir.name for r in result.members] == ["member_0", "member_1"]
    paths = committee_models(tmp_path / "run")
    assert paths == result.model_paths and all(p.is_file() for p in paths)
    first, second = (tdn.load_model(p) for p in paths)
    assert not torch.equal(first.embedding.weight, second.embedding.weight)  # different seeds
    splits = [json.loads((r.output_dir / "statistics.json").read_text()) for r in result.members]
    assert splits[0] == splits[1]  # the same training split
    atoms = molecule("CH3CH2OH")
    atoms.calc = TDNCalculator(paths, default_dtype="float64")
    assert atoms.calc.get_property("force_spread", atoms) > 0


def test_committee_size_is_checked(tmp_path):
    from tdn.train import ConfigError, compose, train

    with pytest.raises(ConfigError, match="committee.size must be an integer >= 1"):
        train(compose([*TINY_TRAINING, "committee.size=two"]), tmp_path / "run")
    with pytest.raises(ConfigError, match="ckpt_path resumes one run"):
        train(compose([*TINY_TRAINING, "committee.size=2", f"ckpt_path={tmp_path}/x.ckpt"]), tmp_path / "run")
