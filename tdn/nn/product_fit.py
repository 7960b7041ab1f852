"""Tables behind :class:`tdn.nn.product.ProductBasis`, computed in float64 and cached.

* :func:`coupling_basis` — the generalised Clebsch–Gordan basis ``U^{nu,L}``: an orthonormal basis of the
  symmetric, equivariant ``nu``-linear maps from the stacked layout (degrees ``0..lmax_in``) to degree ``L``.
* :func:`symmetric_cp` — a symmetric CP decomposition of the stacked ``U^nu`` (rows ``(L, eta, M)``) with shared
  directions, ``U^nu ≈ a (b_r^{⊗nu})_r``: an exact decomposition built from the support of ``U``
  (:func:`monomial_directions`), compressed towards the smallest rank within a tolerance
  (:func:`compress_symmetric_cp`, refits by variable projection + L-BFGS, :func:`fit_symmetric_cp`), cached in
  memory, shipped for common sizes and cached on disk.
* :func:`gaussian_second_moment` / :func:`power_second_moment` — the exact output second moments of the bases for
  unit-variance Gaussian inputs, used to scale the weights (Isserlis' theorem).

Run ``python -m tdn.nn.product_fit`` to regenerate the shipped CP directions in ``product_factors/``.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from e3nn.o3 import wigner_3j

from ..o3 import check_path_set, dim, sphere_grid, spherical_harmonics

# ---------------------------------------------------------------------------------------------------------------
# The generalised Clebsch–Gordan basis
# ---------------------------------------------------------------------------------------------------------------

Multiset = tuple[int, ...]


@cache
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


@cache
def _multiset_basis(degrees: Multiset, L: int) -> torch.Tensor:
    """Orthonormal basis ``[eta, 2L+1, 2l1+1, ..., 2lnu+1]`` of the equivariant maps on ``V_l1 ⊗ ... ⊗ V_lnu``
    that are symmetric under exchanging slots of equal degree (``degrees`` sorted).

    The trees form an orthonormal basis of all equivariant maps and the symmetriser (the mean over slot
    permutations) is an orthogonal projector commuting with rotations, so the symmetrised trees span the symmetric
    equivariant maps. They are orthonormalised by Gram–Schmidt in tree order, not by an SVD: the result is then a
    deterministic function of the 3j tables (an SVD of this degenerate problem may return any rotation of the basis,
    depending on the LAPACK build), so weights trained on one machine mean the same on another.
    """
    trees = _coupling_trees(degrees, L)
    shape = (2 * L + 1, *(2 * l + 1 for l in degrees))
    if not trees:
        return torch.zeros(0, *shape, dtype=torch.float64)
    perms = _slot_permutations(degrees)
    kept: list[torch.Tensor] = []
    for tree in trees:
        v = (sum(tree.permute(0, *(1 + i for i in p)) for p in perms) / len(perms)).reshape(-1)
        for _ in range(2):  # Gram–Schmidt, twice for orthogonality to round-off
            for b in kept:
                v = v - (b @ v) * b
        norm = float(v.norm())
        if 1e-10 < norm < 1e-3:  # pragma: no cover - measured: kept >= 0.27, dropped <= 4e-16 up to nu=4, l=3
            raise RuntimeError(f"ambiguous rank in the symmetric coupling basis of {degrees} -> {L}: residual {norm}")
        if norm > 1e-3:
            kept.append(v / norm)
    if not kept:
        return torch.zeros(0, *shape, dtype=torch.float64)
    return torch.stack(kept).reshape(-1, *shape)


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


@cache
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


def coupling_basis(nu: int, lmax_in: int, L: int, paths: str = "o3") -> torch.Tensor:
    """``U^{nu,L}`` ``[eta, 2L+1, D, ..., D]`` (``nu`` input axes, ``D = (lmax_in+1)^2``), float64.

    Orthonormal (``sum_{M, i} U_a[M, i...] U_b[M, i...] = delta_ab``), symmetric under permuting the input axes,
    and equivariant: ``U(D x, ..., D x) = D_L U(x, ..., x)`` for rotations (and for inversion with "o3", where
    degree ``l`` has parity ``(-1)^l``). It spans *all* such maps: for every sorted degree multiset
    ``l1 <= ... <= lnu`` the left-coupled Wigner-3j trees are symmetrised over slots of equal degree and
    orthonormalised (Gram–Schmidt), then spread symmetrically over the distinct orderings of the multiset; "o3" keeps
    the multisets with ``l1 + ... + lnu + L`` even (natural parity). Each basis element lives on one multiset.
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
    with _one_thread():
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


# ---------------------------------------------------------------------------------------------------------------
# Cached symmetric CP factors: memory, shipped package data, user cache directory
# ---------------------------------------------------------------------------------------------------------------

FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).with_name("product_factors")


