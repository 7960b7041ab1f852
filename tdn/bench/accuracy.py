"""Accuracy of the tensor-product backends on real DFT data at one equal, documented training budget.

One table per dataset family (``rmd17``, ``3bpa``, ``acac``, ``oxides``). Every backend (cg, cp, gaunt, grid, and
optionally ``cg-shared``: the exact path-shared map that cp approximates, and ``cp-degree``: cp with one weight per
output degree) is trained through the same Hydra config users run (:func:`tdn.train.compose` +
:func:`tdn.train.train`, i.e. what ``tdn-train`` does) with the overrides

    experiment=accuracy_cpu  <dataset overrides>  tp=<backend>  epochs=<budget>  seed=0

so that architecture, data, optimiser, seed and number of optimiser steps are identical; only the tensor product
(and, through its weight mode, the width of the radial MLP's last layer) differs. The model is the one the run
exports (EMA weights of the best validation checkpoint); the test split of the run is evaluated by the trainer, extra
test files (AcAc at 600 K) by :func:`evaluate` on the exported model.

The data come from ``../shared/data`` next to the repository (``--data-root``); they are never copied.
Results are written to ``OUT/accuracy_<table>.{json,md,png}`` after every run, and a rerun reuses the runs already
in the JSON with the same budget (``--no-resume`` retrains everything).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import common

BACKENDS = ("cg", "cp", "gaunt", "grid")
VARIANTS = {  # variant name -> tp overrides
    "cg": ["tp=cg"],
    "cp": ["tp=cp"],
    "gaunt": ["tp=gaunt"],
    "grid": ["tp=grid"],
    "cg-shared": ["tp=cg", "tp.weights=shared"],  # the exact map cp approximates (same path-weight sharing)
    "cp-degree": ["tp=cp", "tp.weights=degree"],  # cp with one weight per channel and output degree
}
TABLES = ("rmd17", "3bpa", "acac", "oxides")
RMD17_MOLECULES = ("aspirin", "azobenzene", "benzene", "ethanol", "malonaldehyde", "naphthalene", "salicylic",
                   "toluene")
DEFAULT_MOLECULES = ("aspirin", "ethanol", "malonaldehyde", "toluene")
# MACE paper (Batatia et al. 2022), rMD17 with 950 / 50 structures of train_01: energy MAE meV, force MAE meV/Å
# (../shared/data/README.md)
MACE_PAPER = {
    "aspirin": (2.2, 6.6), "azobenzene": (1.2, 2.6), "benzene": (0.4, 0.3), "ethanol": (0.4, 2.1),
    "malonaldehyde": (0.8, 5.0), "naphthalene": (0.5, 1.3), "salicylic": (0.9, 3.8), "toluene": (0.5, 1.5),
}
TARGET_RATIO = 1.10  # cp force MAE within 10 % of cg's on every rMD17 molecule


# ------------------------------------------------------------------------------------------------- the budget


@dataclass(frozen=True)
class Budget:
    """What every run of a table gets. ``steps``: optimiser steps (epochs = ceil(steps / batches per epoch))."""

    name: str
    steps: int
    batch_size: int
    overrides: tuple[str, ...] = ()
    max_train: int | None = None  # cap on training structures (None: the protocol's)
    test_limit: int | None = None  # cap on test structures evaluated (None: all)
    threads: int = 1

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


BUDGETS = {
    # a small MACE-like model (conf/experiment/accuracy_cpu.yaml) for ~200 optimiser steps of 10 structures:
    # minutes per run on a shared 2-core CPU. NOT the MACE-paper recipe (that is experiment=rmd17_aspirin on a GPU).
    "cpu": Budget("cpu", steps=190, batch_size=10),
    # smoke test: a tiny model, a few steps on a few structures
    "quick": Budget(
        "quick", steps=2, batch_size=4, max_train=8, test_limit=8,
        overrides=("model.channels=4", "model.lmax=1", "model.lmax_hidden=1", "model.num_bessel=4",
                   "model.radial_mlp=[8]", "model.readout_mlp=4", "data.val_size=4", "data.eval_batch_size=4"),
    ),
}


# ------------------------------------------------------------------------------------------------- datasets


@dataclass
class Dataset:
    """One training set of a table: its overrides, the test split's label, extra test files, references."""

    table: str
    name: str
    overrides: list[str]
    train_frames: int  # structures in the training split (for the epoch count)
    test_label: str
    extra_tests: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> {path, format, options}
    reference: dict[str, tuple[float, float]] = field(default_factory=dict)  # test label -> (E MAE, F MAE)
    protocol: str = ""


