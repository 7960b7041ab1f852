"""The Hydra config tree, and the errors a bad configuration gets before training starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SAMPLE, SAMPLE_DATA, needs_sample
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from tdn.models import PRESETS
from tdn.train import CONF_DIR, ConfigError, compose, train
from tdn.train.resolvers import training_data_stats

TINY = [
    *SAMPLE_DATA,
    "model.channels=4",
    "model.lmax=1",
    "model.correlation=2",
    "model.radial_mlp=[8]",
    "epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.num_sanity_val_steps=0",
]

FAKE_STATS = {
    "elements": [1, 8],
    "avg_num_neighbors": 3.0,
    "e0": {1: -1.0, 8: -2.0},
    "force_rms": 0.5,
    "mean_interaction_energy_per_atom": 0.1,
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_config_tree():
    assert options("tp") == ["cg", "cp", "gaunt", "grid"]
    assert options("model") == ["mace", "mace_medium"]
    assert options("data") == ["extxyz", "oc20_s2ef", "oc22_s2ef", "pubchemqcr", "pubchemqcr_s", "rmd17", "sample"]
    assert options("trainer") == ["cpu", "ddp", "gpu"]
    assert {"oc20_s2ef_2m", "pubchemqcr_s", "rmd17_aspirin"} <= set(options("experiment"))
    cfg = compose([])
    choices = {"model": "mace", "tp": "cp", "data": "sample", "trainer": "cpu"}
    assert cfg.model.tp == "cp" and cfg.trainer.accelerator == "cpu" and cfg.trainer.max_epochs == cfg.epochs
    assert all(option in options(group) for group, option in choices.items())


@pytest.mark.parametrize(
    "overrides",
    [[f"tp={t}"] for t in options("tp")]
    + [[f"model={m}"] for m in options("model")]
    + [[f"data={d}"] for d in options("data")]
    + [[f"trainer={t}"] for t in options("trainer")]
    + [[f"experiment={e}"] for e in options("experiment")]
    + [["dtype=float64"], ["dtype=bf16-mixed"]],
)
def test_every_option_resolves(overrides):
    """Every option composes and resolves (statistics from a stand-in provider; mandatory paths may stay ???)."""
    cfg = compose(overrides)
    with training_data_stats(FAKE_STATS.__getitem__):
        resolved = OmegaConf.to_container(cfg, resolve=True)
    model = resolved["model"]
    assert model["tp"] == resolved["tp"]["kind"] and model["cutoff"] == resolved["cutoff"]
    assert model["avg_num_neighbors"] == 3.0 and model["atomic_energies"] == {1: -1.0, 8: -2.0}
    assert resolved["trainer"]["precision"] in ("32-true", "64-true", "bf16-mixed")
    assert resolved["data"]["cutoff"] == resolved["cutoff"]


def test_mace_medium_matches_the_model_preset():
    cfg = compose(["model=mace_medium"])
    for key, value in PRESETS["mace-medium"].items():
        assert cfg.model[key] == value, key


def test_statistics_resolver_outside_a_run():
    with pytest.raises(Exception, match="training_data_stats"):
        OmegaConf.to_container(compose([]).model, resolve=True)


# ----------------------------------------------------------------------------------------------- config errors
def test_unknown_group_option():
    with pytest.raises(MissingConfigException, match="tp/foo"):
        compose(["tp=foo"])
    with pytest.raises(ConfigCompositionException, match="training_module.loss.nope"):
        compose(["training_module.loss.nope=1"])


def test_unknown_group_option_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "tdn.train.cli", "data=nope"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "Could not find 'data/nope'" in proc.stderr and "sample" in proc.stderr  # the options are listed


def test_missing_data_path(tmp_path):
    with pytest.raises(ConfigError, match="data.train: no such file or directory: /nonexistent/train.xyz"):
        train(compose(TINY + ["data.train=/nonexistent/train.xyz"]), tmp_path)
    with pytest.raises(ConfigError, match="data.test: no such file"):
        train(compose(TINY + [f"data.test={tmp_path / 'test.xyz'}"]), tmp_path)
    with pytest.raises(ConfigError, match="data: train=100"):
        train(compose(TINY + ["data.train_size=100"]), tmp_path)
    with pytest.raises(ConfigError, match="data.train is required"):
        train(compose(["data=oc20_s2ef", "data.val=/x"]), tmp_path)


@needs_sample
def test_missing_data_path_cli(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tdn.train.cli",
            "data=rmd17",
            f"data.source.root={tmp_path}/rmd17",
            f"hydra.run.dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"configuration error: data.train: no such file or directory: {tmp_path}/rmd17/aspirin/train_01.xyz" in (
        proc.stderr
    )


@needs_sample
def test_element_not_in_model(tmp_path):
    with pytest.raises(ConfigError, match=r"N \(Z=7\) appear in the training data but not in the model"):
        train(compose(TINY + ["model.elements=[1,6,8]"]), tmp_path / "a")
    # an element only the test split has: found before training too
    with pytest.raises(ConfigError, match=r"Cu \(Z=29\), Pt \(Z=78\) appear in the test data"):
        train(compose(TINY + ["data.format=null", f"data.test={SAMPLE / 'oc20'}"]), tmp_path / "b")


def test_bad_run_options(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path: no such checkpoint"):
        train(compose(TINY + [f"ckpt_path={tmp_path / 'x.ckpt'}"]), tmp_path)
    with pytest.raises(ConfigError, match="init_from: no such model file"):
        train(compose(TINY + [f"init_from={tmp_path / 'x.pt'}"]), tmp_path)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        train(compose(TINY + ["dtype=float16"]), tmp_path)


@needs_sample
def test_bad_training_options(tmp_path):
    with pytest.raises(ConfigError, match="neighbour lists use cutoff 5.0 Å but the model was built for 4.0 Å"):
        train(compose(TINY + ["model.cutoff=4.0"]), tmp_path)
    with pytest.raises(ConfigError, match="loss.kind must be one of"):
        train(compose(TINY + ["training_module.loss.kind=l1"]), tmp_path)
    with pytest.raises(ConfigError, match="unknown metric family"):
        train(compose(TINY + ["training_module.metrics=[generic,oc99]"]), tmp_path)


def test_conf_dir_is_the_repository_one():
    """The package's config tree is the repository's conf/ (tdn/conf links to it), not a copy that could drift."""
    assert CONF_DIR.resolve() == Path(__file__).resolve().parents[1] / "conf"


def test_compose_from_several_threads_at_once():
    """Hydra's global state is per process: concurrent compose calls must not trip over each other."""
    from concurrent.futures import ThreadPoolExecutor

    from tdn.train import compose

    overrides = [[f"seed={k}", "tp=grid" if k % 2 else "tp=cp"] for k in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        configs = list(pool.map(compose, overrides))
    assert [c.seed for c in configs] == list(range(16))
    assert [c.tp.kind for c in configs] == ["cp", "grid"] * 8
