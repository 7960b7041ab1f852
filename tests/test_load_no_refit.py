"""A model file records the rank of every CP factor set (config.cp_factors): load_model builds placeholders of those
ranks and loads the file's values, without reading, fitting or caching factors; older files still load."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import SMALL_MODEL, small_model
from torch_geometric.data import Data

import tdn
from tdn.contractions import factors as product_factors
from tdn.io import ModelFileError, read_model_file
from tdn.tp import cp
from tdn.tp.factor_store import FactorStore, factor_plan

pytestmark = pytest.mark.usefixtures("one_thread")

# Tolerances with no shipped factors (those are fitted for 1e-4): building the model fits and caches them.
UNSHIPPED = dict(tp_options={"tol": 2e-2}, product_options={"tol": 2e-2})
CP_MODEL = dict(tp="cp", lmax=1, correlation=3, elements=[1, 8], cutoff=4.0, **UNSHIPPED)


def water() -> Data:
    pos = torch.tensor([[0.0, 0.0, 0.1], [0.76, 0.0, -0.5], [-0.7, 0.1, -0.48]], dtype=torch.float64)
    return Data(
        pos=pos,
        atomic_numbers=torch.tensor([8, 1, 1]),
        edge_index=torch.tensor([[0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1]]),
        unit_shifts=torch.zeros(6, 3, dtype=torch.float64),
        cell=torch.zeros(1, 3, 3, dtype=torch.float64),
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A float64 cp model (two-body and product basis) with factors fitted into a private cache, and its file."""
    folder = tmp_path_factory.mktemp("no_refit")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TDN_CACHE_DIR", str(folder / "build_cache"))
        product_factors.clear_memory()
        model = small_model(**CP_MODEL)
        product_factors.clear_memory()
    assert SMALL_MODEL["dtype"] == "float64" and model.dtype == torch.float64
    sources = {block.tp.factors_source for block in model.interactions}
    assert sources == {"fitted"}, "the test needs factors that are not shipped"
    path = folder / "model.tdn"
    tdn.save_model(model, path)
    return model, path


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty cache directory for the test, and no product-basis factors kept in memory."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TDN_CACHE_DIR", str(cache))
    product_factors.clear_memory()
    yield cache
    product_factors.clear_memory()


@pytest.fixture
def no_factor_files(monkeypatch):
    """Any fit, factor-file lookup, read or cache write fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("factors were fitted or a factor file was used while loading a model file")

    for module in (cp, product_factors):
        monkeypatch.setattr(module, "fit_factors", refuse)
    for method in ("find", "load", "cache", "save"):
        monkeypatch.setattr(FactorStore, method, refuse)


def expected_record(model) -> dict[str, int]:
    """``{family: sorted ranks}`` of the model's CP modules, as the modules report them."""
    tp_ranks = sorted({block.tp.rank for block in model.interactions})
    product_ranks = sorted({r for block in model.products for r in block.basis.ranks.values()})
    return {"cp_factors": tp_ranks, "product_cp": product_ranks}


def recorded_ranks(record: dict) -> dict[str, list[int]]:
    families: dict[str, set[int]] = {"cp_factors": set(), "product_cp": set()}
    for key, entry in record.items():
        families[key.split("/")[0]].add(entry["rank"])
    return {family: sorted(ranks) for family, ranks in families.items()}


def rewrite_config(path, target, change) -> None:
    """Write ``path``'s payload to ``target`` with ``change(config)`` applied to its config."""
    payload = read_model_file(path)
    config = json.loads(json.dumps(payload["config"]))
    change(config)
    torch.save({**payload, "config": json.dumps(config)}, target)


def test_config_records_every_cp_factor_set(saved):
    model, path = saved
    record = read_model_file(path)["config"]["cp_factors"]
    assert recorded_ranks(record) == expected_record(model)
    # layer 0 reads scalars (lmax_in 0), layer 1 l <= 1; the product basis has orders 2 and 3 in both layers
    assert sorted(record) == sorted(
        [f"cp_factors/cp_o3_{l_in}_1_1_tol2e-02" for l_in in (0, 1)]
        + [f"product_cp/cp_o3_in1_out{l_out}_nu{nu}_tol2e-02" for l_out in (0, 1) for nu in (2, 3)]
    )
    errors = {block.tp.fit_error for block in model.interactions}
    assert errors <= {entry["error"] for entry in record.values()}


