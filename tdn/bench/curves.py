"""Learning curves of the tensor-product backends: test error against optimiser steps and against training compute,
trained until the curves flatten, resumable and accumulating across runs of the command.

    python scripts/bench_accuracy.py curves --datasets ethanol aspirin 3bpa --variants cg cp cp-degree cp-inout grid \\
        --seeds 0 1 2 --jobs 2

Every run is ``tdn-train`` (a child process, one torch thread) with the overrides of :mod:`.accuracy_protocol`
(``experiment=accuracy_cpu``, the dataset, ``tp=<variant>``, ``seed``) plus the model size, a fixed long budget of
optimiser steps and snapshot epochs spaced geometrically (:class:`tdn.train.callbacks.Snapshots`). The run's
:class:`tdn.train.callbacks.TrainingClock` gives the process CPU seconds (and wall seconds) of its training steps, so
the compute axis excludes validation, snapshots and evaluation, and survives a resume. Each snapshot (EMA weights)
is evaluated on the run's test split (the split ``tdn-train`` cuts or reads with the same data options and seed).

Resumable: a run directory with a checkpoint and no exported model is resumed from ``checkpoints/last.ckpt``; a
finished run is never retrained; snapshots already evaluated are not evaluated again. Accumulating: the results
of every run go to ``OUT/curves_<dataset>_<size>.json`` (merged under a file lock, so two commands may run at once)
and the table / plot are rewritten from everything in it (:mod:`.curves_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import common
from .accuracy_protocol import RMD17_MOLECULES, VARIANTS, Budget, Dataset, datasets, run_overrides

SIZES = {  # model size -> overrides on top of experiment=accuracy_cpu (16 channels, lmax 2, correlation 2)
    "quick": ["model.channels=4", "model.lmax=1", "model.lmax_hidden=1", "model.num_bessel=4", "model.radial_mlp=[8]",
              "model.readout_mlp=4", "data.eval_batch_size=4"],  # a smoke test: seconds per run
    "small": [],
    "large": ["model.channels=64", "model.lmax=3", "model.correlation=3"],
}
DATASETS = (*RMD17_MOLECULES, "3bpa")
DEFAULT_DATASETS = ("ethanol", "aspirin", "3bpa")
DEFAULT_VARIANTS = ("cg", "cp", "cp-degree", "cp-inout", "grid")
DEVICES = ("cpu", "cuda")  # where the runs train; a GPU's tables are kept apart and timed by the wall clock
DEFAULT_STEPS = 6000  # optimiser steps of 10 structures: 64 epochs of rMD17's 950, 172 of 3BPA's 350
# learning-rate schedules -> overrides on top of experiment=accuracy_cpu (plateau: lr x0.8 after 5 epochs without a
# better validation loss); cosine decays to 1 % of the lr over the budget, so the curve ends at a floor
SCHEDULES = {
    "plateau": [],
    "cosine": ["training_module.lr_scheduler.name=cosine", "training_module.lr_scheduler.warmup_epochs=1",
               "training_module.lr_scheduler.min_lr_ratio=0.01"],
}
SNAPSHOTS = 16  # points per curve (geometric in epochs, the last epoch included)


@dataclass(frozen=True)
class CurveRun:
    """One training run of a curve table: dataset, variant, seed and model size at a budget of optimiser steps."""

    dataset: Dataset
    variant: str
    seed: int
    size: str
    steps: int
    batch_size: int = 10
    device: str = "cpu"
    schedule: str = "plateau"

    @property
    def key(self) -> str:
        return f"{self.variant}/seed{self.seed}"

    @property
    def table(self) -> str:
        """``curves_<dataset>_<size>``, ``_steps<N>`` for a budget other than the default (a table holds one),
        ``_cuda`` for runs on a GPU (whose compute is counted in other seconds)."""
        budget = "" if self.steps == DEFAULT_STEPS else f"_steps{self.steps}"
        budget += self.schedule_suffix
        return f"curves_{self.dataset.name.lower()}_{self.size}{budget}{self.device_suffix}"

    @property
    def schedule_suffix(self) -> str:
        return "" if self.schedule == "plateau" else f"_{self.schedule}"

    @property
    def device_suffix(self) -> str:
        return "" if self.device == "cpu" else f"_{self.device}"

    def budget(self) -> Budget:
        return Budget("curve", steps=self.steps, batch_size=self.batch_size)

    def epochs(self) -> int:
        return max(1, math.ceil(self.steps / math.ceil(self.dataset.train_frames / self.batch_size)))

    def run_dir(self, work_dir: Path) -> Path:
        budget = f"{self.size}_steps{self.steps}{self.schedule_suffix}{self.device_suffix}"
        return Path(work_dir) / "curves" / budget / f"{self.dataset.name.lower()}_{self.variant}_seed{self.seed}"

    def overrides(self) -> list[str]:
        """``tdn-train`` overrides of this run (without its directory)."""
        snapshots = ",".join(str(e) for e in snapshot_epochs(self.epochs()))
        return [*run_overrides(self.dataset, self.variant, self.budget(), self.seed), *SIZES[self.size],
                *SCHEDULES[self.schedule], f"snapshots.epochs=[{snapshots}]", "loggers=[csv]",
                *(["trainer=gpu"] if self.device == "cuda" else [])]


def snapshot_epochs(epochs: int, points: int = SNAPSHOTS) -> list[int]:
    """About ``points`` epoch counts from 1 to ``epochs``, spaced geometrically (a log-scaled axis), last included."""
    if epochs <= points:
        return list(range(1, epochs + 1))
    return sorted({max(1, round(epochs ** (k / (points - 1)))) for k in range(points)} | {epochs})


def dataset_spec(name: str, data_root: Path) -> Dataset:
    """The dataset called ``name`` (an rMD17 molecule or ``3bpa``) from :func:`.accuracy_protocol.datasets`."""
    if name == "3bpa":
        return datasets("3bpa", data_root)[0]
    if name in RMD17_MOLECULES:
        return datasets("rmd17", data_root, [name])[0]
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


# ------------------------------------------------------------------------------------------------- training


def train_command(run: CurveRun, run_dir: Path) -> list[str]:
    """The ``tdn-train`` command line that starts, resumes or (after a crash before any checkpoint) restarts it."""
    command = [sys.executable, "-m", "tdn.train.cli", *run.overrides(), f"hydra.run.dir={run_dir}"]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        command.append(f"ckpt_path={last}")
    elif run_dir.exists():
        command.append("overwrite=true")  # stopped before its first checkpoint: nothing to keep
    return command


def train_run(run: CurveRun, work_dir: Path, log: Callable[[str], None]) -> Path:
    """Train (or resume) ``run`` in a child process with one thread; returns its directory (raises if it failed)."""
    run_dir = run.run_dir(work_dir)
    if (run_dir / "model.pt").is_file():
        return run_dir
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = train_command(run, run_dir)
    action = "resuming" if any("ckpt_path=" in c for c in command) else "training"
    log(f"{run.dataset.name} {run.size} {run.key}: {action} ({run.epochs()} epochs, {run.steps} steps)")
    with (run_dir.parent / f"{run_dir.name}.log").open("a") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code != 0 or not (run_dir / "model.pt").is_file():
        raise RuntimeError(f"tdn-train exited with {code}; see {run_dir.parent / (run_dir.name + '.log')}")
    return run_dir


# ------------------------------------------------------------------------------------------------- evaluation


def held_out(run: CurveRun) -> tuple[Any, str, list[str]]:
    """The data module of the run's test split (what ``tdn-train`` tests on), the split's name and the metrics."""
    from omegaconf import OmegaConf

    from ..evaluate import eval_datamodule
    from ..train import compose

    cfg = compose(run.overrides())
    datamodule, split, _ = eval_datamodule(OmegaConf.to_container(cfg.data, resolve=True), "test")
    metrics = OmegaConf.to_container(cfg.training_module.metrics, resolve=True)
    return datamodule, split, [metrics] if isinstance(metrics, str) else list(metrics)


def held_out_loader(run: CurveRun) -> tuple[Any, list[str]]:
    """The run's test split as a data loader, and its metric names."""
    datamodule, split, metrics = held_out(run)
    return datamodule.eval_dataloader(split), metrics


