"""The run directory: never write into another run's directory by accident, and leave nothing behind on failure.

- A run writes into an empty (or new) directory. A directory that already holds files is refused unless the run
  resumes from that directory's own checkpoint (``ckpt_path=<dir>/checkpoints/last.ckpt``) or ``overwrite=true``
  says to replace the previous run's outputs (:data:`RUN_OUTPUTS`; other files are left alone).
- Hydra writes ``.hydra/`` and ``<job name>.log`` into the directory before the job starts; those are not a run's
  content. :class:`RunDirGuard` (a Hydra callback, see conf/train.yaml) makes the check before Hydra writes
  anything, so a refused run changes no file.
- :class:`RunDirRecord` remembers what the directory held before the run; a run that fails before it wrote a
  checkpoint removes what it created (the directory too, when it created it), and never anything that was there.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from .errors import ConfigError

# Everything a run writes into its directory (what overwrite=true replaces).
RUN_OUTPUTS = (
    "checkpoints",
    "tensorboard",
    "metrics.csv",
    "hparams.yaml",
    "config.yaml",
    "model_config.json",
    "statistics.json",
    "test_metrics.json",
    "model.pt",
    "learning_curve.png",
    "snapshots",
)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_launcher_child() -> bool:
    """Whether this process is a secondary rank of a multi-process run (it shares the first rank's directory)."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in RANK_VARIABLES)


def _hydra_file(name: str) -> bool:
    return name == ".hydra" or name.endswith(".log")


def run_content(path: str | os.PathLike) -> list[str]:
    """Names in the directory ``path`` other than Hydra's own (``.hydra/``, ``*.log``), sorted; [] if it is new."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if not _hydra_file(p.name))


def resumes_here(output_dir: str | os.PathLike, ckpt_path: Any) -> bool:
    """Whether ``ckpt_path`` is a checkpoint of the run in ``output_dir`` (``<output_dir>/checkpoints/...``)."""
    if not ckpt_path:
        return False
    checkpoints = (Path(output_dir) / "checkpoints").resolve()
    return Path(str(ckpt_path)).resolve().parent == checkpoints


def check_run_dir(output_dir: str | os.PathLike, cfg: Any, key: str = "output directory") -> None:
    """Refuse (ConfigError) a directory that holds another run, unless resuming from its own checkpoint or
    ``overwrite`` is set. ``key`` names the option the user set the directory with (e.g. ``hydra.run.dir``)."""
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ConfigError(f"{key}: {output_dir} is a file, not a directory")
    content = run_content(output_dir)
    if not content or is_launcher_child() or resumes_here(output_dir, cfg.get("ckpt_path")):
        return
    if cfg.get("overwrite", False):
        return
    shown = ", ".join(content[:6]) + (", ..." if len(content) > 6 else "")
    raise ConfigError(
        f"{key}: {output_dir} already holds files ({shown}); a run never writes into another run's directory: "
        f"choose a new directory, resume that run with ckpt_path={Path(output_dir) / 'checkpoints' / 'last.ckpt'}, "
        "or replace its outputs with overwrite=true"
    )


def clear_outputs(output_dir: str | os.PathLike) -> list[str]:
    """Remove a previous run's outputs (:data:`RUN_OUTPUTS`) from ``output_dir``; returns the names removed."""
    removed = []
    for name in RUN_OUTPUTS:
        path = Path(output_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


class RunDirRecord:
    """What ``path`` held before a run, so that a failed run can remove exactly what it created."""

    def __init__(self, path: str | os.PathLike, before: set[str] | None = None, existed: bool | None = None):
        self.path = Path(path)
        self.existed = self.path.is_dir() if existed is None else existed
        self.before = (set(os.listdir(self.path)) if self.existed else set()) if before is None else set(before)

    def wrote_results(self) -> bool:
        """Whether the run left something worth keeping: a checkpoint (the run trained at least one epoch)."""
        checkpoints = self.path / "checkpoints"
        return checkpoints.is_dir() and any(p.suffix == ".ckpt" for p in checkpoints.iterdir())

    def clean_up(self) -> None:
        """After a failure: remove what the run created, unless it wrote a checkpoint; the directory itself too when
        the run created it and it is empty then. Nothing that was there before is touched."""
        if not self.path.is_dir() or self.wrote_results():
            return
        for name in sorted(set(os.listdir(self.path)) - self.before):
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        if not self.existed and not any(self.path.iterdir()):
            self.path.rmdir()


# What the Hydra callback found in each run directory before Hydra wrote into it (read by train() on a failure).
_records: dict[str, RunDirRecord] = {}


def recorded(path: str | os.PathLike) -> RunDirRecord | None:
    """The record :class:`RunDirGuard` made of ``path`` before Hydra wrote into it (None when there is none)."""
    return _records.get(str(Path(path).resolve()))


class RunDirGuard(Callback):
    """Hydra callback (conf/train.yaml ``hydra.callbacks``): checks ``hydra.run.dir`` before Hydra creates it or
    writes ``.hydra/`` into it, and records what it held. A refused run exits with status 2 and changes nothing."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        output_dir = Path(str(config.hydra.run.dir)).resolve()
        try:
            check_run_dir(output_dir, config, key="hydra.run.dir")
        except ConfigError as error:
            print(f"tdn-train: configuration error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
        _records[str(output_dir)] = RunDirRecord(output_dir)
