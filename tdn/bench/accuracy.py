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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from . import common
from .accuracy_protocol import (
    BACKENDS,
    BUDGETS,
    DEFAULT_MOLECULES,
    RMD17_MOLECULES,
    TABLES,
    VARIANTS,
    Budget,
    Dataset,
    datasets,
    epochs_for,
    evaluate_targets,
    run_overrides,
)
from .accuracy_report import (
    doc_block,
    fmt_fixed,
    report_written,
    targets_section,  # noqa: F401 - re-exported: the tests import it from here
    write_outputs,
)

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
    """Train and evaluate every variant on every dataset of ``table`` (reusing the runs already in the JSON at the
    same budget unless ``resume`` is false); the JSON, markdown and PNG are rewritten after every run."""
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
    """One log line of a finished (or failed) run."""
    if "error" in row:
        return f"{row['dataset']} {row['backend']}: FAILED {row['error']}"
    tests = "; ".join(f"{label}: E {fmt_fixed(t.get('energy_mae_meV'))} meV, "
                      f"F {fmt_fixed(t.get('forces_mae_meV_A'))} meV/Å" for label, t in row["tests"].items())
    return (f"{row['dataset']} {row['backend']}: {tests}  ({row.get('epochs')} epochs, {row.get('steps')} steps, "
            f"{row['train_wall_s']:.0f} s wall, {row['params']} params)")


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
    """The command line of ``scripts/bench_accuracy.py``: run one table, write its files, update its page section."""
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
