"""CP-decomposed tensor product with path-weight sharing (the "Tensor Decomposition Networks" idea).

The stacked path tensor ``M [d3, d1, d2]`` of :func:`tdn.o3.path_tensor` is replaced by rank-``R`` CP factors
``M ≈ sum_r A[:, r] ⊗ B[:, r] ⊗ C[:, r]`` (``A [d3, R]`` output, ``B [d1, R]`` on x, ``C [d2, R]`` on y)::

    xb  = x @ B                          [E, C, R]
    yc  = y @ C                          [E, R]
    out = (xb * yc[:, None, :]) @ Aᵀ     [E, C, d3]      times the expanded weights w

The rank is the smallest whose relative error ``||M - M_hat||_F / ||M||_F`` is at most ``tol`` (default 1e-4),
or an explicit ``rank=``. Factors come, in this order, from the package data (``tdn/tp/cp_factors``, written
by ``scripts/fit_cp.py``), from the user cache directory (both through :mod:`tdn.tp.factor_store`), or from a
one-off seeded ALS fit (:mod:`tdn.tp.cp_fit`) that is then written to the cache. Whatever the source, the error
is recomputed against the current ``M`` when the factors are loaded and reported as ``fit_error``. A model being
loaded from its file builds them as zeros of the rank its config records instead (no lookup, no fit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..o3 import dim, path_tensor
from . import cp_fit
from .base import FactorisedProduct
from .factor_store import FactorStore, format_tol  # noqa: F401  (format_tol: also importable from here)

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).with_name("cp_factors")
DEFAULT_TOL = 1e-4
FORMAT_VERSION = 1
_STALE_FACTOR = 10.0  # a stored error this much below the recomputed one means M changed: refit

STORE = FactorStore(
    folder="cp_factors",
    package_dir=PACKAGE_DIR,
    format_version=FORMAT_VERSION,
    required=("A", "B", "C", "rel_error", "tol", "lmax_in", "lmax_sh", "lmax_out", "seed", "paths", "method", "sweeps"),
    logger=__name__,
)


# ----------------------------------------------------------------------------------------------- files


def factor_name(
    lmax_in: int, lmax_sh: int, lmax_out: int, paths: str, tol: float = DEFAULT_TOL, rank: int | None = None,
    seed: int = 0,
) -> str:
    """``cp_{paths}_{lmax_in}_{lmax_sh}_{lmax_out}_tol{tol}.npz`` (or ``_rank{R}``; ``_seed{s}`` unless 0), with the
    exact tolerance of :func:`tdn.tp.factor_store.format_tol`."""
    return STORE.filename(f"cp_{paths}_{lmax_in}_{lmax_sh}_{lmax_out}", tol, rank, seed)


def cache_dir() -> Path:
    """``$TDN_CACHE_DIR``, else ``$XDG_CACHE_HOME/tdn``, else ``~/.cache/tdn``; CP factors go in ``cp_factors/``."""
    return STORE.cache_dir()


@dataclass
class CPFactors:
    """Factors ``A [d3, R]``, ``B [d1, R]``, ``C [d2, R]`` (float64) of one path tensor, with their record."""

    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    rel_error: float
    lmax_in: int
    lmax_sh: int
    lmax_out: int
    paths: str
    tol: float  # target of the rank search; 0 for a fixed rank
    seed: int
    method: str  # "als" or "exact-slices"
    sweeps: int = 0  # ALS sweeps spent, the rank search included (deterministic, unlike the time)
    seconds: float = 0.0  # wall time of the fit (not stored: the file's bytes depend only on the content)

    @property
    def rank(self) -> int:
        return self.A.shape[1]


def factor_arrays(factors: CPFactors) -> dict[str, np.ndarray]:
    """The arrays a factor file holds (its ``format_version`` is added by the store)."""
    return {
        "A": factors.A, "B": factors.B, "C": factors.C,
        "rel_error": np.float64(factors.rel_error), "tol": np.float64(factors.tol),
        "lmax_in": np.int64(factors.lmax_in), "lmax_sh": np.int64(factors.lmax_sh),
        "lmax_out": np.int64(factors.lmax_out), "seed": np.int64(factors.seed),
        "paths": np.array(factors.paths), "method": np.array(factors.method),
        "sweeps": np.int64(factors.sweeps),
    }


def save_factors(path: Path, factors: CPFactors) -> None:
    """Write an ``.npz`` whose bytes depend only on the content (fixed zip timestamps, no compression).

    The file is written next to its target and renamed into place, so concurrent readers never see half a file.
    """
    STORE.save(path, factor_arrays(factors))


def from_arrays(data: dict[str, np.ndarray]) -> CPFactors:
    """The :class:`CPFactors` of a factor file's arrays."""
    return CPFactors(
        A=data["A"], B=data["B"], C=data["C"], rel_error=float(data["rel_error"]), tol=float(data["tol"]),
        lmax_in=int(data["lmax_in"]), lmax_sh=int(data["lmax_sh"]), lmax_out=int(data["lmax_out"]),
        seed=int(data["seed"]), paths=str(data["paths"]), method=str(data["method"]), sweeps=int(data["sweeps"]),
    )


