"""Fine-tuning an exported model (``init_from`` and the ``finetune`` section): E0 refit, new elements, frozen parts,
a lower learning rate for pretrained weights, replay data, and the architecture check."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from helpers import MOLECULES, QUIET_TRAINER, needs_sample

import tdn
from tdn.data import atoms_to_graph, collate
from tdn.train import ConfigError, compose, train
from tdn.train.data import build_datamodule
from tdn.train.finetune import RowSteps, add_elements, plan_parameters
from tdn.train.replay import ReplayBatchSampler
from tdn.train.run import build_model_and_plan, finetune_section

pytestmark = [needs_sample, pytest.mark.usefixtures("one_thread")]

ARCH = dict(tp="cp", lmax=1, lmax_hidden=1, channels=4, correlation=2, num_bessel=4, radial_mlp=[8], readout_mlp=4)
E0 = {1: -13.6, 6: -1030.0, 7: -1480.0, 8: -2040.0}
TINY = [
    "data=extxyz",
    "data.train_size=12",
    "data.val_size=4",
    "data.test_size=4",
    "batch_size=4",
    "dtype=float64",
    *(f"model.{k}={v}" for k, v in ARCH.items() if k not in ("tp", "radial_mlp")),
    "model.radial_mlp=[8]",
    "epochs=1",
    *QUIET_TRAINER,
]


def pretrained(path: Path, elements: list[int], seed: int = 1) -> Path:
    """An (untrained) model of the config's architecture, exported to ``path``."""
    torch.manual_seed(seed)
    model = tdn.models.build_model(
        **ARCH, elements=elements, atomic_energies={z: E0[z] for z in elements}, scale=0.7, shift=0.1, dtype="float64"
    )
    tdn.save_model(model.eval(), path)
    return path


def predict(model, frames) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate([atoms_to_graph(a, 5.0, dtype=torch.float64) for a in frames])
    out = model(batch, compute_forces=True)
    return out["energy"].detach(), out["forces"].detach()


def labelled_by(model, frames, per_atom_shift: float) -> list:
    """``frames`` labelled with the model's energies (+ ``per_atom_shift`` eV per atom) and forces."""
    energy, forces = predict(model, frames)
    sizes = [len(a) for a in frames]
    for atoms, e, f in zip(frames, energy.tolist(), torch.split(forces, sizes)):
        atoms.calc = SinglePointCalculator(atoms, energy=e + per_atom_shift * len(atoms), forces=f.numpy())
    return frames


@pytest.fixture(scope="module")
def shifted(tmp_path_factory) -> tuple[Path, Path, list]:
    """A model with H, C, N, O and 20 sample molecules labelled by it, shifted by +1 eV per atom."""
    root = tmp_path_factory.mktemp("shifted")
    model_path = pretrained(root / "model.pt", [1, 6, 7, 8])
    frames = read(MOLECULES, ":20")
    data = root / "shifted.xyz"
    write(data, labelled_by(tdn.load_model(model_path), frames, 1.0), format="extxyz")
    return model_path, data, read(data, ":")


def build(overrides: list[str], tmp_path: Path):
    cfg = compose(TINY + overrides)
    datamodule = build_datamodule(dict(cfg.data), stats_file=tmp_path / "statistics.json")
    return cfg, datamodule, *build_model_and_plan(cfg, datamodule)


# ------------------------------------------------------------------------------------------------------ E0s
def test_refit_e0_absorbs_a_per_atom_shift_with_the_weights_untouched(tmp_path, shifted):
    model_path, data, frames = shifted
    original = tdn.load_model(model_path)
    _, _, model, _ = build([f"data.train={data}", f"init_from={model_path}"], tmp_path)
    before, after = original.state_dict(), model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["atomic_energies"]
    assert model.config.atomic_energies == pytest.approx([E0[z] + 1.0 for z in (1, 6, 7, 8)], abs=1e-9)
    e_old, f_old = predict(original, frames)
    e_new, f_new = predict(model.eval(), frames)
    natoms = torch.tensor([len(a) for a in frames], dtype=torch.float64)
    assert torch.allclose(e_new, e_old + natoms, rtol=0, atol=1e-8)  # every structure, not only the training split
    assert torch.equal(f_new, f_old)
    assert model.config.e0_kind == "fitted"


def test_keep_e0(tmp_path, shifted):
    model_path, data, _ = shifted
    _, _, model, _ = build([f"data.train={data}", f"init_from={model_path}", "finetune.e0=keep"], tmp_path)
    assert model.config.atomic_energies == [E0[z] for z in (1, 6, 7, 8)]


