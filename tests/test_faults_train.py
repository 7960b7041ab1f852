"""Faults a new user hit with ``tdn-train`` and the data readers, each run as a user would (the command line, in
process or as a subprocess, or the public API): the message names the file, record, key or option and the fix, the
exit status is 2 (1 for a diverged run), and no file the user had is changed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from helpers import MOLECULES, QUIET_TRAINER, TINY_MODEL, needs_sample

import tdn
import tdn.data
from tdn.train import ConfigError, compose, train
from tdn.train import cli as tdn_train_cli

pytestmark = [needs_sample, pytest.mark.usefixtures("one_thread")]

SMALL = [
    "data=extxyz",
    "data.val_size=4",
    "batch_size=4",
    *TINY_MODEL,
    *QUIET_TRAINER,
]


# ------------------------------------------------------------------------------------------------------ helpers
def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha1 of every file under ``root``."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


def labelled(atoms, energy: float | None = None):
    atoms.calc = EMT()
    e, f = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = SinglePointCalculator(atoms, energy=e if energy is None else energy, forces=f)
    return atoms


@pytest.fixture(scope="module")
def ch4(tmp_path_factory) -> Path:
    """12 rattled CH4 (one composition, as rMD17), EMT labels."""
    frames = []
    for k in range(12):
        atoms = molecule("CH4")
        atoms.rattle(0.05, seed=k)
        frames.append(labelled(atoms))
    path = tmp_path_factory.mktemp("data") / "ch4.xyz"
    write(path, frames, format="extxyz")
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ch4) -> tuple[Path, list[logging.LogRecord]]:
    """A 2-epoch run on the CH4 data through the public API, and the warnings it logged."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    log = logging.getLogger("tdn.train")
    log.addHandler(handler)
    try:
        out = tmp_path_factory.mktemp("runs") / "run"
        train(compose([*SMALL, f"data.train={ch4}", "epochs=2"]), out)
    finally:
        log.removeHandler(handler)
    return out, records


