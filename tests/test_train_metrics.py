"""Metrics, losses, EMA and schedules against values computed by hand (no training)."""

from __future__ import annotations

import math

import pytest
import torch
from torch_geometric.data import Batch, Data

from tdn.train.ema import EMA
from tdn.train.losses import LossConfig, PotentialLoss
from tdn.train.metrics import GenericMetrics, MeanLoss, MetricSet, PubChemQCRMetrics, S2EFMetrics
from tdn.train.optim import build_optimizer, build_scheduler, warmup_cosine


def _graph(n: int, energy: float, forces: list[list[float]], fixed: list[bool] | None = None, stress=None) -> Data:
    return Data(
        pos=torch.zeros(n, 3, dtype=torch.float64),
        atomic_numbers=torch.ones(n, dtype=torch.long),
        energy=torch.tensor([energy], dtype=torch.float64),
        forces=torch.tensor(forces, dtype=torch.float64),
        fixed=torch.tensor(fixed or [False] * n),
        natoms=torch.tensor([n]),
        stress=torch.zeros(1, 3, 3, dtype=torch.float64) if stress is None else stress.view(1, 3, 3),
        has_stress=torch.tensor([stress is not None]),
    )


@pytest.fixture
def batch_and_pred():
    """Two structures: 2 atoms (one fixed) and 1 atom; predictions with known errors."""
    batch = Batch.from_data_list(
        [
            _graph(2, -10.0, [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], fixed=[False, True], stress=torch.eye(3) * 0.1),
            _graph(1, -4.0, [[0.0, 2.0, 0.0]]),
        ]
    )
    pred = {
        "energy": torch.tensor([-10.01, -3.96], dtype=torch.float64),  # errors -0.01 (2 atoms), +0.04 (1 atom)
        "forces": torch.tensor([[0.0, 0.0, 1.02], [0.0, 1.0, 0.0], [0.0, 2.0, -0.01]], dtype=torch.float64),
        "stress": torch.stack([torch.eye(3) * 0.12, torch.eye(3) * 5.0]).double(),  # 2nd: no label, ignored
    }
    return batch, pred


def test_generic_metrics(batch_and_pred):
    batch, pred = batch_and_pred
    m = GenericMetrics()
    m.update(pred, batch)
    out = {k: float(v) for k, v in m.compute().items()}
    e_err = [-0.01, 0.04]
    assert out["energy_mae_meV"] == pytest.approx(1000 * (0.01 + 0.04) / 2)
    assert out["energy_rmse_meV"] == pytest.approx(1000 * math.sqrt((0.01**2 + 0.04**2) / 2))
    assert out["energy_per_atom_mae_meV"] == pytest.approx(1000 * (0.005 + 0.04) / 2)
    assert out["energy_per_atom_rmse_meV"] == pytest.approx(1000 * math.sqrt((0.005**2 + 0.04**2) / 2))
    assert sum(e_err) == pytest.approx(0.03)
    f_err = [0.02, 1.0, 1.0, 0.01]  # nonzero component errors over 9 components
    assert out["forces_mae_meV_A"] == pytest.approx(1000 * sum(f_err) / 9)
    assert out["forces_rmse_meV_A"] == pytest.approx(1000 * math.sqrt(sum(e * e for e in f_err) / 9))
    assert out["stress_mae_meV_A3"] == pytest.approx(1000 * 3 * 0.02 / 9)  # only the labelled structure
    assert out["stress_rmse_meV_A3"] == pytest.approx(1000 * math.sqrt(3 * 0.02**2 / 9))


