"""End-to-end training runs through the Hydra config (compose API): every backend, export, fine-tuning, exact
resume. Tiny model and data so that the whole file stays within tens of seconds on two cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import QUIET_TRAINER, SAMPLE, SAMPLE_DATA, TINY_MODEL, needs_sample

import tdn
from tdn.train import compose, train

TINY = [
    *SAMPLE_DATA,
    "batch_size=4",
    *TINY_MODEL,
    "model.lmax_hidden=1",
    "epochs=1",
    *QUIET_TRAINER,
]

pytestmark = needs_sample


def run(tmp_path: Path, *overrides: str, name: str = "run"):
    return train(compose(TINY + list(overrides)), tmp_path / name)


@pytest.mark.parametrize("tp", ["cg", "cp", "gaunt", "grid"])
def test_one_epoch_per_backend(tmp_path, tp):
    result = run(tmp_path, f"tp={tp}")
    out = result.output_dir
    for name in (
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "metrics.csv",
        "learning_curve.png",
        "test_metrics.json",
        "model.pt",
        "config.yaml",
        "statistics.json",
    ):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert {"energy_mae_meV", "forces_rmse_meV_A", "loss"} <= metrics.keys()
    assert all(v == v for v in metrics.values())  # no NaN
    model = tdn.load_model(result.model_path)
    assert model.config.tp == tp and model.config.elements == [1, 6, 7, 8]
    assert result.export_error == 0.0


def test_export_reproduces_trained_model_and_fine_tune(tmp_path):
    """The exported file gives the EMA model's energies exactly; init_from starts a new run from it."""
    from tdn.train.data import build_datamodule
    from tdn.train.run import _container

    cfg = compose(TINY + ["dtype=float64", "epochs=2"])
    result = train(cfg, tmp_path / "a")
    ckpt = torch.load(result.best_checkpoint, weights_only=False)
    ema_state = {k.removeprefix("ema.module."): v for k, v in ckpt["state_dict"].items() if k.startswith("ema.module.")}
    exported = tdn.load_model(result.model_path)
    trained = tdn.load_model(result.model_path)
    trained.load_state_dict(ema_state)  # the weights the run validated and tested with
    dm = build_datamodule(_container(cfg, "data"))
    batch = next(iter(dm.test_dataloader()))
    e_file = exported(batch, compute_forces=False)["energy"]
    e_trained = trained(batch, compute_forces=False)["energy"]
    assert torch.equal(e_file, e_trained)
    assert exported.config.dtype == "float64"

    tuned = train(
        compose(TINY + ["dtype=float64", f"init_from={result.model_path}", "model.channels=99", "finetune.e0=keep"]),
        tmp_path / "b",
    )
    model = tdn.load_model(tuned.model_path)
    assert model.config.channels == 4  # the architecture comes from the file, not from model.* (with a warning)
    assert model.config.atomic_energies == exported.config.atomic_energies  # finetune.e0=keep


def _state(path: Path) -> tuple[dict, dict, dict]:
    ckpt = torch.load(path, weights_only=False)
    return ckpt["state_dict"], ckpt["optimizer_states"][0], ckpt["plateau_scheduler"]


def test_resume_is_exact(tmp_path):
    """Two half runs (1 epoch, then resume to 2) end with exactly the weights, EMA and optimizer of one 2-epoch run."""
    # ReduceLROnPlateau (the default): a cosine schedule spans `epochs`, so a shorter first run would change it
    common = [
        "dtype=float64",
        "data.train_size=12",
        "training_module.lr_scheduler.patience=0",
        "test=false",
        "export=false",
    ]
    full = run(tmp_path, *common, "epochs=2", name="full")
    half = run(tmp_path, *common, "epochs=1", name="half")
    resumed = run(tmp_path, *common, "epochs=2", f"ckpt_path={half.last_checkpoint}", name="resumed")
    w_full, opt_full, sch_full = _state(full.last_checkpoint)
    w_res, opt_res, sch_res = _state(resumed.last_checkpoint)
    assert w_full.keys() == w_res.keys() and any(k.startswith("ema.") for k in w_full)
    for key in w_full:
        assert torch.equal(w_full[key], w_res[key]), key
    for k, state in opt_full["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_res["state"][k][name])), (k, name)
    assert opt_full["param_groups"] == opt_res["param_groups"]
    assert sch_full == sch_res and sch_full["last_epoch"] == 2
    # and the half run really stopped halfway: its weights differ
    w_half = _state(half.last_checkpoint)[0]
    assert not all(torch.equal(w_half[k], w_full[k]) for k in w_full)


def test_lightning_checkpoint_is_self_describing(tmp_path):
    """A checkpoint rebuilds its module without the data or the config (the model config is in its hparams)."""
    from tdn.train.module import PotentialModule

    result = run(tmp_path, "test=false", "export=false")
    module = PotentialModule.load_from_checkpoint(result.best_checkpoint, weights_only=False)
    assert module.model.config.elements == [1, 6, 7, 8] and module.ema is not None


def test_bf16_mixed(tmp_path):
    result = run(tmp_path, "dtype=bf16-mixed", "tp=cp")
    assert tdn.load_model(result.model_path).config.dtype == "float32"  # bf16 autocast, float32 weights
    assert all(v == v for v in result.test_metrics.values())


def test_oc20_layout_with_s2ef_metrics(tmp_path):
    """The OC20-layout sample (fixed subsurface atoms): forces loss and S2EF metrics on free atoms."""
    result = run(
        tmp_path, "data=oc20_s2ef", f"data.train={SAMPLE / 'oc20'}", "data.val=null",
        "data.val_size=4", "data.test_size=4", "data.train_size=8", "data.max_atoms=null", "data.batch_size=4",
        "data.num_workers=0", "export=false",
    )  # fmt: skip
    metrics = result.test_metrics
    assert {"s2ef_energy_mae_eV", "s2ef_forces_mae_eV_A", "s2ef_forces_cosine", "s2ef_efwt", "forces_mae_meV_A"} <= (
        metrics.keys()
    )
    assert 0.0 <= metrics["s2ef_efwt"] <= 1.0 and -1.0 <= metrics["s2ef_forces_cosine"] <= 1.0


def test_stress_training(tmp_path):
    """Periodic structures with stress labels: the stress term is trained and evaluated."""
    import ase.io
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for k in range(12):
        atoms = bulk("Cu", "fcc", a=3.6 + 0.02 * (k % 4), cubic=True)
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
        frames.append(atoms)
    path = tmp_path / "cu.xyz"
    ase.io.write(path, frames, format="extxyz")
    result = run(
        tmp_path, f"data.train={path}", "data.train_size=4", "training_module.loss.stress_weight=10.0", "export=false"
    )
    assert {"stress_mae_meV_A3", "stress_rmse_meV_A3"} <= result.test_metrics.keys()
    assert result.test_metrics["stress_mae_meV_A3"] == result.test_metrics["stress_mae_meV_A3"]  # not NaN
