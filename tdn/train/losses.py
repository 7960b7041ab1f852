"""The training loss: weighted energy + forces + stress terms, each MAE, MSE or Huber, weights schedulable by epoch.

    loss = w_E * L(E_pred, E_ref)  [per atom: both divided by the atom count]
         + w_F * L(F_pred, F_ref)  [mean over force components; optionally free atoms only]
         + w_S * L(S_pred, S_ref)  [mean over stress components of the structures that carry a stress label]

A schedule is a list of stages ``{epoch: k, energy: w, forces: w, stress: w}``: from epoch ``k`` on (0-based) the
given weights replace the base ones (MACE's second stage raises the energy weight this way).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

TERMS = ("energy", "forces", "stress")
KINDS = ("mse", "mae", "huber", "l2mae")


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str, delta: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of the chosen pointwise loss over all elements of the rows where ``mask`` [rows] is True (all rows when
    ``mask`` is None); 0 when no row counts.

    ``l2mae`` (fairchem's force loss) is the mean over rows of the Euclidean norm of the error of each row (a force
    vector, a flattened stress); for an energy (one value per row) it is the MAE. Masked rows are weighted out, not
    selected: a boolean index would have a data-dependent shape, i.e. a device-to-host sync on a GPU.
    """
    if pred.numel() == 0:
        return pred.sum() * 0.0
    rows = pred.shape[0]
    diff = pred - target
    if mask is not None:
        # where, not a product: a NaN in a row that does not count must not leak into the loss
        diff = torch.where(mask.view(rows, *([1] * (diff.dim() - 1))), diff, torch.zeros_like(diff))
    if kind == "l2mae":
        per_row = torch.linalg.vector_norm(diff.reshape(rows, -1), dim=-1)
        return per_row.mean() if mask is None else per_row.sum() / mask.sum().clamp_min(1)
    if kind == "mse":
        pointwise = diff.square()
    elif kind == "mae":
        pointwise = diff.abs()
    else:
        pointwise = F.huber_loss(diff, torch.zeros_like(diff), reduction="none", delta=delta)
    if mask is None:
        return pointwise.mean()
    per_row_elements = diff.numel() // rows
    return pointwise.sum() / (mask.sum() * per_row_elements).clamp_min(1)


@dataclass
class LossConfig:
    """What ``conf/train.yaml: loss`` holds (see the module docstring)."""

    energy_weight: float = 1.0
    forces_weight: float = 100.0
    stress_weight: float = 0.0
    kind: str = "mse"  # mse | mae | huber | l2mae, for all terms unless overridden below
    energy_kind: str | None = None
    forces_kind: str | None = None
    stress_kind: str | None = None
    huber_delta: float = 0.01
    energy_per_atom: bool = True  # energy term on E/N (MACE); False: on the total energy per structure
    forces_free_atoms_only: bool = False  # OC20 S2EF trains on free (not fixed) atoms only
    schedule: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("kind", "energy_kind", "forces_kind", "stress_kind"):
            value = getattr(self, name)
            if value is not None and value not in KINDS:
                raise ValueError(f"loss.{name} must be one of {KINDS}, got {value!r}")
        if self.huber_delta <= 0:
            raise ValueError(f"loss.huber_delta must be positive, got {self.huber_delta}")
        for term in TERMS:
            if getattr(self, f"{term}_weight") < 0:
                raise ValueError(f"loss.{term}_weight must be >= 0, got {getattr(self, f'{term}_weight')}")
        stages = []
        for i, stage in enumerate(self.schedule):
            stage = dict(stage)
            unknown = sorted(set(stage) - {"epoch", *TERMS})
            if unknown or "epoch" not in stage:
                raise ValueError(
                    f"loss.schedule[{i}] must be {{epoch: k, energy: w, forces: w, stress: w}}, got {stage}"
                    + (f" (unknown keys {unknown})" if unknown else "")
                )
            if int(stage["epoch"]) < 0 or any(float(stage[t]) < 0 for t in TERMS if t in stage):
                raise ValueError(f"loss.schedule[{i}]: epoch and weights must be >= 0, got {stage}")
            stages.append(stage)
        self.schedule = sorted(stages, key=lambda s: int(s["epoch"]))
        if not any(self.uses(t) for t in TERMS):
            raise ValueError("loss: every weight is zero; give energy_weight, forces_weight or stress_weight > 0")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LossConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown loss option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    def weights(self, epoch: int) -> dict[str, float]:
        """The weights in force during ``epoch`` (0-based)."""
        out = {t: float(getattr(self, f"{t}_weight")) for t in TERMS}
        for stage in self.schedule:
            if epoch >= int(stage["epoch"]):
                out.update({t: float(stage[t]) for t in TERMS if t in stage})
        return out

    def uses(self, term: str) -> bool:
        """Whether ``term`` has a non-zero weight in any stage."""
        return float(getattr(self, f"{term}_weight")) > 0 or any(float(s.get(term, 0)) > 0 for s in self.schedule)

    def kind_of(self, term: str) -> str:
        return getattr(self, f"{term}_kind") or self.kind


