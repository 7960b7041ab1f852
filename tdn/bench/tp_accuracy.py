"""Accuracy, equivariance and expressivity of the maps of the tensor-product microbenchmark (:mod:`tdn.bench.tp`).

Each tdn variant is compared with the exact CG map of the same weight mode and, for single-weight maps, with the exact
Gaunt map; e3nn's per-path outputs are summed per output degree and compared with the exact per-path CG map; the
effective coupling tensor of a tdn variant is projected onto the Wigner-3j blocks (:func:`path_analysis`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .. import o3 as tdn_o3
from . import common
from .tp_ops import BenchConfig, Op, Variant, build_cueq, build_e3nn, build_tdn, mace_irreps

ACTIVE_PATH_TOL = 1e-3  # a path counts as represented when its projection holds > this fraction of |T|


# ------------------------------------------------------------------------------------ exact maps and accuracy


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``|out - ref| / |ref|`` (Frobenius norms)."""
    return float((out - ref).norm() / ref.norm().clamp_min(torch.finfo(ref.dtype).tiny))


def exact_output(tensor: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``out[e, c, k] = scale[e, c, k] sum_ij T[k, i, j] x[e, c, i] y[e, j]`` (dense einsum, float64)."""
    return torch.einsum("kij,eci,ej->eck", tensor.to(x), x, y) * scale


def exact_cg(lmax: int, paths: str, weights: str, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The exact CG product in weight mode ``weights``, from tdn.o3's normalised path blocks."""
    if weights == "path":
        out = x.new_zeros(x.shape[0], x.shape[1], tdn_o3.dim(lmax))
        for p, ((l1, l2, l3), block) in enumerate(tdn_o3.path_blocks(lmax, lmax, lmax, paths)):
            part = torch.einsum("kij,eci,ej->eck", block.to(x), x[..., tdn_o3.degree_slice(l1)],
                                y[..., tdn_o3.degree_slice(l2)])
            out[..., tdn_o3.degree_slice(l3)] += w[:, :, p : p + 1] * part
        return out
    return exact_output(tdn_o3.path_tensor(lmax, lmax, lmax, paths), x, y, expand_weights(w, lmax, weights))


def expand_weights(w: torch.Tensor, lmax: int, weights: str) -> torch.Tensor:
    """Per-degree weights ``[E, C, L + 1]`` expanded to one per output component; other modes unchanged."""
    if weights == "degree":
        return w[:, :, tdn_o3.degree_of_component(lmax).to(w.device)]
    return w


def effective_tensor(tp: nn.Module, d_in: int, d_sh: int, num_weights: int) -> torch.Tensor:
    """The bilinear map of ``tp`` with all weights 1 (channel 0), probed on basis vectors: ``[d_out, d_in, d_sh]``."""
    eye_in = torch.eye(d_in, dtype=torch.float64)
    eye_sh = torch.eye(d_sh, dtype=torch.float64)
    channels = tp.channels
    x = eye_in.repeat_interleave(d_sh, 0)[:, None, :].expand(-1, channels, -1).contiguous()
    y = eye_sh.repeat(d_in, 1)
    w = torch.ones(x.shape[0], channels, num_weights, dtype=torch.float64)
    with torch.no_grad():
        out = tp(x, y, w)[:, 0, :]
    return out.reshape(d_in, d_sh, -1).permute(2, 0, 1)


def path_analysis(tensor: torch.Tensor, lmax: int) -> dict[str, Any]:
    """Project a ``[d, d, d]`` coupling tensor onto every Wigner-3j block ``(l1, l2, l3)`` (triangle rule).

    ``paths_active``: blocks holding more than ACTIVE_PATH_TOL of the tensor's norm (``paths_odd``: of those,
    with l1 + l2 + l3 odd); ``non_cg_residual``: the relative norm left outside every CG block — couplings no
    CG path makes, which break equivariance (zero for an exact map; for cp part of its fit error).
    """
    total = tensor.norm()
    fit = torch.zeros_like(tensor)
    active, odd = 0, 0
    for (l1, l2, l3), block in tdn_o3.path_blocks(lmax, lmax, lmax, "so3"):
        idx = (tdn_o3.degree_slice(l3), tdn_o3.degree_slice(l1), tdn_o3.degree_slice(l2))
        coeff = (tensor[idx] * block).sum() / (block * block).sum()
        fit[idx] += coeff * block
        if coeff.abs() * block.norm() > ACTIVE_PATH_TOL * total:
            active += 1
            odd += (l1 + l2 + l3) % 2
    return {"paths_active": active, "paths_active_odd": odd,
            "non_cg_residual": float((tensor - fit).norm() / total)}


def rotations(cfg: BenchConfig, parity: bool) -> list[torch.Tensor]:
    """A seeded proper rotation, and its improper partner ``-R`` when parity is part of the symmetry."""
    rotation = tdn_o3.random_rotation(generator=torch.Generator().manual_seed(cfg.seed + 1))
    return [rotation, -rotation] if parity else [rotation]


def random_inputs(shapes: Sequence[tuple[int, ...]], edges: int, dtype: torch.dtype, device: str,
                  seed: int) -> list[torch.Tensor]:
    """Seeded standard-normal float64 tensors ``[edges, *shape]``, then cast to ``dtype`` on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(edges, *s, dtype=torch.float64, generator=gen).to(device=device, dtype=dtype) for s in shapes]


def tdn_accuracy(variant: Variant, lmax: int, cfg: BenchConfig) -> dict[str, Any]:
    """Relative errors vs the exact CG and Gaunt maps, equivariance (float64, float32) and the path analysis."""
    with common.default_dtype(torch.float64):  # tables straight from float64, not via a float32 copy
        op = build_tdn(variant.kind, variant.weights, lmax, cfg.accuracy_channels, cfg.paths)
    tp64 = op.module
    x, y, w = random_inputs(op.shapes, cfg.accuracy_edges, torch.float64, "cpu", cfg.seed)
    with torch.no_grad():
        out = tp64(x, y, w)
    res: dict[str, Any] = {"rel_err_vs_cg": relative_error(out, exact_cg(lmax, cfg.paths, variant.weights, x, y, w))}
    if variant.weights != "path":
        gaunt = exact_output(tdn_o3.gaunt_tensor(lmax, lmax, lmax), x, y, expand_weights(w, lmax, variant.weights))
        res["rel_err_vs_gaunt"] = relative_error(out, gaunt)
    res["target_map"] = target_map(res)
    res.update(tdn_equivariance(tp64, lmax, cfg))
    d_in, d_sh, _ = tp64.dims
    res.update(path_analysis(effective_tensor(tp64, d_in, d_sh, tp64.num_weights), lmax))
    return res


def target_map(res: dict[str, Any]) -> str:
    """The exact map a variant computes (or approximates): the closer of CG and Gaunt."""
    cg, gaunt = res.get("rel_err_vs_cg"), res.get("rel_err_vs_gaunt")
    if gaunt is not None and (cg is None or gaunt < cg):
        return "gaunt"
    return "cg"


def tdn_equivariance(tp64: nn.Module, lmax: int, cfg: BenchConfig) -> dict[str, float]:
    """Equivariance errors of a tdn variant in float64 and float32 (max over the rotations)."""
    res = {}
    for dtype in (torch.float64, torch.float32):
        tp = copy.deepcopy(tp64).to(dtype=dtype)
        inputs = random_inputs(((cfg.accuracy_channels, tdn_o3.dim(lmax)), (tdn_o3.dim(lmax),),
                                (cfg.accuracy_channels, tp.num_weights)), cfg.accuracy_edges, dtype, "cpu", cfg.seed)
        errors = [tdn_o3.equivariance_error(tp, inputs, [lmax, lmax, None], lmax, rotation=r)
                  for r in rotations(cfg, parity=cfg.paths == "o3")]
        res[f"equiv_err_{'f64' if dtype == torch.float64 else 'f32'}"] = max(errors)
    return res


def irreps_equivariance_error(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                              irreps_in: Sequence[Any], irreps_out: Any, rotation: torch.Tensor) -> float:
    """``max |fn(D x) - D fn(x)| / max |fn(x)|`` for modules in e3nn's flat layout (``None``: invariant input)."""
    dtype = inputs[0].dtype
    with torch.no_grad():
        out = fn(*inputs)
        rotated = fn(*[act_irreps(t, ir, rotation) for t, ir in zip(inputs, irreps_in)])
        expected = act_irreps(out, irreps_out, rotation)
    return float((rotated - expected).abs().max() / out.abs().max().clamp_min(torch.finfo(dtype).tiny))


def act_irreps(t: torch.Tensor, irreps: Any, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate ``t [E, irreps.dim]`` (e3nn "mul_ir" layout) with tdn's float64-exact Wigner-D blocks.

    (e3nn's own ``D_from_matrix`` is only float32-accurate from l = 2 on.) An improper ``rotation`` multiplies
    degree ``l`` of parity ``p`` by ``p``; tdn's blocks already carry ``(-1)^l``, hence the factor ``p (-1)^l``.
    """
    if irreps is None:
        return t
    big_d = tdn_o3.wigner_D(irreps.lmax, rotation)
    improper = bool(torch.det(rotation) < 0)
    chunks = []
    for (mul, ir), sl in zip(irreps, irreps.slices()):
        block = big_d[tdn_o3.degree_slice(ir.l), tdn_o3.degree_slice(ir.l)]
        if improper:
            block = block * ir.p * (-1) ** ir.l
        chunk = t[:, sl].reshape(t.shape[0], mul, 2 * ir.l + 1) @ block.to(t).T
        chunks.append(chunk.reshape(t.shape[0], -1))
    return torch.cat(chunks, dim=1)


def collapse_e3nn(out: torch.Tensor, op: Op, lmax: int, channels: int) -> torch.Tensor:
    """e3nn's per-path outputs summed per output degree with tdn's normalisation ``1 / sqrt(n(l3))`` ("so3" set)."""
    irreps_out = op.info["irreps"][2]
    slices = irreps_out.slices()
    counts: dict[int, int] = {}
    for _, _, l3 in op.info["path_ids"]:
        counts[l3] = counts.get(l3, 0) + 1
    stacked = out.new_zeros(out.shape[0], channels, tdn_o3.dim(lmax))
    for (_, _, i_out, _, _), (_, _, l3) in zip(op.info["instructions"], op.info["path_ids"]):
        chunk = out[:, slices[i_out]].reshape(out.shape[0], channels, 2 * l3 + 1)
        stacked[..., tdn_o3.degree_slice(l3)] += chunk / math.sqrt(counts[l3])
    return stacked


def e3nn_accuracy(lmax: int, cfg: BenchConfig) -> dict[str, Any]:
    """e3nn (MACE build) vs the exact per-path CG map of the "so3" path set; equivariance incl. parity."""
    channels = cfg.accuracy_channels
    with common.default_dtype(torch.float64):
        op = build_e3nn(lmax, channels)
    tp64 = op.module
    x, y, w = random_inputs(((channels, tdn_o3.dim(lmax)), (tdn_o3.dim(lmax),), (channels, op.num_paths)),
                            cfg.accuracy_edges, torch.float64, "cpu", cfg.seed)
    order = {p: i for i, p in enumerate(tdn_o3.path_list(lmax, lmax, lmax, "so3"))}
    w_flat = torch.cat([w[:, :, order[p]] for p in op.info["path_ids"]], dim=1)  # instruction order, C per path
    with torch.no_grad():
        out = tp64(tdn_o3.to_e3nn_layout(x, lmax), y, w_flat)
    res: dict[str, Any] = {"target_map": "cg", "rel_err_vs_cg": relative_error(
        collapse_e3nn(out, op, lmax, channels), exact_cg(lmax, "so3", "path", x, y, w))}
    irreps_x, irreps_y, irreps_out = op.info["irreps"]
    for dtype, key in ((torch.float64, "equiv_err_f64"), (torch.float32, "equiv_err_f32")):
        module = copy.deepcopy(tp64).to(dtype=dtype)
        inputs = random_inputs(op.shapes, cfg.accuracy_edges, dtype, "cpu", cfg.seed)
        res[key] = max(irreps_equivariance_error(module, inputs, [irreps_x, irreps_y, None], irreps_out, r)
                       for r in rotations(cfg, parity=True))
    res["paths_active"], res["paths_active_odd"] = op.num_paths, op.info["odd_paths"]
    return res


def cueq_accuracy(lmax: int, cfg: BenchConfig, op: Op) -> dict[str, Any]:
    """Equivariance only (its output layout is cuEquivariance's own); the error vs CG is not checked."""
    from e3nn import o3

    irreps_x, irreps_y, _ = mace_irreps(lmax, cfg.accuracy_channels)
    small = build_cueq(lmax, cfg.accuracy_channels, cfg.device, torch.float32)
    inputs = random_inputs(small.shapes, cfg.accuracy_edges, torch.float32, cfg.device, cfg.seed)
    irreps_out = o3.Irreps(str(small.info["irreps_out"]))
    error = max(irreps_equivariance_error(small.module, inputs, [irreps_x, irreps_y, None], irreps_out, r)
                for r in rotations(cfg, parity=True))
    return {"equiv_err_f32": error, "paths_active": op.num_paths, "accuracy_note": "error vs CG not checked"}


def accuracy(variant: Variant, lmax: int, cfg: BenchConfig, op: Op) -> dict[str, Any]:
    """The accuracy fields of a row, by the variant's source (tdn, e3nn or cuEquivariance)."""
    if variant.source == "tdn":
        return tdn_accuracy(variant, lmax, cfg)
    if variant.source == "e3nn":
        return e3nn_accuracy(lmax, cfg)
    return cueq_accuracy(lmax, cfg, op)


def couplings(variant: Variant, row: dict[str, Any]) -> str:
    """Expressivity in words: which couplings the variant represents and how many free weights per channel."""
    active = row.get("paths_active", row.get("num_paths"))
    p = row.get("weights_per_channel")
    if variant.source != "tdn":
        return f"{active} paths ({row.get('paths_active_odd', 0)} odd-parity), {p} free weights/ch"
    odd = row.get("paths_active_odd", 0)
    parity = "only even l1+l2+l3" if not odd else f"{odd} odd"
    ratios = "Gaunt" if row.get("target_map") == "gaunt" else "CG"
    if variant.weights == "path":
        text = f"{active} paths ({parity}), {p} free weights/ch"
    elif variant.weights == "degree":
        text = f"{active} paths ({parity}), {p} weights/ch (one per l_out), fixed {ratios} ratios within a degree"
    else:
        text = f"{active} paths ({parity}), 1 shared weight/ch, fixed {ratios} ratios"
    residual = row.get("non_cg_residual")
    if residual is not None and residual > 1e-9:
        text += f" + non-CG residual {residual:.1e}"
    return text
