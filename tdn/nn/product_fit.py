"""Tables behind :class:`tdn.nn.product.ProductBasis`, computed in float64 and cached.

* :func:`coupling_basis` — the generalised Clebsch–Gordan basis ``U^{nu,L}``: an orthonormal basis of the
  symmetric, equivariant ``nu``-linear maps from the stacked layout (degrees ``0..lmax_in``) to degree ``L``.
* :func:`fit_symmetric_cp` / :func:`symmetric_cp` — a symmetric CP decomposition of the stacked ``U^nu``
  (rows ``(L, eta, M)``) with shared directions: ``U^nu ≈ a (b_r^{⊗nu})_r``.
* :func:`output_variance` / :func:`power_variance` — the exact output variance of each basis for
  unit-variance Gaussian inputs, used to scale the weights (Isserlis' theorem).

Run ``python -m tdn.nn.product_fit`` to regenerate the shipped CP directions in ``product_factors/``.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from e3nn.o3 import wigner_3j

from ..o3 import check_path_set, dim, sphere_grid, spherical_harmonics

# ---------------------------------------------------------------------------------------------------------------
# The generalised Clebsch–Gordan basis
# ---------------------------------------------------------------------------------------------------------------

Multiset = tuple[int, ...]


@lru_cache(maxsize=None)
def _w3j(l1: int, l2: int, l3: int) -> torch.Tensor:
    """The Wigner-3j block ``(l1, l2, l3)`` as ``[2l3+1, 2l1+1, 2l2+1]`` (float64, unit Frobenius norm).

    The same e3nn table :func:`tdn.o3.path_blocks` stacks (without its path normalisation, which does not
    matter here because every coupling tree is normalised), fetched one triple at a time: trees need
    intermediate degrees up to ``nu * lmax_in`` but only triples with a small middle degree.
    """
    return wigner_3j(l1, l2, l3, dtype=torch.float64).permute(2, 0, 1).contiguous()


def _coupling_trees(degrees: Multiset, L: int) -> list[torch.Tensor]:
    """All left-coupled trees ``((l1 l2)K2 l3)K3 ... -> L`` of the degrees, each ``[2L+1, 2l1+1, ..., 2lnu+1]``.

    Trees with different intermediate degrees are orthogonal and together span every SO(3)-equivariant map
    ``V_l1 ⊗ ... ⊗ V_lnu -> V_L``. Intermediates that can no longer reach ``L`` are pruned.
    """
    nu = len(degrees)
    states: list[tuple[int, torch.Tensor]] = [(degrees[0], torch.eye(2 * degrees[0] + 1, dtype=torch.float64))]
    for j in range(1, nu):
        lj, rest = degrees[j], sum(degrees[j + 1 :])
        new_states = []
        for k_prev, tree in states:  # tree [2K+1, inputs so far...]
            for k in range(abs(k_prev - lj), k_prev + lj + 1):
                if abs(k - L) > rest:
                    continue
                block = _w3j(k_prev, lj, k)  # [2k+1, 2k_prev+1, 2lj+1]
                new_states.append((k, torch.einsum("kpb,p...->k...b", block, tree)))
        states = new_states
    return [tree / tree.norm() for k, tree in states if k == L]


def _slot_permutations(degrees: Multiset) -> list[tuple[int, ...]]:
    """Permutations of the input slots that leave the (sorted) degree tuple unchanged."""
    return [p for p in itertools.permutations(range(len(degrees))) if all(degrees[i] == degrees[j] for i, j in
                                                                          zip(p, range(len(degrees))))]


@lru_cache(maxsize=None)
def _multiset_basis(degrees: Multiset, L: int) -> torch.Tensor:
    """Orthonormal basis ``[eta, 2L+1, 2l1+1, ..., 2lnu+1]`` of the equivariant maps on ``V_l1 ⊗ ... ⊗ V_lnu``
    that are symmetric under exchanging slots of equal degree (``degrees`` sorted).

    The trees form an orthonormal basis of all equivariant maps and the symmetriser is an orthogonal projector
    commuting with rotations, so the singular values of the symmetrised trees are exactly 0 or 1.
    """
    trees = _coupling_trees(degrees, L)
    shape = (2 * L + 1, *(2 * l + 1 for l in degrees))
    if not trees:
        return torch.zeros(0, *shape, dtype=torch.float64)
    perms = _slot_permutations(degrees)
    sym = []
    for tree in trees:
        sym.append(sum(tree.permute(0, *(1 + i for i in p)) for p in perms) / len(perms))
    mat = torch.stack(sym).reshape(len(sym), -1)  # [trees, (2L+1) prod(2l+1)]
    _, s, vh = torch.linalg.svd(mat, full_matrices=False)
    keep = s > 0.5
    if bool(((s > 1e-8) & ~keep).any()):  # pragma: no cover - would mean the trees were not orthonormal
        raise RuntimeError(f"coupling trees of {degrees} -> {L} are not orthonormal: singular values {s.tolist()}")
    return vh[keep].reshape(-1, *shape)


def multisets(nu: int, lmax_in: int, L: int, paths: str) -> list[Multiset]:
    """Sorted degree tuples ``l1 <= ... <= lnu`` of the inputs (for "o3": ``sum + L`` even)."""
    out = []
    for degrees in itertools.combinations_with_replacement(range(lmax_in + 1), nu):
        if paths == "o3" and (sum(degrees) + L) % 2:
            continue
        out.append(degrees)
    return out


def _arrangements(degrees: Multiset) -> list[tuple[int, ...]]:
    """Distinct orderings of the multiset, each as the permutation ``p`` with ``ordering[j] = degrees[p[j]]``."""
    seen, out = set(), []
    for p in itertools.permutations(range(len(degrees))):
        key = tuple(degrees[i] for i in p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


@lru_cache(maxsize=None)
def _coupling_basis(nu: int, lmax_in: int, L: int, paths: str) -> torch.Tensor:
    d = dim(lmax_in)
    parts = []
    for degrees in multisets(nu, lmax_in, L, paths):
        block = _multiset_basis(degrees, L)  # [eta_m, 2L+1, 2l1+1, ...]
        if block.shape[0] == 0:
            continue
        arrangements = _arrangements(degrees)
        full = torch.zeros(block.shape[0], 2 * L + 1, *([d] * nu), dtype=torch.float64)
        for p in arrangements:
            # slot j carries degree degrees[p[j]]: move block axis 1 + p[j] to position 1 + j
            index = (slice(None), slice(None), *(slice(degrees[i] ** 2, (degrees[i] + 1) ** 2) for i in p))
            full[index] = block.permute(0, 1, *(2 + i for i in p))
        parts.append(full / math.sqrt(len(arrangements)))
    if not parts:
        return torch.zeros(0, 2 * L + 1, *([d] * nu), dtype=torch.float64)
    return torch.cat(parts)


MAX_DENSE = 16**3 * 4  # largest dense U row (components x inputs) built: nu = 3 at lmax_in = 3 (x4 margin)


def coupling_basis(nu: int, lmax_in: int, L: int, paths: str = "o3") -> torch.Tensor:
    """``U^{nu,L}`` ``[eta, 2L+1, D, ..., D]`` (``nu`` input axes, ``D = (lmax_in+1)^2``), float64.

    Orthonormal (``sum_{M, i} U_a[M, i...] U_b[M, i...] = delta_ab``), symmetric under permuting the input axes,
    and equivariant: ``U(D x, ..., D x) = D_L U(x, ..., x)`` for rotations (and for inversion with "o3", where
    degree ``l`` has parity ``(-1)^l``). It spans *all* such maps: for every sorted degree multiset
    ``l1 <= ... <= lnu`` the left-coupled Wigner-3j trees are symmetrised over slots of equal degree and
    orthonormalised (SVD), then spread symmetrically over the distinct orderings of the multiset; "o3" keeps the
    multisets with ``l1 + ... + lnu + L`` even (natural parity). Each basis element lives on one multiset.
    """
    check_path_set(paths)
    if nu < 1 or L < 0 or lmax_in < 0:
        raise ValueError(f"need nu >= 1, L >= 0, lmax_in >= 0, got nu={nu}, L={L}, lmax_in={lmax_in}")
    return _coupling_basis(nu, lmax_in, L, paths).clone()


def stacked_basis(nu: int, lmax_in: int, lmax_out: int, paths: str = "o3") -> tuple[torch.Tensor, list[int]]:
    """All ``U^{nu,L}`` for ``L = 0..lmax_out`` stacked as rows ``(L, eta, M)``: ``[K, D^nu]`` (float64), and
    the number of basis elements ``eta_L`` per ``L``. ``K = sum_L eta_L (2L + 1)``."""
    blocks = [coupling_basis(nu, lmax_in, L, paths) for L in range(lmax_out + 1)]
    d = dim(lmax_in)
    return torch.cat([b.reshape(-1, d**nu) for b in blocks]), [b.shape[0] for b in blocks]


# ---------------------------------------------------------------------------------------------------------------
# Symmetric CP decomposition of the stacked basis
# ---------------------------------------------------------------------------------------------------------------


@contextmanager
def _one_thread() -> Iterator[None]:
    """Small dense problems run fastest on one thread (and reproducibly): no oversubscription on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _ridge(gram: torch.Tensor) -> torch.Tensor:
    return 1e-12 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)


