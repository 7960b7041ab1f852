"""One training run from a composed config: checks, data, model, fit, test, export, plots.

:func:`train` is what ``tdn-train`` calls inside Hydra; tests call it with a config from Hydra's compose API and an
output directory of their own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from .. import models
from ..data.statistics import RANK_DEFICIENT_ADVICE
from ..io import check_finite, refused_global
from .callbacks import NonFiniteLossGuard, Snapshots, TrainingClock
from .checks import check_options
from .committee import CommitteeResult, committee_size, train_committee
from .data import TrainingDataModule, build_datamodule, check_elements
from .errors import ConfigError
from .export import export_model, reproduction_error
from .finetune import FinetuneOptions, ParamPlan, load_for_finetuning
from .loggers import build_loggers, check_loggers
from .module import PotentialModule
from .plot import plot_learning_curve
from .replay import ReplayOptions
from .resolvers import MODEL_DTYPES, training_data_stats
from .rundir import RunDirRecord, check_run_dir, clear_outputs, is_launcher_child, recorded, resumes_here

logger = logging.getLogger("tdn.train")

TOP_LEVEL_REQUIRED = ("model", "data", "trainer", "training_module", "checkpoint")
QUIET_WARNINGS = (  # Lightning's hints that do not apply here
    ".*does not have many workers.*",
    ".*module\\(s\\) in eval mode.*",  # the EMA copy is meant to stay in eval mode
    ".*overridden `on_(before|after)_batch_transfer`.*",  # the dtype cast and CPU-side flags are the module's
    ".*Experiment logs directory .* exists and is not empty.*",  # the run directory is checked by tdn.train.rundir
    ".*Checkpoint directory .* exists and is not empty.*",  # ... and holds checkpoints only when resuming in place
)
STATS_E0 = "${training_data_stats:e0}"  # how conf/model takes the E0s from the training data


@dataclass
class RunResult:
    """What a run produced (paths are None when that output was not written)."""

    output_dir: Path
    test_metrics: dict[str, float] = field(default_factory=dict)
    model_path: Path | None = None
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    learning_curve: Path | None = None
    export_error: float | None = None


# ---------------------------------------------------------------------------------------------------- building
def _container(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.to_container(cfg[key], resolve=True)


def finetune_section(cfg: DictConfig) -> dict[str, Any]:
    """The ``finetune`` section as plain values ({} for configs without one)."""
    return _container(cfg, "finetune") if cfg.get("finetune") is not None else {}


def _stats_provider(datamodule: TrainingDataModule):
    def provide(name: str) -> Any:
        stats = datamodule.statistics()
        if name not in stats:
            known = sorted(k for k in stats if k != "fingerprint")
            raise ConfigError(f"${{training_data_stats:{name}}}: no such statistic; the data module gives {known}")
        value = stats[name]
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"${{training_data_stats:{name}}} is {value}: the training split cannot provide it")
        return value

    return provide


def build_model(cfg: DictConfig, datamodule: TrainingDataModule) -> torch.nn.Module:
    """The model of ``cfg.model`` with its statistics from the training split, or the one of ``cfg.init_from``
    prepared for fine-tuning (:mod:`tdn.train.finetune`)."""
    return build_model_and_plan(cfg, datamodule)[0]


def build_model_and_plan(cfg: DictConfig, datamodule: TrainingDataModule) -> tuple[torch.nn.Module, ParamPlan | None]:
    """:func:`build_model`, and with ``init_from`` how the parameters train (frozen parts, learning-rate factors)."""
    dtype = MODEL_DTYPES[cfg.dtype] if cfg.dtype in MODEL_DTYPES else None
    if dtype is None:
        raise ConfigError(f"dtype must be one of {sorted(MODEL_DTYPES)}, got {cfg.dtype!r}")
    if cfg.get("init_from"):
        return load_for_finetuning(cfg, datamodule, datamodule.statistics(), dtype)
    return _new_model(cfg, datamodule), None


def _new_model(cfg: DictConfig, datamodule: TrainingDataModule) -> torch.nn.Module:
    with training_data_stats(_stats_provider(datamodule)):
        try:
            values = _container(cfg, "model")
        except InterpolationResolutionError as exc:
            if isinstance(exc.__cause__, ConfigError):
                raise exc.__cause__ from None
            raise ConfigError(f"model: {exc}") from exc
    values = {k: v for k, v in values.items() if v is not None}
    values.setdefault("e0_kind", e0_kind(cfg, datamodule))
    if values.get("scale") is not None and not float(values["scale"]) > 0:
        logger.warning("model.scale = %s (no force signal in the training data?): using 1.0", values["scale"])
        values["scale"] = 1.0
    energies = values.get("atomic_energies")
    if isinstance(energies, dict):  # {Z: E0} from the statistics; elements absent from training get 0
        energies = {int(z): float(e) for z, e in energies.items()}
        absent = [int(z) for z in values.get("elements", []) if int(z) not in energies]
        if absent:
            logger.warning("no training structure contains Z=%s: their E0 is set to 0 eV", absent)
        values["atomic_energies"] = {int(z): energies.get(int(z), 0.0) for z in values.get("elements", [])}
    try:
        return models.build_model(config=values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from exc


def e0_kind(cfg: DictConfig, datamodule: TrainingDataModule) -> str:
    """What the model's E0s will be (:data:`tdn.models.config.E0_KINDS`): from the statistics when
    ``model.atomic_energies`` takes them from the training data, "isolated" when the user gives them, else "none"."""
    raw = OmegaConf.to_container(cfg.model, resolve=False).get("atomic_energies")  # interpolations as written
    if raw is None:
        return "none"
    if isinstance(raw, str) and raw.replace(" ", "") == STATS_E0:
        return str(datamodule.statistics().get("e0_kind", "unknown"))
    return "isolated"


def warn_rank_deficient(cfg: DictConfig, model: torch.nn.Module, stats: dict[str, Any]) -> None:
    """The warning (once per run) when the model's E0s are a rank-deficient least-squares fit."""
    if cfg.get("init_from") or model.config.e0_kind != "fitted-rank-deficient":
        return
    logger.warning(
        "E0 fit: the training data has only %d independent composition(s) for %d elements, so the least-squares "
        "E0s (%s) are not isolated-atom energies. Options: %s",
        stats.get("e0_rank", 0),
        len(model.config.elements),
        ", ".join(f"Z={z}: {e:.6g} eV" for z, e in zip(model.config.elements, model.config.atomic_energies)),
        RANK_DEFICIENT_ADVICE,
    )