def test_load_needs_no_fit_and_no_factor_file(saved, empty_cache, no_factor_files):
    model, path = saved
    loaded = tdn.load_model(path)
    graph = water()
    expected, got = model(graph), loaded(graph)
    assert got["energy"].dtype == torch.float64
    torch.testing.assert_close(got["energy"], expected["energy"], rtol=0, atol=1e-12)
    torch.testing.assert_close(got["forces"], expected["forces"], rtol=0, atol=1e-12)
    assert not empty_cache.exists()  # nothing was cached
    assert loaded.config.cp_factors == model.config.cp_factors
    for block, original in zip(loaded.interactions, model.interactions):
        assert block.tp.factors_source == "model file" and block.tp.factors_file == str(path)
        assert block.tp.fit_error == original.tp.fit_error
        assert torch.equal(block.tp.x_factor, original.tp.x_factor)
    for block, original in zip(loaded.products, model.products):
        assert block.basis.ranks == original.basis.ranks and block.basis.fit_errors == original.basis.fit_errors
        assert torch.equal(block.basis.contraction.directions, original.basis.contraction.directions)


def test_file_without_the_record_still_loads(saved, empty_cache, tmp_path):
    model, path = saved
    old = tmp_path / "old.tdn"
    rewrite_config(path, old, lambda config: config.pop("cp_factors"))
    assert "cp_factors" not in read_model_file(old)["config"]
    loaded = tdn.load_model(old)  # the factors are looked up, here fitted again, then replaced by the file's
    assert {block.tp.factors_source for block in loaded.interactions} == {"fitted"}
    graph = water()
    torch.testing.assert_close(loaded(graph)["energy"], model(graph)["energy"], rtol=0, atol=1e-12)
    assert recorded_ranks(loaded.config.cp_factors) == expected_record(model)


@pytest.mark.parametrize("family", ["cp_factors", "product_cp"])
def test_a_rank_that_disagrees_with_the_tensors_is_a_clear_error(saved, empty_cache, no_factor_files, tmp_path,
                                                                 family):
    _, path = saved
    edited = tmp_path / "edited.tdn"

    def bump(config):
        key = next(k for k in config["cp_factors"] if k.startswith(family + "/"))
        config["cp_factors"][key]["rank"] += 1

    rewrite_config(path, edited, bump)
    with pytest.raises(ModelFileError, match=rf"{re.escape(str(edited))}.*CP ranks recorded in its config .* disagree"):
        tdn.load_model(edited)


@pytest.mark.parametrize("entry", [{"rank": 0, "error": 0.0}, {"rank": "4", "error": 0.0}, {"rank": 4}, 4])
def test_a_malformed_record_is_a_clear_error(saved, tmp_path, entry):
    _, path = saved
    edited = tmp_path / "edited.tdn"
    rewrite_config(path, edited, lambda config: config["cp_factors"].update({"cp_factors/x": entry}))
    with pytest.raises(ModelFileError, match=r"incompatible model config: cp_factors\['cp_factors/x'\]"):
        tdn.load_model(edited)


def test_models_without_cp_factors_record_nothing():
    assert small_model(elements=[1, 8]).config.cp_factors == {}  # cg everywhere


def test_placeholders_only_for_the_listed_sets(empty_cache):
    name = cp.factor_name(1, 1, 1, "o3", tol=2e-2)
    key = cp.STORE.key(name)
    with factor_plan({key: {"rank": 3, "error": 0.5}}, origin="model.tdn") as plan:
        tp = tdn.tp.build("cp", lmax=1, channels=2, tol=2e-2)
        other = tdn.tp.build("cp", lmax=1, channels=2)  # the shipped default: looked up as usual
    assert tp.rank == 3 and tp.factors_source == "model file" and tp.fit_error == 0.5
    assert not bool(tp.x_factor.any()) and not empty_cache.exists()
    assert other.factors_source == "package" and other.fit_error > 0
    assert plan.recorded[key] == {"rank": 3, "error": 0.5}
    assert plan.recorded[cp.STORE.key(cp.factor_name(1, 1, 1, "o3"))]["rank"] == other.rank