@dataclass(frozen=True)
class CPFactors:
    """Symmetric CP of the stacked ``U^nu`` (rows ``(L, eta, M)``): ``U^nu ≈ coefficients @ Phi(directions)^T``."""

    directions: torch.Tensor  # [D, R] float64, columns b_r
    coefficients: torch.Tensor  # [K, R] float64, a[(L, eta, M), r]
    error: float  # relative Frobenius error of the stacked U^nu
    source: str  # "shipped", "cache", "fit"

    @property
    def rank(self) -> int:
        return self.directions.shape[1]


def cache_dir() -> Path:
    """``$TDN_CACHE_DIR`` or ``~/.cache/tdn``; CP fits go to its ``product_cp/`` subfolder."""
    return Path(os.environ.get("TDN_CACHE_DIR") or Path.home() / ".cache" / "tdn")


def factor_filename(nu: int, lmax_in: int, lmax_out: int, paths: str, tol: float, rank: int | None,
                    seed: int) -> str:
    target = f"rank{rank}" if rank is not None else f"tol{tol:.0e}"
    return f"cp_{paths}_in{lmax_in}_out{lmax_out}_nu{nu}_{target}_seed{seed}.npz"


_CP_CACHE: dict[tuple, CPFactors] = {}


def symmetric_cp(
    nu: int, lmax_in: int, lmax_out: int, paths: str = "o3", tol: float = 1e-4, rank: int | None = None,
    seed: int = 0, trials: int = 4,
) -> CPFactors:
    """The symmetric CP of the stacked ``U^nu`` for ``L = 0..lmax_out``: cached in memory, then looked up in the
    shipped ``product_factors/`` and in :func:`cache_dir`, else fitted (:func:`compress_symmetric_cp` for a
    tolerance, :func:`fit_symmetric_cp` for a fixed ``rank``) and saved to the cache directory.

    Files store only the directions ``B``; the coefficients are re-solved on load (one least-squares problem), so
    a file stays valid for any orthonormal basis of the same span and is rejected (and refitted) if its error no
    longer meets the tolerance.
    """
    key = (nu, lmax_in, lmax_out, paths, float(tol), rank, seed)
    if key in _CP_CACHE:
        return _CP_CACHE[key]
    if nu < 2:
        raise ValueError(f"the symmetric CP is fitted for nu >= 2, got nu={nu}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    target, _ = stacked_basis(nu, lmax_in, lmax_out, paths)
    name = factor_filename(nu, lmax_in, lmax_out, paths, tol, rank, seed)
    found = None
    for source, folder in (("shipped", SHIPPED_DIR), ("cache", cache_dir() / "product_cp")):
        found = _load(folder / name, target, nu, tol, rank, source)
        if found is not None:
            break
    if found is None:
        with _one_thread():
            if rank is None:
                b, a, err = compress_symmetric_cp(target, nu, tol=tol, seed=seed, trials=trials)
            else:
                start = monomial_directions(target, nu, seed)
                if rank >= start.shape[1]:  # already exact: pad with seeded directions, no optimisation
                    gen = torch.Generator().manual_seed(seed)
                    extra = torch.randn(start.shape[0], rank - start.shape[1], generator=gen, dtype=torch.float64)
                    b = torch.cat([start, extra / math.sqrt(start.shape[0])], dim=1)
                    a, err = cp_coefficients(target, b, nu)
                else:
                    a0, _ = cp_coefficients(target, start, nu)
                    order = (a0.norm(dim=0) * start.norm(dim=0) ** nu).argsort(descending=True)
                    b, a, err = _fit_symmetric_cp(target, nu, rank, seed, 0.0, 3000, start[:, order[:rank]], 0.999)
        found = CPFactors(b, a, err, "fit")
        _save(cache_dir() / "product_cp" / name, found, nu, lmax_in, lmax_out, paths, tol, rank, seed)
    _CP_CACHE[key] = found
    return found


def _load(path: Path, target: torch.Tensor, nu: int, tol: float, rank: int | None, source: str) -> CPFactors | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            if int(data["format_version"]) != FORMAT_VERSION:
                return None
            directions = torch.from_numpy(np.array(data["directions"], dtype=np.float64))
            stored_error = float(data["error"])
    except (OSError, KeyError, ValueError):  # unreadable or foreign file: refit
        return None
    if directions.dim() != 2 or directions.shape[0] ** nu != target.shape[1]:
        return None
    if rank is not None and directions.shape[1] != rank:
        return None
    with _one_thread():
        coefficients, error = cp_coefficients(target, directions, nu)
    limit = (1.01 * stored_error + 1e-12) if rank is not None else max(tol, 1.01 * stored_error + 1e-12)
    if error > limit:
        return None
    return CPFactors(directions, coefficients, error, source)


def _save(path: Path, factors: CPFactors, nu: int, lmax_in: int, lmax_out: int, paths: str, tol: float,
          rank: int | None, seed: int) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(
            tmp, format_version=FORMAT_VERSION, directions=factors.directions.numpy(), error=factors.error,
            nu=nu, lmax_in=lmax_in, lmax_out=lmax_out, paths=paths, tol=tol, rank=-1 if rank is None else rank,
            seed=seed,
        )
        os.replace(tmp, path)  # atomic: concurrent processes never read a half-written file
    except OSError as exc:  # a read-only home is not an error, only slower next time
        warnings.warn(f"could not cache the CP factors in {path}: {exc}", stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------
# Output variance for unit-variance Gaussian inputs (weight normalisation)
# ---------------------------------------------------------------------------------------------------------------


def _isserlis(nu: int) -> list[tuple[int, int]]:
    """``(k, count)``: the pairings of two copies of ``nu`` slots with ``k`` pairs across the copies number
    ``C(nu, k)^2 k! ((nu - k - 1)!!)^2``; the other ``(nu - k) / 2`` pairs of each copy are internal."""

    def double_factorial(n: int) -> int:
        return math.prod(range(n, 0, -2)) if n > 0 else 1

    return [(k, math.comb(nu, k) ** 2 * math.factorial(k) * double_factorial(nu - k - 1) ** 2)
            for k in range(nu % 2, nu + 1, 2)]


def gaussian_second_moment(rows: torch.Tensor, nu: int) -> torch.Tensor:
    """``E[(T_k(A, ..., A))^2]`` for symmetric rows ``T_k`` ``[K, D^nu]`` and ``A ~ N(0, I_D)`` -> ``[K]``.

    Isserlis' theorem: ``sum_k count(k) ||tr^{(nu-k)/2} T||^2``, where ``tr`` contracts two slots with the
    identity (internal pairs) and ``k`` slots are paired across the two copies.
    """
    d = round(rows.shape[1] ** (1 / nu)) if nu > 0 else 1
    out = torch.zeros(rows.shape[0], dtype=torch.float64)
    traced = rows.to(torch.float64)
    for k, count in sorted(_isserlis(nu), reverse=True):  # k = nu, nu - 2, ...: one more trace each step
        out += count * (traced**2).sum(1)
        if k >= 2:
            traced = traced.reshape(rows.shape[0], -1, d, d).diagonal(dim1=2, dim2=3).sum(-1)
    return out


@cache
def power_second_moment(nu: int, lmax_in: int, lmax_out: int) -> torch.Tensor:
    """``E[((f^nu)_{LM})^2]`` ``[(lmax_out+1)^2]`` for the sphere function ``f = A . Y`` with ``A ~ N(0, I_D)``.

    ``f`` is a Gaussian field with variance ``D`` and covariance ``kappa(r, s) = Y(r) . Y(s)``, so
    ``E[f(r)^nu f(s)^nu] = sum_k count(k) kappa^k D^(nu-k)`` (same pairings as :func:`gaussian_second_moment`),
    integrated against ``Y_LM(r) Y_LM(s)`` with a quadrature exact for the band limit ``nu lmax_in + lmax_out``.
    """
    points, weights = sphere_grid(nu * lmax_in + lmax_out)
    y_in = spherical_harmonics(lmax_in, points)  # [Q, D]
    project = weights[:, None] * spherical_harmonics(lmax_out, points)  # [Q, D_out]
    kappa = y_in @ y_in.T  # [Q, Q]
    d = dim(lmax_in)
    kernel = sum(count * kappa**k * float(d) ** (nu - k) for k, count in _isserlis(nu))
    return torch.einsum("qm,qp,pm->m", project, kernel, project)


# ---------------------------------------------------------------------------------------------------------------
# Regenerating the shipped factors
# ---------------------------------------------------------------------------------------------------------------

SHIPPED_COMBOS = [
    (nu, lmax_in, lmax_out, paths)
    for paths in ("o3", "so3")
    for lmax_in in (1, 2, 3)
    for lmax_out in (0, 1)
    for nu in range(2, (4 if lmax_in <= 2 else 3) + 1)
]


def ship(out_dir: Path = SHIPPED_DIR, tol: float = 1e-4, seed: int = 0, trials: int = 8) -> None:
    """Fit every combination of :data:`SHIPPED_COMBOS` (MACE-medium: ``lmax_in=3, lmax_out<=1, nu<=3``; the
    defaults and test sizes) and write the directions to ``out_dir``."""
    import time

    for nu, lmax_in, lmax_out, paths in SHIPPED_COMBOS:
        name = factor_filename(nu, lmax_in, lmax_out, paths, tol, None, seed)
        target, _ = stacked_basis(nu, lmax_in, lmax_out, paths)
        if _load(out_dir / name, target, nu, tol, None, "shipped") is not None:
            continue
        start = time.perf_counter()
        b, a, err = compress_symmetric_cp(target, nu, tol=tol, seed=seed, trials=trials)
        _save(out_dir / name, CPFactors(b, a, err, "fit"), nu, lmax_in, lmax_out, paths, tol, None, seed)
        print(f"{name}: K={target.shape[0]} rank={b.shape[1]} error={err:.2e} ({time.perf_counter() - start:.0f} s)",
              flush=True)


if __name__ == "__main__":
    ship()
