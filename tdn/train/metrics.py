"""Evaluation metrics with the field's conventions, reduced exactly across ranks.

Every metric keeps float64 sums and counts as torchmetrics states with ``dist_reduce_fx="sum"``, so ``compute()``
all-reduces sums and counts and only then divides: the result is the metric of the whole evaluated set whatever
the number of processes. Units are in the names.

- ``generic``: energy MAE/RMSE per structure (meV) and per atom (meV/atom), force MAE/RMSE over force components
  (meV/Å), stress MAE/RMSE over components of the structures that carry a stress label (meV/Å^3).
- ``s2ef`` (OC20 / OC22, as fairchem evaluates S2EF): energy MAE per structure (eV); on free atoms only (``fixed`` is
  False): force MAE over components (eV/Å), force cosine (mean over atoms), and the fractions of structures with
  energy error < 0.02 eV (EwT), max force-component error < 0.03 eV/Å (FwT), and both (EFwT).
- ``pubchemqcr``: energy MAE in meV/atom; force RMSE in meV/Å computed per molecule (structure) over its atoms'
  components, then averaged over molecules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torchmetrics import Metric

from .losses import num_atoms_per_graph

MEV = 1000.0
EWT_THRESHOLD = 0.02  # eV
FWT_THRESHOLD = 0.03  # eV/Å


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` with the rows where ``mask`` [rows] is False set to 0. Rows are weighted out, never selected:
    a boolean index has a data-dependent shape, i.e. a device-to-host sync on a GPU."""
    shape = (values.shape[0],) + (1,) * (values.dim() - 1)
    return torch.where(mask.view(shape), values, torch.zeros_like(values))


def _graph_index(batch: Any, num_atoms: int, device: torch.device) -> torch.Tensor:
    index = getattr(batch, "batch", None)
    return torch.zeros(num_atoms, dtype=torch.long, device=device) if index is None else index


class SumMetric(Metric):
    """Float64 sum states (all-reduced by summation); subclasses list them in ``states`` and fill ``update``."""

    states: tuple[str, ...] = ()
    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in self.states:
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, **values: torch.Tensor | float) -> None:
        for name, value in values.items():
            state = getattr(self, name)
            # on the state's device: a Python number becomes a tensor there, never a transfer of a tensor
            setattr(self, name, state + torch.as_tensor(value, dtype=torch.float64, device=state.device))

    @staticmethod
    def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return num / den if float(den) > 0 else torch.full_like(num, float("nan"))


class GenericMetrics(SumMetric):
    states = (
        "e_abs", "e_sq", "e_pa_abs", "e_pa_sq", "n_graphs",
        "f_abs", "f_sq", "n_f",
        "s_abs", "s_sq", "n_s",
    )  # fmt: skip

    def update(self, pred: Mapping[str, torch.Tensor | None], batch: Any) -> None:
        energy = pred["energy"].detach().double()
        err = energy - batch.energy.view(-1).double()
        natoms = num_atoms_per_graph(batch, energy.shape[0]).double()
        self._add(
            e_abs=err.abs().sum(),
            e_sq=err.square().sum(),
            e_pa_abs=(err / natoms).abs().sum(),
            e_pa_sq=(err / natoms).square().sum(),
            n_graphs=err.numel(),
        )
        if pred.get("forces") is not None and getattr(batch, "forces", None) is not None:
            f_err = pred["forces"].detach().double() - batch.forces.double()
            self._add(f_abs=f_err.abs().sum(), f_sq=f_err.square().sum(), n_f=f_err.numel())
        if pred.get("stress") is not None and getattr(batch, "stress", None) is not None:
            has = getattr(batch, "has_stress", None)
            has = torch.ones_like(err, dtype=torch.bool) if has is None else has.view(-1).bool()
            s_err = _masked(pred["stress"].detach().double() - batch.stress.view(-1, 3, 3).double(), has)
            self._add(s_abs=s_err.abs().sum(), s_sq=s_err.square().sum(), n_s=has.sum() * 9)

    def compute(self) -> dict[str, torch.Tensor]:
        out = {
            "energy_mae_meV": MEV * self._ratio(self.e_abs, self.n_graphs),
            "energy_rmse_meV": MEV * self._ratio(self.e_sq, self.n_graphs).sqrt(),
            "energy_per_atom_mae_meV": MEV * self._ratio(self.e_pa_abs, self.n_graphs),
            "energy_per_atom_rmse_meV": MEV * self._ratio(self.e_pa_sq, self.n_graphs).sqrt(),
        }
        if float(self.n_f) > 0:
            out["forces_mae_meV_A"] = MEV * self.f_abs / self.n_f
            out["forces_rmse_meV_A"] = MEV * (self.f_sq / self.n_f).sqrt()
        if float(self.n_s) > 0:
            out["stress_mae_meV_A3"] = MEV * self.s_abs / self.n_s
            out["stress_rmse_meV_A3"] = MEV * (self.s_sq / self.n_s).sqrt()
        return out