def evaluate_snapshots(run: CurveRun, run_dir: Path, done: set[int]) -> list[dict[str, Any]]:
    """Test errors of every snapshot of ``run_dir`` whose epoch is not in ``done``: one curve point each."""
    from ..evaluate import evaluate_model
    from ..io import load_model

    index_path = run_dir / "snapshots" / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else []
    todo = [row for row in index if row["epoch"] not in done]
    if not todo:
        return []
    loader, metric_names = held_out_loader(run)
    points = []
    for row in todo:
        model = load_model(run_dir / "snapshots" / row["file"])
        metrics = evaluate_model(model, loader, metric_names)["metrics"]
        points.append({**{k: row[k] for k in ("epoch", "step", "train_cpu_s", "train_wall_s")},
                       "test_forces_mae_meV_A": metrics.get("forces_mae_meV_A"),
                       "test_energy_mae_meV": metrics.get("energy_mae_meV"),
                       "test_energy_per_atom_mae_meV": metrics.get("energy_per_atom_mae_meV")})
    return points


def run_record(run: CurveRun, run_dir: Path, previous: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON record of a finished run: its curve (old points kept, new ones evaluated) and final metrics."""
    old = {p["epoch"]: p for p in (previous or {}).get("points", [])}
    points = {**old, **{p["epoch"]: p for p in evaluate_snapshots(run, run_dir, set(old))}}
    from ..io import load_model

    final = json.loads((run_dir / "test_metrics.json").read_text()) if (run_dir / "test_metrics.json").is_file() else {}
    model = load_model(run_dir / "model.pt")
    return {
        "dataset": run.dataset.name, "variant": run.variant, "seed": run.seed, "size": run.size, "steps": run.steps,
        "device": run.device, "epochs": run.epochs(), "overrides": run.overrides(), "run_dir": str(run_dir),
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tp": {"kind": model.config.tp, "weights": model.config.tp_weights},
        "final": {k: final[k] for k in ("forces_mae_meV_A", "energy_mae_meV", "energy_per_atom_mae_meV") if k in final},
        "points": [points[e] for e in sorted(points)],
        "protocol": run.dataset.protocol, "train_frames": run.dataset.train_frames,
    }


# ------------------------------------------------------------------------------------------------- step costs

STEP_REPS = 30  # timed rounds of the step costs (after STEP_WARMUP), every variant once per round
STEP_WARMUP = 3


def timing_batch(run: CurveRun) -> Any:
    """The first ``run.batch_size`` structures of the run's test split as one batch (the size of a training batch
    of this dataset), on the run's device."""
    from torch_geometric.data import Batch

    datamodule, split, _ = held_out(run)
    dataset = datamodule.prepared(split)[0]
    structures = [dataset[i] for i in range(min(run.batch_size, len(dataset)))]
    return Batch.from_data_list(structures).to(run.device)


