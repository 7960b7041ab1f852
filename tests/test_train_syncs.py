"""No device-to-host sync in the per-step pieces of training: the EMA update, the loss (and its backward), the
metrics update and the module's per-step bookkeeping. ``count_syncs`` (tests/syncs.py) counts, on any machine, the
operations that would make the host wait for a GPU; the model's forward and the neighbour lists are not part of
this."""

from __future__ import annotations

import pytest
import torch
from helpers import SMALL_MODEL
from syncs import count_syncs
from torch_geometric.data import Batch, Data

from tdn.train.ema import EMA
from tdn.train.losses import LossConfig, PotentialLoss
from tdn.train.metrics import MetricSet
from tdn.train.module import PotentialModule

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _graph(n: int, energy: float, seed: int, fixed: list[bool] | None = None, stress: bool = False) -> Data:
    gen = torch.Generator().manual_seed(seed)
    return Data(
        pos=torch.rand(n, 3, generator=gen, dtype=torch.float64),
        atomic_numbers=torch.ones(n, dtype=torch.long),
        energy=torch.tensor([energy], dtype=torch.float64),
        forces=torch.rand(n, 3, generator=gen, dtype=torch.float64),
        fixed=torch.tensor(fixed or [False] * n),
        natoms=torch.tensor([n]),
        stress=torch.rand(1, 3, 3, generator=gen, dtype=torch.float64),
        has_stress=torch.tensor([stress]),
    )


def _batch_and_pred(device: str) -> tuple[Batch, dict[str, torch.Tensor]]:
    batch = Batch.from_data_list(
        [_graph(3, -5.0, 0, fixed=[True, False, False], stress=True), _graph(2, -3.0, 1), _graph(4, -7.0, 2)]
    ).to(device)
    gen = torch.Generator().manual_seed(3)
    pred = {
        "energy": torch.tensor([-5.1, -2.9, -7.3], dtype=torch.float64).to(device).requires_grad_(),
        "forces": torch.rand(9, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_(),
        "stress": torch.rand(3, 3, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_(),
    }
    return batch, pred


def test_what_the_old_code_did_is_counted():
    """A boolean index, ``int(tensor)`` and ``bincount`` (what the loss, metrics and EMA did) are syncs."""
    x, mask = torch.arange(6.0), torch.tensor([True, False] * 3)
    with count_syncs() as syncs:
        x[mask].sum()
        int(x.sum())
        torch.bincount(torch.tensor([0, 1, 1]), minlength=3)
    assert syncs.count == 3, syncs.events


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["mse", "mae", "huber", "l2mae"])
def test_loss_and_its_backward_do_not_sync(device, kind):
    batch, pred = _batch_and_pred(device)
    loss_fn = PotentialLoss(LossConfig(stress_weight=1.0, kind=kind, forces_free_atoms_only=True))
    del batch.natoms  # the atom counts then come from batch.batch (index_add into a known size, not bincount)
    with count_syncs() as syncs:
        total, _ = loss_fn(pred, batch)
        total.backward()
    assert syncs.count == 0, syncs.events
    assert all(torch.isfinite(p.grad).all() for p in pred.values())


@pytest.mark.parametrize("device", DEVICES)
def test_metrics_update_does_not_sync(device):
    batch, pred = _batch_and_pred(device)
    metrics = MetricSet(["generic", "s2ef", "pubchemqcr"]).to(device)
    with count_syncs() as syncs:
        metrics.update(pred, batch)
    assert syncs.count == 0, syncs.events
    values = metrics.compute()  # compute() may sync: it runs once per epoch
    assert float(values["s2ef_forces_mae_eV_A"]) > 0 and float(values["stress_mae_meV_A3"]) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_ema_update_does_not_sync_even_after_a_load(device):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).to(device)
    ema = EMA(model, decay=0.9)
    with count_syncs() as syncs:
        for step in range(3):
            ema.update(model, step=step)
        ema.update(model, step=2)  # the same optimizer step again: skipped
    assert syncs.count == 0, syncs.events
    assert int(ema.num_updates) == 3 and int(ema.last_step) == 2

    restored = EMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    restored.update(model, step=3)  # the counters are read back once after a load ...
    with count_syncs() as syncs:
        restored.update(model, step=4)  # ... and never again
    assert syncs.count == 0, syncs.events
    assert int(restored.num_updates) == 5 and int(restored.last_step) == 4


@pytest.mark.parametrize("device", DEVICES)
def test_module_step_bookkeeping_does_not_sync(device):
    module = PotentialModule({**SMALL_MODEL, "elements": [1]}).to(device)
    batch, pred = _batch_and_pred(device)
    with count_syncs() as syncs:
        assert module.wants_stress(batch, training=True) is False  # no stress loss: decided from the config
        module.record_nonfinite(torch.tensor(1.5, device=device), batch_idx=0)
        module.record_nonfinite(torch.tensor(float("nan"), device=device), batch_idx=1)
        module.record_nonfinite(torch.tensor(float("inf"), device=device), batch_idx=2)
    assert syncs.count == 0, syncs.events
    epoch, batch_idx, step, value = module.nonfinite_record().tolist()
    assert (epoch, batch_idx, step) == (0, 1, 0) and value != value  # the first non-finite one: NaN at batch 1
