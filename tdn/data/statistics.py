"""Dataset statistics for model set-up, always computed from the training split (never hard-coded).

``compute_statistics`` returns a JSON-friendly dict:

    num_structures, num_atoms          counts used
    elements                           sorted atomic numbers seen in training (plus any asked for)
    avg_num_neighbors                  mean number of incoming edges per atom at the cutoff
    e0                                 {Z: eV} per-element reference energies
    e0_method                          "least_squares", "given" or "zero"
    mean_interaction_energy_per_atom   eV/atom: mean over structures of (E - sum_i E0[Z_i]) / N
    std_interaction_energy_per_atom    eV/atom: its standard deviation
    force_rms                          eV/Å: sqrt(mean of squared force components over all atoms)
    mean_num_atoms                     atoms per structure
    cutoff                             Å

E0 by least squares solves ``counts @ E0 ≈ E`` over the training structures (counts[s, z] = atoms of
element z in structure s). When every structure has the same composition (rMD17) the system is
rank-deficient and lstsq returns its minimum-norm solution; the sum over a structure is still right.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

logger = logging.getLogger("tdn.data")


def _resolve_e0(e0, elements: list[int]) -> dict[int, float] | None:
    """Given references as {Z: eV}: from a mapping (Z or symbol keys), an .npz (``coeff`` by Z) or a .json file."""
    from .oc import load_linear_reference

    if e0 is None or (isinstance(e0, str) and e0 in ("least_squares", "zero")):
        return None
    table = load_linear_reference(e0)
    missing = [z for z in elements if z >= len(table) or not np.isfinite(table[z])]
    if missing:
        raise ValueError(f"given E0 references have no value for Z={missing}")
    return {z: float(table[z]) for z in elements}


def compute_statistics(
    graphs: Iterable,
    *,
    cutoff: float | None = None,
    e0="least_squares",
    elements: Iterable[int] | None = None,
) -> dict:
    """Statistics of training graphs (torch_geometric Data with the contract fields).

    Args:
        graphs: the training graphs (None entries, skipped records, are ignored).
        cutoff: recorded in the result (Å).
        e0: "least_squares" (default), "zero", or given references: {Z or symbol: eV}, an .npz path
            with ``coeff`` indexed by Z (fairchem linear references), or a JSON path.
        elements: atomic numbers to include even if absent from training (their fitted E0 is 0).
    """
    counts_rows: list[dict[int, int]] = []
    energies, natoms = [], []
    num_edges = 0
    force_sq, force_n = 0.0, 0
    for graph in graphs:
        if graph is None:
            continue
        z = graph.atomic_numbers.numpy()
        zs, cnt = np.unique(z, return_counts=True)
        counts_rows.append(dict(zip(zs.tolist(), cnt.tolist())))
        energies.append(float(graph.energy.reshape(-1)[0]))
        natoms.append(len(z))
        num_edges += int(graph.edge_index.shape[1])
        f = graph.forces.double().numpy()
        finite = np.isfinite(f).all(axis=1)
        force_sq += float((f[finite] ** 2).sum())
        force_n += int(finite.sum()) * 3
    if not counts_rows:
        raise ValueError("no training structures to compute statistics from")

    seen = sorted({z for row in counts_rows for z in row})
    all_elements = sorted(set(seen) | set(int(z) for z in (elements or [])))
    column = {z: k for k, z in enumerate(all_elements)}
    counts = np.zeros((len(counts_rows), len(all_elements)))
    for s, row in enumerate(counts_rows):
        for z, c in row.items():
            counts[s, column[z]] = c
    energies = np.asarray(energies)
    natoms = np.asarray(natoms, dtype=np.float64)

    given = _resolve_e0(e0, all_elements)
    if given is not None:
        e0_values = np.array([given[z] for z in all_elements])
        method = "given"
    elif e0 == "zero":
        e0_values = np.zeros(len(all_elements))
        method = "zero"
    elif e0 == "least_squares":
        labelled = np.isfinite(energies)
        e0_values = np.linalg.lstsq(counts[labelled], energies[labelled], rcond=None)[0]
        method = "least_squares"
    else:
        raise ValueError(f"e0 must be 'least_squares', 'zero' or given references, got {e0!r}")

    interaction = (energies - counts @ e0_values) / natoms
    interaction = interaction[np.isfinite(interaction)]
    return {
        "num_structures": len(counts_rows),
        "num_atoms": int(natoms.sum()),
        "elements": all_elements,
        "avg_num_neighbors": num_edges / float(natoms.sum()),
        "e0": {int(z): float(v) for z, v in zip(all_elements, e0_values)},
        "e0_method": method,
        "mean_interaction_energy_per_atom": float(interaction.mean()) if interaction.size else float("nan"),
        "std_interaction_energy_per_atom": float(interaction.std()) if interaction.size else float("nan"),
        "force_rms": float(np.sqrt(force_sq / force_n)) if force_n else float("nan"),
        "mean_num_atoms": float(natoms.mean()),
        "cutoff": None if cutoff is None else float(cutoff),
    }


def save_statistics(stats: Mapping, path) -> None:
    """Write statistics as JSON (E0 keys become strings; :func:`load_statistics` turns them back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = dict(stats)
    out["e0"] = {str(z): v for z, v in stats["e0"].items()}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out, indent=2, sort_keys=True))
    tmp.replace(path)  # atomic: another rank never reads a half-written file


def load_statistics(path) -> dict:
    """Read statistics written by :func:`save_statistics` (E0 keys back to int)."""
    stats = json.loads(Path(path).read_text())
    stats["e0"] = {int(z): float(v) for z, v in stats["e0"].items()}
    stats["elements"] = [int(z) for z in stats["elements"]]
    return stats