def num_atoms_per_graph(batch: Any, num_graphs: int) -> torch.Tensor:
    """``natoms`` [B] from the batch (or counted from ``batch.batch``)."""
    natoms = getattr(batch, "natoms", None)
    if natoms is not None:
        return natoms.view(-1)
    index = getattr(batch, "batch", None)
    if index is None:
        return torch.full((num_graphs,), batch.pos.shape[0], dtype=torch.long, device=batch.pos.device)
    # index_add into a known size: bincount sizes its output from the data (a device-to-host sync on a GPU)
    counts = torch.zeros(num_graphs, dtype=torch.long, device=index.device)
    return counts.index_add_(0, index, torch.ones_like(index))


class PotentialLoss(torch.nn.Module):
    """``loss(pred, batch, epoch) -> (total, {"energy": ..., "forces": ..., "stress": ...})``.

    ``pred`` is the model's output dict; ``batch`` carries the labels of docs/CONTRACTS.md.
    The parts are unweighted (what each term measures); ``total`` is the weighted sum.
    """

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        self.config = config

    def forward(
        self, pred: Mapping[str, torch.Tensor | None], batch: Any, epoch: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        weights = c.weights(epoch)
        energy = pred["energy"]
        dtype = energy.dtype
        parts: dict[str, torch.Tensor] = {}

        if weights["energy"] > 0:
            e_pred, e_ref = energy, batch.energy.view(-1).to(dtype)
            if c.energy_per_atom:
                natoms = num_atoms_per_graph(batch, energy.shape[0]).to(dtype)
                e_pred, e_ref = e_pred / natoms, e_ref / natoms
            parts["energy"] = elementwise_loss(e_pred, e_ref, c.kind_of("energy"), c.huber_delta)

        if weights["forces"] > 0:
            if pred.get("forces") is None:
                raise RuntimeError("the forces loss needs the model to compute forces")
            f_pred, f_ref = pred["forces"], batch.forces.to(dtype)
            free = None
            if c.forces_free_atoms_only and getattr(batch, "fixed", None) is not None:
                free = ~batch.fixed.view(-1).bool()
            parts["forces"] = elementwise_loss(f_pred, f_ref, c.kind_of("forces"), c.huber_delta, free)

        if weights["stress"] > 0:
            if pred.get("stress") is None:
                raise RuntimeError("the stress loss needs the model to compute stress")
            has = getattr(batch, "has_stress", None)
            has = torch.ones(energy.shape[0], dtype=torch.bool, device=energy.device) if has is None else has
            s_ref = batch.stress.view(-1, 3, 3).to(dtype)
            parts["stress"] = elementwise_loss(
                pred["stress"], s_ref, c.kind_of("stress"), c.huber_delta, has.view(-1).bool()
            )

        total = energy.new_zeros(())
        for term, value in parts.items():
            total = total + weights[term] * value
        return total, parts