class S2EFMetrics(SumMetric):
    states = ("e_abs", "n_graphs", "f_abs", "n_f", "cos", "n_atoms", "ewt", "fwt", "efwt")

    def update(self, pred: Mapping[str, torch.Tensor | None], batch: Any) -> None:
        energy = pred["energy"].detach().double()
        e_err = (energy - batch.energy.view(-1).double()).abs()  # [B]
        forces = pred["forces"].detach().double()
        target = batch.forces.double()
        fixed = getattr(batch, "fixed", None)
        free = torch.ones(forces.shape[0], dtype=torch.bool, device=forces.device)
        if fixed is not None:
            free = ~fixed.view(-1).bool()
        graph = _graph_index(batch, forces.shape[0], forces.device)
        f_err = _masked((forces - target).abs(), free)  # [N, 3]; 0 on fixed atoms
        cosine = _masked(torch.nn.functional.cosine_similarity(forces, target, dim=-1), free)  # [N]
        max_f_err = e_err.new_zeros(e_err.shape).scatter_reduce(
            0, graph, f_err.amax(dim=-1), "amax", include_self=True
        )  # [B]; errors are >= 0, so the zeros of fixed atoms never win; no free atoms: within the threshold
        num_free = free.sum()
        e_ok, f_ok = e_err < EWT_THRESHOLD, max_f_err < FWT_THRESHOLD
        self._add(
            e_abs=e_err.sum(),
            n_graphs=e_err.numel(),
            f_abs=f_err.sum(),
            n_f=num_free * 3,
            cos=cosine.sum(),
            n_atoms=num_free,
            ewt=e_ok.sum(),
            fwt=f_ok.sum(),
            efwt=(e_ok & f_ok).sum(),
        )

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "s2ef_energy_mae_eV": self._ratio(self.e_abs, self.n_graphs),
            "s2ef_forces_mae_eV_A": self._ratio(self.f_abs, self.n_f),
            "s2ef_forces_cosine": self._ratio(self.cos, self.n_atoms),
            "s2ef_ewt": self._ratio(self.ewt, self.n_graphs),
            "s2ef_fwt": self._ratio(self.fwt, self.n_graphs),
            "s2ef_efwt": self._ratio(self.efwt, self.n_graphs),
        }


class PubChemQCRMetrics(SumMetric):
    states = ("e_pa_abs", "f_rmse", "n_graphs")

    def update(self, pred: Mapping[str, torch.Tensor | None], batch: Any) -> None:
        energy = pred["energy"].detach().double()
        num_graphs = energy.shape[0]
        natoms = num_atoms_per_graph(batch, num_graphs).double()
        e_err = (energy - batch.energy.view(-1).double()).abs() / natoms
        f_sq = (pred["forces"].detach().double() - batch.forces.double()).square().sum(dim=-1)  # [N]
        graph = _graph_index(batch, f_sq.shape[0], f_sq.device)
        per_graph = f_sq.new_zeros(num_graphs).index_add(0, graph, f_sq)  # [B]
        rmse = (per_graph / (3.0 * natoms)).sqrt()
        self._add(e_pa_abs=e_err.sum(), f_rmse=rmse.sum(), n_graphs=num_graphs)

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "pcqr_energy_mae_meV_atom": MEV * self._ratio(self.e_pa_abs, self.n_graphs),
            "pcqr_forces_rmse_meV_A": MEV * self._ratio(self.f_rmse, self.n_graphs),
        }


class MeanLoss(SumMetric):
    """The evaluation loss: mean over batches weighted by their number of structures (independent of the ranks,
    which share one global list of evaluation batches)."""

    states = ("total", "n_graphs")

    def update(self, loss: torch.Tensor, num_graphs: int) -> None:
        self._add(total=loss.detach().double() * num_graphs, n_graphs=num_graphs)

    def compute(self) -> torch.Tensor:
        return self._ratio(self.total, self.n_graphs)


METRICS: dict[str, type[SumMetric]] = {
    "generic": GenericMetrics,
    "s2ef": S2EFMetrics,
    "pubchemqcr": PubChemQCRMetrics,
}


class MetricSet(torch.nn.Module):
    """Several metric families updated and computed together; ``compute()`` merges their dicts."""

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        names = list(names)
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric family {unknown}; choose from {sorted(METRICS)}")
        self.families = torch.nn.ModuleDict({name: METRICS[name]() for name in names})

    def update(self, pred: Mapping[str, torch.Tensor | None], batch: Any) -> None:
        for metric in self.families.values():
            metric.update(pred, batch)

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for metric in self.families.values():
            out.update(metric.compute())
        return out

    def reset(self) -> None:
        for metric in self.families.values():
            metric.reset()