def datasets(table: str, data_root: Path, molecules: Sequence[str] = DEFAULT_MOLECULES,
             budget: Budget | None = None) -> list[Dataset]:
    root = Path(data_root)
    cap = budget.max_train if budget is not None else None

    def frames(n: int) -> tuple[int, list[str]]:
        if cap is not None and cap < n:
            return cap, [f"data.train_size={cap}"]
        return n, [f"data.train_size={n}"]

    if table == "rmd17":
        out = []
        for mol in molecules:
            if mol not in RMD17_MOLECULES:
                raise ValueError(f"unknown rMD17 molecule {mol!r}; choose from {RMD17_MOLECULES}")
            n, size = frames(950)
            out.append(Dataset(
                "rmd17", mol,
                ["data=rmd17", f"data.source.root={root / 'rmd17'}", f"data.source.molecule={mol}", *size,
                 "data.val_size=50"],
                n, "test_01", reference={"test_01": MACE_PAPER[mol]},
                protocol="train_01: 950 train / 50 val (seeded split); test_01 (1000)",
            ))
        return out
    if table == "3bpa":
        n, size = frames(350)
        return [Dataset(
            "3bpa", "3BPA",
            ["data=extxyz", f"data.train={root / '3bpa' / 'train_300K.xyz'}", *size, "data.val_size=50",
             "data.test_size=100"],
            n, "300K (held out of train_300K)",
            protocol="train_300K (500): 350 train / 50 val / 100 test, seeded split; the published 3BPA test sets "
                     "(300/600/1200 K, dihedral scans) are not in ../shared/data",
        )]
    if table == "acac":
        n, size = frames(450)
        acac = root / "acac"
        return [Dataset(
            "acac", "AcAc",
            ["data=extxyz", f"data.train={acac / 'train_300K.xyz'}", f"data.test={acac / 'test_MD_300K.xyz'}",
             *size, "data.val_size=50"],
            n, "test_MD_300K",
            extra_tests={"test_MD_600K": {"path": str(acac / "test_MD_600K.xyz"), "format": "extxyz", "options": {}}},
            protocol="train_300K (500): 450 train / 50 val; test_MD_300K (650) and test_MD_600K (650)",
        )]
    if table == "oxides":
        n, size = frames(205)
        return [Dataset(
            "oxides", "BO2 oxides",
            ["data=extxyz", f"data.train={root / 'oxides' / 'oxides.db'}", "data.format=asedb", *size,
             "data.val_size=30", "data.test_size=60",
             # forces are ~0 by symmetry in most of these EOS scans (rms 0.014 eV/Å): MACE's rms-force scaling would
             # shrink the model's output ~10x below the spread of the energies; scale by that spread instead
             "model.scale=${training_data_stats:std_interaction_energy_per_atom}"],
            n, "held out (60)",
            protocol="oxides.db (295, periodic PBE EOS scans): 205 train / 30 val / 60 test, seeded split; "
                     "model.scale = std of the interaction energy per atom (forces are mostly zero by symmetry); "
                     "no stress labels in the file, so no stress is trained or measured",
        )]
    raise ValueError(f"table must be one of {TABLES}, got {table!r}")


def epochs_for(dataset: Dataset, budget: Budget) -> int:
    return max(1, math.ceil(budget.steps / math.ceil(dataset.train_frames / budget.batch_size)))


def run_overrides(dataset: Dataset, variant: str, budget: Budget, seed: int = 0) -> list[str]:
    """The Hydra overrides of one run: ``tdn-train <these>`` reproduces it. ``seed`` sets the initialisation, the
    data order and the train / validation split."""
    out = ["experiment=accuracy_cpu", *dataset.overrides, *VARIANTS[variant], f"epochs={epochs_for(dataset, budget)}",
           f"batch_size={budget.batch_size}", f"seed={seed}", *budget.overrides]
    if budget.test_limit is not None:
        out.append(f"trainer.limit_test_batches={max(1, math.ceil(budget.test_limit / budget.batch_size))}")
    return out


# ------------------------------------------------------------------------------------------------- evaluation