def test_s2ef_metrics_free_atoms_only(batch_and_pred):
    batch, pred = batch_and_pred
    m = S2EFMetrics()
    m.update(pred, batch)
    out = {k: float(v) for k, v in m.compute().items()}
    assert out["s2ef_energy_mae_eV"] == pytest.approx(0.025)
    # free atoms: atom 0 (error 0.02 in z) and atom 2 (error 0.01 in z); the fixed atom 1 (error 1.0) is ignored
    assert out["s2ef_forces_mae_eV_A"] == pytest.approx((0.02 + 0.01) / 6)
    cos0 = 1.02 / 1.02
    cos2 = 4.0 / (2.0 * math.sqrt(4.0 + 1e-4))
    assert out["s2ef_forces_cosine"] == pytest.approx((cos0 + cos2) / 2)
    # structure 0: |dE| = 0.01 < 0.02, max free |dF| = 0.02 < 0.03 -> within; structure 1: |dE| = 0.04 -> not
    assert out["s2ef_ewt"] == pytest.approx(0.5)
    assert out["s2ef_fwt"] == pytest.approx(1.0)
    assert out["s2ef_efwt"] == pytest.approx(0.5)


def test_s2ef_efwt_force_threshold():
    batch = Batch.from_data_list([_graph(1, 0.0, [[0.0, 0.0, 0.0]]), _graph(1, 0.0, [[0.0, 0.0, 0.0]])])
    pred = {"energy": torch.zeros(2, dtype=torch.float64), "forces": torch.tensor([[0.029, 0, 0], [0.031, 0, 0]])}
    m = S2EFMetrics()
    m.update(pred, batch)
    assert float(m.compute()["s2ef_efwt"]) == pytest.approx(0.5)


def test_pubchemqcr_metrics(batch_and_pred):
    batch, pred = batch_and_pred
    m = PubChemQCRMetrics()
    m.update(pred, batch)
    out = {k: float(v) for k, v in m.compute().items()}
    assert out["pcqr_energy_mae_meV_atom"] == pytest.approx(1000 * (0.005 + 0.04) / 2)
    rmse0 = math.sqrt((0.02**2 + 1.0 + 1.0) / 6)  # molecule 0: 2 atoms x 3 components
    rmse1 = math.sqrt(0.01**2 / 3)
    assert out["pcqr_forces_rmse_meV_A"] == pytest.approx(1000 * (rmse0 + rmse1) / 2)


def test_metrics_reduce_like_one_process(batch_and_pred):
    """Sum/count states merged from two 'ranks' give the metric of the whole set (what all-reduce does)."""
    batch, pred = batch_and_pred
    whole = MetricSet(["generic", "s2ef", "pubchemqcr"])
    whole.update(pred, batch)
    parts = [MetricSet(["generic", "s2ef", "pubchemqcr"]) for _ in range(2)]
    graphs = batch.to_data_list()
    for k, part in enumerate(parts):
        one = Batch.from_data_list([graphs[k]])
        sl = slice(0, 2) if k == 0 else slice(2, 3)
        part.update(
            {"energy": pred["energy"][k : k + 1], "forces": pred["forces"][sl], "stress": pred["stress"][k : k + 1]},
            one,
        )
    for name, metric in parts[0].families.items():
        metric.merge_state(parts[1].families[name])
    merged, expected = parts[0].compute(), whole.compute()
    assert merged.keys() == expected.keys()
    for key in expected:
        assert float(merged[key]) == pytest.approx(float(expected[key]), rel=1e-12), key


def test_mean_loss_weights_batches_by_structures():
    m = MeanLoss()
    m.update(torch.tensor(1.0), 3)
    m.update(torch.tensor(3.0), 1)
    assert float(m.compute()) == pytest.approx(1.5)


def test_unknown_metric_family():
    with pytest.raises(ValueError, match="unknown metric family"):
        MetricSet(["generic", "nope"])