# ------------------------------------------------------------------------------------------------------ elements
def test_new_elements_are_refused_unless_asked_for(tmp_path):
    model_path = pretrained(tmp_path / "hco.pt", [1, 6, 8])
    with pytest.raises(ConfigError, match=r"N \(Z=7\) appear in the training data .* finetune.new_elements=true"):
        build([f"data.train={MOLECULES}", f"init_from={model_path}"], tmp_path)


def test_add_elements_keeps_every_pretrained_row():
    torch.manual_seed(0)
    model = tdn.models.build_model(**ARCH, elements=[1, 8], atomic_energies=[-1.0, -2.0], dtype="float64")
    grown, rows = add_elements(model, [6, 29], seed=3)
    assert grown.config.elements == [1, 6, 8, 29] and grown.config.atomic_energies == [-1.0, 0.0, -2.0, 0.0]
    assert rows.keys() == {"embedding.weight", "self_connections.1.weight", "products.0.basis.weight",
                           "products.1.basis.weight"}  # fmt: skip
    old, new = model.state_dict(), grown.state_dict()
    for key in old:
        if key in rows or key == "atomic_energies":  # per-element tensors: pretrained rows copied by element
            assert torch.equal(new[key][[0, 2]], old[key]), key
        else:
            assert torch.equal(new[key], old[key]), key
    again, _ = add_elements(model, [6, 29], seed=3)  # new rows come from the seed alone
    assert torch.equal(again.embedding.weight, grown.embedding.weight)


# ------------------------------------------------------------------------------------------------------ training
def test_frozen_parts_stay_bit_identical_and_a_new_element_trains(tmp_path):
    model_path = pretrained(tmp_path / "hco.pt", [1, 6, 8])
    result = train(
        compose(
            TINY
            + [
                f"data.train={MOLECULES}",
                f"init_from={model_path}",
                "finetune.new_elements=true",
                "finetune.freeze=[embedding,interactions.0]",
                "finetune.pretrained_lr_factor=0.1",
                "training_module.optimizer.lr=0.01",
                "training_module.optimizer.weight_decay=0.1",  # must not move frozen values either
                "test=false",
            ]
        ),
        tmp_path / "run",
    )
    original = tdn.load_model(model_path)
    start, _ = add_elements(original, [7], seed=0)  # what fine-tuning started from (seed=0 of the config)
    ckpt = torch.load(result.last_checkpoint, weights_only=False)
    trained = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    exported = tdn.load_model(result.model_path).state_dict()  # the EMA weights
    old_rows = [0, 1, 3]  # H, C, O in [1, 6, 7, 8]
    for weights in (trained, exported):
        assert torch.equal(weights["embedding.weight"][old_rows], original.embedding.weight)
        assert not torch.equal(weights["embedding.weight"][2], start.embedding.weight[2])  # N's row trained
        frozen = [k for k in original.state_dict() if k.startswith("interactions.0.")]
        assert frozen and all(torch.equal(weights[k], original.state_dict()[k]) for k in frozen)
        assert not torch.equal(weights["readouts.1.net.0.weight"], original.readouts[1].net[0].weight)
        product = weights["products.0.basis.weight"]  # not frozen: pretrained rows move too
        assert not torch.equal(product[old_rows], original.products[0].basis.weight)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert {g["lr_factor"] for g in groups} == {0.1, 1.0}  # pretrained tensors / tensors with a new element's rows
    assert [g["lr"] for g in groups] == [pytest.approx(1e-2 * g["lr_factor"]) for g in groups]


def test_row_steps_equal_a_per_row_learning_rate():
    """A scaled step on rows is the step of a parameter group with ``factor * lr`` (Adam, weight decay)."""
    torch.manual_seed(0)
    target = torch.randn(3, 2)
    whole = torch.nn.Parameter(torch.randn(3, 2))
    split = [torch.nn.Parameter(whole.detach()[k : k + 1].clone()) for k in range(3)]
    opt_a = torch.optim.AdamW([whole], lr=0.1, weight_decay=0.5)
    opt_b = torch.optim.AdamW([{"params": [split[0]], "lr": 0.05}, {"params": [split[1]], "lr": 0.0},
                               {"params": [split[2]]}], lr=0.1, weight_decay=0.5)  # fmt: skip
    RowSteps([(whole, torch.tensor([0]), 0.5), (whole, torch.tensor([1]), 0.0)]).attach(opt_a)
    frozen = whole.detach()[1].clone()
    for _ in range(5):
        for opt, value in ((opt_a, whole), (opt_b, torch.cat(split))):
            opt.zero_grad()
            ((value - target) ** 3).sum().backward()
            opt.step()
    assert torch.allclose(whole.detach(), torch.cat(split).detach(), rtol=0, atol=1e-6)
    assert torch.equal(whole.detach()[1], frozen) and whole.grad[1].abs().sum() == 0