@pytest.fixture
def tdn_train(monkeypatch, capfd):
    """``tdn-train ARGS`` in this process: (exit status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["tdn-train", *args])
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        loggers = [logging.getLogger(name) for name in ("", *tdn_train_cli.LIGHTNING_LOGGERS)]
        saved = [(log.handlers[:], log.level, log.propagate) for log in loggers]
        capfd.readouterr()
        try:
            tdn_train_cli.main()
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        finally:  # Hydra configured logging for the run: give the other tests theirs back
            for log, (handlers, level, propagate) in zip(loggers, saved):
                for handler in set(log.handlers) - set(handlers):
                    handler.close()
                log.handlers[:], log.level, log.propagate = handlers, level, propagate
        out, err = capfd.readouterr()
        return code, out, err

    return run


def message_lines(err: str) -> list[str]:
    """The lines of stderr that are tdn-train's report (Hydra's log lines start with '[')."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("[")]


# ------------------------------------------------------------------------------------------------ close atoms, NaN
def test_close_atoms_are_a_record_error_naming_file_frame_and_pair(tmp_path):
    frames = read(MOLECULES, ":6")
    frames[4].positions[1] = frames[4].positions[0] + [0.0, 0.0, 0.03]
    path = tmp_path / "close.xyz"
    write(path, frames, format="extxyz")
    ds = tdn.data.read(path)
    with pytest.raises(tdn.data.InvalidRecordError) as info:
        ds[4]
    assert info.value.reason == "close_atoms"
    assert str(info.value) == f"{path} [key frame 4]: close_atoms (atoms 0 and 1 are 0.03 Å apart, closer than 0.1 Å)"
    skipping = tdn.data.TDNDataModule(train=str(path), val_size=0, batch_size=2, skip_invalid=True)
    assert len(skipping.prepared("train")[0]) == 5 and skipping.skipped == {"train": {"close_atoms": 1}}


def test_min_distance_check_is_public_and_sees_periodic_images():
    assert tdn.data.MIN_DISTANCE == 0.1
    tdn.data.check_min_distance([[0, 0, 0], [0, 0, 0.74]])  # H2: fine
    with pytest.raises(tdn.data.CloseAtomsError, match=r"atoms 0 and 1 are 0.05 Å apart") as info:
        tdn.data.check_min_distance([[0.0, 0, 0], [3.95, 0, 0]], cell=np.eye(3) * 4.0, pbc=True)
    assert isinstance(info.value, ValueError) and (info.value.i, info.value.j) == (0, 1)
    with pytest.raises(tdn.data.CloseAtomsError, match="atom 0 and a periodic image of itself"):
        tdn.data.check_min_distance([[0.0, 0, 0]], cell=np.diag([0.05, 4.0, 4.0]), pbc=True)


def test_bad_data_is_two_lines_with_the_skip_invalid_hint(tmp_path, tdn_train):
    frames = read(MOLECULES, ":20")
    frames[5].positions[1] = frames[5].positions[0]
    path = tmp_path / "close.xyz"
    write(path, frames, format="extxyz")
    before = snapshot(tmp_path)
    code, _, err = tdn_train(*SMALL, f"data.train={path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and "Traceback" not in err
    assert message_lines(err) == [
        f"tdn-train: bad training data: {path} [key frame 5]: close_atoms (atoms 0 and 1 are 0 Å apart, closer "
        "than 0.1 Å)",
        "  fix or remove that structure, or skip invalid structures (counted and reported) with "
        "data.skip_invalid=true",
    ]
    assert snapshot(tmp_path) == before  # the data is untouched and the failed run left no directory


def test_nonfinite_loss_stops_training_naming_the_batch(tmp_path):
    """The module keeps the first non-finite batch on the device; the guard reads it every 2 batches and names
    batch 2, found after batch 3."""
    import lightning as L
    from helpers import SMALL_MODEL
    from torch.utils.data import DataLoader

    from tdn.train.callbacks import NonFiniteLossGuard
    from tdn.train.errors import NonFiniteLossError
    from tdn.train.module import PotentialModule

    frames = [labelled(molecule("H2O")) for _ in range(8)]
    for atoms in frames:
        atoms.rattle(0.02, seed=len(frames))
    frames[5].calc.results["energy"] = float("inf")  # batch 2 of batches of 2
    graphs = [tdn.data.atoms_to_graph(a, 3.0, dtype="float64") for a in frames]
    loader = DataLoader(graphs, batch_size=2, collate_fn=tdn.data.collate)
    module = PotentialModule({**SMALL_MODEL, "elements": [1, 8]}, ema={"enabled": False})
    trainer = L.Trainer(
        max_epochs=1, callbacks=[NonFiniteLossGuard(every=2)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, precision="64-true", default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"the loss became inf at epoch 0, batch 2 \(step 2\)") as info:
        trainer.fit(module, loader)
    assert (info.value.epoch, info.value.batch, info.value.step) == (0, 2, 2)
    assert trainer.global_step == 4  # read at the interval (after batch 3), not with a sync every step


def test_nonfinite_loss_cli_exit_1_and_no_leftovers(tmp_path, tdn_train):
    frames = read(MOLECULES, ":16")
    frames[3].calc.results["energy"] = 1e30  # finite, but its square is not (float32)
    path = tmp_path / "huge.xyz"
    write(path, frames, format="extxyz")
    before = snapshot(tmp_path)
    code, _, err = tdn_train(*SMALL, f"data.train={path}", "epochs=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 1 and "Traceback" not in err
    (line,) = [x for x in message_lines(err) if x.startswith("tdn-train:")]
    assert line.startswith("tdn-train: training stopped: the loss became inf at epoch 0, batch ")
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_a_nonfinite_model_is_never_saved(tmp_path, finished_run):
    run, _ = finished_run
    model = tdn.load_model(run / "model.pt")
    target = tmp_path / "model.pt"
    shutil.copy(run / "model.pt", target)
    before = snapshot(tmp_path)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    name = next(n for n, _ in model.named_parameters())
    with pytest.raises(tdn.io.NonFiniteModelError, match=f"non-finite .*in {name}"):
        tdn.save_model(model, target)
    assert snapshot(tmp_path) == before  # the good file is not replaced


# ------------------------------------------------------------------------------------------------------ E0 kind
def test_rank_deficient_e0_is_said_once_and_recorded(finished_run):
    run, records = finished_run
    warnings = [r.getMessage() for r in records if "E0 fit" in r.getMessage()]
    assert len(warnings) == 1
    assert "only 1 independent composition(s) for 2 elements" in warnings[0] and "data.e0={Z: eV" in warnings[0]
    assert tdn.load_model(run / "model.pt").config.e0_kind == "fitted-rank-deficient"
    assert json.loads((run / "statistics.json").read_text())["e0_kind"] == "fitted-rank-deficient"


@pytest.mark.parametrize(
    ("override", "kind"), [("data.e0={1: -13.6, 6: -1030.0}", "isolated"), ("data.e0=zero", "none")]
)
def test_e0_kind_of_given_and_zero_e0(tmp_path, ch4, override, kind):
    from tdn.train.data import build_datamodule
    from tdn.train.run import build_model

    cfg = compose([*SMALL, f"data.train={ch4}", override])
    datamodule = build_datamodule(dict(cfg.data), stats_file=tmp_path / "statistics.json")
    assert build_model(cfg, datamodule).config.e0_kind == kind


def test_old_model_files_load_with_unknown_e0_kind(tmp_path, finished_run):
    run, _ = finished_run
    payload = torch.load(run / "model.pt", weights_only=True)
    config = json.loads(payload["config"])
    del config["e0_kind"]
    torch.save({**payload, "config": json.dumps(config)}, tmp_path / "old.pt")
    assert tdn.load_model(tmp_path / "old.pt").config.e0_kind == "unknown"


# ---------------------------------------------------------------------------------------------- run directories
def test_an_existing_run_directory_is_refused_unchanged_then_overwritten_on_request(tmp_path, finished_run, tdn_train):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("from the first run\n")
    before = snapshot(tmp_path)
    code, _, err = tdn_train(*SMALL, f"hydra.run.dir={run}", f"data.train={_ch4_of(run)}")
    assert code == 2 and "Traceback" not in err
    assert message_lines(err) == [
        f"tdn-train: configuration error: hydra.run.dir: {run} already holds files (checkpoints, config.yaml, "
        "hparams.yaml, learning_curve.png, metrics.csv, model.pt, ...); a run never writes into another run's "
        f"directory: choose a new directory, resume that run with ckpt_path={run}/checkpoints/last.ckpt, or replace "
        "its outputs with overwrite=true"
    ]
    assert snapshot(tmp_path) == before  # not even Hydra's .hydra/ was rewritten

    code, _, _ = tdn_train(*SMALL, f"hydra.run.dir={run}", f"data.train={_ch4_of(run)}", "overwrite=true", "epochs=1")
    assert code == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # no -v1 copies
    assert snapshot(run)["model.pt"] != before["run/model.pt"]


def _ch4_of(run: Path) -> str:
    """The training file of a run, from the config it saved."""
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["data"]["train"]


def test_default_run_directories_are_unique(monkeypatch):
    import re

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tdn.train import CONF_DIR

    for name in ("TDN_RUN_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):  # launchers give their job id instead
        monkeypatch.delenv(name, raising=False)
    dirs = []
    for _ in range(2):  # two runs started together
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="train", return_hydra_config=True)
            dirs.append(str(cfg.hydra.run.dir))
            assert str(cfg.hydra.run.dir) == dirs[-1]  # one run resolves it once
    GlobalHydra.instance().clear()
    assert dirs[0] != dirs[1]
    assert all(re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-[0-9a-f]{6}", d) for d in dirs), dirs


def test_resume_in_place_keeps_the_whole_history_and_loads_safely(tmp_path, finished_run, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    calls = []
    load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    train(compose([*SMALL, f"data.train={_ch4_of(run)}", "epochs=4", f"ckpt_path={run}/checkpoints/last.ckpt"]), run)
    assert calls and all(c is True for c in calls), calls  # the resume and the best-checkpoint reload
    import csv

    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    val_epochs = [int(r["epoch"]) for r in rows if r.get("val/loss")]
    assert val_epochs == [0, 1, 2, 3]


def test_each_log_line_once(tmp_path, ch4):
    """The real command line: Lightning's console handler is not printed beside Hydra's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tdn.train.cli", *SMALL, f"data.train={ch4}", "epochs=1", "export=false",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert text.count("GPU available:") == 1 and text.count("`Trainer.fit` stopped") == 1, text


# ------------------------------------------------------------------------------------------------- user errors
@pytest.fixture
def user_files(tmp_path) -> dict[str, Path]:
    (tmp_path / "empty.xyz").write_text("")
    (tmp_path / "a_directory").mkdir()
    write(tmp_path / "mol.db", read(MOLECULES, ":4"))
    return {p.stem: p for p in tmp_path.iterdir()}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["data.train={empty}"], "data.train: {empty} holds no structures (an empty file?)"),
        (["data.train={a_directory}"], "data.train: {a_directory} is a directory, but data.format=extxyz reads single"),
        ([f"data.train={MOLECULES}", "epochs=abc"], "epochs must be an integer >= 1, got 'abc' (e.g. epochs=50)"),
        (
            ["data.train={mol}"],
            "data.train: {mol} is an ASE database (SQLite), but data.format=extxyz (the format was not guessed from "
            "the file): set data.format=asedb",
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, user_files, tdn_train, args, expected):
    names = {k: str(v) for k, v in user_files.items()}
    args = [a.format(**names) for a in args]
    before = snapshot(tmp_path)
    code, _, err = tdn_train(*SMALL, *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and "Traceback" not in err
    (line,) = message_lines(err)
    assert line.startswith("tdn-train: configuration error: " + expected.format(**names)), line
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_full_traceback_on_request(tmp_path, tdn_train):
    args = [f"data.train={MOLECULES}", "epochs=abc", "debug=true", f"hydra.run.dir={tmp_path}/r"]
    code, _, err = tdn_train(*SMALL, *args)
    assert code == 1 and "Traceback" in err and "ConfigError: epochs must be an integer >= 1, got 'abc'" in err


# ------------------------------------------------------------------------------------------ messages and pickles
def test_forces_shape_error_quotes_the_stored_shape(tmp_path):
    path = tmp_path / "f4.xyz"
    path.write_text(
        '3\nProperties=species:S:1:pos:R:3:REF_forces:R:4 REF_energy=-1.0 pbc="F F F"\n'
        + "".join(f"H 0 {y} {z} 0.1 0.2 0.3 0.4\n" for y, z in ((0, 0), (0, 0.8), (0.8, 0)))
    )
    message = r"forces of shape \(3, 4\) for 3 atoms \(expected \(3, 3\)\)"  # as stored, not reshaped to (4, 3)
    with pytest.raises(tdn.data.InvalidRecordError, match=message):
        tdn.data.read(path)[0]


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_refused_pickles_name_their_file(tmp_path):
    from tdn.data.lmdb_utils import write_lmdb

    write_lmdb(tmp_path / "oc" / "a.lmdb", [(b"length", pickle.dumps(_Payload()))])
    with pytest.raises(tdn.data.UnsafePickleError, match=f"{tmp_path}/oc/a.lmdb \\[key length\\]: unsafe_pickle"):
        len(tdn.data.read(tmp_path / "oc", format="oc20-lmdb"))
    (tmp_path / "ref.pkl").write_bytes(pickle.dumps({"random1": _Payload()}))
    with pytest.raises(tdn.data.UnsafePickleError, match=f"{tmp_path}/ref.pkl \\[key ref_energies\\]"):
        tdn.data.read(MOLECULES.parent / "oc20", format="oc20-lmdb", ref_energies=tmp_path / "ref.pkl")


def test_unsafe_model_file_message(tmp_path):
    torch.save({"format": "tdn-model", "module": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(tdn.io.ModelFileError) as info:
        tdn.load_model(tmp_path / "pickled.pt")
    text = str(info.value)
    assert "will likely succeed" not in text and "weights_only=False" not in text
    assert "torch.nn.modules.linear.Linear" in text and "tdn refuses to load pickled code" in text
    assert "tdn.save_model(model, path)" in text


def test_init_from_with_a_new_element_points_at_the_right_fix(tmp_path, finished_run):
    model = finished_run[0] / "model.pt"
    cfg = compose([*SMALL, f"data.train={MOLECULES}", f"init_from={model}", "data.train_size=12"])
    with pytest.raises(ConfigError) as info:
        train(cfg, tmp_path / "tuned")
    text = str(info.value)
    assert text.startswith("element(s) N (Z=7), O (Z=8) appear in the training data but the model of init_from=")
    assert "knows only [1, 6]" in text and "add them to model.elements" not in text
    assert not (tmp_path / "tuned").exists()