@lru_cache(maxsize=None)
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
    with _one_thread():
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
    target: torch.Tensor, nu: int, tol: float = 1e-4, seed: int = 0, max_iter: int = 1500, max_fits: int = 12,
    verbose: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The symmetric CP of ``target`` with (about) the smallest rank whose relative error is ``<= tol``.

    Starts from the exact :func:`monomial_directions` (rank ``R_s``) and bisects the rank between the lower bound
    ``K`` (the rows are linearly independent) and the smallest rank found so far: a trial rank ``R`` starts from
    the ``R`` columns of the best solution with the largest contribution ``|a_r| |b_r|^nu`` and is refitted by
    :func:`fit_symmetric_cp`. The search is a heuristic (the problem is non-convex); it never returns an error
    above ``tol``. Returns ``(B [D, R], a [K, R], error)``.
    """
    with _one_thread():
        best = monomial_directions(target, nu, seed)
        a, err = cp_coefficients(target, best, nu)
        lo, hi = target.shape[0], best.shape[1]
        fits = 0
        while lo < hi and fits < max_fits:
            rank = (lo + hi) // 2
            order = (a.norm(dim=0) * best.norm(dim=0) ** nu).argsort(descending=True)
            trial, trial_a, trial_err = _fit_symmetric_cp(
                target, nu, rank, seed, 0.9 * tol, max_iter, best[:, order[:rank]], 0.98
            )
            fits += 1
            if verbose:
                print(f"  nu={nu} rank {rank}: error {trial_err:.2e}", flush=True)
            if trial_err <= tol:
                hi, best, a, err = rank, trial, trial_a, trial_err
            else:
                lo = rank + 1
        return best, a, err