def build_module(cfg: DictConfig, model: torch.nn.Module, plan: ParamPlan | None = None) -> PotentialModule:
    tm = _container(cfg, "training_module")
    unknown = sorted(set(tm) - {"loss", "optimizer", "lr_scheduler", "ema", "metrics", "compute_stress"})
    if unknown:
        raise ConfigError(f"unknown training_module option(s) {unknown}")
    try:
        return PotentialModule(
            model_config=model.config.to_dict(), model=model, seed=int(cfg.seed), finetune_plan=plan, **tm
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"training_module: {exc}") from exc


def build_trainer(cfg: DictConfig, output_dir: Path) -> tuple[L.Trainer, ModelCheckpoint]:
    trainer_kwargs = _container(cfg, "trainer")
    keep_history = resumes_here(output_dir, cfg.get("ckpt_path"))  # metrics.csv continues the resumed run's
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="best",
        monitor=cfg.checkpoint.monitor,
        mode=cfg.checkpoint.mode,
        save_top_k=1,
        auto_insert_metric_name=False,
    )
    # last.ckpt after every epoch: Lightning's save_last rewrites it only when the monitored value improved, so a
    # run stopped after epochs without improvement would resume from an older epoch
    latest = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
                             auto_insert_metric_name=False, enable_version_counter=False)
    loggers = build_loggers(cfg, output_dir, keep_history=keep_history)
    guard = NonFiniteLossGuard(every=int(trainer_kwargs.get("log_every_n_steps") or 50))
    clock = TrainingClock()
    callbacks = [guard, clock, checkpoint, latest, LearningRateMonitor(logging_interval="epoch")]
    snapshots = _container(cfg, "snapshots") if cfg.get("snapshots") is not None else {}
    if snapshots.get("epochs") or snapshots.get("every_n_epochs"):
        callbacks.insert(2, Snapshots(output_dir / "snapshots", snapshots.get("epochs") or (),
                                      snapshots.get("every_n_epochs") or 0, clock))
    try:
        trainer = L.Trainer(
            default_root_dir=str(output_dir),
            logger=loggers or False,
            callbacks=callbacks,
            use_distributed_sampler=False,  # the data module shards its balanced batches over the ranks itself
            **trainer_kwargs,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"trainer: {exc}") from exc
    return trainer, checkpoint


