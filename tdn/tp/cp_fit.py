"""Deterministic CP decomposition of a coupling tensor by alternating least squares (float64, numpy).

Model (shapes of the stacked path tensor ``M [d3, d1, d2]``: output, x, y)::

    M[k, i, j] ≈ M_hat[k, i, j] = sum_r A[k, r] B[i, r] C[j, r]      A [d3, R], B [d1, R], C [d2, R]

so the bilinear map ``out = M : x y`` becomes ``out = A [(Bᵀ x) ⊙ (Cᵀ y)]``.

ALS updates one factor at a time with the other two fixed; each update is a linear least-squares problem
whose normal equations need only the Gram matrices of the fixed factors, e.g. for ``A``::

    A (H + λ I) = X + λ A_old,     H = (BᵀB) ⊙ (CᵀC) [R, R],     X[k, r] = sum_ij M[k, i, j] B[i, r] C[j, r]

(``X`` is the "MTTKRP"; ``⊙`` the Hadamard product). The proximal ridge ``λ ||A - A_old||²`` keeps the
solve well-posed when columns become collinear and, unlike a plain ridge, does not bias the fixed point;
``λ`` decays geometrically to a small floor. After every sweep the three columns of each rank-one term are
rescaled to equal norms, and an extrapolation step ``F <- F_old + s (F - F_old)`` along the sweep's direction
is accepted when it lowers the error (step ``s`` grows on success and resets on failure).

Everything is seeded (``numpy.random.default_rng(SeedSequence(...))``) and runs the same operations in the
same order, so the same seed gives bit-identical factors on one machine / BLAS build.

:func:`fit_smallest_rank` searches the smallest rank ``R`` whose relative error ``||M - M_hat||_F / ||M||_F``
is at most ``tol``: a lower bound from the unfoldings, an exact construction from matrix slices as the upper
bound (and fallback), then an upward scan and a bisection with warm starts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

log = logging.getLogger(__name__)

Factors = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class CPFit:
    """Factors ``A [d3, R]``, ``B [d1, R]``, ``C [d2, R]`` and the relative Frobenius error of ``M``.

    Unpacks as ``A, B, C, rel_error = fit``. ``method`` is "als" or "exact-slices"; ``history`` lists the
    ``(rank, rel_error, sweeps)`` of every ALS fit tried by a rank search.
    """

    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    rel_error: float
    sweeps: int = 0
    method: str = "als"
    history: list[tuple[int, float, int]] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def __iter__(self):
        return iter((self.A, self.B, self.C, self.rel_error))


# ----------------------------------------------------------------------------------------------- basics


def reconstruct(A: np.ndarray, B: np.ndarray, C: np.ndarray) -> np.ndarray:
    """``M_hat[k, i, j] = sum_r A[k, r] B[i, r] C[j, r]`` ``[d3, d1, d2]``."""
    d3, d1, d2, rank = A.shape[0], B.shape[0], C.shape[0], A.shape[1]
    khatri_rao = (B[:, None, :] * C[None, :, :]).reshape(d1 * d2, rank)  # [d1*d2, R]
    return (A @ khatri_rao.T).reshape(d3, d1, d2)


def relative_error(M: np.ndarray, A: np.ndarray, B: np.ndarray, C: np.ndarray) -> float:
    """``||M - M_hat||_F / ||M||_F``, computed densely (exact to round-off, for reporting)."""
    return float(np.linalg.norm(M - reconstruct(A, B, C)) / np.linalg.norm(M))


_INIT, _PAD, _RESTART = 1, 2, 3  # purposes of derived random streams


def _rng(seed: int, rank: int, purpose: int, index: int = 0) -> np.random.Generator:
    """A generator derived from ``(seed, rank, purpose, index)``: reproducible and independent streams.

    (``SeedSequence`` ignores trailing zeros, so every key has the same length and a nonzero purpose.)
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(rank), int(purpose), int(index)]))


def random_factors(shape: tuple[int, int, int], rank: int, rng: np.random.Generator, scale: float = 1.0) -> Factors:
    """Gaussian factors whose rank-one terms have Frobenius norm about ``scale``."""
    d3, d1, d2 = shape
    std = scale ** (1 / 3)
    return (
        rng.standard_normal((d3, rank)) * std / math.sqrt(d3),
        rng.standard_normal((d1, rank)) * std / math.sqrt(d1),
        rng.standard_normal((d2, rank)) * std / math.sqrt(d2),
    )


