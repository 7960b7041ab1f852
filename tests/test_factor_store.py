"""The one store of fitted factor files (tdn.tp.factor_store), through both of its families: the two-body CP
factors of tdn.tp.cp and the symmetric CP factors of the product basis (tdn.contractions.factors)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch

import tdn
from tdn.contractions import factors as product_factors
from tdn.tp import cp
from tdn.tp.factor_store import FactorFileError, FactorStore, cache_root, format_tol, read_npz, write_npz

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """An empty cache for every test, and no factors kept in memory between tests."""
    monkeypatch.setenv("TDN_CACHE_DIR", str(tmp_path / "cache"))
    product_factors.clear_memory()
    yield
    product_factors.clear_memory()


# ----------------------------------------------------------------------------------------------- places and names


def test_cache_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "cache"  # TDN_CACHE_DIR wins
    monkeypatch.delenv("TDN_CACHE_DIR")
    assert cache_root() == tmp_path / "xdg" / "tdn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "tdn"


def test_both_families_honour_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("TDN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cp.cache_dir() == tmp_path / "xdg" / "tdn" / "cp_factors"
    assert product_factors.STORE.cache_dir() == tmp_path / "xdg" / "tdn" / "product_cp"
    fitted = product_factors.symmetric_cp(2, 1, 0, "o3", rank=3)
    assert fitted.source == "fitted"
    assert (tmp_path / "xdg" / "tdn" / "product_cp" / product_factors.factor_name(2, 1, 0, "o3", rank=3)).is_file()


@pytest.mark.parametrize("tol", [1e-4, 1.5e-4, 1e-3, 2.5e-5, 1.234567891e-4, 0.1])
def test_tolerance_in_names_is_exact(tol):
    assert float(format_tol(tol)) == tol
    assert all(ch.isalnum() or ch in ".-" for ch in format_tol(tol))


def test_names_of_close_tolerances_differ():
    assert format_tol(1e-4) == "1e-04" and format_tol(1.5e-4) == "1.5e-04"
    assert cp.factor_name(2, 2, 2, "o3", tol=1e-4) != cp.factor_name(2, 2, 2, "o3", tol=1.5e-4)
    name = product_factors.factor_name
    assert name(2, 1, 1, "o3", tol=1e-4) != name(2, 1, 1, "o3", tol=1.5e-4)
    assert cp.factor_name(1, 1, 1, "so3", rank=5, seed=2) == "cp_so3_1_1_1_rank5_seed2.npz"
    assert product_factors.factor_name(3, 2, 1, "o3") == "cp_o3_in2_out1_nu3_tol1e-04.npz"


# ----------------------------------------------------------------------------------------------- writing


def test_same_factors_give_the_same_bytes(tmp_path, monkeypatch):
    """Writing the same arrays twice, at different times, gives identical files (fixed zip timestamps)."""
    found = product_factors.symmetric_cp(2, 2, 1, "o3")
    arrays = product_factors.factor_arrays(found, 2, 2, 1, "o3", 1e-4, None, 0)
    product_factors.STORE.save(tmp_path / "a.npz", arrays)
    monkeypatch.setattr(time, "time", lambda: 2.0e9)  # a writer stamping the wall time (zipfile.writestr) would differ
    product_factors.STORE.save(tmp_path / "b.npz", arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_shipped_files_are_written_by_the_store(tmp_path):
    """Every shipped file of both families is what the store writes for its arrays, byte for byte."""
    shipped = [*sorted(cp.PACKAGE_DIR.glob("*.npz"))[:3], *sorted(product_factors.PACKAGE_DIR.glob("*.npz"))[:3]]
    for path in shipped:
        arrays = read_npz(path)
        write_npz(tmp_path / path.name, arrays)
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    store = FactorStore("x", tmp_path / "package", 1, ("a",), __name__)
    target = tmp_path / "f.npz"
    store.save(target, {"a": np.arange(3.0)})
    before = target.read_bytes()
    with pytest.raises(ValueError, match="pickle"):
        store.save(target, {"a": np.arange(3.0), "b": np.array([{"not": "an array"}], dtype=object)})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npz"]


# ----------------------------------------------------------------------------------------------- reading


def truncated_copy(source, target) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def test_truncated_two_body_file_is_an_error_naming_it():
    name = cp.factor_name(1, 1, 1, "so3", rank=5)
    path = cp.cache_dir() / name
    truncated_copy(cp.PACKAGE_DIR / cp.factor_name(1, 1, 1, "so3"), path)
    with pytest.raises(FactorFileError, match=rf"{path}.*truncated or corrupt"):
        tdn.tp.build("cp", lmax=1, channels=2, paths="so3", rank=5)
    with pytest.raises(FactorFileError, match=str(path)):
        cp.load_factors(path)


def test_corrupt_product_file_is_an_error_naming_it():
    name = product_factors.factor_name(2, 1, 1, "o3", rank=6)
    path = product_factors.STORE.cache_dir() / name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a zip archive at all")
    with pytest.raises(FactorFileError, match=rf"{path}"):
        product_factors.symmetric_cp(2, 1, 1, "o3", rank=6)


def test_file_without_an_array_is_an_error_naming_it(tmp_path):
    path = tmp_path / "f.npz"
    write_npz(path, {"directions": np.eye(2), "format_version": np.int64(1)})
    with pytest.raises(FactorFileError, match=rf"{path} lacks the arrays \['error'\]"):
        product_factors.STORE.load(path)


def test_stale_product_file_is_refitted(caplog):
    """Directions that do not reproduce U^nu, or a file of another format version, are fitted again (and the
    cache file replaced)."""
    name = product_factors.factor_name(2, 1, 1, "o3", rank=6)
    path = product_factors.STORE.cache_dir() / name
    wrong = product_factors.SymmetricCPFactors(torch.randn(4, 6), torch.zeros(0), 1e-6, "fitted")
    product_factors.STORE.save(path, product_factors.factor_arrays(wrong, 2, 1, 1, "o3", 1e-4, 6, 0))
    with caplog.at_level(logging.WARNING, logger="tdn.contractions.factors"):
        found = product_factors.symmetric_cp(2, 1, 1, "o3", rank=6)
    assert found.source == "fitted" and found.error < 0.5 and "stale" in caplog.text
    assert np.array_equal(read_npz(path)["directions"], found.directions.numpy())

    product_factors.clear_memory()
    arrays = read_npz(path)
    arrays["format_version"] = np.int64(99)
    write_npz(path, arrays)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tdn.contractions.factors"):
        again = product_factors.symmetric_cp(2, 1, 1, "o3", rank=6)
    assert again.source == "fitted" and "format version 99" in caplog.text


# ----------------------------------------------------------------------------------------------- shipped data


def test_shipped_factors_load_without_fitting(monkeypatch):
    """The default convolution and a correlation-3 model come from the package data: no fit runs."""

    def no_fit(*args, **kwargs):
        raise AssertionError("a fit ran although the factors are shipped")

    monkeypatch.setattr(cp, "fit_factors", no_fit)
    monkeypatch.setattr(product_factors, "fit_factors", no_fit)
    tp = tdn.tp.build("cp", lmax=3, channels=4)
    assert tp.factors_source == "package"
    model = tdn.models.build_model(tp="cp", lmax=2, channels=4, num_layers=2, correlation=3, elements=[1, 6, 8])
    ranks = [m.ranks for m in model.modules() if isinstance(m, tdn.nn.ProductBasis)]
    assert len(ranks) == 2 and all(set(r) == {2, 3} for r in ranks)
    with pytest.raises(AssertionError, match="a fit ran"):  # the patch is in the path a missing file takes
        tdn.tp.build("cp", lmax=1, channels=2, paths="so3", rank=5)
