"""Symmetric CP decomposition of the stacked coupling basis, in float64, deterministic for a seed.

``U^nu`` (rows ``(L, eta, M)``, ``[K, D^nu]``) ≈ ``a Phi(B)^T`` with ``Phi(B) = (b_r^{⊗nu})_r``: directions
``B [D, R]`` shared by all rows and coefficients ``a [K, R]``. :func:`monomial_directions` gives an exact
decomposition from the support of ``U``; :func:`compress_symmetric_cp` walks its rank down within a tolerance,
refitting by variable projection + L-BFGS (:func:`fit_symmetric_cp`); :func:`fit_fixed_rank` fits a given rank.
Storage and lookup of the results: :mod:`tdn.contractions.factors`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Small dense problems run fastest on one thread (and reproducibly): no oversubscription on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _ridge(gram: torch.Tensor) -> torch.Tensor:
    return 1e-12 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)


@cache
def _symmetric_index(nu: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted index tuples ``i1 <= ... <= inu`` ``[M, nu]``, their flat index in ``D^nu`` ``[M]`` and
    ``sqrt(multiplicity)`` ``[M]``: a symmetric tensor's Frobenius norm is that of its ``M`` weighted entries."""
    tuples = torch.tensor(list(itertools.combinations_with_replacement(range(d), nu)), dtype=torch.long)
    flat = torch.zeros(tuples.shape[0], dtype=torch.long)
    for j in range(nu):
        flat = flat * d + tuples[:, j]
    counts = torch.stack([(tuples == i).sum(1) for i in range(d)], dim=1)  # [M, D]
    mult = math.factorial(nu) / torch.exp(torch.lgamma(counts.to(torch.float64) + 1)).prod(1)
    return tuples.reshape(-1, nu), flat, mult.sqrt()


def cp_coefficients(target: torch.Tensor, directions: torch.Tensor, nu: int) -> tuple[torch.Tensor, float]:
    """Least-squares ``a [K, R]`` for fixed directions, and the relative error ``||T - a Phi^T|| / ||T||``.

    Solved by SVD (``gelsd``) in the weighted space of distinct monomials, so it stays accurate when the
    directions are badly conditioned (the optimiser's normal equations square the condition number).
    """
    d = directions.shape[0]
    tuples, flat, weight = _symmetric_index(nu, d)
    phi = directions[tuples].prod(1) * weight[:, None]  # [M, R]: b_r^{⊗nu} at the distinct monomials
    rows = target[:, flat] * weight  # [K, M]
    a = torch.linalg.lstsq(phi, rows.T, driver="gelsd").solution.T  # [K, R]
    err = float((rows - a @ phi.T).norm() / rows.norm())
    return a, err


