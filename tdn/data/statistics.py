"""Dataset statistics for model set-up, always computed from the training split (never hard-coded).

``compute_statistics`` returns a JSON-friendly dict:

    num_structures, num_atoms          counts used
    elements                           sorted atomic numbers seen in training (plus any asked for)
    avg_num_neighbors                  mean number of incoming edges per atom at the cutoff
    e0                                 {Z: eV} per-element reference energies
    e0_method                          "least_squares", "given" or "zero"
    e0_kind                            what the E0s are (ModelConfig.e0_kind): "isolated" (given references),
                                       "fitted" (least squares of full rank), "fitted-rank-deficient", "none"
    mean_interaction_energy_per_atom   eV/atom: mean over structures of (E - sum_i E0[Z_i]) / N
    std_interaction_energy_per_atom    eV/atom: its standard deviation
    force_rms                          eV/Å: sqrt(mean of squared force components over all atoms)
    mean_num_atoms                     atoms per structure
    cutoff                             Å

E0 by least squares solves ``counts @ E0 ≈ E`` over the training structures (counts[s, z] = atoms of
element z in structure s). When every structure has the same composition (rMD17, 3BPA) the system is
rank-deficient: lstsq returns its minimum-norm solution, whose sum over the training composition is
right but whose split between elements is arbitrary (aspirin: H, C and O all get the same value). Such
E0s are no isolated-atom energies and do not transfer to other compositions; ``e0_kind`` says
"fitted-rank-deficient" and :data:`RANK_DEFICIENT_ADVICE` lists the alternatives.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

logger = logging.getLogger("tdn.data")

E0_KINDS = {"given": "isolated", "zero": "none"}  # e0_method -> e0_kind; least squares: by the rank

RANK_DEFICIENT_ADVICE = (
    "give isolated-atom energies with data.e0={Z: eV, ...} (or an .npz / .json table of E0 per element), "
    "or keep the fitted split: its sum is right for the training compositions but the per-element values are "
    "arbitrary, so energies of other compositions (and atomisation energies) are not meaningful"
)


def composition_rank(counts: np.ndarray) -> tuple[int, int]:
    """(rank, number of elements present) of a composition matrix counts[structure, element]."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts.any(axis=0) if counts.size else np.zeros(counts.shape[1:], dtype=bool)
    used = counts[:, present]
    return (int(np.linalg.matrix_rank(used)) if used.size else 0), int(present.sum())


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
    kind = E0_KINDS.get(method, "fitted")
    rank, present = composition_rank(counts[np.isfinite(energies)])
    if method == "least_squares" and rank < present:
        kind = "fitted-rank-deficient"

    interaction = (energies - counts @ e0_values) / natoms
    interaction = interaction[np.isfinite(interaction)]
    return {
        "num_structures": len(counts_rows),
        "num_atoms": int(natoms.sum()),
        "elements": all_elements,
        "avg_num_neighbors": num_edges / float(natoms.sum()),
        "e0": {int(z): float(v) for z, v in zip(all_elements, e0_values)},
        "e0_method": method,
        "e0_kind": kind,
        "e0_rank": rank,
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
