"""Probing the tensor-product backends for the expressivity benchmark (:mod:`tdn.bench.expressivity`): one row per
backend, path set and L with the equivariance errors, the distances of its bilinear map from the exact CG and Gaunt
tensors, the paths it holds and its weights per channel; and the shipped CP factors.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from .. import o3 as tdn_o3
from .. import tp as tdn_tp
from ..tp import cp as tdn_cp
from . import common
from .tp_accuracy import effective_tensor, path_analysis, random_inputs

BACKENDS = ("cg", "cp", "gaunt", "grid")
PATH_SETS = ("o3", "so3")
# the weight mode each backend uses in the model by default (conf/tp/*.yaml)
MODEL_WEIGHTS = {kind: tdn_tp.BACKENDS[kind].default_weights for kind in BACKENDS}  # what a model uses
CANNOT = {
    "cg": "none (exact; per-path weights)",
    "cp": "residual of the CP decomposition (see fit error); per-path weights",
    "gaunt": "odd l1+l2+l3 paths; path weights other than the Gaunt ones within an output degree",
    "grid": "odd l1+l2+l3 paths; path weights other than the Gaunt ones within an output degree",
}


# --------------------------------------------------------------------------------------------- CP factors


def cp_factor_file(lmax: int, paths: str, tol: float = tdn_cp.DEFAULT_TOL, rank: int | None = None) -> Path | None:
    """The shipped or cached factor file for ``(L, L, L)``, or None (never fits: a fit at L = 6 takes long)."""
    name = tdn_cp.factor_name(lmax, lmax, lmax, paths, tol, rank)
    for directory in (tdn_cp.PACKAGE_DIR, tdn_cp.cache_dir()):
        if (directory / name).is_file():
            return directory / name
    return None


def shipped_square(paths: str) -> dict[int, dict[str, dict[str, Any]]]:
    """``{L: {"tol": row, "paper": row}}`` of the shipped square factors (rank, rel_error, file) for one path set."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for row in tdn_cp.shipped_factors():
        if row["paths"] != paths or not row["lmax_in"] == row["lmax_sh"] == row["lmax_out"]:
            continue
        L = row["lmax_out"]
        key = "tol" if row["tol"] > 0 else ("paper" if row["rank"] == 7 * L * L else f"rank{row['rank']}")
        out.setdefault(L, {})[key] = row
    return out


# --------------------------------------------------------------------------------------------- per-backend rows


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def scaled_distance(T: torch.Tensor, ref: torch.Tensor, lmax: int, per_degree: bool) -> float:
    """``min over scales a ||a T - ref|| / ||ref||``: one global scale, or one per output degree ``l3``."""
    if not per_degree:
        denom = float((T * T).sum())
        a = float((T * ref).sum()) / denom if denom > 0 else 0.0
        return _rel(a * T, ref)
    fitted = torch.zeros_like(T)
    for l3 in range(lmax + 1):
        s = tdn_o3.degree_slice(l3)
        denom = float((T[s] * T[s]).sum())
        fitted[s] = (float((T[s] * ref[s]).sum()) / denom if denom > 0 else 0.0) * T[s]
    return _rel(fitted, ref)


def odd_fraction(lmax: int) -> float:
    """The part of the "so3" path tensor in odd ``l1 + l2 + l3`` paths: ``||M_odd|| / ||M_so3||``."""
    M = tdn_o3.path_tensor(lmax, lmax, lmax, "so3")
    odd = torch.zeros_like(M)
    for (l1, l2, l3), block in tdn_o3.path_blocks(lmax, lmax, lmax, "so3"):
        if (l1 + l2 + l3) % 2:
            odd[tdn_o3.degree_slice(l3), tdn_o3.degree_slice(l1), tdn_o3.degree_slice(l2)] += block
    return float(odd.norm() / M.norm())