def time_steps(table: dict[str, Any], run: CurveRun, reps: int = STEP_REPS) -> dict[str, Any]:
    """The cost of one training step of every variant of ``table`` with the code as it is now, timed in turn (one
    step of each per round, so load from other jobs hits all alike): the model of the variant's first run (its
    ``model.pt``), the dataset's batch, the loss and optimiser of :func:`.train_step.training_step`. On a CPU the
    median process CPU ms per step, on a GPU the median wall ms. A variant whose model cannot be loaded or stepped
    is reported in ``errors``."""
    from ..io import load_model
    from .curves_report import runs_by_variant
    from .train_step import training_step

    torch.set_num_threads(1)
    batch = timing_batch(run)

    def warm_step(record: dict[str, Any]) -> Callable[[], None]:
        torch.manual_seed(0)
        model = load_model(Path(record["run_dir"]) / "model.pt", device=run.device).train()
        step = training_step(model, batch, torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True))
        step()  # a failure raises here, before any timing
        return step

    steps, errors = {}, {}
    for variant, records in runs_by_variant(table).items():
        step, error = common.attempt(lambda r=records[0]: warm_step(r), run.device)
        if error:
            errors[variant] = error
        else:
            steps[variant] = step
    timings = common.time_interleaved(steps, run.device, STEP_WARMUP, reps) if steps else {}
    unit = "cpu_ms" if run.device == "cpu" else "step_ms"
    return {"ms": {v: t[unit] for v, t in timings.items()}, "errors": errors, "reps": reps,
            "structures": int(batch.num_graphs), "atoms": int(batch.num_nodes), "edges": int(batch.edge_index.shape[1]),
            "meta": common.run_metadata(run.device)}  # fmt: skip