def balance(A: np.ndarray, B: np.ndarray, C: np.ndarray) -> Factors:
    """Rescale each term's three columns to the common norm ``(|a_r| |b_r| |c_r|)^(1/3)`` (same ``M_hat``)."""
    na, nb, nc = (np.linalg.norm(F, axis=0) for F in (A, B, C))
    tiny = np.finfo(np.float64).tiny
    na, nb, nc = (np.maximum(n, tiny) for n in (na, nb, nc))
    g = np.cbrt(na * nb * nc)
    return A * (g / na), B * (g / nb), C * (g / nc)


def term_weights(A: np.ndarray, B: np.ndarray, C: np.ndarray) -> np.ndarray:
    """``[R]`` Frobenius norms of the rank-one terms ``|a_r| |b_r| |c_r|``."""
    return np.linalg.norm(A, axis=0) * np.linalg.norm(B, axis=0) * np.linalg.norm(C, axis=0)


def truncate(factors: Factors, rank: int) -> Factors:
    """Keep the ``rank`` heaviest terms (original order preserved): a warm start for a smaller rank."""
    keep = np.sort(np.argsort(-term_weights(*factors), kind="stable")[:rank])
    return tuple(F[:, keep].copy() for F in factors)  # type: ignore[return-value]


def pad(factors: Factors, rank: int, rng: np.random.Generator, scale: float) -> Factors:
    """Append ``rank - R`` small random terms: a warm start for a larger rank."""
    extra = rank - factors[0].shape[1]
    if extra <= 0:
        return truncate(factors, rank)
    shape = (factors[0].shape[0], factors[1].shape[0], factors[2].shape[0])
    new = random_factors(shape, extra, rng, scale)
    return tuple(np.concatenate([F, G], axis=1) for F, G in zip(factors, new))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- ALS


class _Problem:
    """``M`` with the reshapes the MTTKRPs need, and the squared norm ``||M||²``."""

    def __init__(self, M: np.ndarray) -> None:
        self.M = np.ascontiguousarray(M, dtype=np.float64)
        self.shape: tuple[int, int, int] = self.M.shape  # type: ignore[assignment]
        d3, d1, d2 = self.shape
        self.by_y = self.M.reshape(d3 * d1, d2)  # [d3*d1, d2]
        self.by_out = np.ascontiguousarray(self.M.reshape(d3, d1 * d2).T)  # [d1*d2, d3]
        self.norm2 = float(np.sum(self.M * self.M))

    def contract_y(self, C: np.ndarray) -> np.ndarray:
        """``T[k, i, r] = sum_j M[k, i, j] C[j, r]`` ``[d3, d1, R]``."""
        d3, d1, _ = self.shape
        return (self.by_y @ C).reshape(d3, d1, -1)

    def contract_out(self, A: np.ndarray) -> np.ndarray:
        """``S[i, j, r] = sum_k M[k, i, j] A[k, r]`` ``[d1, d2, R]``."""
        _, d1, d2 = self.shape
        return (self.by_out @ A).reshape(d1, d2, -1)

    def squared_error(self, A: np.ndarray, B: np.ndarray, C: np.ndarray) -> float:
        """``||M - M_hat||² = ||M||² - 2 <M, M_hat> + ||M_hat||²`` without forming ``M_hat``."""
        inner = float(np.einsum("kir,kr,ir->", self.contract_y(C), A, B))
        return max(self.norm2 - 2 * inner + _hat_norm2(A, B, C), 0.0)


def _hat_norm2(A: np.ndarray, B: np.ndarray, C: np.ndarray) -> float:
    """``||M_hat||² = sum_rs (AᵀA ⊙ BᵀB ⊙ CᵀC)_rs``."""
    return float(np.sum((A.T @ A) * (B.T @ B) * (C.T @ C)))


def _solve(gram: np.ndarray, rhs: np.ndarray, old: np.ndarray, lam: float) -> np.ndarray:
    """``F`` with ``F (gram + λ I) = rhs + λ old`` (Cholesky; ``rhs``, ``old`` ``[d, R]``)."""
    shift = lam * float(np.mean(np.diag(gram)))
    system = gram + shift * np.eye(gram.shape[0])
    try:
        factor = scipy.linalg.cho_factor(system, lower=False, check_finite=False)
        return scipy.linalg.cho_solve(factor, (rhs + shift * old).T, check_finite=False).T
    except np.linalg.LinAlgError:  # semidefinite to round-off: least squares instead
        return scipy.linalg.lstsq(system, (rhs + shift * old).T, check_finite=False)[0].T


