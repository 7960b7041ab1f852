"""Parity plots of an evaluation (PNG): predicted against reference energy per atom and force components."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def parity_plot(
    reference: np.ndarray,
    predicted: np.ndarray,
    path: str | Path,
    *,
    title: str,
    unit: str,
    mae: float | None = None,
) -> Path | None:
    """One parity plot (with the y = x line and the MAE in the title); None when there is nothing finite to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference, predicted = np.asarray(reference, float).ravel(), np.asarray(predicted, float).ravel()
    finite = np.isfinite(reference) & np.isfinite(predicted)
    reference, predicted = reference[finite], predicted[finite]
    if reference.size == 0:
        return None
    low = float(min(reference.min(), predicted.min()))
    high = float(max(reference.max(), predicted.max()))
    pad = 0.02 * (high - low or 1.0)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if reference.size > 20_000:  # a scatter of that many points is a blot: show the density instead
        ax.hexbin(reference, predicted, gridsize=80, bins="log", mincnt=1, cmap="viridis")
    else:
        ax.scatter(reference, predicted, s=6, alpha=0.6, linewidths=0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="black", linewidth=0.8)
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel(f"reference ({unit})")
    ax.set_ylabel(f"predicted ({unit})")
    ax.set_title(title if mae is None else f"{title}\nMAE {mae:.4g} {unit}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_parity_plots(
    out: Path,
    energy_ref: np.ndarray,
    energy_pred: np.ndarray,
    natoms: np.ndarray,
    forces_ref: np.ndarray,
    forces_pred: np.ndarray,
    energy_mae: float | None = None,
    forces_mae: float | None = None,
) -> dict[str, str]:
    """``parity_energy.png`` (eV/atom) and ``parity_forces.png`` (eV/Å) in ``out``; returns {kind: file name}.
    The MAEs in the titles are those given (of the whole set: the forces drawn may be a sample)."""
    written: dict[str, str] = {}
    e_ref, e_pred = energy_ref / natoms, energy_pred / natoms
    path = parity_plot(e_ref, e_pred, out / "parity_energy.png", title="energy per atom", unit="eV/atom",
                       mae=energy_mae)  # fmt: skip
    if path is not None:
        written["energy"] = path.name
    path = parity_plot(forces_ref, forces_pred, out / "parity_forces.png", title="force components", unit="eV/Å",
                       mae=forces_mae)  # fmt: skip
    if path is not None:
        written["forces"] = path.name
    return written