def test_unknown_freeze_name_lists_the_valid_ones():
    model = tdn.models.build_model(**ARCH, elements=[1, 8])
    with pytest.raises(ConfigError) as info:
        plan_parameters(model, ["embeddings"])
    text = str(info.value)
    assert "finetune.freeze: no parameter of the model is 'embeddings'" in text
    assert "embedding, interactions, interactions.0, interactions.1, self_connections" in text
    with pytest.raises(ConfigError, match="leaves no parameter to train"):
        plan_parameters(model, ["embedding", "interactions", "self_connections", "products", "readouts"])


def test_finetune_options_need_init_from(tmp_path):
    with pytest.raises(ConfigError, match="finetune.freeze fine-tune"):
        train(compose(TINY + [f"data.train={MOLECULES}", "finetune.freeze=[embedding]"]), tmp_path / "a")
    with pytest.raises(ConfigError, match="finetune.replay.data: no such file"):
        train(compose(TINY + [f"data.train={MOLECULES}", "finetune.replay.data=/nonexistent.xyz"]), tmp_path / "b")


# ------------------------------------------------------------------------------------------------------ architecture
def test_architecture_mismatch_warns_or_is_refused(tmp_path, shifted, caplog):
    model_path, data, _ = shifted
    common = [f"data.train={data}", f"init_from={model_path}", "model.channels=99", "model.lmax=2"]
    with caplog.at_level(logging.WARNING, logger="tdn.train"):
        _, _, model, _ = build(common, tmp_path)
    assert model.config.channels == 4 and model.config.lmax == 1  # the file's architecture
    warned = [r.getMessage() for r in caplog.records if "architecture" in r.getMessage()]
    assert len(warned) == 1 and "lmax (file 1, config 2), channels (file 4, config 99)" in warned[0]
    with pytest.raises(ConfigError, match=r"another architecture than model\.\*: lmax \(file 1, config 2\), channels"):
        build([*common, "finetune.architecture_mismatch=error"], tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tdn.train"):
        build([f"data.train={data}", f"init_from={model_path}", "finetune.architecture_mismatch=error"], tmp_path)
    assert not [r for r in caplog.records if "architecture" in r.getMessage()]  # the same architecture: no message
    with pytest.raises(ConfigError, match="cutoff 4.0 Å but the model of init_from was built for 5.0 Å: set cutoff"):
        build([f"data.train={data}", f"init_from={model_path}", "cutoff=4.0"], tmp_path)


# ------------------------------------------------------------------------------------------------------ replay
def test_replay_draws_a_fraction_per_epoch(tmp_path, shifted):
    _, data, _ = shifted
    cfg = compose(TINY + [f"data.train={MOLECULES}", f"finetune.replay.data={data}", "finetune.replay.fraction=0.5"])
    from tdn.train.replay import ReplayOptions

    datamodule = build_datamodule(dict(cfg.data))
    datamodule.add_replay(ReplayOptions.from_config(finetune_section(cfg)["replay"]))
    loader = datamodule.train_dataloader()
    sampler = loader.batch_sampler
    assert isinstance(sampler, ReplayBatchSampler) and (sampler.num_train, sampler.num_replay) == (12, 20)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        positions = sorted(k for batch in sampler for k in batch)
        assert positions[:12] == list(range(12)) and len(positions) == 18  # all of train + 6 replay structures
        assert len(sampler) == 5 and all(len(b) <= 4 for b in sampler)
        epochs.append(positions[12:])
        assert len(set(epochs[-1])) == 6 and min(epochs[-1]) >= 12  # drawn without replacement
    assert epochs[0] != epochs[1] != epochs[2]  # drawn again every epoch ...
    sampler.set_epoch(1)
    assert sorted(k for batch in sampler for k in batch)[12:] == epochs[1]  # ... from (seed, epoch): resumable
    batch = next(iter(loader))
    assert batch.num_graphs <= 4
    capped = ReplayBatchSampler(np.full(32, 3), None, 12, 20, 6, batch_size=None, max_atoms=10, seed=0)
    for epoch in range(4):
        capped.set_epoch(epoch)
        assert len(list(capped)) == len(capped) == 6  # 18 structures of 3 atoms, 3 per batch