def evaluate(model: torch.nn.Module, path: str | Path, format: str | None = None, options: dict | None = None,
             batch_size: int = 50, limit: int | None = None) -> dict[str, float]:
    """Energy / force errors of ``model`` on a labelled file (meV, meV/Å; energy per structure)."""
    from ..data import atoms_to_graph, collate, read

    dataset = read(str(path), format=format, **(options or {}))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    cutoff = float(model.config.cutoff)
    dtype = next(model.parameters()).dtype
    e_abs = e_sq = e_pa = f_abs = f_sq = 0.0
    n_f = 0
    model.eval()
    for start in range(0, n, batch_size):
        graphs = [atoms_to_graph(dataset[i], cutoff, dtype=dtype) for i in range(start, min(n, start + batch_size))]
        batch = collate(graphs)
        out = model(batch, compute_forces=True, training=False)
        de = (out["energy"].detach().to(torch.float64) - batch.energy.to(torch.float64))
        df = (out["forces"].detach().to(torch.float64) - batch.forces.to(torch.float64))
        e_abs += float(de.abs().sum())
        e_sq += float((de**2).sum())
        e_pa += float((de.abs() / batch.natoms.to(torch.float64)).sum())
        f_abs += float(df.abs().sum())
        f_sq += float((df**2).sum())
        n_f += df.numel()
    return {"energy_mae_meV": 1e3 * e_abs / n, "energy_rmse_meV": 1e3 * math.sqrt(e_sq / n),
            "energy_per_atom_mae_meV": 1e3 * e_pa / n, "forces_mae_meV_A": 1e3 * f_abs / n_f,
            "forces_rmse_meV_A": 1e3 * math.sqrt(f_sq / n_f), "structures": n}


def read_curve(metrics_csv: Path) -> dict[str, Any]:
    """Epochs done and the validation curve (with Lightning's logged step), from the run's CSV log."""
    if not metrics_csv.is_file():
        return {}
    epochs, curve = 0, []
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            if row.get("train/loss") and row.get("epoch"):  # training rows (the test row has the next epoch number)
                epochs = max(epochs, int(float(row["epoch"])) + 1)
            if row.get("val/forces_mae_meV_A"):
                epochs = max(epochs, int(float(row["epoch"])) + 1)
                curve.append({"epoch": int(float(row["epoch"])), "step": int(float(row["step"])),
                              "val_forces_mae_meV_A": float(row["val/forces_mae_meV_A"]),
                              "val_energy_mae_meV": float(row.get("val/energy_mae_meV") or "nan")})
    return {"epochs": epochs, "val_curve": curve}


def train_one(dataset: Dataset, variant: str, budget: Budget, work_dir: Path, seed: int = 0) -> dict[str, Any]:
    """One training run through the Hydra config, then its evaluation; a row of the table."""
    from ..io import load_model
    from ..train import compose, train

    overrides = run_overrides(dataset, variant, budget, seed)
    out_dir = unused_dir(work_dir / dataset.table / f"{budget.name}_steps{budget.steps}"
                         / f"{dataset.name}_{variant}_seed{seed}".replace(" ", "_"))
    row: dict[str, Any] = {"table": dataset.table, "dataset": dataset.name, "backend": variant, "seed": seed,
                           "overrides": overrides, "budget": budget.name, "budget_key": budget.key(),
                           "train_frames": dataset.train_frames, "protocol": dataset.protocol,
                           "run_dir": str(out_dir)}
    cfg = compose(overrides)
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(cfg, out_dir)
    row["train_wall_s"] = time.perf_counter() - wall  # statistics, fit, test of the run's split, export
    row["train_cpu_s"] = time.process_time() - cpu
    row["fit_wall_s"] = fit_seconds(out_dir)
    row.update(read_curve(out_dir / "metrics.csv"))
    row["steps"] = row.get("epochs", 0) * math.ceil(dataset.train_frames / budget.batch_size)  # optimiser steps done
    model = load_model(result.model_path)
    row["params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row["tp"] = {"kind": model.config.tp, "weights": model.config.tp_weights, "paths": model.config.paths}
    cp_rank = [m.rank for m in model.modules() if getattr(m, "kind", "") == "cp" and hasattr(m, "rank")]
    if cp_rank:
        row["tp"]["cp_ranks"] = sorted(set(cp_rank))
        row["tp"]["cp_fit_error_max"] = max(m.fit_error for m in model.modules() if getattr(m, "kind", "") == "cp"
                                            and hasattr(m, "fit_error"))
    tests = {dataset.test_label: _trainer_metrics(result.test_metrics)}
    start = time.perf_counter()
    for label, spec in dataset.extra_tests.items():
        tests[label] = evaluate(model, spec["path"], spec.get("format"), spec.get("options"),
                                limit=budget.test_limit)
    row["extra_eval_s"] = time.perf_counter() - start
    row["tests"] = tests
    return row


def unused_dir(path: Path) -> Path:
    """``path``, or ``path_2``, ``path_3``, ... if it exists (a rerun never mixes its logs with an older run's)."""
    candidate, k = path, 1
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.name}_{k}")
    return candidate


