"""The CP backend: agreement with the exact product, shipped / cached / fitted factors, determinism, gradients,
equivariance and argument errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import tdn
from tdn.o3 import equivariance_error, path_tensor, random_rotation
from tdn.tp import cp, cp_fit

TOL = cp.DEFAULT_TOL


def _inputs(module, num_edges: int = 64, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d_in, d_sh, _ = module.dims
    x = torch.randn(num_edges, module.channels, d_in, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(num_edges, d_sh, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(num_edges, module.channels, module.num_weights, generator=g, dtype=torch.float64).to(dtype)
    return x, y, w


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared, oversubscribed CPU the thread pool's
    hand-offs make each op ~100x slower; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets an empty cache: nothing leaks from or into the user's."""
    monkeypatch.setenv("TDN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("paths", ["o3", "so3"])
@pytest.mark.parametrize("weights", ["shared", "degree"])
@pytest.mark.parametrize("lmax", [1, 2, 3, 4])
def test_cp_matches_cg(lmax, weights, paths):
    tp = tdn.tp.build("cp", lmax=lmax, channels=4, paths=paths, weights=weights).double()
    ref = tdn.tp.build("cg", lmax=lmax, channels=4, paths=paths, weights=weights).double()
    assert tp.factors_source == "package"
    assert tp.fit_error <= TOL
    x, y, w = _inputs(tp)
    # for unit-variance inputs the relative output error estimates the relative error of M
    assert _relative(tp(x, y, w), ref(x, y, w)) <= 3 * TOL


@pytest.mark.parametrize("lmax_in", [0, 1])
def test_cp_model_degrees_shipped(lmax_in):
    """The MACE-like model's convolutions (lmax_in = 0, 1 into lmax_sh = lmax_out = 2) load instantly."""
    for paths in ("o3", "so3"):
        tp = tdn.tp.build("cp", lmax_in=lmax_in, lmax_sh=2, lmax_out=2, channels=3, paths=paths).double()
        ref = tdn.tp.build("cg", lmax_in=lmax_in, lmax_sh=2, lmax_out=2, channels=3, paths=paths,
                           weights="shared").double()
        assert tp.factors_source == "package"
        x, y, w = _inputs(tp)
        assert _relative(tp(x, y, w), ref(x, y, w)) <= 3 * TOL


def test_cp_float32_keeps_the_fit_accuracy():
    tp = tdn.tp.build("cp", lmax=4, channels=8, paths="so3").float()
    ref = tdn.tp.build("cg", lmax=4, channels=8, paths="so3", weights="shared").double()
    assert tp.x_factor.dtype == torch.float32
    x, y, w = _inputs(ref)
    assert _relative(tp(x.float(), y.float(), w.float()), ref(x, y, w)) <= 3 * TOL


def test_rank_override_reports_its_error():
    """The TDN paper's 7 L² at L = 3 misses ~1e-4 by orders of magnitude for "so3"; the reported error says so."""
    tp = tdn.tp.build("cp", lmax=3, channels=4, paths="so3", rank=63).double()
    ref = tdn.tp.build("cg", lmax=3, channels=4, paths="so3", weights="shared").double()
    assert tp.rank == 63 and tp.tol is None
    assert tp.fit_error > 100 * TOL
    x, y, w = _inputs(tp, num_edges=256)
    measured = _relative(tp(x, y, w), ref(x, y, w))
    assert tp.fit_error / 3 <= measured <= 3 * tp.fit_error


def test_shipped_factors_listing():
    rows = cp.shipped_factors()
    square = {(r["paths"], r["lmax_out"]) for r in rows
              if r["lmax_in"] == r["lmax_sh"] == r["lmax_out"] and r["tol"] == TOL}
    assert square == {(p, L) for p in ("o3", "so3") for L in range(1, 7)}
    for r in rows:
        assert set(r) >= {"lmax_in", "lmax_sh", "lmax_out", "paths", "rank", "rel_error", "method", "file"}
        if r["tol"] > 0:
            assert r["rel_error"] <= r["tol"], r
    assert sum(r["bytes"] for r in rows) < 10 * 2**20


def test_fit_is_deterministic():
    M = path_tensor(2, 2, 2, "so3").numpy()
    a = cp_fit.fit_cp(M, 12, seed=3, max_sweeps=40)
    b = cp_fit.fit_cp(M, 12, seed=3, max_sweeps=40)
    c = cp_fit.fit_cp(M, 12, seed=4, max_sweeps=40)
    for fa, fb in zip(a, b):
        assert np.array_equal(fa, fb)
    assert not np.array_equal(a.A, c.A)
    M = path_tensor(1, 1, 1, "so3").numpy()
    first, second = cp_fit.fit_smallest_rank(M, seed=0), cp_fit.fit_smallest_rank(M, seed=0)
    assert first.rank == second.rank and first.rel_error <= TOL
    for fa, fb in zip(first, second):
        assert np.array_equal(fa, fb)


def test_search_bounds():
    M = path_tensor(2, 2, 2, "o3").numpy()
    exact = cp_fit.exact_slices(M)
    assert exact.rel_error < 1e-13 and exact.method == "exact-slices"
    assert np.allclose(cp_fit.reconstruct(exact.A, exact.B, exact.C), M, atol=1e-14)
    lower = cp_fit.unfolding_lower_bound(M, TOL)
    assert lower == 9  # every unfolding of M has full rank d = 9
    shipped = tdn.tp.build("cp", lmax=2, channels=1, paths="o3")
    assert lower <= shipped.rank <= exact.rank


def test_cache_is_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TDN_CACHE_DIR", str(tmp_path / "mine"))
    with caplog.at_level(logging.WARNING, logger="tdn.tp.cp"):
        first = tdn.tp.build("cp", lmax=1, channels=2, paths="so3", rank=5).double()
    assert first.factors_source == "fitted"
    assert "this happens once" in caplog.text and str(tmp_path / "mine") in caplog.text
    file = tmp_path / "mine" / "cp_factors" / cp.factor_name(1, 1, 1, "so3", rank=5)
    assert file.is_file() and first.factors_file == str(file)
    second = tdn.tp.build("cp", lmax=1, channels=2, paths="so3", rank=5).double()
    assert second.factors_source == "cache"
    assert second.fit_error == pytest.approx(first.fit_error, rel=1e-9)
    for a, b in zip(first.factors(), second.factors()):
        assert torch.equal(a, b)


def test_cache_dir_fallbacks(tmp_path, monkeypatch):
    monkeypatch.delenv("TDN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cp.cache_dir() == tmp_path / "xdg" / "tdn" / "cp_factors"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cp.cache_dir() == tmp_path / "home" / ".cache" / "tdn" / "cp_factors"


def test_stale_cache_file_is_refitted(tmp_path, caplog):
    """A cached file that does not reproduce the current M (e.g. M's definition changed) is not trusted."""
    rng = np.random.default_rng(0)
    wrong = cp.CPFactors(*(rng.standard_normal((4, 4)) for _ in range(3)), rel_error=1e-5, lmax_in=1, lmax_sh=1,
                         lmax_out=1, paths="o3", tol=0.0, seed=0, method="als")
    cp.save_factors(cp.cache_dir() / cp.factor_name(1, 1, 1, "o3", rank=4), wrong)
    with caplog.at_level(logging.WARNING, logger="tdn.tp.cp"):
        tp = tdn.tp.build("cp", lmax=1, channels=1, paths="o3", rank=4)
    assert "stale" in caplog.text and tp.factors_source == "fitted"
    assert tp.fit_error < 0.5


def test_saved_file_bytes_are_deterministic(tmp_path):
    """The same seed gives the same file, byte for byte (fixed zip timestamps, no wall time stored)."""
    M = path_tensor(1, 1, 1, "so3").numpy()

    def fitted(seconds: float) -> cp.CPFactors:
        A, B, C, error = cp_fit.fit_cp(M, 5, seed=1, max_sweeps=30)
        return cp.CPFactors(A, B, C, error, 1, 1, 1, "so3", 0.0, 1, "als", sweeps=30, seconds=seconds)

    cp.save_factors(tmp_path / "a.npz", fitted(1.0))
    cp.save_factors(tmp_path / "b.npz", fitted(2.0))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded = cp.load_factors(tmp_path / "a.npz")
    assert np.array_equal(loaded.A, fitted(0.0).A) and loaded.rank == 5 and loaded.paths == "so3"


@pytest.mark.parametrize("weights", ["shared", "degree"])
def test_gradcheck(weights):
    tp = tdn.tp.build("cp", lmax=2, channels=2, paths="so3", weights=weights).double()
    x, y, w = (t.requires_grad_() for t in _inputs(tp, num_edges=3))
    assert torch.autograd.gradcheck(tp, (x, y, w))


@pytest.mark.parametrize("paths", ["o3", "so3"])
def test_equivariance(paths):
    """Equivariant up to the fit error (the factors approximate an equivariant M); inversion too for "o3"."""
    lmax = 3
    tp = tdn.tp.build("cp", lmax=lmax, channels=4, paths=paths, weights="degree").double()
    x, y, w = _inputs(tp, num_edges=16)
    g = torch.Generator().manual_seed(1)
    rotation = random_rotation(generator=g)
    bound = 20 * max(tp.fit_error, 1e-12)
    assert equivariance_error(tp, [x, y, w], [lmax, lmax, None], lmax, rotation) <= bound
    if paths == "o3":
        assert equivariance_error(tp, [x, y, w], [lmax, lmax, None], lmax, -rotation) <= bound


def test_conv_matches_cg():
    tp = tdn.tp.build("cp", lmax_in=1, lmax_sh=2, lmax_out=2, channels=3, paths="o3").double()
    ref = tdn.tp.build("cg", lmax_in=1, lmax_sh=2, lmax_out=2, channels=3, paths="o3", weights="shared").double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    y = torch.randn(12, 9, generator=g, dtype=torch.float64)
    w = torch.randn(12, 3, 1, generator=g, dtype=torch.float64)
    sender, receiver = torch.randint(0, 5, (12,), generator=g), torch.randint(0, 5, (12,), generator=g)
    out = tp.conv(x, y, w, sender, receiver, fused=False)
    assert _relative(out, ref.conv(x, y, w, sender, receiver)) <= 3 * TOL


def test_argument_errors():
    with pytest.raises(ValueError, match="per-path weights"):
        tdn.tp.build("cp", lmax=2, channels=2, weights="path")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        tdn.tp.build("cp", lmax=2, channels=2, rank=0)
    with pytest.raises(ValueError, match="tol must be"):
        tdn.tp.build("cp", lmax=2, channels=2, tol=2.0)
    with pytest.raises(ValueError, match="seed must be"):
        tdn.tp.build("cp", lmax=2, channels=2, seed=-1)
    with pytest.raises(ValueError, match="lmax_in must be"):
        tdn.tp.build("cp", lmax=-1, channels=2)
    with pytest.raises(ValueError, match="rank must be"):
        cp_fit.fit_cp(np.ones((2, 2, 2)), 0)


def test_als_stops_on_an_exact_fit():
    """An error of exactly zero (a rank-deficient slice fitted exactly) ends the fit: no rate is extrapolated."""
    options = cp_fit.ALSOptions()
    errors = [1.0] * options.window + [0.0]
    assert cp_fit._should_stop(errors, options.window + 1, 10 * options.window, 1e-4, options)
