"""The generalised Clebsch–Gordan basis ``U^{nu,L}`` of the product basis, computed in float64 and cached.

:func:`coupling_basis` is an orthonormal basis of the symmetric, equivariant ``nu``-linear maps from the stacked
layout (degrees ``0..lmax_in``) to degree ``L``; :func:`stacked_basis` stacks it for ``L = 0..lmax_out`` as the
rows ``(L, eta, M)`` that the "cg" contraction evaluates and the "cp" contraction decomposes.
"""

from __future__ import annotations

import itertools
import math
from functools import cache

import torch
from e3nn.o3 import wigner_3j

from ..o3 import check_path_set, dim

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
