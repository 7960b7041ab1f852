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


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, delta: float) -> torch.Tensor:
    """Mean of the chosen pointwise loss over all elements (0 for empty input).

    ``l2mae`` (fairchem's force loss) is the mean over rows of the Euclidean norm of the error of each row (a force
    vector, a flattened stress); for an energy (one value per row) it is the MAE.
    """
    if pred.numel() == 0:
        return pred.sum() * 0.0
    if kind == "l2mae":
        diff = (pred - target).reshape(pred.shape[0], -1)
        return torch.linalg.vector_norm(diff, dim=-1).mean()
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "mae":
        return F.l1_loss(pred, target)
    return F.huber_loss(pred, target, delta=delta)


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
    return torch.bincount(index, minlength=num_graphs)


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
            if c.forces_free_atoms_only and getattr(batch, "fixed", None) is not None:
                free = ~batch.fixed.view(-1).bool()
                f_pred, f_ref = f_pred[free], f_ref[free]
            parts["forces"] = elementwise_loss(f_pred, f_ref, c.kind_of("forces"), c.huber_delta)

        if weights["stress"] > 0:
            if pred.get("stress") is None:
                raise RuntimeError("the stress loss needs the model to compute stress")
            has = getattr(batch, "has_stress", None)
            has = torch.ones(energy.shape[0], dtype=torch.bool, device=energy.device) if has is None else has
            has = has.view(-1).bool()
            s_pred = pred["stress"][has]
            s_ref = batch.stress.view(-1, 3, 3).to(dtype)[has]
            parts["stress"] = elementwise_loss(s_pred, s_ref, c.kind_of("stress"), c.huber_delta)

        total = energy.new_zeros(())
        for term, value in parts.items():
            total = total + weights[term] * value
        return total, parts
