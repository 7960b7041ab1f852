"""The run's loggers (``loggers=[csv, tensorboard, wandb, mlflow]``): an offline Weights & Biases run writes its files
in the run directory; an optional logger whose package is missing is a one-line error naming ``pip install``."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import QUIET_TRAINER, SAMPLE_DATA, TINY_MODEL, needs_sample

from tdn.train import ConfigError, compose, train

pytestmark = [needs_sample, pytest.mark.usefixtures("one_thread")]

TINY = [
    *SAMPLE_DATA,
    "batch_size=4",
    *TINY_MODEL,
    "epochs=1",
    "test=false",
    "export=false",
    *QUIET_TRAINER,
]


def test_wandb_offline_run_writes_its_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written outside tmp_path
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(compose(TINY + ["loggers=[csv,wandb]", "wandb.project=tdn-test"]), tmp_path / "run")
    out = result.output_dir
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb"))  # the offline record that `wandb sync` uploads
    assert (out / "metrics.csv").is_file() and not (out / "tensorboard").exists()  # only the loggers asked for


def test_mlflow_run_writes_a_local_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset")  # set, then removed: the test's end restores the
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # original environment whatever the run sets
    result = train(compose(TINY + ["loggers=[mlflow]"]), tmp_path / "run")
    (run_dir,) = [p for p in (result.output_dir / "mlruns").glob("*/*") if (p / "metrics").is_dir()]
    assert (run_dir / "metrics" / "train" / "loss").is_file() and (run_dir / "params" / "seed").is_file()


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if it were not installed
    with pytest.raises(ConfigError, match=r"^loggers: wandb needs the wandb package, which is not installed: "
                                          r"pip install wandb \(or leave wandb out of loggers\)$"):  # fmt: skip
        train(compose(TINY + ["loggers=[csv,wandb]"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_missing_mlflow_and_unknown_logger(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match="pip install mlflow"):
        train(compose(TINY + ["loggers=[mlflow]"]), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"unknown logger\(s\) \['neptune'\]"):
        train(compose(TINY + ["loggers=[csv,neptune]"]), tmp_path / "b")


def test_missing_wandb_on_the_command_line(tmp_path):
    """The user's view: one line on stderr, exit status 2."""
    code = (
        "import sys; sys.modules['wandb'] = None; from tdn.train.cli import main; "
        f"sys.argv = ['tdn-train', *{TINY!r}, 'loggers=[wandb]', 'hydra.run.dir={tmp_path / 'run'}']; main()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tdn-train:")]
    assert lines == [
        "tdn-train: configuration error: loggers: wandb needs the wandb package, which is not installed: "
        "pip install wandb (or leave wandb out of loggers)"
    ]
    assert "Traceback" not in proc.stderr