def als_sweep(problem: _Problem, A: np.ndarray, B: np.ndarray, C: np.ndarray, lam: float) -> tuple[Factors, float]:
    """One sweep A -> B -> C; returns the new factors and their squared error (free from the last MTTKRP)."""
    gA, gB, gC = A.T @ A, B.T @ B, C.T @ C
    T = problem.contract_y(C)  # [d3, d1, R]; C is unchanged until the last step, so T serves A and B
    A = _solve(gB * gC, np.einsum("kir,ir->kr", T, B), A, lam)
    gA = A.T @ A
    B = _solve(gA * gC, np.einsum("kir,kr->ir", T, A), B, lam)
    gB = B.T @ B
    S = problem.contract_out(A)  # [d1, d2, R]
    X = np.einsum("ijr,ir->jr", S, B)  # [d2, R]
    C = _solve(gA * gB, X, C, lam)
    gC = C.T @ C
    inner = float(np.sum(C * X))
    err2 = max(problem.norm2 - 2 * inner + float(np.sum(gA * gB * gC)), 0.0)
    return (A, B, C), err2


@dataclass
class ALSOptions:
    """Knobs of :func:`fit_cp` (defaults tuned on the path tensors of L = 1..6).

    ``lam0`` / ``lam_decay`` / ``lam_min``: proximal ridge relative to the mean Gram diagonal, per sweep.
    ``window`` / ``stall``: stop when the error fell by less than a factor ``1 - stall`` over ``window`` sweeps.
    ``give_up``: with a target ``tol``, stop early when the recent rate of decrease cannot reach it in the
    remaining sweeps (rate extrapolated over ``window`` sweeps, with ``give_up_slack`` head room).
    """

    lam0: float = 1e-3
    lam_decay: float = 0.9
    lam_min: float = 1e-12
    extrapolate: bool = True
    step_growth: float = 1.3
    step_max: float = 8.0
    window: int = 100
    stall: float = 1e-3
    give_up: bool = True
    give_up_slack: float = 3.0


def fit_cp(
    M: np.ndarray,
    rank: int,
    seed: int = 0,
    max_sweeps: int = 2000,
    tol: float = 0.0,
    init: Factors | None = None,
    options: ALSOptions | None = None,
) -> CPFit:
    """Rank-``rank`` CP factors of ``M [d3, d1, d2]`` by seeded, extrapolated, proximal ALS (float64).

    Stops at ``max_sweeps``, when the relative error reaches ``tol`` (``0``: never), when it stalls, or (with
    ``tol > 0``) when ``tol`` is out of reach at the current rate. ``init`` warm-starts from given factors,
    otherwise Gaussian factors from ``seed``. Returns :class:`CPFit` (``A, B, C, rel_error = fit``) with the
    relative error recomputed densely.
    """
    if rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    opt = options or ALSOptions()
    problem = _Problem(M)
    if problem.norm2 == 0:
        zeros = tuple(np.zeros((d, rank)) for d in problem.shape)
        return CPFit(*zeros, rel_error=0.0)  # type: ignore[misc]
    scale = math.sqrt(problem.norm2 / rank)
    if init is None:
        factors = random_factors(problem.shape, rank, _rng(seed, rank, _INIT), scale)
    else:
        factors = tuple(np.array(F, dtype=np.float64) for F in init)  # type: ignore[assignment]
        if any(F.shape != (d, rank) for F, d in zip(factors, problem.shape)):
            raise ValueError(f"init must have shapes {[(d, rank) for d in problem.shape]}")
    factors = balance(*factors)
    err2 = problem.squared_error(*factors)
    errors = [math.sqrt(err2 / problem.norm2)]
    step = 1.0
    sweep = 0
    target = tol * 0.99  # head room so that the dense recomputation below stays under tol
    while sweep < max_sweeps and errors[-1] > target:
        lam = max(opt.lam0 * opt.lam_decay**sweep, opt.lam_min)
        new, new_err2 = als_sweep(problem, *factors, lam)
        new = balance(*new)
        if opt.extrapolate and sweep > 0:
            step, new, new_err2 = _extrapolate(problem, factors, new, new_err2, step, opt)
        factors, err2 = new, new_err2
        sweep += 1
        errors.append(math.sqrt(err2 / problem.norm2))
        if _should_stop(errors, sweep, max_sweeps, tol, opt):
            break
    A, B, C = factors
    return CPFit(A, B, C, rel_error=relative_error(problem.M, A, B, C), sweeps=sweep)