def fit_seconds(run_dir: str | Path) -> float | None:
    """Wall time of ``trainer.fit`` alone (training + validation): from the run's config.yaml, written just before
    the fit, to its last checkpoint, written at its end (file modification times)."""
    start, end = Path(run_dir) / "config.yaml", Path(run_dir) / "checkpoints" / "last.ckpt"
    if not (start.is_file() and end.is_file()):
        return None
    return end.stat().st_mtime - start.stat().st_mtime


def _trainer_metrics(metrics: dict[str, float]) -> dict[str, float]:
    keys = ("energy_mae_meV", "energy_rmse_meV", "energy_per_atom_mae_meV", "forces_mae_meV_A", "forces_rmse_meV_A")
    return {k: float(metrics[k]) for k in keys if k in metrics}


# ------------------------------------------------------------------------------------------------- the table


def default_name(table: str, budget: Budget) -> str:
    """``accuracy_<table>``, ``_quick`` for the smoke budget, ``_steps<N>`` when the steps differ from the budget's
    (a table holds one budget: a different one must not replace its rows)."""
    name = f"accuracy_{table}" + ("_quick" if budget.name == "quick" else "")
    if budget.steps != BUDGETS[budget.name].steps:
        name += f"_steps{budget.steps}"
    return name


def run_table(table: str, variants: Sequence[str], budget: Budget, data_root: Path, out_dir: Path, work_dir: Path,
              molecules: Sequence[str] = DEFAULT_MOLECULES, name: str | None = None, resume: bool = True,
              log: Callable[[str], None] = print, command: str | None = None, seed: int = 0) -> dict[str, Any]:
    name = name or default_name(table, budget)
    json_path = Path(out_dir) / f"{name}.json"
    previous_result: dict[str, Any] = {}
    if resume and json_path.is_file():
        previous_result = json.loads(json_path.read_text())
    previous = previous_result.get("rows", [])
    specs = datasets(table, data_root, molecules, budget)
    missing = [str(p) for d in specs for p in _data_paths(d) if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"data not found: {missing} (give --data-root; it was {data_root})")
    torch.set_num_threads(budget.threads)
    result: dict[str, Any] = {
        "meta": common.run_metadata("cpu", packages=("lightning", "e3nn", "hydra-core")),
        "table": table, "budget": asdict(budget), "variants": list(variants), "data_root": str(data_root),
        "command": command or f"python scripts/bench_accuracy.py {table}",
        # runs of the same budget from earlier commands (other molecules, backends or seeds) stay in the table
        "rows": [r for r in previous if r.get("budget_key") == budget.key()],
    }
    for r in result["rows"]:  # rows written before fit_wall_s was recorded
        if r.get("fit_wall_s") is None and r.get("run_dir"):
            r["fit_wall_s"] = fit_seconds(r["run_dir"])
    descriptions = [{"name": d.name, "protocol": d.protocol, "epochs": epochs_for(d, budget),
                     "train_frames": d.train_frames} for d in specs]
    result["datasets"] = _merge_datasets(descriptions, result["rows"], previous_result)
    result["variants"] = list(dict.fromkeys([*variants, *(r["backend"] for r in result["rows"])]))
    for dataset in specs:
        for variant in variants:
            old = next((r for r in result["rows"] if _same_run(r, dataset, variant, seed, budget)), None)
            if old is not None and "error" not in old:
                log(f"{dataset.name} {variant} seed {seed}: reused from {json_path.name}")
                continue
            log(f"{dataset.name} {variant} seed {seed}: training ({epochs_for(dataset, budget)} epochs of "
                f"{dataset.train_frames} structures, batch {budget.batch_size})")
            try:
                row = train_one(dataset, variant, budget, Path(work_dir), seed)
            except Exception as error:  # noqa: BLE001 - one failing run must not lose the others
                row = {"table": table, "dataset": dataset.name, "backend": variant, "seed": seed, "budget": budget.name,
                       "budget_key": budget.key(), "error": common.describe_error(error, 500)}
            log("  " + progress_line(row))
            result["rows"] = sorted([r for r in result["rows"] if not _same_key(r, dataset.name, variant, seed, budget)]
                                    + [row], key=_row_order)
            result["datasets"] = _merge_datasets(descriptions, result["rows"], previous_result)
            result["meta"]["date"] = common.run_metadata("cpu")["date"]
            result["targets"] = evaluate_targets(result)
            write_outputs(result, out_dir, name)
    result["rows"].sort(key=_row_order)
    result["targets"] = evaluate_targets(result)
    write_outputs(result, out_dir, name)
    return result


