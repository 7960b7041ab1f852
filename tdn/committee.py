"""Committees of models: one graph, M models, the mean as the prediction and the spread as its uncertainty.

``TDNCalculator([path_1, ..., path_M])`` evaluates M models trained alike (``tdn-train committee.size=M``: same data
and architecture, different seeds). The members must share the cutoff and the elements, so that ONE neighbour list
and one set of graph tensors serves them all (:func:`check_committee` names the difference otherwise). Each member
then runs its forward and backward pass on those shared tensors, one after the other
(:func:`tdn.edge_forces.evaluate_models`): the host transfer and the neighbour list are paid once per step, the
network M times.

Result keys (mace-torch's committee names; means are the plain predictions):

* ``energy``, ``free_energy``, ``forces``, ``stress``, ``energies`` (per atom), ``stresses``: committee means;
* ``energy_comm [M]``, ``forces_comm [M, N, 3]``, ``stress_comm [M, 6]``: each member's prediction;
* ``energy_var``, ``forces_var [N, 3]``, ``stress_var [6]``: variances over the members (population variance,
  divided by M, as mace-torch), eV^2, (eV/Å)^2, (eV/Å^3)^2;
* ``force_spread``: ``max_k sqrt(sum_a forces_var[k, a])`` (eV/Å), the largest root-mean-square deviation of an
  atom's force vector from the committee mean: what an active-learning loop thresholds (``tdn-md
  --max-force-spread``).

``stress*`` only for fully periodic cells (as the calculator's ``stress``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase.stress import full_3x3_to_voigt_6_stress
from torch import nn

__all__ = ["COMMITTEE_PROPERTIES", "check_committee", "force_spread", "results_from_host"]

COMMITTEE_PROPERTIES = ("energy_comm", "energy_var", "forces_comm", "forces_var", "stress_comm", "stress_var",
                        "force_spread")  # fmt: skip


def check_committee(models: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
    """ValueError unless every model has the first one's cutoff and set of elements (the message names the
    member, by ``names`` when given, and the difference)."""
    names = list(names) if names is not None else [f"model {k}" for k in range(len(models))]
    first = models[0].config
    for name, model in zip(names[1:], models[1:]):
        config = model.config
        if abs(float(config.cutoff) - float(first.cutoff)) > 1e-9:
            raise ValueError(f"a committee's models must share the cutoff (one neighbour list serves them all): "
                             f"{names[0]} has {first.cutoff} Å, {name} {config.cutoff} Å")  # fmt: skip
        if set(config.elements) != set(first.elements):
            only_first = sorted(set(first.elements) - set(config.elements))
            only_this = sorted(set(config.elements) - set(first.elements))
            raise ValueError(f"a committee's models must know the same elements: {names[0]} has {first.elements}, "
                             f"{name} {config.elements} (Z only in the first: {only_first}, only in {name}: "
                             f"{only_this})")  # fmt: skip


def force_spread(forces_var: np.ndarray) -> float:
    """``max_k sqrt(sum_a forces_var[k, a])`` (eV/Å) of a committee's force variances ``[N, 3]``."""
    return float(np.sqrt(forces_var.sum(axis=-1)).max(initial=0.0))


def results_from_host(host: dict[str, np.ndarray], volume: float | None, committee: bool) -> dict[str, object]:
    """The ASE results of one structure from the host arrays of :class:`tdn.TDNCalculator`.

    ``host``: ``node_energy [M, N]``, ``forces [M, N, 3]``, optionally ``virial [M, 3, 3]`` (periodic cells),
    ``atom_virials [N, 3, 3]`` (the committee mean), ``dispersion_energy`` (a scalar, added to every member's
    energy, already in their forces and virials). ``volume``: the cell volume (Å^3) for the stresses.
    ``committee``: add the per-member predictions and variances (:data:`COMMITTEE_PROPERTIES`).
    """
    node_energy = host["node_energy"]  # [M, N]
    dispersion = float(host["dispersion_energy"]) if "dispersion_energy" in host else None
    energy_m = node_energy.sum(axis=1) + (dispersion or 0.0)  # [M]
    forces_m = host["forces"]  # [M, N, 3]
    energy = float(energy_m.mean())
    results: dict[str, object] = {
        "energy": energy,
        "free_energy": energy,
        "energies": node_energy.mean(axis=0),
        "forces": forces_m.mean(axis=0),
    }
    if dispersion is not None:
        results["dispersion_energy"] = dispersion
    stress_m = None
    if "virial" in host:
        stress_m = full_3x3_to_voigt_6_stress(-host["virial"] / volume)  # [M, 6]
        results["stress"] = stress_m.mean(axis=0)
    if "atom_virials" in host:
        results["stresses"] = full_3x3_to_voigt_6_stress(-host["atom_virials"] / volume)  # [N, 6]
    if committee:
        results["energy_comm"] = energy_m
        results["energy_var"] = float(energy_m.var())
        results["forces_comm"] = forces_m
        results["forces_var"] = forces_m.var(axis=0)
        results["force_spread"] = force_spread(results["forces_var"])
        if stress_m is not None:
            results["stress_comm"] = stress_m
            results["stress_var"] = stress_m.var(axis=0)
    return results