def fit_symmetric_cp(
    target: torch.Tensor,
    nu: int,
    rank: int,
    seed: int = 0,
    tol: float = 0.0,
    max_iter: int = 3000,
    init: torch.Tensor | None = None,
    stall: float = 0.98,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Fit ``target [K, D^nu] ≈ a Phi(B)^T`` with ``Phi(B) = (b_r^{⊗nu})_r``: the symmetric CP decomposition with
    directions ``B [D, R]`` shared by all rows. Returns ``(B, a, relative error)``.

    Variable projection: for fixed ``B`` the best ``a`` solves a linear least-squares problem with Gram matrix
    ``(B^T B)^{∘nu}`` (ridge ``1e-12 * mean diag``); the reduced objective
    ``f(B) = min_a ||T - a Phi^T||^2 + ridge ||a||^2`` is minimised over ``B`` by L-BFGS (strong Wolfe). Its gradient is
    the gradient at fixed optimal ``a`` (envelope theorem), so ``a`` is not differentiated. ``B`` starts from a
    seeded ``N(0, 1/D)`` draw (or ``init``, padded with seeded columns); float64 throughout, deterministic for a
    given seed (run on one thread). Stops once the relative error is ``<= tol``, after ``max_iter`` iterations, or
    when 50 iterations cut the error by less than a factor ``stall``.
    """
    with one_thread():
        return _fit_symmetric_cp(target.to(torch.float64), nu, rank, seed, tol, max_iter, init, stall)


def _fit_symmetric_cp(
    target: torch.Tensor, nu: int, rank: int, seed: int, tol: float, max_iter: int, init: torch.Tensor | None,
    stall: float,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    d = round(target.shape[1] ** (1 / nu))
    tuples, flat, weight = _symmetric_index(nu, d)
    rows = target[:, flat] * weight  # [K, M]: the rows in the weighted space of distinct monomials
    gen = torch.Generator().manual_seed(seed)
    fresh = torch.randn(d, rank, generator=gen, dtype=torch.float64) / math.sqrt(d)
    if init is not None:
        keep = min(rank, init.shape[1])
        fresh[:, :keep] = init[:, :keep]
    directions = fresh.requires_grad_(True)
    norm2 = float((rows**2).sum())
    opt = torch.optim.LBFGS(
        [directions], lr=1.0, max_iter=50, history_size=50, line_search_fn="strong_wolfe",
        tolerance_grad=1e-15, tolerance_change=1e-18,
    )
    state = {"err": math.inf}

    def closure() -> torch.Tensor:
        opt.zero_grad()
        phi = directions[tuples].prod(1) * weight[:, None]  # [M, R]: b_r^{⊗nu} at the distinct monomials
        h = rows @ phi  # [K, R] = T_k(b_r, ..., b_r)
        gram = (directions.T @ directions) ** nu  # [R, R] = Phi^T Phi
        with torch.no_grad():
            ridge = _ridge(gram)
            chol, info = torch.linalg.cholesky_ex(gram + ridge)
            if int(info) != 0:
                a = torch.linalg.lstsq(gram + ridge, h.T, driver="gelsd").solution.T
            else:
                a = torch.cholesky_solve(h.T, chol).T
        fit = (a * h).sum()
        quad = ((a @ gram) * a).sum()
        loss = (norm2 - 2 * fit + quad + ridge[0, 0] * (a**2).sum()) / norm2
        loss.backward()
        state["err"] = math.sqrt(max(float(norm2 - 2 * fit.detach() + quad.detach()), 0.0) / norm2)
        return loss

    done, previous = 0, math.inf
    while done < max_iter:
        opt.step(closure)
        done += 50
        if state["err"] <= tol or state["err"] > stall * previous:  # converged, or < (1 - stall) gain in 50 steps
            break
        previous = state["err"]
    b = directions.detach()
    a, err = cp_coefficients(target, b, nu)
    return b, a, err


def monomial_directions(target: torch.Tensor, nu: int, seed: int = 0) -> torch.Tensor:
    """Directions ``B [D, R_s]`` for which the symmetric CP of ``target [K, D^nu]`` is *exact*.

    Every row is a homogeneous polynomial of degree ``nu`` in the components of ``A``, supported on the monomials
    where ``target`` is nonzero. For every set ``V`` of components that occurs in a support monomial (and every
    subset of it), add ``C(nu-1, |V|-1)`` directions supported on ``V`` with seeded generic entries: the powers
    ``(b . A)^nu`` of those span all monomials that use exactly the components ``V`` (a Vandermonde-like system),
    and their lower-order parts are spanned by the directions of the subsets, so by induction on ``|V|`` the span
    holds every support monomial. ``R_s`` is the starting point that :func:`symmetric_cp` compresses.
    """
    d = round(target.shape[1] ** (1 / nu))
    nonzero = target.reshape(-1, *([d] * nu)).abs().amax(0) > 1e-12  # [D]*nu, symmetric
    sets: set[tuple[int, ...]] = set()
    for idx in nonzero.nonzero().tolist():
        support = tuple(sorted(set(idx)))
        for k in range(1, len(support) + 1):
            sets.update(itertools.combinations(support, k))
    gen = torch.Generator().manual_seed(seed)
    columns = []
    for support in sorted(sets, key=lambda s: (len(s), s)):
        for _ in range(math.comb(nu - 1, len(support) - 1)):
            col = torch.zeros(d, dtype=torch.float64)
            values = 0.5 + torch.rand(len(support), generator=gen, dtype=torch.float64)
            signs = torch.randint(0, 2, (len(support),), generator=gen).to(torch.float64) * 2 - 1
            col[list(support)] = values * signs
            columns.append(col / col.norm())
    return torch.stack(columns, dim=1) if columns else torch.zeros(d, 0, dtype=torch.float64)


def compress_symmetric_cp(
    target: torch.Tensor, nu: int, tol: float = 1e-4, seed: int = 0, trials: int = 4, max_iter: int = 1000,
    verbose: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A symmetric CP of ``target`` with a small rank whose relative error is ``<= tol``.

    Starts from the exact :func:`monomial_directions` (rank ``R_s``, error ~1e-13) and walks the rank down in steps
    of ~3%: a trial rank ``R`` keeps the ``R`` columns of the best solution with the largest contribution
    ``|a_r| |b_r|^nu`` and is refitted by :func:`fit_symmetric_cp`; the walk stops at the first failure or after
    ``trials`` fits. The problem is non-convex, so this is the smallest rank *found*, never one above ``tol``.
    (Measured: random starts need more terms than ``R_s`` for the same error, and the walk removes at most a
    few percent of it.) Returns ``(B [D, R], a [K, R], error)``.
    """
    with one_thread():
        best = monomial_directions(target, nu, seed)
        a, err = cp_coefficients(target, best, nu)
        for _ in range(trials):
            rank = best.shape[1] - max(1, round(0.03 * best.shape[1]))
            if rank < target.shape[0]:  # the K rows are linearly independent: no fewer terms can work
                break
            order = (a.norm(dim=0) * best.norm(dim=0) ** nu).argsort(descending=True)
            trial, trial_a, trial_err = _fit_symmetric_cp(
                target, nu, rank, seed, 0.9 * tol, max_iter, best[:, order[:rank]], 0.98
            )
            if verbose:
                print(f"  nu={nu} rank {rank}: error {trial_err:.2e}", flush=True)
            if trial_err > tol:
                break
            best, a, err = trial, trial_a, trial_err
        return best, a, err


def fit_fixed_rank(target: torch.Tensor, nu: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A symmetric CP of ``target [K, D^nu]`` with exactly ``rank`` terms: ``(B [D, R], a [K, R], error)``.

    At or above the exact :func:`monomial_directions` rank ``R_s`` those directions are padded with seeded
    ``N(0, 1/D)`` columns (exact, no optimisation); below it the ``rank`` columns with the largest contribution
    ``|a_r| |b_r|^nu`` start :func:`fit_symmetric_cp` (3000 iterations at most, no error target).
    """
    with one_thread():
        start = monomial_directions(target, nu, seed)
        if rank >= start.shape[1]:  # already exact: pad with seeded directions, no optimisation
            gen = torch.Generator().manual_seed(seed)
            extra = torch.randn(start.shape[0], rank - start.shape[1], generator=gen, dtype=torch.float64)
            b = torch.cat([start, extra / math.sqrt(start.shape[0])], dim=1)
            a, err = cp_coefficients(target, b, nu)
            return b, a, err
        a0, _ = cp_coefficients(target, start, nu)
        order = (a0.norm(dim=0) * start.norm(dim=0) ** nu).argsort(descending=True)
        return _fit_symmetric_cp(target, nu, rank, seed, 0.0, 3000, start[:, order[:rank]], 0.999)
