"""``tdn-eval``: evaluate an exported model on a dataset, batched on a device.

    tdn-eval model.pt data.test=test.xyz
    tdn-eval model.pt data=oc20_s2ef data.test=/data/s2ef/val_id device=cuda batch_size=32 out=eval_val_id
    tdn-eval model.pt data=sample split=test

The arguments are Hydra overrides of ``conf/eval.yaml``, which takes the ``data/`` group of ``tdn-train``: every format
and reader option of training, and the dataset's metric families (generic, s2ef, pubchemqcr) with the same names and
units as the training metrics. The first argument without ``=`` is the model file. Writes ``<out>/metrics.json`` (the
metrics, force MAE / RMSE per element, sizes and timing), ``parity_energy.png`` and ``parity_forces.png``.

A user's mistake (a bad option, a missing file, a bad record) is one or two lines on stderr and exit status 2
(``debug=true`` or ``HYDRA_FULL_ERROR=1`` shows the traceback instead).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

USAGE = """usage: tdn-eval MODEL [OVERRIDE ...]

Evaluate an exported tdn model (MODEL, written by tdn-train or tdn.save_model) on a dataset. Overrides (key=value) of
conf/eval.yaml, with the data/ group of tdn-train:
  data=GROUP          extxyz (default), sample, rmd17, oc20_s2ef, oc22_s2ef, pubchemqcr, pubchemqcr_s
  data.test=PATH      the files to evaluate (a list: data.test=[a.xyz,b.xyz]); data.format, data.reader_options.*
  split=test          test | val | train: that part of data.train, cut as a training run with the same data.* and
                      seed cut it | all: every structure of data.train
  device=cpu          cpu | cuda | cuda:N        batch_size=16     dtype=null (the model's)
  out=DIR             output directory (default eval-<model name>-<split>)
  plots=true  progress=true  compute_stress=auto  debug=false
Writes DIR/metrics.json, DIR/parity_energy.png, DIR/parity_forces.png.
Examples:
  tdn-eval model.pt data.test=test.xyz
  tdn-eval model.pt data=oc20_s2ef data.test=/data/s2ef/val_id device=cuda batch_size=32"""

MEV = 1000.0
MISSING = "???"


@dataclass
class EvalResult:
    """What an evaluation produced."""

    output_dir: Path
    metrics: dict[str, float | None] = field(default_factory=dict)
    per_element: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    json_path: Path | None = None
    plots: dict[str, Path] = field(default_factory=dict)


class ElementForceErrors:
    """Force MAE and RMSE per element (over the force components of that element's atoms), in meV/Å.

    Sums stay on the device in float64 (no host read per batch); atoms whose reference forces are not finite, and
    atoms outside ``mask``, are left out.
    """

    def __init__(self, elements: Sequence[int], device: str | torch.device = "cpu") -> None:
        self.elements = [int(z) for z in elements]
        n = len(self.elements)
        self.column = torch.full((max(self.elements) + 1,), -1, dtype=torch.long, device=device)
        self.column[torch.tensor(self.elements, device=device)] = torch.arange(n, device=device)
        self.abs = torch.zeros(n, dtype=torch.float64, device=device)
        self.sq = torch.zeros(n, dtype=torch.float64, device=device)
        self.atoms = torch.zeros(n, dtype=torch.float64, device=device)

    def update(self, forces: torch.Tensor, reference: torch.Tensor, numbers: torch.Tensor, mask=None) -> None:
        err = forces.detach().double() - reference.double()  # [N, 3]
        valid = torch.isfinite(err).all(dim=-1)
        if mask is not None:
            valid = valid & mask
        err = torch.where(valid.unsqueeze(-1), err, torch.zeros_like(err))
        index = self.column[numbers]
        self.abs.index_add_(0, index, err.abs().sum(dim=-1))
        self.sq.index_add_(0, index, err.square().sum(dim=-1))
        self.atoms.index_add_(0, index, valid.double())

    def compute(self) -> dict[str, dict[str, Any]]:
        from ase.data import chemical_symbols

        out: dict[str, dict[str, Any]] = {}
        for k, z in enumerate(self.elements):
            atoms = float(self.atoms[k])
            if atoms > 0:
                out[chemical_symbols[z]] = {
                    "Z": z,
                    "num_atoms": int(atoms),
                    "forces_mae_meV_A": MEV * float(self.abs[k]) / (3 * atoms),
                    "forces_rmse_meV_A": MEV * math.sqrt(float(self.sq[k]) / (3 * atoms)),
                }
        return out


# ---------------------------------------------------------------------------------------------------- the loop
def _progress(iterable: Any, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="tdn-eval", unit="batch", disable=not enabled, dynamic_ncols=True, mininterval=0.5)


def evaluate_model(
    model: torch.nn.Module,
    loader: Any,
    metric_names: Sequence[str],
    *,
    device: str | torch.device = "cpu",
    compute_stress: bool | str = "auto",
    free_atoms_only: bool = False,
    plot_max_points: int = 100_000,
    progress: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Run ``model`` over every batch of ``loader`` on ``device``; the metrics of ``metric_names``
    (:mod:`tdn.train.metrics`), force errors per element, and the arrays the parity plots need."""
    from .train.losses import num_atoms_per_graph
    from .train.metrics import MetricSet

    device = torch.device(device)
    model = model.to(device).eval()
    metrics = MetricSet(metric_names).to(device)
    per_element = ElementForceErrors(model.config.elements, device)
    energies: list[torch.Tensor] = []  # [B, 3] rows: reference, predicted, atoms
    forces: list[torch.Tensor] = []  # [k, 2] rows: reference, predicted
    per_batch = max(1, math.ceil(plot_max_points / max(1, len(loader))))
    generator = torch.Generator().manual_seed(seed)
    for batch in _progress(loader, progress):
        has_stress = getattr(batch, "has_stress", None)  # read on the CPU, before the transfer
        labelled = has_stress is not None and bool(has_stress.any())
        stress = compute_stress is True or (compute_stress == "auto" and labelled)
        batch = batch.to(device)
        pred = model(batch, compute_forces=True, compute_stress=stress, training=False)
        metrics.update(pred, batch)
        fixed = getattr(batch, "fixed", None)
        mask = ~fixed.view(-1).bool() if free_atoms_only and fixed is not None else None
        per_element.update(pred["forces"], batch.forces, batch.atomic_numbers, mask)
        natoms = num_atoms_per_graph(batch, pred["energy"].shape[0]).double()
        energies.append(torch.stack([batch.energy.view(-1).double(), pred["energy"].double(), natoms], 1).cpu())
        pair = torch.stack([batch.forces.reshape(-1).double(), pred["forces"].reshape(-1).double()], 1).cpu()
        if pair.shape[0] > per_batch:  # a seeded sample, spread over the whole set
            pair = pair[torch.randperm(pair.shape[0], generator=generator)[:per_batch]]
        forces.append(pair)
    values = {k: float(v) for k, v in metrics.compute().items()}
    e = torch.cat(energies).numpy() if energies else np.zeros((0, 3))
    f = torch.cat(forces).numpy() if forces else np.zeros((0, 2))
    return {
        "metrics": {k: (v if math.isfinite(v) else None) for k, v in values.items()},
        "per_element": per_element.compute(),
        "num_structures": int(e.shape[0]),
        "num_atoms": int(e[:, 2].sum()) if e.size else 0,
        "energy": e,
        "forces": f,
    }


# ---------------------------------------------------------------------------------------------------- config
def _paths(value: Any) -> list[str]:
    if value in (None, "", MISSING):
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    return [str(v) for v in value]


def eval_datamodule(data: Mapping[str, Any], split: str) -> tuple[Any, str, list[str]]:
    """The data module, the name of the split to evaluate in it, and the paths it comes from."""
    from .train.data import build_datamodule, check_path_format
    from .train.errors import ConfigError

    if split not in ("test", "val", "train", "all"):
        raise ConfigError(f"split must be test, val, train or all, got {split!r}")
    data = dict(data)
    given = {key: _paths(data.get(key)) for key in ("train", "val", "test")}
    whole = given[split] if split in ("test", "val") and given[split] else None
    if split == "all":
        whole = given["train"]
        if not whole:
            raise ConfigError("split=all evaluates every structure of data.train: give data.train=PATH")
    if whole is not None:  # these files, every structure in them (opened twice, as train and as val: no split)
        key = "data.train" if split == "all" else f"data.{split}"
        for path in whole:  # checked here, under the key the user gave them with
            if not Path(path).exists():
                raise ConfigError(f"{key}: no such file or directory: {path}")
            check_path_format(key, path, data.get("format"))
        data.update(train=whole, val=whole, test=None, train_size=None, val_size=0, test_size=0)
        name = "train"
    elif not given["train"]:
        raise ConfigError(f"split={split}: give the files to evaluate, data.{split}=PATH (or data.train=PATH to "
                          f"evaluate the {split} part a training run cut from it)")  # fmt: skip
    else:
        name = split
    datamodule = build_datamodule(data)
    if not datamodule.has_split(name):
        raise ConfigError(
            f"split={split}: data.{split} is not given and data.{split}_size cuts nothing off data.train: give "
            f"data.{split}=PATH, or split=all to evaluate every structure of data.train"
        )
    return datamodule, name, whole or given["train"]


def check_elements(datamodule: Any, name: str, elements: Sequence[int]) -> None:
    """A ConfigError naming the elements of the evaluated data the model lacks (sets up to
    :data:`tdn.train.data.ELEMENT_SCAN_LIMIT` structures are scanned first)."""
    from ase.data import chemical_symbols

    from .train.errors import ConfigError

    present = datamodule.split_elements(name)
    missing = sorted((present or set()) - {int(z) for z in elements})
    if missing:
        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in missing)
        raise ConfigError(
            f"element(s) {names} appear in the evaluated data but the model knows only {sorted(elements)}: "
            "evaluate structures of the model's elements only"
        )


def resolve_device(device: str) -> torch.device:
    from .train.errors import ConfigError

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={device!r}: {exc} (use cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: no CUDA device is available here; use device=cpu")
    return resolved


def compose_eval(overrides: Sequence[str] = (), model: str | os.PathLike | None = None):
    """The ``tdn-eval`` config for ``overrides`` (the model file set afterwards: paths need no Hydra quoting)."""
    from .train import compose

    cfg = compose(list(overrides), config_name="eval")
    if model is not None:
        cfg.model = str(model)
    return cfg


def evaluate(cfg: Any) -> EvalResult:
    """Evaluate as ``cfg`` (conf/eval.yaml, e.g. from :func:`compose_eval`) says; writes the JSON and the plots."""
    from omegaconf import OmegaConf

    from .evaluate_plots import write_parity_plots
    from .io import load_model
    from .models import UnknownElementError
    from .train.errors import ConfigError

    model_path = OmegaConf.select(cfg, "model", throw_on_missing=False)
    if model_path in (None, MISSING, ""):
        raise ConfigError("no model file: give it as the first argument (tdn-eval model.pt ...) or model=PATH")
    if cfg.dtype is not None and cfg.dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32, float64 or null (the model's), got {cfg.dtype!r}")
    if not isinstance(cfg.batch_size, int) or isinstance(cfg.batch_size, bool) or cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {cfg.batch_size!r}")
    device = resolve_device(str(cfg.device))
    model = load_model(model_path, dtype=cfg.dtype)
    cfg.dtype = model.config.dtype
    cutoff = float(model.config.cutoff)
    if cfg.cutoff is None:
        cfg.cutoff = cutoff
    data = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=False)
    if abs(float(data["cutoff"]) - cutoff) > 1e-9:
        raise ConfigError(f"the neighbour lists would use cutoff {data['cutoff']} Å but the model was built for "
                          f"{cutoff} Å: leave cutoff (and data.cutoff) at null / the model's")  # fmt: skip
    datamodule, name, paths = eval_datamodule(data, str(cfg.split))
    metric_names = list(OmegaConf.to_container(cfg.metrics, resolve=True) if OmegaConf.is_config(cfg.metrics)
                        else [cfg.metrics])  # fmt: skip
    check_elements(datamodule, name, model.config.elements)
    try:
        loader = datamodule.eval_dataloader(name)
        start = time.perf_counter()
        found = evaluate_model(
            model,
            loader,
            metric_names,
            device=device,
            compute_stress=cfg.compute_stress,
            free_atoms_only=bool(data.get("free_atoms_only", False)),
            plot_max_points=int(cfg.plot_max_points),
            progress=bool(cfg.progress),
            seed=int(cfg.seed),
        )
    except UnknownElementError as exc:  # in a set too large to scan beforehand
        raise ConfigError(f"data: {exc}; evaluate structures of these elements only") from None
    except ValueError as exc:
        if "metric family" in str(exc):
            raise ConfigError(f"metrics: {exc}") from None
        raise
    seconds = time.perf_counter() - start
    out = Path(cfg.out) if cfg.out else Path(f"eval-{Path(model_path).stem}-{cfg.split}")
    out.mkdir(parents=True, exist_ok=True)
    result = EvalResult(output_dir=out, metrics=found["metrics"], per_element=found["per_element"])
    if cfg.plots and found["num_structures"]:
        e, f = found["energy"], found["forces"]
        maes = (found["metrics"].get("energy_per_atom_mae_meV"), found["metrics"].get("forces_mae_meV_A"))
        energy_mae, forces_mae = (None if v is None else v / MEV for v in maes)
        written = write_parity_plots(out, e[:, 0], e[:, 1], e[:, 2], f[:, 0], f[:, 1], energy_mae, forces_mae)
        result.plots = {kind: out / file for kind, file in written.items()}
    result.report = {
        "model": str(Path(model_path).resolve()),
        "data": {"paths": paths, "format": data.get("format"), "split": str(cfg.split)},
        "device": str(device),
        "dtype": model.config.dtype,
        "metric_families": metric_names,
        "num_structures": found["num_structures"],
        "num_atoms": found["num_atoms"],
        "seconds": seconds,
        "metrics": result.metrics,
        "per_element": result.per_element,
        "plots": {kind: path.name for kind, path in result.plots.items()},
    }
    result.json_path = out / "metrics.json"
    result.json_path.write_text(json.dumps(result.report, indent=2, sort_keys=False))
    return result


# ---------------------------------------------------------------------------------------------------- command line
def split_arguments(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The model file (the argument without ``=``) and the overrides."""
    from .train.errors import ConfigError

    positional = [a for a in argv if "=" not in a]
    if len(positional) > 1:
        raise ConfigError(f"one model file and key=value overrides expected, got {positional}")
    return (positional[0] if positional else None), [a for a in argv if "=" in a]


def override_message(error: BaseException) -> str:
    """Hydra's message for a bad override on one line, without its advice to add unknown keys with ``+``."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    match = re.match(r"Could not override '([^']+)'", text)
    if match:
        return f"unknown option {match.group(1)!r} (tdn-eval --help lists the options)"
    return text


def summary(result: EvalResult) -> str:
    lines = [f"{result.report['num_structures']} structures, {result.report['num_atoms']} atoms "
             f"({result.report['seconds']:.1f} s)", "metrics:"]  # fmt: skip
    width = max((len(k) for k in result.metrics), default=0)
    lines += [f"  {k:<{width}}  {'n/a' if v is None else f'{v:.6g}'}" for k, v in sorted(result.metrics.items())]
    if result.per_element:
        lines.append("force errors per element (meV/Å):  MAE  RMSE  atoms")
        lines += [
            f"  {symbol:<3} {row['forces_mae_meV_A']:.6g}  {row['forces_rmse_meV_A']:.6g}  {row['num_atoms']}"
            for symbol, row in result.per_element.items()
        ]
    lines.append(f"metrics:        {result.json_path}")
    lines += [f"parity plot:    {path}" for path in result.plots.values()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``tdn-eval`` entry point."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .train.cli import report_user_error

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    debug = "debug=true" in argv or os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        model, overrides = split_arguments(argv)
        result = evaluate(compose_eval(overrides, model))
    except (HydraException, OmegaConfBaseException) as error:  # a bad override: Hydra's message, first lines
        if debug:
            raise
        print(f"tdn-eval: configuration error: {override_message(error)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as error:  # noqa: BLE001 - sorted into a user's mistake or a bug
        report_user_error("tdn-eval", error, debug)
    print(summary(result), flush=True)


if __name__ == "__main__":
    main()