def load_factors(path: Path) -> CPFactors:
    """The factors in ``path``; :class:`tdn.tp.factor_store.FactorFileError` (naming it) if it cannot be read."""
    return from_arrays(STORE.load(path))


def shipped_factors(directory: Path = PACKAGE_DIR) -> list[dict]:
    """The factors shipped as package data: one dict per file with ``lmax_in, lmax_sh, lmax_out, paths, rank,
    rel_error, tol, seed, method, sweeps, file, bytes``, sorted by path set and degrees (for benchmark reports)."""
    rows = []
    for file in sorted(directory.glob("cp_*.npz")):
        f = load_factors(file)
        rows.append(dict(
            lmax_in=f.lmax_in, lmax_sh=f.lmax_sh, lmax_out=f.lmax_out, paths=f.paths, rank=f.rank,
            rel_error=f.rel_error, tol=f.tol, seed=f.seed, method=f.method, sweeps=f.sweeps, file=file.name,
            bytes=file.stat().st_size,
        ))
    return sorted(rows, key=lambda r: (r["paths"], r["lmax_out"], r["lmax_in"], r["lmax_sh"], r["file"]))


# ----------------------------------------------------------------------------------------------- fitting


def fit_factors(
    lmax_in: int, lmax_sh: int, lmax_out: int, paths: str, tol: float = DEFAULT_TOL, rank: int | None = None,
    seed: int = 0, progress: Callable[[str], None] | None = None,
) -> CPFactors:
    """Fit factors of ``M``: the smallest rank reaching ``tol``, or the best fit at a given ``rank``."""
    M = path_tensor(lmax_in, lmax_sh, lmax_out, paths).numpy()
    start = time.perf_counter()
    if rank is None:
        fit = cp_fit.fit_smallest_rank(M, tol=tol, seed=seed, progress=progress or (lambda line: None))
    else:
        fit = cp_fit.fit_fixed_rank(M, rank, seed=seed)
    return CPFactors(
        fit.A, fit.B, fit.C, fit.rel_error, lmax_in, lmax_sh, lmax_out, paths, 0.0 if rank is not None else tol,
        seed, fit.method, sum(sweeps for _, _, sweeps in fit.history), time.perf_counter() - start,
    )


def _matches(f: CPFactors, lmax_in: int, lmax_sh: int, lmax_out: int, paths: str, M: np.ndarray) -> float | None:
    """The recomputed relative error of ``f`` against ``M``, or None if the file does not describe ``M``
    (other degrees or path set, an error far above the recorded one, or above the tolerance it was fitted for)."""
    if (f.lmax_in, f.lmax_sh, f.lmax_out, f.paths) != (lmax_in, lmax_sh, lmax_out, paths):
        return None
    if (f.A.shape[0], f.B.shape[0], f.C.shape[0]) != M.shape:
        return None
    error = cp_fit.relative_error(M, f.A, f.B, f.C)
    if error > _STALE_FACTOR * max(f.rel_error, 1e-12) or (f.tol > 0 and error > f.tol * (1 + 1e-6)):
        return None
    return error


def get_factors(
    lmax_in: int, lmax_sh: int, lmax_out: int, paths: str, tol: float = DEFAULT_TOL, rank: int | None = None,
    seed: int = 0,
) -> tuple[CPFactors, str, Path]:
    """Factors for ``M`` with their source ("package", "cache", "fitted" or "model file") and file.

    Looks in the package data, then the cache (:data:`STORE`); otherwise fits once (logging a warning, since a large
    ``M`` takes minutes) and writes the result to the cache. Loaded factors are checked against the current ``M``:
    a file whose recomputed error is far above its recorded one is stale and is refitted; an unreadable file is a
    :class:`tdn.tp.factor_store.FactorFileError` naming it. Inside a :func:`tdn.tp.factor_store.factor_plan` that
    lists these factors as a placeholder, they are zeros ``A [d3, R]``, ``B [d1, R]``, ``C [d2, R]`` of the recorded
    rank (source "model file": its values replace them), and no file is read or written.
    """
    name = factor_name(lmax_in, lmax_sh, lmax_out, paths, tol, rank, seed)
    planned = STORE.placeholder(name)
    if planned is not None:
        shape = (dim(lmax_out), dim(lmax_in), dim(lmax_sh))
        A, B, C = (np.zeros((d, planned.rank)) for d in shape)
        factors = CPFactors(A, B, C, planned.error, lmax_in, lmax_sh, lmax_out, paths,
                            0.0 if rank is not None else tol, seed, "placeholder")  # fmt: skip
        found: tuple[CPFactors, str, Path] = (factors, "model file", Path(planned.origin))
    else:
        found = _find_or_fit(name, lmax_in, lmax_sh, lmax_out, paths, tol, rank, seed)
    STORE.record(name, found[0].rank, found[0].rel_error)
    return found


