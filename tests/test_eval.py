"""``tdn-eval``: an exported model evaluated on a dataset; the JSON metrics against numbers computed here directly
from ``model(graph)``, the bundled sample in two formats, and the errors a user gets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols
from ase.io import read, write
from helpers import SAMPLE, ase_graph, needs_sample, small_model

import tdn
from tdn.evaluate import compose_eval, evaluate, main

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A small float64 model (untrained: the numbers only have to be reproduced) with the sample's elements."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    model = small_model(seed=2, elements=[1, 6, 7, 8, 29, 78], atomic_energies=[-1.0, -5.0, -4.0, -3.0, -2.0, -6.0])
    tdn.save_model(model, path)
    return path


@pytest.fixture(scope="module")
def handmade(tmp_path_factory) -> Path:
    """Seven rattled molecules with made-up energies and forces."""
    rng = np.random.default_rng(0)
    frames = []
    for k, name in enumerate(["H2O", "CH4", "NH3", "CO2", "C2H4", "HCN", "CH3OH"]):
        atoms = molecule(name)
        atoms.rattle(0.05, seed=k)
        forces = rng.normal(scale=0.5, size=(len(atoms), 3))
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal(-10.0, 3.0)), forces=forces)
        frames.append(atoms)
    path = tmp_path_factory.mktemp("data") / "handmade.xyz"
    write(path, frames, format="extxyz")
    return path


def direct_metrics(model, frames) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The generic metrics and per-element force errors from ``model(graph)`` one structure at a time (ASE's
    neighbour list, numpy sums): nothing of the data module, the batching or tdn's metric classes."""
    e_err, e_pa_err, f_err, numbers = [], [], [], []
    for atoms in frames:
        out = model(ase_graph(atoms, model.config.cutoff), compute_forces=True)
        e_err.append(float(out["energy"][0]) - atoms.get_potential_energy())
        e_pa_err.append(e_err[-1] / len(atoms))
        f_err.append(out["forces"].detach().numpy() - atoms.get_forces())
        numbers.append(atoms.numbers)
    e, e_pa, f, z = np.array(e_err), np.array(e_pa_err), np.concatenate(f_err), np.concatenate(numbers)
    metrics = {
        "energy_mae_meV": 1e3 * np.abs(e).mean(),
        "energy_rmse_meV": 1e3 * np.sqrt((e**2).mean()),
        "energy_per_atom_mae_meV": 1e3 * np.abs(e_pa).mean(),
        "energy_per_atom_rmse_meV": 1e3 * np.sqrt((e_pa**2).mean()),
        "forces_mae_meV_A": 1e3 * np.abs(f).mean(),
        "forces_rmse_meV_A": 1e3 * np.sqrt((f**2).mean()),
    }
    per_element = {
        chemical_symbols[s]: {
            "num_atoms": int((z == s).sum()),
            "forces_mae_meV_A": 1e3 * np.abs(f[z == s]).mean(),
            "forces_rmse_meV_A": 1e3 * np.sqrt((f[z == s] ** 2).mean()),
        }
        for s in np.unique(z)
    }
    return metrics, per_element


def test_json_metrics_equal_direct_computation(tmp_path, model_path, handmade):
    result = evaluate(
        compose_eval(
            [f"data.test={handmade}", f"out={tmp_path / 'eval'}", "batch_size=3", "progress=false"], model_path
        )
    )
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    metrics, per_element = direct_metrics(tdn.load_model(model_path), read(handmade, ":"))
    assert report["num_structures"] == 7 and report["num_atoms"] == sum(len(a) for a in read(handmade, ":"))
    assert report["metrics"].keys() == metrics.keys()  # the generic family; no stress labels, no stress metrics
    for key, value in metrics.items():
        assert report["metrics"][key] == pytest.approx(value, rel=1e-9), key
    assert report["per_element"].keys() == per_element.keys() == {"H", "C", "N", "O"}
    for symbol, row in per_element.items():
        assert report["per_element"][symbol]["num_atoms"] == row["num_atoms"]
        for key in ("forces_mae_meV_A", "forces_rmse_meV_A"):
            assert report["per_element"][symbol][key] == pytest.approx(row[key], rel=1e-9), (symbol, key)
    assert report["dtype"] == "float64" and report["device"] == "cpu" and report["data"]["split"] == "test"
    for name in ("parity_energy.png", "parity_forces.png"):
        assert (tmp_path / "eval" / name).read_bytes()[:8] == PNG
    assert result.metrics == report["metrics"]


@needs_sample
def test_bundled_sample_splits_and_formats(tmp_path, model_path, capsys):
    main([str(model_path), "data=sample", "split=test", f"out={tmp_path / 'a'}", "progress=false"])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert report["num_structures"] == 16  # the 10% test part of the sample's 160 structures, as tdn-train cuts it
    assert {"Cu", "Pt", "H", "O"} <= report["per_element"].keys()
    assert "forces_mae_meV_A" in printed and str(tmp_path / "a" / "metrics.json") in printed

    main([str(model_path), "data=oc20_s2ef", f"data.test={SAMPLE / 'oc20'}", f"out={tmp_path / 'b'}", "progress=false",
          "data.num_workers=0"])  # fmt: skip
    report = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert report["num_structures"] == 80
    assert {"s2ef_energy_mae_eV", "s2ef_forces_cosine", "s2ef_efwt", "energy_mae_meV"} <= report["metrics"].keys()
    assert report["data"]["format"] == "oc20-lmdb"


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value.code, capsys.readouterr().err


def test_user_errors(tmp_path, model_path, handmade, capsys):
    code, err = run_cli([str(tmp_path / "nope.pt"), f"data.test={handmade}"], capsys)
    assert (code, err.strip()) == (2, f"tdn-eval: error: no model file at '{tmp_path / 'nope.pt'}'")
    code, err = run_cli([str(model_path)], capsys)
    assert code == 2 and err.startswith("tdn-eval: configuration error: split=test: give the files to evaluate")
    code, err = run_cli([str(model_path), f"data.test={handmade}", "batchsize=4"], capsys)
    assert (code, err.strip()) == (2, "tdn-eval: configuration error: unknown option 'batchsize' (tdn-eval --help "
                                      "lists the options)")  # fmt: skip
    code, err = run_cli([str(model_path), "data=nope"], capsys)
    assert code == 2 and "Could not find 'data/nope' Available options in 'data': extxyz" in err
    code, err = run_cli([str(model_path), f"data.test={tmp_path / 'missing.xyz'}"], capsys)
    assert code == 2 and "data.test: no such file or directory" in err
    small = tmp_path / "h2.pt"
    tdn.save_model(small_model(elements=[1]), small)
    code, err = run_cli([str(small), f"data.test={handmade}"], capsys)
    assert code == 2 and "element(s) C (Z=6), N (Z=7), O (Z=8) appear in the evaluated data" in err
    if not torch.cuda.is_available():
        code, err = run_cli([str(model_path), f"data.test={handmade}", "device=cuda"], capsys)
        assert code == 2 and "no CUDA device is available here; use device=cpu" in err
    assert len([line for line in err.splitlines() if line]) == 1


def test_help(capsys):
    main(["--help"])
    assert capsys.readouterr().out.startswith("usage: tdn-eval MODEL [OVERRIDE ...]")