# ------------------------------------------------------------------------------------------------------- losses
def test_loss_terms_and_kinds(batch_and_pred):
    batch, pred = batch_and_pred
    e_pa = torch.tensor([-0.005, 0.04], dtype=torch.float64)  # per-atom energy errors
    f_err = (pred["forces"] - batch.forces).flatten()
    for kind, reduce in [("mse", lambda x: (x**2).mean()), ("mae", lambda x: x.abs().mean())]:
        loss = PotentialLoss(LossConfig(energy_weight=2.0, forces_weight=3.0, kind=kind))
        total, parts = loss(pred, batch)
        assert float(parts["energy"]) == pytest.approx(float(reduce(e_pa)))
        assert float(parts["forces"]) == pytest.approx(float(reduce(f_err)))
        assert float(total) == pytest.approx(2 * float(reduce(e_pa)) + 3 * float(reduce(f_err)))
    total, parts = PotentialLoss(LossConfig(energy_per_atom=False, kind="mae"))(pred, batch)
    assert float(parts["energy"]) == pytest.approx(0.025)
    _, parts = PotentialLoss(LossConfig(forces_kind="l2mae", energy_kind="huber", huber_delta=0.01))(pred, batch)
    assert float(parts["forces"]) == pytest.approx((0.02 + 1.0 * math.sqrt(2) + 0.01) / 3)
    huber = [0.5 * 0.005**2, 0.01 * (0.04 - 0.005)]
    assert float(parts["energy"]) == pytest.approx(sum(huber) / 2)


def test_loss_free_atoms_and_stress(batch_and_pred):
    batch, pred = batch_and_pred
    cfg = LossConfig(energy_weight=0.0, forces_weight=1.0, stress_weight=1.0, kind="mae", forces_free_atoms_only=True)
    _, parts = PotentialLoss(cfg)(pred, batch)
    assert float(parts["forces"]) == pytest.approx((0.02 + 0.01) / 6)
    assert float(parts["stress"]) == pytest.approx(3 * 0.02 / 9)  # the unlabelled structure is left out
    assert "energy" not in parts


def test_loss_schedule():
    cfg = LossConfig(energy_weight=1.0, forces_weight=100.0, schedule=[{"epoch": 3, "energy": 1000.0}])
    assert cfg.weights(2) == {"energy": 1.0, "forces": 100.0, "stress": 0.0}
    assert cfg.weights(3) == {"energy": 1000.0, "forces": 100.0, "stress": 0.0}
    with pytest.raises(ValueError, match="schedule"):
        LossConfig(schedule=[{"energy": 1.0}])
    with pytest.raises(ValueError, match="kind"):
        LossConfig(kind="l1")
    with pytest.raises(ValueError, match="unknown loss option"):
        LossConfig.from_dict({"energy": 1.0})


# --------------------------------------------------------------------------------------------- EMA and optimizers
def test_ema_update_and_warmup():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9, warmup=True)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, step=1)
    d1 = min(0.9, 2 / 11)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), d1 * 1.0 + (1 - d1) * 3.0))
    ema.update(model, step=1)  # the same optimizer step again: no second update
    assert int(ema.num_updates) == 1
    ema.train()
    assert not ema.module.training


def test_warmup_cosine_and_optimizer_groups():
    f = warmup_cosine(total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert [round(f(s), 6) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert f(10) == pytest.approx(0.1)
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model.named_parameters(), {"name": "adamw", "lr": 0.1, "weight_decay": 0.5, "amsgrad": True})
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]  # the bias is not decayed
    assert opt.param_groups[0]["amsgrad"]
    plateau = build_scheduler(opt, {"name": "plateau", "factor": 0.5, "patience": 2}, 100, 10)
    assert plateau["monitor"] == "val/loss" and plateau["interval"] == "epoch"
    cosine = build_scheduler(opt, {"name": "cosine", "warmup_epochs": 0.5}, 100, 10)
    assert cosine["interval"] == "step"
    assert build_scheduler(opt, {"name": "none"}, 100, 10) is None
    with pytest.raises(ValueError, match="unknown optimizer option"):
        build_optimizer(model.named_parameters(), {"lr": 0.1, "momentum": 0.9})