def check_config(cfg: DictConfig) -> None:
    """Structural checks that need no data (Hydra has already refused unknown groups and keys)."""
    missing = [k for k in TOP_LEVEL_REQUIRED if k not in cfg]
    if missing:
        raise ConfigError(f"config is missing section(s) {missing}")
    check_options(cfg)
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path: no such checkpoint: {cfg.ckpt_path}")
    if cfg.get("init_from") and not Path(cfg.init_from).is_file():
        raise ConfigError(f"init_from: no such model file: {cfg.init_from}")
    finetune = finetune_section(cfg)
    options = FinetuneOptions.from_config(finetune)
    replay = ReplayOptions.from_config(finetune.get("replay"))
    used = options.used_without_init_from() + (["finetune.replay.data"] if replay is not None else [])
    if used and not cfg.get("init_from"):
        raise ConfigError(f"{', '.join(used)} fine-tune(s) an exported model: give init_from=path/to/model.pt")
    check_loggers(cfg)
    if cfg.dtype not in MODEL_DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(MODEL_DTYPES)}, got {cfg.dtype!r}")


# ---------------------------------------------------------------------------------------------------- the run
def train(cfg: DictConfig, output_dir: str | Path) -> RunResult | CommitteeResult:
    """Train, test and export as ``cfg`` says, writing everything under ``output_dir``.

    ``committee.size > 1``: that many runs, one after the other, in ``output_dir/member_<k>``
    (:mod:`tdn.train.committee`), returning a :class:`tdn.train.committee.CommitteeResult`.

    ``output_dir`` must be new or empty, unless ``cfg.ckpt_path`` is a checkpoint of the run in it (resume) or
    ``cfg.overwrite`` is set (its previous outputs are replaced). A run that fails before writing a checkpoint
    removes what it created.
    """
    output_dir = Path(output_dir)
    if committee_size(cfg) > 1:
        return train_committee(cfg, output_dir, train)
    record = recorded(output_dir) or RunDirRecord(output_dir)  # the command line's was taken before Hydra wrote
    try:
        check_config(cfg)
        check_run_dir(output_dir, cfg)
        if cfg.get("overwrite") and not resumes_here(output_dir, cfg.get("ckpt_path")) and not is_launcher_child():
            removed = clear_outputs(output_dir)
            record.before -= set(removed)
            if removed:
                logger.warning("overwrite=true: removed the previous run's %s from %s", ", ".join(removed), output_dir)
        return _train(cfg, output_dir)
    except BaseException:
        if not is_launcher_child():
            record.clean_up()
        raise