def _rotations(seed: int, count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [tdn_o3.random_rotation(generator=gen) for _ in range(count)]


def equivariance(tp64: torch.nn.Module, lmax: int, paths: str, seed: int, rotations: int, edges: int,
                 channels: int) -> dict[str, float]:
    """Max relative equivariance error over ``rotations`` proper rotations, float64 and float32 (+ parity for o3)."""
    out: dict[str, float] = {}
    rots = _rotations(seed, rotations)
    d = tdn_o3.dim(lmax)
    for dtype, tag in ((torch.float64, "f64"), (torch.float32, "f32")):
        tp = copy.deepcopy(tp64).to(dtype=dtype)
        x, y, w = random_inputs(((channels, d), (d,), (channels, tp.num_weights)), edges, dtype, "cpu", seed)
        errs = [tdn_o3.equivariance_error(tp, [x, y, w], [lmax, lmax, None], lmax, rotation=r) for r in rots]
        out[f"equiv_{tag}"] = max(errs)
        if paths == "o3":
            errs = [tdn_o3.equivariance_error(tp, [x, y, w], [lmax, lmax, None], lmax, rotation=-r) for r in rots]
            out[f"parity_{tag}"] = max(errs)
    return out


def build_backend(kind: str, lmax: int, paths: str, channels: int, allow_fit: bool) -> tuple[Any, dict[str, Any]]:
    """The float64 module with ``weights="shared"`` (the bare map), or ``(None, {"status": why})``."""
    options: dict[str, Any] = {}
    info: dict[str, Any] = {}
    if kind == "cp" and not allow_fit:
        if cp_factor_file(lmax, paths) is None:
            paper = cp_factor_file(lmax, paths, rank=7 * lmax * lmax)
            if paper is None:
                return None, {"status": "no shipped tol-1e-4 (or 7L^2) factors; --fit-missing fits them"}
            options["rank"] = 7 * lmax * lmax
            info["note"] = "tol-1e-4 factors not shipped: the TDN paper's rank 7L^2 is used"
    with common.default_dtype(torch.float64):
        try:
            tp = tdn_tp.build(kind, lmax=lmax, channels=channels, paths=paths, weights="shared", **options)
        except ValueError as err:
            return None, {"status": f"unsupported: {err}"}
    if kind == "cp":
        info.update(rank=tp.rank, fit_error=tp.fit_error, factors=Path(tp.factors_file).name,
                    factors_source=tp.factors_source)
    if kind == "grid":
        info["rank"] = tp.num_points  # a factorised product of rank Q (grid points)
    return tp, info


def weight_counts(kind: str, lmax: int, paths: str) -> dict[str, int]:
    """``{mode: P}`` for every weight mode the backend offers (P = weights per channel)."""
    cls = tdn_tp.BACKENDS[kind]
    path_list = tdn_o3.path_list(lmax, lmax, lmax, paths)
    return {mode: tdn_tp.weights_per_channel(mode, path_list, lmax) for mode in cls.supported_weights}


def backend_row(kind: str, lmax: int, paths: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The row of one backend, L and path set (``cfg``: seed, rotations, edges, channels, allow_fit)."""
    row: dict[str, Any] = {
        "backend": kind, "lmax": lmax, "paths": paths, "d": tdn_o3.dim(lmax),
        "num_paths": len(tdn_o3.path_list(lmax, lmax, lmax, paths)),
        "num_paths_o3": len(tdn_o3.path_list(lmax, lmax, lmax, "o3")),
        "weights_per_channel": weight_counts(kind, lmax, paths),
        "model_weights": MODEL_WEIGHTS[kind], "cannot_represent": CANNOT[kind],
    }
    start = time.perf_counter()
    tp, info = build_backend(kind, lmax, paths, cfg["channels"], cfg["allow_fit"])
    row.update(info)
    if tp is None:
        if kind in ("gaunt", "grid") and paths == "so3":
            # what the Gaunt map misses of the so3 tensor: the odd paths entirely, the rest up to per-degree scales
            G = tdn_o3.gaunt_tensor(lmax, lmax, lmax)
            M = tdn_o3.path_tensor(lmax, lmax, lmax, "so3")
            row.update(odd_fraction=odd_fraction(lmax), dist_M_degree=scaled_distance(G, M, lmax, True))
        row["seconds"] = time.perf_counter() - start
        return row
    d = tdn_o3.dim(lmax)
    T = effective_tensor(tp, d, d, tp.num_weights)  # [d, d, d] float64, weights 1
    M = tdn_o3.path_tensor(lmax, lmax, lmax, paths)
    G = tdn_o3.gaunt_tensor(lmax, lmax, lmax)
    row.update(
        dist_M=_rel(T, M),
        dist_M_scale=scaled_distance(T, M, lmax, False),
        dist_M_degree=scaled_distance(T, M, lmax, True),
        dist_G=_rel(T, G),
        **path_analysis(T, lmax),
    )
    row["exact_map"] = "G" if row["dist_G"] < row["dist_M"] else "M"
    row.update(equivariance(tp, lmax, paths, cfg["seed"], cfg["rotations"], cfg["edges"], cfg["channels"]))
    row["seconds"] = time.perf_counter() - start
    return row


