"""tdn-md: the command line runs every ensemble end to end and writes its log, trajectory and thermo PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import read

import tdn
from tdn.md import ENSEMBLES, MDSettings, build_dynamics, main, read_log
from tdn.models import build_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# LangevinBAOAB says which barostat mass it derived from P_tau: information, not a problem.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Using heuristic P_mass:UserWarning"),
]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(tp="cp", preset="tiny", elements=[1, 6, 8, 29], cutoff=3.5, avg_num_neighbors=10.0)
    path = tmp_path_factory.mktemp("md_model") / "tiny.pt"
    tdn.save_model(model, path)
    return path


def test_help_lists_the_ensembles(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ENSEMBLES:
        assert name in text
    for flag in ("--model", "--timestep", "--temperature", "--traj-format", "--device", "--dtype", "--skin"):
        assert flag in text


def test_nve_run_writes_log_trajectory_and_png(model_file, structure, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        str(structure),
        "--model",
        str(model_file),
        "--steps",
        "6",
        "--log-interval",
        "2",
        "--traj-interval",
        "3",
        "--dtype",
        "float64",
        "--temperature",
        "300",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    assert "steps/s" in capsys.readouterr().out
    meta, names, values = read_log(out / "md.log")
    assert meta["ensemble"] == "nve" and meta["natoms"] == "8"
    assert names == ["step", "time[ps]", "Epot[eV]", "Ekin[eV]", "Etot[eV]", "T[K]", "steps/s"]
    assert values[:, 0].tolist() == [0, 2, 4, 6]
    assert np.allclose(values[:, 1], values[:, 0] * 1e-3)  # 1 fs steps, time in ps
    assert np.allclose(values[:, 4], values[:, 2] + values[:, 3])
    assert values[0, 5] == pytest.approx(300, rel=0.5)
    frames = read(out / "trajectory.extxyz", index=":")
    assert len(frames) == 3  # steps 0, 3, 6
    assert frames[-1].get_forces().shape == (8, 3)
    assert (out / "thermo.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("ensemble", [e for e in ENSEMBLES if e != "nve"])
def test_every_ensemble_runs(model_file, structure, tmp_path, ensemble):
    out = tmp_path / ensemble
    argv = [
        str(structure),
        "--model",
        str(model_file),
        "--ensemble",
        ensemble,
        "--steps",
        "4",
        "--log-interval",
        "2",
        "--traj-interval",
        "2",
        "--traj-format",
        "traj",
        "--no-progress",
        "--no-plot",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    _, names, values = read_log(out / "md.log")
    assert values.shape[0] == 3
    assert ("P[GPa]" in names) == ensemble.startswith("npt")
    assert len(read(out / "trajectory.traj", index=":")) == 3
    assert not (out / "thermo.png").exists()


def test_npt_needs_a_periodic_cell(model_file):
    atoms = molecule("H2O")
    atoms.calc = tdn.TDNCalculator(model_file)
    with pytest.raises(ValueError, match="periodic"):
        build_dynamics(atoms, MDSettings(ensemble="npt-iso"))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="ensemble"):
        MDSettings(ensemble="nvt")
    with pytest.raises(ValueError, match="timestep"):
        MDSettings(timestep=0)