def _extrapolate(
    problem: _Problem, old: Factors, new: Factors, new_err2: float, step: float, opt: ALSOptions
) -> tuple[float, Factors, float]:
    """Try ``old + s (new - old)`` with ``s = step``; keep it if better and grow ``step``, else reset it."""
    trial = tuple(F0 + step * (F1 - F0) for F0, F1 in zip(old, new))
    trial_err2 = problem.squared_error(*trial)
    if trial_err2 < new_err2:
        return min(step * opt.step_growth, opt.step_max), balance(*trial), trial_err2
    return 1.0 + 0.5 * (step - 1.0), new, new_err2


def _should_stop(errors: list[float], sweep: int, max_sweeps: int, tol: float, opt: ALSOptions) -> bool:
    if sweep < opt.window:
        return False
    now, before = errors[-1], errors[-1 - opt.window]
    if now == 0.0:  # exact (a small rank-deficient M): nothing left to gain
        return True
    if now > before * (1 - opt.stall):
        return True
    if tol > 0 and opt.give_up:
        rate = math.log(before / now) / opt.window  # per sweep
        reachable = now * math.exp(-rate * (max_sweeps - sweep))
        return reachable > tol * opt.give_up_slack
    return False


# ----------------------------------------------------------------------------------------------- bounds


def exact_slices(M: np.ndarray, rtol: float = 1e-12) -> CPFit:
    """An exact CP decomposition from matrix slices: the cheapest of the three modes.

    Fixing one index, e.g. ``j`` of ``y``, ``M[:, :, j] = U diag(s) Vᵀ`` (SVD, rank ``r_j``) gives the terms
    ``A = U s^(1/2)``, ``B = V s^(1/2)``, ``C = e_j``; in all ``R = sum_j r_j``. Error is round-off (~1e-15).
    """
    M = np.asarray(M, dtype=np.float64)
    best: CPFit | None = None
    for mode in range(3):
        moved = np.moveaxis(M, mode, 2)  # [p, q, n]: slices over the last axis
        cols: list[list[np.ndarray]] = [[], [], []]
        for j in range(moved.shape[2]):
            U, s, Vt = np.linalg.svd(moved[:, :, j])
            r = int(np.sum(s > rtol * max(s[0] if s.size else 0.0, 1e-300)))
            unit = np.zeros((moved.shape[2], r))
            unit[j] = 1.0
            root = np.sqrt(s[:r])
            for slot, F in zip((0, 1, 2), (U[:, :r] * root, Vt[:r].T * root, unit)):
                cols[slot].append(F)
        P, Q, N = (np.concatenate(c, axis=1) for c in cols)
        factors = [P, Q, N]  # on axes (moved: p, q, n) = original axes with `mode` moved last
        order = [a for a in range(3) if a != mode] + [mode]
        A, B, C = (factors[order.index(axis)] for axis in range(3))
        if best is None or A.shape[1] < best.rank:
            A, B, C = balance(A, B, C)
            best = CPFit(A, B, C, rel_error=relative_error(M, A, B, C), method="exact-slices")
    assert best is not None
    return best


def unfolding_lower_bound(M: np.ndarray, tol: float) -> int:
    """A rank ``R`` below which no CP approximation reaches relative error ``tol``.

    Every unfolding of a rank-``R`` CP tensor has matrix rank ``<= R``, so its error is at least the
    Eckart–Young tail ``sqrt(sum_{i > R} σ_i²)`` of each unfolding of ``M``; the bound is the largest over modes.
    """
    M = np.asarray(M, dtype=np.float64)
    norm = np.linalg.norm(M)
    bound = 1
    for mode in range(3):
        s = np.linalg.svd(np.moveaxis(M, mode, 0).reshape(M.shape[mode], -1), compute_uv=False)
        tail = np.sqrt(np.cumsum((s**2)[::-1])[::-1]) / norm  # tail[i] = error of the best rank-i fit
        bound = max(bound, int(np.sum(tail > tol)))
    return bound


# ----------------------------------------------------------------------------------------------- rank search