def _same_key(row: dict[str, Any], dataset: str, variant: str, seed: int, budget: Budget) -> bool:
    """The same table cell: dataset, backend, seed and budget."""
    return (row["dataset"] == dataset and row["backend"] == variant and row.get("seed", 0) == seed
            and row.get("budget_key") == budget.key())


def _same_run(row: dict[str, Any], spec: Dataset, variant: str, seed: int, budget: Budget) -> bool:
    """The same cell trained with the same overrides (a changed dataset setting is retrained)."""
    def strip(overrides: Sequence[str]) -> list[str]:
        return [o for o in overrides if not o.startswith("seed=")]

    return (_same_key(row, spec.name, variant, seed, budget)
            and strip(row.get("overrides", [])) == strip(run_overrides(spec, variant, budget, seed)))


def _row_order(row: dict[str, Any]) -> tuple:
    names, variants = list(RMD17_MOLECULES), list(VARIANTS)
    return (names.index(row["dataset"]) if row["dataset"] in names else 0, row["dataset"],
            variants.index(row["backend"]) if row["backend"] in variants else 99, row.get("seed", 0))


def _merge_datasets(current: list[dict[str, Any]], rows: list[dict[str, Any]],
                    previous: dict[str, Any]) -> list[dict[str, Any]]:
    """The dataset descriptions of every dataset with a row (this command's, then earlier ones')."""
    names = {d["name"] for d in current}
    extra = [d for d in previous.get("datasets", [])
             if d["name"] not in names and any(r["dataset"] == d["name"] for r in rows)]
    return sorted(current + extra, key=lambda d: _row_order({"dataset": d["name"], "backend": ""}))


def _data_paths(dataset: Dataset) -> list[str]:
    out = []
    for o in dataset.overrides:
        key, _, value = o.partition("=")
        if key in ("data.train", "data.test", "data.source.root"):
            out.append(value)
    return out + [spec["path"] for spec in dataset.extra_tests.values()]


def progress_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['dataset']} {row['backend']}: FAILED {row['error']}"
    tests = "; ".join(f"{label}: E {_f(t.get('energy_mae_meV'))} meV, F {_f(t.get('forces_mae_meV_A'))} meV/Å"
                      for label, t in row["tests"].items())
    return (f"{row['dataset']} {row['backend']}: {tests}  ({row.get('epochs')} epochs, {row.get('steps')} steps, "
            f"{row['train_wall_s']:.0f} s wall, {row['params']} params)")


def _forces(rows: list[dict[str, Any]], molecule: str, backend: str) -> dict[int, float]:
    """Test force MAE per seed of one molecule and backend."""
    return {r.get("seed", 0): r["tests"]["test_01"]["forces_mae_meV_A"] for r in rows
            if r["dataset"] == molecule and r["backend"] == backend and "error" not in r}


def _mean(values: dict[int, float]) -> float:
    return sum(values.values()) / len(values)


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """cp force MAE within 10 % of cg's on every rMD17 molecule (at this equal budget, seed 0); with more seeds,
    also the ratio of the seed means and the spread of each backend over seeds."""
    if result["table"] != "rmd17":
        return []
    out = []
    for d in result["datasets"]:
        cg, cp = _forces(result["rows"], d["name"], "cg"), _forces(result["rows"], d["name"], "cp")
        if 0 not in cg or 0 not in cp:
            continue
        row = {"molecule": d["name"], "cg": cg[0], "cp": cp[0], "ratio": cp[0] / cg[0],
               "pass": cp[0] <= TARGET_RATIO * cg[0], "cg_seeds": cg, "cp_seeds": cp}
        shared = _forces(result["rows"], d["name"], "cg-shared")
        if 0 in shared:
            row["cp_vs_cg_shared"] = cp[0] / shared[0]
        degree = _forces(result["rows"], d["name"], "cp-degree")
        if 0 in degree:
            row["cp_degree_vs_cg"] = degree[0] / cg[0]
        if len(cg) > 1 and len(cp) > 1:
            row["ratio_of_means"] = _mean(cp) / _mean(cg)
        if len(cg) > 1 and len(degree) > 1:
            row["cp_degree_seeds"] = degree
            row["degree_ratio_of_means"] = _mean(degree) / _mean(cg)
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------- outputs