def store_step_costs(run: CurveRun, out_dir: Path, reps: int = STEP_REPS) -> dict[str, Any]:
    """Time the steps of ``run``'s table (:func:`time_steps`) and keep them in its JSON as ``step_costs``."""
    path = Path(out_dir) / f"{run.table}.json"
    costs = time_steps(read_table(path), run, reps)
    with locked(path):
        table = read_table(path)
        table["step_costs"] = costs
        common.write_json(path, table)
    return costs


# ------------------------------------------------------------------------------------------------- the tables

_LOCK = threading.Lock()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive access to ``path``'s JSON for this process's threads and other commands (a lock file beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _LOCK, open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_table(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}}


def store(run: CurveRun, record: dict[str, Any], out_dir: Path, command: str) -> dict[str, Any]:
    """Merge ``record`` into the run's table JSON and rewrite its markdown and plot; returns the table."""
    from .curves_report import write_outputs

    path = Path(out_dir) / f"{run.table}.json"
    with locked(path):
        table = read_table(path)
        table["runs"][run.key] = record
        table.update(dataset=run.dataset.name, size=run.size, steps=run.steps, device=run.device,
                     schedule=run.schedule, command=command,
                     meta=common.run_metadata(run.device, packages=("lightning", "e3nn")))
        write_outputs(table, Path(out_dir), run.table)
    return table


def process(run: CurveRun, work_dir: Path, out_dir: Path, command: str, log: Callable[[str], None]) -> dict | None:
    """Train or resume one run, evaluate what is new, store it. A failure is logged and stored, never raised."""
    path = Path(out_dir) / f"{run.table}.json"
    previous = read_table(path)["runs"].get(run.key)
    if previous and previous.get("steps") == run.steps and "error" not in previous and previous.get("complete"):
        log(f"{run.dataset.name} {run.size} {run.key}: done (in {path.name})")
        return previous
    try:
        run_dir = train_run(run, work_dir, log)
        record = {**run_record(run, run_dir, previous), "complete": True}
    except Exception as error:  # noqa: BLE001 - one failing run must not stop the others
        record = {"dataset": run.dataset.name, "variant": run.variant, "seed": run.seed, "size": run.size,
                  "steps": run.steps, "error": common.describe_error(error, 500)}
    store(run, record, out_dir, command)
    log(f"{run.dataset.name} {run.size} {run.key}: " + progress(record))
    return record


