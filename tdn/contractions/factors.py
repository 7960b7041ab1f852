"""The symmetric CP factors of the "cp" contraction: looked up in memory, in the package data, in the user cache,
else fitted once (:mod:`tdn.contractions.fit`) and cached; zeros of a recorded rank for a model loaded from its file.

Files go through the store shared with the two-body CP factors (:mod:`tdn.tp.factor_store`): package data in
``tdn/contractions/cp_factors/``, the cache in ``cache_root()/product_cp/``, named
``cp_{paths}_in{lmax_in}_out{lmax_out}_nu{nu}_tol{tol}.npz`` (``_rank{R}`` for a fixed rank, ``_seed{s}`` unless 0).
They store only the directions ``B``; the coefficients are re-solved on load (one least-squares problem), so a file
stays valid for any orthonormal basis of the same span and is refitted if its error no longer meets the tolerance.
:func:`ship` regenerates the package data (``python scripts/fit_cp.py --product``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..o3 import dim
from ..tp.factor_store import FactorFileError, FactorStore
from .coupling import stacked_basis
from .fit import compress_symmetric_cp, cp_coefficients, fit_fixed_rank, one_thread

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).with_name("cp_factors")
DEFAULT_TOL = 1e-4
FORMAT_VERSION = 1

STORE = FactorStore(
    folder="product_cp",
    package_dir=PACKAGE_DIR,
    format_version=FORMAT_VERSION,
    required=("directions", "error"),
    logger=__name__,
)


@dataclass(frozen=True)
class SymmetricCPFactors:
    """Symmetric CP of the stacked ``U^nu`` (rows ``(L, eta, M)``): ``U^nu ≈ coefficients @ Phi(directions)^T``."""

    directions: torch.Tensor  # [D, R] float64, columns b_r
    coefficients: torch.Tensor  # [K, R] float64, a[(L, eta, M), r]
    error: float  # relative Frobenius error of the stacked U^nu
    source: str  # "package", "cache", "fitted"

    @property
    def rank(self) -> int:
        return self.directions.shape[1]


def factor_name(nu: int, lmax_in: int, lmax_out: int, paths: str, tol: float = DEFAULT_TOL, rank: int | None = None,
                seed: int = 0) -> str:
    """``cp_{paths}_in{lmax_in}_out{lmax_out}_nu{nu}_tol{tol}.npz`` (see :meth:`FactorStore.filename`)."""
    return STORE.filename(f"cp_{paths}_in{lmax_in}_out{lmax_out}_nu{nu}", tol, rank, seed)


def factor_arrays(factors: SymmetricCPFactors, nu: int, lmax_in: int, lmax_out: int, paths: str, tol: float,
                  rank: int | None, seed: int) -> dict[str, np.ndarray]:
    """What a file stores: the directions, the error, and the record of what was fitted."""
    return {
        "directions": factors.directions.numpy(), "error": np.float64(factors.error), "nu": np.int64(nu),
        "lmax_in": np.int64(lmax_in), "lmax_out": np.int64(lmax_out), "paths": np.array(paths),
        "tol": np.float64(tol), "rank": np.int64(-1 if rank is None else rank), "seed": np.int64(seed),
    }


def accept(target: torch.Tensor, nu: int, tol: float, rank: int | None) -> Callable[[dict], SymmetricCPFactors | None]:
    """A check of a file's arrays against ``target [K, D^nu]``: its factors with re-solved coefficients, or None
    when they do not describe ``target`` (other size or rank, or an error above ``tol`` and the stored one)."""

    def check(data: dict[str, np.ndarray]) -> SymmetricCPFactors | None:
        directions = torch.from_numpy(np.array(data["directions"], dtype=np.float64))
        stored_error = float(data["error"])
        if directions.dim() != 2 or directions.shape[0] ** nu != target.shape[1]:
            return None
        if rank is not None and directions.shape[1] != rank:
            return None
        with one_thread():
            coefficients, error = cp_coefficients(target, directions, nu)
        limit = (1.01 * stored_error + 1e-12) if rank is not None else max(tol, 1.01 * stored_error + 1e-12)
        if error > limit:
            return None
        return SymmetricCPFactors(directions, coefficients, error, "")

    return check


def fit_factors(target: torch.Tensor, nu: int, tol: float, rank: int | None, seed: int,
                trials: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, a, error)``: :func:`compress_symmetric_cp` for a tolerance, :func:`fit_fixed_rank` for a rank."""
    with one_thread():
        if rank is None:
            return compress_symmetric_cp(target, nu, tol=tol, seed=seed, trials=trials)
        return fit_fixed_rank(target, nu, rank, seed)


_MEMORY: dict[tuple, SymmetricCPFactors] = {}


def clear_memory() -> None:
    """Forget the factors kept in memory (the next :func:`symmetric_cp` reads the files again)."""
    _MEMORY.clear()