def _f(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "—"


def results_table(result: dict[str, Any]) -> str:
    header = ["dataset", "test", "backend (weights)", "E MAE meV", "F MAE meV/Å", "E/atom MAE meV", "E RMSE meV",
              "F RMSE meV/Å",
              "MACE paper E / F MAE", "params", "epochs / steps", "fit wall s", "run wall s", "run CPU s"]
    body = []
    for r in result["rows"]:
        if "error" in r:
            body.append([r["dataset"], "—", r["backend"], f"failed: {r['error'][:120]}", *[""] * 10])
            continue
        weights = r.get("tp", {}).get("weights", "")
        rank = r.get("tp", {}).get("cp_ranks")
        label = f"{r['backend']} ({weights}{', R=' + '/'.join(map(str, rank)) if rank else ''})"
        if r.get("seed", 0):
            label += f", seed {r['seed']}"
        for test, t in r["tests"].items():
            ref = MACE_PAPER.get(r["dataset"]) if r["table"] == "rmd17" else None
            body.append([
                r["dataset"], test, label, _f(t.get("energy_mae_meV")), _f(t.get("forces_mae_meV_A")),
                _f(t.get("energy_per_atom_mae_meV"), 2), _f(t.get("energy_rmse_meV")), _f(t.get("forces_rmse_meV_A")),
                f"{ref[0]} / {ref[1]}" if ref else "—", r["params"], f"{r.get('epochs')} / {r.get('steps')}",
                _f(r.get("fit_wall_s"), 0), f"{r['train_wall_s']:.0f}", f"{r['train_cpu_s']:.0f}",
            ])
    return common.markdown_table(header, body)


def _spread(values: dict[int, float]) -> str:
    if len(values) < 2:
        return "—"
    return f"{min(values.values()):.1f}–{max(values.values()):.1f} ({len(values)} seeds)"


def targets_section(result: dict[str, Any]) -> list[str]:
    targets = result.get("targets") or evaluate_targets(result)
    if not targets:
        return []
    body = [[t["molecule"], _f(t["cg"]), _f(t["cp"]), f"{t['ratio']:.2f}", "PASS" if t["pass"] else "FAIL",
             f"{t['cp_vs_cg_shared']:.2f}" if "cp_vs_cg_shared" in t else "—",
             f"{t['cp_degree_vs_cg']:.2f}" if "cp_degree_vs_cg" in t else "—",
             _spread(t["cg_seeds"]), _spread(t["cp_seeds"]),
             f"{t['ratio_of_means']:.2f}" if "ratio_of_means" in t else "—",
             f"{t['degree_ratio_of_means']:.2f}" if "degree_ratio_of_means" in t else "—"] for t in targets]
    verdict = "met" if all(t["pass"] for t in targets) else "NOT met"
    degree_means = [t["degree_ratio_of_means"] for t in targets if "degree_ratio_of_means" in t]
    degree_line = []
    if degree_means:
        within = sum(r <= TARGET_RATIO for r in degree_means)
        degree_line = [
            f"With one weight per output degree (cp-degree) the ratio of seed means is ≤ {TARGET_RATIO:.2f} on "
            f"{within}/{len(degree_means)} molecules (range {min(degree_means):.2f}–{max(degree_means):.2f}).",
            "",
        ]
    return [
        "## Target: cp force MAE within 10% of cg at equal budget",
        "",
        f"On the molecules run here the target is **{verdict}** at this budget, seed 0 "
        f"({sum(t['pass'] for t in targets)}/{len(targets)} molecules). cp / cg-shared: against the exact map cp "
        "approximates (same path-weight sharing), which separates the CP approximation from the loss of per-path "
        "weights; cp-degree / cg: cp with one weight per output degree. The seed spread (initialisation, data order "
        "and train/val split) says how much of a ratio is noise.",
        "",
        common.markdown_table(["molecule", "cg F MAE", "cp F MAE", "cp / cg", f"≤ {TARGET_RATIO:.2f}",
                               "cp / cg-shared", "cp-degree / cg", "cg over seeds", "cp over seeds",
                               "cp / cg, seed means", "cp-degree / cg, seed means"], body),
        "",
        *degree_line,
    ]


def budget_lines(result: dict[str, Any]) -> list[str]:
    b = result["budget"]
    lines = [
        f"- budget `{b['name']}`: {b['steps']} optimiser steps of {b['batch_size']} structures, rounded up to "
        "whole epochs, for every backend (epochs per dataset below), `conf/experiment/accuracy_cpu.yaml` (small "
        "MACE-like model: 16 channels, hidden l ≤ 1, spherical harmonics l ≤ 2, correlation 2, 2 layers, radial MLP "
        "32×32, float32, Adam(AMSGrad) lr 0.01, EMA 0.99, loss energy-per-atom 1 + forces 10 (MSE)); "
        f"torch threads {b['threads']}; device CPU",
    ]
    if b.get("overrides"):
        lines.append(f"- extra overrides: `{' '.join(b['overrides'])}`")
    if b.get("max_train"):
        lines.append(f"- at most {b['max_train']} training structures; at most {b.get('test_limit')} test structures")
    for d in result["datasets"]:
        lines.append(f"- {d['name']}: {d['protocol']}; {d['train_frames']} training structures, {d['epochs']} epochs")
    lines.append("- columns: fit wall = `trainer.fit` (training + validation); run wall / CPU = the whole run "
                 "(statistics, fit, test, export) in wall and process-CPU seconds; params = trainable parameters")
    lines.append("- this is **not** the MACE-paper recipe (256 channels, l ≤ 3, correlation 3, ~2000 epochs on a GPU): "
                 "absolute errors are far above the published ones; the table compares backends at one small budget")
    return lines


def markdown_report(result: dict[str, Any], name: str, command: str) -> str:
    meta = result["meta"]
    git = meta["git"]
    lines = [
        f"# Accuracy on real DFT data: {result['table']}",
        "",
        f"- machine: {common.machine_line(meta)} (shared with other jobs: wall times are noisy, CPU times less so)",
        f"- date: {meta['date']}; commit {git['commit'][:12]}{' (dirty tree)' if git.get('dirty') else ''}; "
        f"torch {meta['versions']['torch']}, lightning {meta['versions'].get('lightning')}",
        f"- command: `{command}`",
        *budget_lines(result),
        "- one run = `tdn-train "
        + " ".join(_shown(o, result.get("data_root")) for o in result["rows"][0].get("overrides", []))
        + "` (per row: "
        "its dataset and `tp=`); errors on the exported model (EMA weights of the best validation epoch)"
        if result["rows"] and "overrides" in result["rows"][0] else "",
        "",
        f"![accuracy]({name}.png)",
        "",
        results_table(result),
        "",
        *targets_section(result),
    ]
    return "\n".join(lines)


def _shown(override: str, data_root: str | None) -> str:
    """Overrides with the data root shortened to ``<data-root>`` for the report."""
    return override.replace(data_root, "<data-root>") if data_root else override


def write_plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    groups = []  # (dataset, test)
    for r in rows:
        for test in r["tests"]:
            if (r["dataset"], test) not in groups:
                groups.append((r["dataset"], test))
    variants = [v for v in result["variants"] if any(r["backend"] == v for r in rows)]
    curves = [r for r in rows if r.get("seed", 0) == 0 and len(r.get("val_curve", [])) >= 3]
    panels = 3 if curves else 2
    fig, axes = plt.subplots(1, panels, figsize=(max(8, 2.2 * len(groups) + 4) + 5 * (panels - 2), 5), squeeze=False)
    width = 0.8 / max(1, len(variants))
    for ax, key, unit in ((axes[0][0], "forces_mae_meV_A", "force MAE (meV/Å)"),
                          (axes[0][1], "energy_mae_meV", "energy MAE (meV)")):
        for k, v in enumerate(variants):
            xs = [g + (k - (len(variants) - 1) / 2) * width for g in range(len(groups))]
            ys, others = [], []  # bars: seed 0; dots: other seeds
            for x, (ds, test) in zip(xs, groups):
                sel = [r for r in rows if r["dataset"] == ds and r["backend"] == v]
                first = next((r for r in sel if r.get("seed", 0) == 0), sel[0] if sel else None)
                ys.append(first["tests"].get(test, {}).get(key, math.nan) if first else math.nan)
                others += [(x, r["tests"].get(test, {}).get(key, math.nan)) for r in sel if r is not first]
            ax.bar(xs, ys, width, label=v)
            if others:
                ax.plot(*zip(*others), "k.", ms=5, label="other seeds" if k == 0 else None)
        if result["table"] == "rmd17":
            idx = 1 if key.startswith("forces") else 0
            for g, (ds, _) in enumerate(groups):
                if ds in MACE_PAPER:
                    ax.plot([g - 0.4, g + 0.4], [MACE_PAPER[ds][idx]] * 2, "k--", lw=1,
                            label="MACE paper (GPU recipe)" if g == 0 else None)
        ax.set_xticks(range(len(groups)), [f"{ds}\n{test}" for ds, test in groups], fontsize=8)
        ax.set_ylabel(unit)
        ax.set_yscale("log")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    if curves:  # learning curves: validation force MAE per epoch
        ax = axes[0][2]
        for r in curves:
            ax.plot([p["step"] for p in r["val_curve"]], [p["val_forces_mae_meV_A"] for p in r["val_curve"]], "o-",
                    ms=3, label=f"{r['dataset']} {r['backend']}")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("validation force MAE (meV/Å)")
        ax.set_yscale("log")
        ax.set_title("learning curves (seed 0)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
    fig.suptitle(f"{result['table']}: test errors at budget '{result['budget']['name']}' "
                 f"({result['budget']['steps']} steps)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict[str, Any], out_dir: Path, name: str, command: str | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    command = command or result.get("command") or f"python scripts/bench_accuracy.py {result['table']}"
    result["command"] = command
    paths = {"json": common.write_json(out_dir / f"{name}.json", result)}
    if result["rows"]:
        paths["png"] = write_plot(result, out_dir / f"{name}.png")
    paths["md"] = common.write_text(out_dir / f"{name}.md", markdown_report(result, name, command))
    return paths


def update_doc_section(doc: Path | None, name: str, text: str) -> bool:
    """Replace the block between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` of ``doc`` (docs/accuracy.md)
    with ``text``; nothing happens when the file or the markers are absent. Returns whether it was replaced."""
    if doc is None or not Path(doc).is_file():
        return False
    content = Path(doc).read_text()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if begin not in content or end not in content:
        return False
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    Path(doc).write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")
    return True


def report_written(written: dict[str, Path], doc: Path | None, name: str, block: str) -> None:
    """Print the files written, and put ``block`` in the ``name`` section of ``doc`` (the published accuracy page,
    given with ``--doc``)."""
    print("wrote " + ", ".join(str(p) for p in written.values()), flush=True)
    if update_doc_section(doc, name, block):
        print(f"updated the {name} section of {doc}", flush=True)


def doc_block(result: dict[str, Any], name: str) -> str:
    """What docs/accuracy.md shows of a table: provenance, the results and the target check."""
    meta = result["meta"]
    return "\n".join([
        f"`{result['command']}` — {meta['date']}, commit {meta['git']['commit'][:12]}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}, {common.machine_line(meta)}; "
        f"full report: [benchmarks/{name}.md](benchmarks/{name}.md)",
        "",
        f"![{name}](benchmarks/{name}.png)",
        "",
        results_table(result),
        "",
        *targets_section(result),
    ])


# ------------------------------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None, defaults: dict[str, Path] | None = None) -> argparse.Namespace:
    """Command-line options; ``defaults`` (from the script: paths of the checkout) fill ``--data-root``, ``--out``,
    ``--work-dir`` and ``--doc``, which are otherwise required (installed code knows no repository layout)."""
    defaults = defaults or {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=TABLES, help="which table to (re)compute")
    parser.add_argument("--backends", nargs="+", choices=sorted(VARIANTS), default=list(BACKENDS),
                        help="variants to train (cg-shared: the exact path-shared map cp approximates)")
    parser.add_argument("--molecules", nargs="+", choices=RMD17_MOLECULES, default=list(DEFAULT_MOLECULES),
                        help="rMD17 molecules (table rmd17)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the 'quick' budget (a smoke test: seconds per run)")
    parser.add_argument("--steps", type=int, default=None, help="override the budget's optimiser steps")
    for option, help_text in (("data-root", "folder of the reference data (rmd17/, 3bpa/, acac/, oxides/)"),
                              ("out", "output folder of the tables"),
                              ("work-dir", "run directories (checkpoints, logs, exported models)")):
        default = defaults.get(option.replace("-", "_"))
        parser.add_argument(f"--{option}", type=Path, default=default, required=default is None, help=help_text)
    parser.add_argument("--doc", type=Path, default=None,
                        help="markdown page whose section of this table is rewritten (default: the script's published "
                             "page when --out is its published folder, else none)")
    parser.add_argument("--name", default=None, help="output name (default accuracy_<table>[_quick])")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the runs (initialisation, data order, train/val split); rows of several seeds "
                             "share one table")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="retrain runs already in the output JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, defaults: dict[str, Path] | None = None) -> dict[str, Any]:
    import sys

    args = parse_args(argv, defaults)
    budget = BUDGETS["quick" if args.quick else args.budget]
    if args.steps is not None:
        budget = Budget(**{**asdict(budget), "steps": args.steps})
    command = "python scripts/bench_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    name = args.name or default_name(args.table, budget)
    result = run_table(args.table, args.backends, budget, args.data_root, args.out, args.work_dir, args.molecules,
                       name, args.resume, log=lambda line: print(line, flush=True), command=command, seed=args.seed)
    written = write_outputs(result, args.out, name, command)
    doc = args.doc
    if doc is None and defaults and "doc" in defaults and Path(args.out).resolve() == Path(defaults["out"]).resolve():
        doc = defaults["doc"]  # the published tables: keep their page in step
    report_written(written, doc, name, doc_block(result, name))
    return result


if __name__ == "__main__":
    main()
