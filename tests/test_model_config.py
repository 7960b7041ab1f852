"""ModelConfig and build_model: defaults, presets, JSON round trip, clear errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tdn.models import DEFAULT_TP_WEIGHTS, PRESETS, ModelConfig, build_model


def test_defaults_and_json_round_trip():
    config = ModelConfig(elements=[1, 8])
    assert (config.tp, config.lmax, config.channels, config.num_layers, config.correlation, config.cutoff) == (
        "cp",
        2,
        32,
        2,
        3,
        5.0,
    )
    assert config.lmax_hidden == 1 and config.tp_weights == DEFAULT_TP_WEIGHTS["cp"]
    assert config.atomic_energies == [0.0, 0.0] and config.dtype == "float32"
    text = json.dumps(dataclasses.asdict(config))
    assert ModelConfig.from_dict(json.loads(text)) == config


def test_preset_mace_medium():
    config = ModelConfig.from_preset("mace-medium", elements=[1, 6], tp="cg")
    assert (config.channels, config.lmax_hidden, config.lmax, config.correlation, config.num_layers) == (
        128,
        1,
        3,
        3,
        2,
    )
    assert (config.cutoff, config.num_bessel, config.radial_mlp) == (5.0, 8, [64, 64, 64])
    assert PRESETS["mace-medium"]["channels"] == 128


def test_atomic_energies_as_dict_and_dtype_object():
    config = ModelConfig(elements=[8, 1], atomic_energies={"1": -13.6, 8: -2040.0}, dtype=torch.float64)
    assert config.atomic_energies == [-2040.0, -13.6] and config.dtype == "float64"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(elements=[]), "at least one"),
        (dict(elements=[1, 1]), "must not repeat"),
        (dict(elements=[0]), "1..118"),
        (dict(tp="e3nn"), "tp must be one of"),
        (dict(tp="gaunt", paths="so3"), r"supports paths in \('o3',\), got 'so3'"),
        (dict(paths="xyz"), "paths must be"),
        (dict(lmax_hidden=3, lmax=2), "must not exceed"),
        (dict(channels=0), "channels must be >= 1"),
        (dict(channels=2.5), "channels must be an integer"),
        (dict(cutoff=-1), "cutoff must be positive"),
        (dict(atomic_energies=[1.0]), "1 values for 2 elements"),
        (dict(atomic_energies={1: 0.0}), r"no E0 for atomic numbers \[8\]"),
        (dict(dtype="float16"), "dtype must be one of"),
        (dict(avg_num_neighbors=0), "avg_num_neighbors must be positive"),
    ],
)
def test_bad_config_is_a_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"elements": [1, 8], **changes})


def test_from_dict_names_unknown_fields_and_presets():
    with pytest.raises(ValueError, match="unknown ModelConfig fields.*colour"):
        ModelConfig.from_dict({"elements": [1], "colour": "red"})
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("mace-huge", elements=[1])
    with pytest.raises(ValueError, match="needs elements"):
        build_model(tp="cg")


def test_build_model_layers_and_priorities():
    model = build_model(
        preset="tiny", tp="cg", elements=[1, 8], channels=6, lmax=2, num_layers=3, dtype="float64", radial_mlp=[4]
    )
    c = model.config
    assert (c.channels, c.lmax, c.num_layers, c.lmax_hidden, c.radial_mlp) == (6, 2, 3, 1, [4])
    assert all(p.dtype == torch.float64 for p in model.parameters())
    # scalars into the first layer, l <= lmax_hidden between layers, scalars out of the last
    degrees = [(b.tp.lmax_in, b.tp.lmax_sh, b.tp.lmax_out) for b in model.interactions]
    assert degrees == [(0, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert [b.tp.num_weights for b in model.interactions] == [3, 7, 7]  # "path" weights: number of paths
    assert json.loads(json.dumps(c.to_dict())) == c.to_dict()
    with pytest.raises(ValueError, match="unknown options"):
        build_model(preset="tiny", tp="cg", elements=[1], product_options={"colour": 1})
