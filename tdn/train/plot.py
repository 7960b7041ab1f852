"""The learning-curve PNG, drawn from the CSV logger's metrics.csv at the end of a run."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path


def read_epoch_series(metrics_csv: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{column: (epochs, values)}`` of every numeric column of Lightning's CSVLogger file."""
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            epoch = row.get("epoch")
            if epoch in (None, ""):
                continue
            for key, value in row.items():
                if key in ("epoch", "step") or value in (None, ""):
                    continue
                try:
                    number = float(value)
                except ValueError:
                    continue
                if math.isfinite(number):
                    series[key][0].append(int(float(epoch)))
                    series[key][1].append(number)
    return dict(series)


def plot_learning_curve(metrics_csv: str | Path, path: str | Path) -> Path | None:
    """Loss (train, val) and the validation energy / force errors against epoch, log scale; None if nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_epoch_series(metrics_csv)
    losses = [k for k in ("train/loss", "val/loss") if k in series]
    errors = [
        k
        for k in series
        if k.startswith("val/")
        and any(s in k for s in ("energy_per_atom_mae", "forces_mae", "s2ef_energy_mae", "pcqr_"))
    ]
    if not losses and not errors:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys, title in ((axes[0], losses, "loss"), (axes[1], errors, "validation errors")):
        for key in keys:
            epochs, values = series[key]
            ax.plot([e + 1 for e in epochs], values, marker="o", markersize=3, label=key)
        if keys and all(v > 0 for k in keys for v in series[k][1]):
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if keys:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