def fit_smallest_rank(
    M: np.ndarray,
    tol: float = 1e-4,
    seed: int = 0,
    max_sweeps: int = 3000,
    restarts: int = 1,
    resolution: float = 0.02,
    growth: float = 1.25,
    start: int | None = None,
    options: ALSOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> CPFit:
    """The smallest rank whose CP fit reaches relative error ``<= tol``, with its factors.

    1. Bounds: ``lo`` from :func:`unfolding_lower_bound` (ranks below fail for sure), the exact slice
       construction (:func:`exact_slices`, error ~1e-15) as the fallback answer with rank ``R_exact``.
    2. Upward scan from ``start`` (default ``lo``) by factors of ``growth`` until an ALS fit succeeds,
       each fit warm-started from the previous (failed) one padded with small random terms.
    3. Bisection between the largest failing and the smallest succeeding rank, warm-started from the
       succeeding factors with their lightest terms dropped, until the gap is below ``resolution * R``
       (and at most 1): the rank found is then within ``resolution`` of the smallest rank ALS reaches.
    4. A walk down from the result in steps of ``resolution * R`` (at least 1), same warm start, while it
       keeps succeeding and stays above the ranks the bisection saw fail: ranks the scan rejected (from a
       weaker, padded warm start) may still be reachable.
    In the bisection a failed warm start gets up to ``restarts`` fresh random starts with seeds derived
    from ``(seed, rank, restart)``. Whichever of ALS and the exact construction has the smaller rank is returned.
    """
    say = progress or log.info
    exact = exact_slices(M)
    lower = unfolding_lower_bound(M, tol)
    say(f"bounds: rank >= {lower}; exact slice construction has rank {exact.rank}")
    history: list[tuple[int, float, int]] = []
    norm = float(np.linalg.norm(M))

    def attempt(rank: int, init: Factors | None, restarts: int) -> CPFit:
        fit = fit_cp(M, rank, seed, max_sweeps, tol, init, options)
        history.append((rank, fit.rel_error, fit.sweeps))
        say(f"rank {rank}: error {fit.rel_error:.3e} after {fit.sweeps} sweeps" + (" (warm)" if init else ""))
        for k in range(restarts):
            if fit.rel_error <= tol:
                break
            init = random_factors(M.shape, rank, _rng(seed, rank, _RESTART, k + 1), norm / math.sqrt(rank))
            fresh = fit_cp(M, rank, seed, max_sweeps, tol, init, options)
            history.append((rank, fresh.rel_error, fresh.sweeps))
            say(f"rank {rank}: error {fresh.rel_error:.3e} after {fresh.sweeps} sweeps (restart {k + 1})")
            if fresh.rel_error < fit.rel_error:
                fit = fresh
        return fit

    failed_rank, failed = lower - 1, None
    success: CPFit | None = None
    rank = max(start or lower, lower)
    while rank < exact.rank:  # 2. upward scan
        init = None if failed is None else pad((failed.A, failed.B, failed.C), rank, _rng(seed, rank, _PAD), 1e-3)
        fit = attempt(rank, init, 0)
        if fit.rel_error <= tol:
            success = fit
            break
        failed_rank, failed = rank, fit
        rank = max(rank + 1, math.ceil(rank * growth))
    if success is None:
        say(f"ALS did not reach {tol:g} below rank {exact.rank}: using the exact slice construction")
        exact.history = history
        return exact
    confirmed: set[int] = set()  # ranks that failed from a truncated success, restarts included

    def step() -> int:
        return max(1, int(resolution * success.rank))

    while success.rank - failed_rank > step():  # 3. bisection
        rank = (success.rank + failed_rank) // 2
        fit = attempt(rank, truncate((success.A, success.B, success.C), rank), restarts)
        if fit.rel_error <= tol:
            success = fit
        else:
            failed_rank = rank
            confirmed.add(rank)
    # 4. the scan's failures came from weaker warm starts: walk down while a truncated success still fits
    while success.rank - step() > max(confirmed, default=lower - 1):
        rank = success.rank - step()
        fit = attempt(rank, truncate((success.A, success.B, success.C), rank), restarts)
        if fit.rel_error > tol:
            break
        success = fit
    success.history = history
    return success


def fit_fixed_rank(
    M: np.ndarray, rank: int, seed: int = 0, restarts: int = 2, max_sweeps: int = 3000,
    options: ALSOptions | None = None,
) -> CPFit:
    """The best of ``1 + restarts`` ALS fits at a fixed ``rank`` (run until they stall), seeds derived from
    ``(seed, rank, restart)``. Used for explicit ranks such as the TDN paper's ``7 L²``."""
    norm = float(np.linalg.norm(M))
    best: CPFit | None = None
    history: list[tuple[int, float, int]] = []
    for k in range(restarts + 1):
        init = None if k == 0 else random_factors(M.shape, rank, _rng(seed, rank, _RESTART, k), norm / math.sqrt(rank))
        fit = fit_cp(M, rank, seed, max_sweeps, 0.0, init, options)
        history.append((rank, fit.rel_error, fit.sweeps))
        if best is None or fit.rel_error < best.rel_error:
            best = fit
    assert best is not None
    best.history = history
    return best