def symmetric_cp(
    nu: int, lmax_in: int, lmax_out: int, paths: str = "o3", tol: float = DEFAULT_TOL, rank: int | None = None,
    seed: int = 0, trials: int = 4,
) -> SymmetricCPFactors:
    """The symmetric CP of the stacked ``U^nu`` for ``L = 0..lmax_out``: kept in memory, else looked up in the
    package data and the user cache (:data:`STORE`), else fitted (:func:`fit_factors`) and written to the cache.

    A file that does not reproduce ``U^nu`` within the tolerance is stale and refitted; an unreadable one is a
    :class:`tdn.tp.factor_store.FactorFileError` naming it. Inside a :func:`tdn.tp.factor_store.factor_plan` that
    lists these factors as a placeholder, they are zeros (directions ``[D, R]``, coefficients ``[K, R]``) of the
    recorded rank with source "model file": no file is read or written and nothing is kept in memory.
    """
    if nu < 2:
        raise ValueError(f"the symmetric CP is fitted for nu >= 2, got nu={nu}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    name = factor_name(nu, lmax_in, lmax_out, paths, tol, rank, seed)
    planned = STORE.placeholder(name)
    if planned is None:
        factors = _find_or_fit(name, nu, lmax_in, lmax_out, paths, tol, rank, seed, trials)
    else:
        rows = stacked_basis(nu, lmax_in, lmax_out, paths)[0].shape[0]
        directions = torch.zeros(dim(lmax_in), planned.rank, dtype=torch.float64)
        coefficients = torch.zeros(rows, planned.rank, dtype=torch.float64)
        factors = SymmetricCPFactors(directions, coefficients, planned.error, "model file")
    STORE.record(name, factors.rank, factors.error)
    return factors


def _find_or_fit(name: str, nu: int, lmax_in: int, lmax_out: int, paths: str, tol: float, rank: int | None,
                 seed: int, trials: int) -> SymmetricCPFactors:
    """The lookup of :func:`symmetric_cp` for the file ``name``: memory, package data, cache, else a fit."""
    key = (nu, lmax_in, lmax_out, paths, float(tol), rank, seed)
    if key in _MEMORY:
        return _MEMORY[key]
    target, _ = stacked_basis(nu, lmax_in, lmax_out, paths)
    found = STORE.find(name, accept(target, nu, tol, rank))
    if found is not None:
        factors, source, _ = found
        factors = dataclasses.replace(factors, source=source)
    else:
        log.info("fitting the symmetric CP of U^%d (lmax_in=%d, lmax_out=%d, paths=%r); cached as %s",
                 nu, lmax_in, lmax_out, paths, STORE.cache_dir() / name)
        b, a, err = fit_factors(target, nu, tol, rank, seed, trials)
        factors = SymmetricCPFactors(b, a, err, "fitted")
        STORE.cache(name, factor_arrays(factors, nu, lmax_in, lmax_out, paths, tol, rank, seed))
    _MEMORY[key] = factors
    return factors


# ---------------------------------------------------------------------------------------------------------------
# Regenerating the package data
# ---------------------------------------------------------------------------------------------------------------

SHIPPED_COMBOS = [
    (nu, lmax_in, lmax_out, paths)
    for paths in ("o3", "so3")
    for lmax_in in (1, 2, 3)
    for lmax_out in (0, 1)
    for nu in range(2, (4 if lmax_in <= 2 else 3) + 1)
]


def ship(out_dir: Path = PACKAGE_DIR, tol: float = DEFAULT_TOL, seed: int = 0, trials: int = 8,
         progress: Callable[[str], None] = print) -> None:
    """Fit every combination of :data:`SHIPPED_COMBOS` (MACE-medium: ``lmax_in=3, lmax_out<=1, nu<=3``; the
    defaults and test sizes) and write the directions to ``out_dir``; files that still fit are kept."""
    for nu, lmax_in, lmax_out, paths in SHIPPED_COMBOS:
        name = factor_name(nu, lmax_in, lmax_out, paths, tol, None, seed)
        target, _ = stacked_basis(nu, lmax_in, lmax_out, paths)
        path = out_dir / name
        if path.is_file():
            try:
                if accept(target, nu, tol, None)(STORE.load(path)) is not None:
                    continue
            except FactorFileError:
                pass  # unreadable or stale: fitted again below
        start = time.perf_counter()
        b, a, err = fit_factors(target, nu, tol, None, seed, trials)
        STORE.save(path, factor_arrays(SymmetricCPFactors(b, a, err, "fitted"), nu, lmax_in, lmax_out, paths, tol,
                                       None, seed))
        progress(f"{name}: K={target.shape[0]} rank={b.shape[1]} error={err:.2e} "
                 f"({time.perf_counter() - start:.0f} s)")