def _train(cfg: DictConfig, output_dir: Path) -> RunResult:
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
        os.environ["OMP_NUM_THREADS"] = str(int(cfg.cpu_threads))  # Lightning's DDP and child processes keep it
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    datamodule = build_datamodule(_container(cfg, "data"), stats_file=output_dir / "statistics.json")
    if not datamodule.has_split("val"):
        raise ConfigError("training needs a validation split: give data.val=... or data.val_size > 0")
    stats = datamodule.statistics()  # reads the training split: data errors surface here, naming file and record
    replay = ReplayOptions.from_config(finetune_section(cfg).get("replay"))
    if replay is not None:
        datamodule.add_replay(replay)
    model, plan = build_model_and_plan(cfg, datamodule)
    if abs(float(datamodule.cutoff) - float(model.config.cutoff)) > 1e-9:
        raise ConfigError(
            f"the neighbour lists use cutoff {datamodule.cutoff} Å but the model was built for {model.config.cutoff} Å"
            f" (with init_from, set cutoff={model.config.cutoff})"
        )
    check_elements(datamodule, model.config.elements, stats, init_from=cfg.get("init_from"))
    warn_rank_deficient(cfg, model, stats)
    module = build_module(cfg, model, plan)
    trainer, checkpoint = build_trainer(cfg, output_dir)
    result = RunResult(output_dir=output_dir)

    if trainer.is_global_zero:
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=False))
        (output_dir / "model_config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        try:  # a checkpoint is loaded as data only: pickled code in it is refused
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path") or None, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ConfigError(
                f"ckpt_path: {cfg.ckpt_path} holds pickled Python objects, which tdn refuses to load "
                f"({refused_global(exc)})"
            ) from None

        result.last_checkpoint = _existing(output_dir / "checkpoints" / "last.ckpt")
        result.best_checkpoint = _existing(checkpoint.best_model_path)
        if result.best_checkpoint is not None:  # test and export the best weights (and their EMA)
            state = torch.load(result.best_checkpoint, map_location=module.device, weights_only=True)
            module.load_state_dict(state["state_dict"])
        if cfg.get("test", True) and datamodule.has_split("test"):
            trainer.test(module, datamodule=datamodule, verbose=False)
            result.test_metrics = dict(module.test_results)

    if trainer.is_global_zero:
        _finish(cfg, module, datamodule, result)
    return result


def _existing(path: str | Path | None) -> Path | None:
    return Path(path) if path and Path(path).is_file() else None


def _finish(cfg: DictConfig, module: PotentialModule, datamodule: TrainingDataModule, result: RunResult) -> None:
    out = result.output_dir
    if result.test_metrics:
        (out / "test_metrics.json").write_text(json.dumps(result.test_metrics, indent=2, sort_keys=True))
    metrics_csv = out / "metrics.csv"
    if metrics_csv.is_file():
        result.learning_curve = plot_learning_curve(metrics_csv, out / "learning_curve.png")
    if cfg.get("export", True):
        model = module.export_model()
        check_finite(model, what=f"model of {result.best_checkpoint or 'the last epoch'}")  # never export NaN
        result.model_path = export_model(model, out / "model.pt")
        batch = next(iter(datamodule.val_dataloader()))
        result.export_error = reproduction_error(model, result.model_path, module.on_after_batch_transfer(batch, 0))
    _report(result)


def _report(result: RunResult) -> None:
    lines = []
    if result.test_metrics:
        lines.append("test metrics:")
        width = max(len(k) for k in result.test_metrics)
        lines += [f"  {k:<{width}}  {v:.6g}" for k, v in sorted(result.test_metrics.items())]
    if result.best_checkpoint is not None:
        lines.append(f"best checkpoint: {result.best_checkpoint}")
    if result.learning_curve is not None:
        lines.append(f"learning curve:  {result.learning_curve}")
    if result.model_path is not None:
        lines.append(
            f"exported model:  {result.model_path}  (reproduces the trained model to {result.export_error:.1e} eV)"
        )
    print("\n".join(lines), flush=True)