def progress(record: dict[str, Any]) -> str:
    """The log line of a stored run."""
    if "error" in record:
        return f"FAILED {record['error']}"
    from .curves_report import clock

    final, last = record.get("final", {}), record["points"][-1] if record["points"] else {}
    key, unit, _, _ = clock(record.get("device", "cpu"))
    return (f"test F {final.get('forces_mae_meV_A', math.nan):.1f} meV/Å, E {final.get('energy_mae_meV', math.nan):.2f}"
            f" meV, {last.get(key) or math.nan:.0f} training {unit}")


def run_all(runs: Sequence[CurveRun], work_dir: Path, out_dir: Path, jobs: int = 2, command: str = "",
            log: Callable[[str], None] = print) -> list[dict | None]:
    """Every run, ``jobs`` at a time (each a one-thread child process); evaluation in this process."""
    torch.set_num_threads(1)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda r: process(r, work_dir, out_dir, command, log), runs))


# ------------------------------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None, defaults: dict[str, Path] | None = None) -> argparse.Namespace:
    defaults = defaults or {}
    parser = argparse.ArgumentParser(prog="bench_accuracy.py curves", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DEFAULT_DATASETS))
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(DEFAULT_VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimiser steps per run (batch of 10)")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="plateau",
                        help="learning-rate schedule (cosine: to 1%% of the lr at the last step; tables of its own)")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="the CPU (compute: CPU seconds) or one GPU (compute: its wall seconds; use --jobs 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the tables from their JSON; train nothing")
    parser.add_argument("--time-steps", action="store_true",
                        help="time one training step of every variant of each table in turn with the current code "
                             "(a load-independent compute axis: steps x step cost)")
    parser.add_argument("--doc", type=Path, default=defaults.get("doc"),
                        help="markdown page whose <!-- BEGIN curves_... --> sections are rewritten")
    for option, help_text in (("data-root", "folder of the reference data (rmd17/, 3bpa/)"),
                              ("out", "output folder of the tables"), ("work-dir", "run directories")):
        default = defaults.get(option.replace("-", "_"))
        parser.add_argument(f"--{option}", type=Path, default=default, required=default is None, help=help_text)
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> list[CurveRun]:
    """The runs of a command, seed-major so that a first pass over every variant finishes before more seeds."""
    specs = [dataset_spec(name, args.data_root) for name in args.datasets]
    return [CurveRun(spec, variant, seed, args.size, args.steps, device=args.device, schedule=args.schedule)
            for seed in args.seeds for spec in specs for variant in args.variants]


def main(argv: Sequence[str] | None = None, defaults: dict[str, Path] | None = None) -> None:
    """The ``curves`` mode of ``scripts/bench_accuracy.py``: train what is missing, then rewrite every table of the
    command (and its section of ``--doc``, the published accuracy page, where it has one)."""
    from .accuracy_report import update_doc_section
    from .curves_report import doc_block, write_outputs

    args = parse_args(argv, defaults)
    command = "python scripts/bench_accuracy.py curves " + " ".join(sys.argv[2:] if argv is None else argv)
    runs = plan(args)
    if not args.report_only:
        start = time.perf_counter()
        run_all(runs, args.work_dir, args.out, args.jobs, command, log=lambda line: print(line, flush=True))
        print(f"{len(runs)} runs in {time.perf_counter() - start:.0f} s; tables in {args.out}", flush=True)
    for name, run in sorted({r.table: r for r in runs}.items()):
        path = Path(args.out) / f"{name}.json"
        if not path.is_file():
            continue
        if args.time_steps:
            costs = store_step_costs(run, args.out)
            print(f"{name}: step costs " + ", ".join(f"{v} {ms:.1f} ms" for v, ms in costs["ms"].items())
                  + "".join(f"; {v} failed: {e}" for v, e in costs["errors"].items()), flush=True)
        with locked(path):
            table = read_table(path)
            print("wrote", *write_outputs(table, Path(args.out), name).values(), flush=True)
        if args.doc is not None and update_doc_section(args.doc, name, doc_block(table, name)):
            print(f"updated the {name} section of {args.doc}", flush=True)