def _find_or_fit(
    name: str, lmax_in: int, lmax_sh: int, lmax_out: int, paths: str, tol: float, rank: int | None, seed: int
) -> tuple[CPFactors, str, Path]:
    """The lookup of :func:`get_factors` for the file ``name``: package data, cache, else a fit written to the
    cache."""
    M = path_tensor(lmax_in, lmax_sh, lmax_out, paths).numpy()

    def accept(data: dict[str, np.ndarray]) -> CPFactors | None:
        factors = from_arrays(data)
        error = _matches(factors, lmax_in, lmax_sh, lmax_out, paths, M)
        if error is None:
            return None
        factors.rel_error = error
        return factors

    found = STORE.find(name, accept)
    if found is not None:
        return found
    file = cache_dir() / name
    target = f"rank {rank}" if rank is not None else f"the smallest rank with relative error <= {tol:g}"
    log.warning(
        "fitting CP factors for lmax_in=%d, lmax_sh=%d, lmax_out=%d, paths=%r (%s, seed %d); "
        "this happens once; cached at %s", lmax_in, lmax_sh, lmax_out, paths, target, seed, file,
    )
    factors = fit_factors(lmax_in, lmax_sh, lmax_out, paths, tol, rank, seed, progress=log.info)
    STORE.cache(name, factor_arrays(factors))
    log.warning("fitted CP factors: rank %d, relative error %.2e, %.1f s", factors.rank, factors.rel_error,
                factors.seconds)
    return factors, "fitted", file


# ----------------------------------------------------------------------------------------------- module


class CPProduct(FactorisedProduct):
    """``out = A [(Bᵀ x) ⊙ (Cᵀ y)] * w``: the CP form of the path-shared product with ``M``.

    weights="shared": one weight per channel for all paths (TDN's path-weight sharing, ``P = 1``);
    weights="degree": one per channel and output degree (``P = lmax_out + 1``), applied after ``A``;
    weights="inout": one per channel and (input degree, output degree) pair, the scalar harmonic's path apart; each
    input degree's part on its own rows of ``B`` (the same factors: ``M`` restricted to those rows is exact in them),
    the paths without coupling in one small product per edge (:meth:`TensorProduct.uncoupled_paths`).
    Per-path weights cannot be applied once the paths are summed into ``M``: "path" is a ValueError.

    ``rank=None`` picks the smallest rank with relative error of ``M`` at most ``tol``; ``rank=R`` forces
    one (e.g. ``7 * L**2``, the TDN paper's schedule; its error is reported, not enforced). Attributes:
    ``rank``, ``fit_error`` (relative Frobenius error of ``M``), ``factors_source`` ("package", "cache",
    "fitted", or "model file": zeros of a model file's recorded rank, replaced by its values when
    :func:`tdn.load_model` loads them), ``factors_file``. The factors are frozen buffers (float64 as stored, then the
    module's dtype).
    """

    kind = "cp"
    supported_paths = ("o3", "so3")
    supported_weights = ("shared", "degree", "inout")
    # models default to "inout": cg's force error at equal steps and the lowest at equal training compute (the
    # learning curves of docs/accuracy.md); "shared" is the fast MD step (4.5x faster on a CPU, 1.2-1.3x the error)
    default_weights = "inout"
    options = ("rank", "tol", "seed")
    unsupported_weights_reason = (
        "CP factorises the sum of all paths (the stacked tensor M), so per-path weights cannot be applied; "
        "use kind='cg' for them"
    )

    def __init__(
        self,
        lmax_in: int,
        lmax_sh: int,
        lmax_out: int,
        channels: int,
        paths: str = "o3",
        weights: str = "shared",
        rank: int | None = None,
        tol: float = DEFAULT_TOL,
        seed: int = 0,
    ) -> None:
        super().__init__(lmax_in, lmax_sh, lmax_out, channels, paths, weights)
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        factors, source, file = get_factors(lmax_in, lmax_sh, lmax_out, paths, float(tol), rank, seed)
        self.tol = float(tol) if rank is None else None
        self.seed = seed
        self.fit_error = factors.rel_error
        self.fit_method = factors.method
        self.factors_source = source
        self.factors_file = str(file)
        self.register_buffer("x_factor", torch.from_numpy(factors.B.copy()))  # B  [d_in, R]
        self.register_buffer("y_factor", torch.from_numpy(factors.C.copy()))  # C  [d_sh, R]
        self.register_buffer("out_factor", torch.from_numpy(np.ascontiguousarray(factors.A.T)))  # Aᵀ [R, d_out]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # left = B [d_in, R], right = C [d_sh, R], project = Aᵀ [R, d_out]
        return self.x_factor, self.y_factor, self.out_factor

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, fit_error={self.fit_error:.2e}, source={self.factors_source}"
