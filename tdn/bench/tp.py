"""Tensor-product microbenchmark: every registered tdn backend against e3nn (and cuEquivariance) in one run.

For each cell ``(L, C, E)`` (degree, channels, edges) and each variant, the benchmark measures the forward and
forward+backward time of ``tp(x [E,C,(L+1)^2], y [E,(L+1)^2], w [E,C,P])`` (inputs require grad, as in training;
the backward computes the gradients of all three inputs for a random output gradient), the peak memory of each,
and, on small float64 inputs, the accuracy and equivariance of the map:

- reference columns: e3nn's ``uvu`` ``TensorProduct`` built as MACE builds its convolution (x: C channels of every
  ``l <= L`` with natural parity, y: spherical harmonics ``l <= L``, every path with ``l_out <= L`` of either parity,
  per-edge weights, one output irrep per path) and cuEquivariance's ``ChannelWiseTensorProduct`` when importable;
- one tdn variant per registered backend and weight mode: "path" where a backend offers it (cg: MACE's exact uvu
  product) and "shared" (P = 1; cg shared is the exact sparse path-shared product cp must beat).

Accuracy: each tdn variant's output is compared with the exact CG map of the SAME weight mode (the stacked path
tensor ``M``) and, where it is a single-weight map, with the exact Gaunt map ``G``; the map a backend computes is
the closer one (cg, cp: ``M``; gaunt, grid: ``G``, a different bilinear map with Gaunt path weights). e3nn's output,
summed per output degree with tdn's path normalisation, is compared with the exact per-path CG map. The effective
coupling tensor of every tdn variant is probed on basis vectors and projected onto the Wigner-3j blocks: this gives
the paths it represents and the part that is not a CG coupling at all (zero for exact maps, the fit error for cp).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import o3 as tdn_o3
from .. import tp as tdn_tp
from . import common

REFERENCE_PAIRS: tuple[tuple[int, int], ...] = ((1, 128), (2, 128), (3, 128), (3, 64), (4, 64), (5, 32), (6, 32))
FULL_EDGES = 100_000
QUICK_LMAX, QUICK_CHANNELS, QUICK_EDGES = (1, 2, 3), 8, 128
REFERENCES = ("e3nn", "cueq")
ACTIVE_PATH_TOL = 1e-3  # a path counts as represented when its projection holds > this fraction of |T|


# --------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Cell:
    lmax: int
    channels: int
    edges: int

    @property
    def label(self) -> str:
        return f"L={self.lmax} C={self.channels} E={self.edges}"


@dataclass(frozen=True)
class Variant:
    name: str
    source: str  # "tdn" | "e3nn" | "cueq"
    kind: str = ""
    weights: str = ""


@dataclass
class BenchConfig:
    cells: list[Cell]
    device: str = "cpu"
    dtype: str = "float32"
    paths: str = "o3"
    backends: tuple[str, ...] | None = None  # tdn kinds; None: every registered backend
    references: tuple[str, ...] = REFERENCES
    warmup: int = 5
    reps: int = 20
    max_seconds: float = 20.0
    accuracy_edges: int = 16
    accuracy_channels: int = 2
    memory: bool = True
    seed: int = 0
    name: str = "tp"
    quick: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def weight_modes(backend: type[tdn_tp.TensorProduct]) -> tuple[str, ...]:
    """The weight modes benchmarked for a backend: "path" (MACE's uvu form) where offered, and "shared"."""
    modes = tuple(m for m in ("path", "shared") if m in backend.supported_weights)
    return modes or backend.supported_weights[:1]


def tdn_variants(backends: Sequence[str] | None = None) -> list[Variant]:
    """One variant per registered backend and weight mode, cg first (its shared form sits beside cp)."""
    kinds = sorted(tdn_tp.BACKENDS) if backends is None else list(backends)
    kinds.sort(key=lambda k: (k != "cg", k))
    out = []
    for kind in kinds:
        if kind not in tdn_tp.BACKENDS:
            raise ValueError(f"unknown backend {kind!r}; registered: {sorted(tdn_tp.BACKENDS)}")
        for mode in weight_modes(tdn_tp.BACKENDS[kind]):
            out.append(Variant(f"{kind}[{mode}]", "tdn", kind, mode))
    return out


def reference_variants(references: Sequence[str]) -> list[Variant]:
    names = {"e3nn": "e3nn uvu", "cueq": "cuEq uvu"}
    return [Variant(names[r], r) for r in references]


def cueq_status() -> str | None:
    """``None`` when cuEquivariance can be imported, else why not."""
    try:
        import cuequivariance  # noqa: F401
        import cuequivariance_torch  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure skips the column
        return f"not importable ({type(error).__name__}: {error})"
    return None


# ------------------------------------------------------------------------------------------ building the ops


@dataclass
class Op:
    """A module with the per-edge shapes of its three inputs and what it can represent."""

    module: nn.Module
    shapes: tuple[tuple[int, ...], ...]
    num_paths: int
    weights_per_channel: int
    info: dict[str, Any] = field(default_factory=dict)

    def inputs(self, edges: int, dtype: torch.dtype, device: str, requires_grad: bool = True) -> list[torch.Tensor]:
        return [torch.randn(edges, *s, dtype=dtype, device=device, requires_grad=requires_grad) for s in self.shapes]


def build_tdn(kind: str, weights: str, lmax: int, channels: int, paths: str) -> Op:
    tp = tdn_tp.build(kind, lmax=lmax, channels=channels, paths=paths, weights=weights)
    d_in, d_sh, _ = tp.dims
    info: dict[str, Any] = {}
    for attr, cast in (("rank", int), ("fit_error", float), ("factors_source", str)):
        value = getattr(tp, attr, None)
        if value is not None:
            info[attr] = cast(value)
    if isinstance(tp, tdn_tp.base.FactorisedProduct):
        info["inner_width"] = int(tp.factors()[0].shape[1])  # R for cp, grid points Q for grid
    return Op(tp, ((channels, d_in), (d_sh,), (channels, tp.num_weights)), tp.num_paths, tp.num_weights, info)


def mace_irreps(lmax: int, channels: int):  # noqa: ANN201 - e3nn types imported lazily
    """x, y and target irreps of MACE's convolution: natural parity in, both parities allowed out."""
    from e3nn import o3

    irreps_x = o3.Irreps("+".join(f"{channels}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(lmax + 1)))
    irreps_y = o3.Irreps.spherical_harmonics(lmax)
    target = o3.Irreps("+".join(f"{l}{p}" for l in range(lmax + 1) for p in "eo"))
    return irreps_x, irreps_y, target


def mace_instructions(lmax: int, channels: int):  # noqa: ANN201
    """MACE's uvu instructions (one output irrep per path, sorted) and each path's ``(l1, l2, l3)``."""
    from e3nn import o3

    irreps_x, irreps_y, target = mace_irreps(lmax, channels)
    out_irreps, instructions, path_ids = [], [], []
    for i, (mul, ir1) in enumerate(irreps_x):
        for j, (_, ir2) in enumerate(irreps_y):
            for ir in ir1 * ir2:
                if ir in target:
                    instructions.append((i, j, len(out_irreps), "uvu", True))
                    out_irreps.append((mul, ir))
                    path_ids.append((ir1.l, ir2.l, ir.l))
    irreps_out, perm, _ = o3.Irreps(out_irreps).sort()
    instructions = [(a, b, perm[c], mode, train) for a, b, c, mode, train in instructions]
    return irreps_x, irreps_y, irreps_out, instructions, path_ids


def build_e3nn(lmax: int, channels: int) -> Op:
    from e3nn import o3

    irreps_x, irreps_y, irreps_out, instructions, path_ids = mace_instructions(lmax, channels)
    tp = o3.TensorProduct(irreps_x, irreps_y, irreps_out, instructions, shared_weights=False, internal_weights=False)
    odd = sum((l1 + l2 + l3) % 2 for l1, l2, l3 in path_ids)
    info = {"irreps": (irreps_x, irreps_y, irreps_out), "instructions": instructions, "path_ids": path_ids,
            "odd_paths": odd}
    return Op(tp, ((irreps_x.dim,), (irreps_y.dim,), (tp.weight_numel,)), len(instructions), len(instructions), info)


def build_cueq(lmax: int, channels: int, device: str, dtype: torch.dtype) -> Op:
    """cuEquivariance's ChannelWiseTensorProduct with the same irreps (mul_ir layout, per-edge weights)."""
    import cuequivariance as cue
    import cuequivariance_torch as cuet

    irreps_x, irreps_y, target = mace_irreps(lmax, channels)
    tp = cuet.ChannelWiseTensorProduct(
        cue.Irreps("O3", str(irreps_x)), cue.Irreps("O3", str(irreps_y)),
        filter_irreps_out=cue.Irreps("O3", str(target)), layout=cue.mul_ir, shared_weights=False,
        internal_weights=False, device=device, dtype=dtype, use_fallback=torch.device(device).type == "cpu",
    )
    paths = len(mace_instructions(lmax, 1)[3])
    info = {"irreps_out": str(tp.irreps_out)}
    return Op(tp, ((irreps_x.dim,), (irreps_y.dim,), (tp.weight_numel,)), paths, tp.weight_numel // channels, info)


def build_op(variant: Variant, lmax: int, channels: int, cfg: BenchConfig, dtype: torch.dtype) -> Op:
    if variant.source == "tdn":
        op = build_tdn(variant.kind, variant.weights, lmax, channels, cfg.paths)
    elif variant.source == "e3nn":
        op = build_e3nn(lmax, channels)
    elif variant.source == "cueq":
        return build_cueq(lmax, channels, cfg.device, dtype)
    else:
        raise ValueError(f"unknown variant source {variant.source!r}")
    op.module = op.module.to(device=cfg.device, dtype=dtype)
    return op


# ------------------------------------------------------------------------------------ exact maps and accuracy


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
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


# ------------------------------------------------------------------------------------------------ measurement


def io_bytes(input_numel: int, output_numel: int, table_numel: int, itemsize: int) -> dict[str, int]:
    """Bytes an ideal fused kernel must move: forward reads inputs + tables and writes the output; the backward
    reads the output gradient, the inputs and the tables again and writes one gradient per input."""
    fwd = (input_numel + output_numel + table_numel) * itemsize
    bwd = (output_numel + 2 * input_numel + table_numel) * itemsize
    return {"io_bytes_fwd": fwd, "io_bytes_fwdbwd": fwd + bwd}


def table_numel(module: nn.Module) -> int:
    return sum(b.numel() for b in module.buffers() if b.is_floating_point())


def measure_speed(op: Op, cell: Cell, cfg: BenchConfig, bandwidth: float | None) -> dict[str, Any]:
    """Times, peak memory and bandwidth floor of the forward and the forward+backward; errors per stage."""
    dtype = cfg.torch_dtype
    torch.manual_seed(cfg.seed)
    inputs, err = common.attempt(lambda: op.inputs(cell.edges, dtype, cfg.device), cfg.device)
    if err:
        return {"errors": {"inputs": err}}
    out, err = common.attempt(lambda: op.module(*inputs), cfg.device)
    if err:
        return {"errors": {"forward": err}}
    res = io_bytes(sum(t.numel() for t in inputs), out.numel(), table_numel(op.module), dtype.itemsize)
    grad_out = torch.randn_like(out).detach()
    out = None  # free before timing

    def forward() -> None:
        op.module(*inputs)

    def forward_backward() -> None:
        torch.autograd.grad(op.module(*inputs), inputs, grad_out)

    errors: dict[str, str] = {}
    for stage, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
        res.update(time_stage(stage, fn, cfg, errors))
        if bandwidth:
            res[f"floor_{stage}_ms"] = res[f"io_bytes_{stage}"] / (bandwidth * 1e9) * 1e3
    if errors:
        res["errors"] = errors
    return res


def time_stage(stage: str, fn: Callable[[], None], cfg: BenchConfig, errors: dict[str, str]) -> dict[str, Any]:
    """Median time and (unless disabled) peak memory of one stage; failures go to ``errors[stage...]``."""
    timing, err = common.attempt(
        lambda: common.time_call(fn, cfg.device, cfg.warmup, cfg.reps, cfg.max_seconds), cfg.device)
    if err:
        errors[stage] = err
        return {}
    res: dict[str, Any] = {f"{stage}_ms": timing["median_ms"], f"{stage}_min_ms": timing["min_ms"],
                           f"{stage}_reps": timing["reps"]}
    if "cpu_median_ms" in timing:
        res[f"{stage}_cpu_ms"] = timing["cpu_median_ms"]
    if cfg.memory:
        peak, err = common.attempt(lambda: common.peak_memory(fn, cfg.device), cfg.device)
        if err:
            errors[f"{stage}_memory"] = err
        else:
            res[f"peak_mem_{stage}"], res["memory_method"] = peak
    return res


def measure(variant: Variant, cell: Cell, cfg: BenchConfig, bandwidth: float | None) -> dict[str, Any]:
    """One row of the result table; every failure is recorded in ``row["errors"]``, never raised."""
    row = base_row(variant, cell)
    row.update({"dtype": cfg.dtype, "path_set": cfg.paths if variant.source == "tdn" else "so3 (MACE build)"})
    op, err = common.attempt(lambda: build_op(variant, cell.lmax, cell.channels, cfg, cfg.torch_dtype), cfg.device)
    if err:
        row["errors"] = {"build": err}
        return row
    row.update({"num_paths": op.num_paths, "weights_per_channel": op.weights_per_channel})
    row.update({k: v for k, v in op.info.items() if k in ("rank", "fit_error", "factors_source", "inner_width")})
    acc, err = common.attempt(lambda: accuracy(variant, cell.lmax, cfg, op), cfg.device)
    row.update(acc or {})
    errors = {"accuracy": err} if err else {}
    speed = measure_speed(op, cell, cfg, bandwidth)
    errors.update(speed.pop("errors", {}))
    row.update(speed)
    row["couplings"] = couplings(variant, row)
    if errors:
        row["errors"] = errors
    return row


def base_row(variant: Variant, cell: Cell) -> dict[str, Any]:
    return {"variant": variant.name, "source": variant.source, "kind": variant.kind, "weights": variant.weights,
            "lmax": cell.lmax, "channels": cell.channels, "edges": cell.edges}


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """``speedup_{fwd,fwdbwd}``: the e3nn time of the same cell divided by the row's time (``speedup_cpu_*``: the
    same with process CPU times, CPU runs only)."""
    for row in rows:
        ref = find_row(rows, row, source="e3nn") or {}
        for stage in ("fwd", "fwdbwd"):
            for key, out in ((f"{stage}_ms", f"speedup_{stage}"), (f"{stage}_cpu_ms", f"speedup_cpu_{stage}")):
                t, t_ref = row.get(key), ref.get(key)
                if t is not None or out.startswith("speedup_f"):
                    row[out] = t_ref / t if t and t_ref else None


def find_row(rows: list[dict[str, Any]], like: dict[str, Any], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        same_cell = all(row[k] == like[k] for k in ("lmax", "channels", "edges"))
        if same_cell and all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def run(cfg: BenchConfig, out_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run every cell and variant; write ``{name}.json`` after each row and the markdown and PNG at the end.

    References (e3nn) run first in each cell; cuEquivariance runs last, in its own pass over the cells, because a
    crash inside its kernels can leave the CUDA context unusable (rows after that are marked, not attempted).
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    status = cueq_status() if "cueq" in cfg.references else "not requested"
    references = [v for v in reference_variants(cfg.references) if v.source != "cueq" or status is None]
    main = [v for v in references if v.source != "cueq"] + tdn_variants(cfg.backends)
    last = [v for v in references if v.source == "cueq"]
    meta = common.run_metadata(cfg.device, packages=("e3nn", "cuequivariance", "cuequivariance-torch"))
    meta.update({"config": {**asdict(cfg), "cells": [asdict(c) for c in cfg.cells]},
                 "backends_registered": sorted(tdn_tp.BACKENDS), "cueq_status": status or "measured",
                 "timing": "median of up to reps calls after warm-up; " + (
                     "CUDA events" if torch.device(cfg.device).type == "cuda" else "wall clock (perf_counter)")})
    bandwidth, err = common.attempt(lambda: common.copy_bandwidth(cfg.device), cfg.device)
    meta["copy_bandwidth"] = bandwidth or {"error": err}
    gbps = bandwidth["gb_per_s"] if bandwidth else None
    result: dict[str, Any] = {"meta": meta, "rows": []}
    json_path = Path(out_dir) / f"{cfg.name}.json" if out_dir is not None else None
    lost: str | None = None
    try:
        for cell, variant in [(c, v) for c in cfg.cells for v in main] + [(c, v) for c in cfg.cells for v in last]:
            if lost:
                row = {**base_row(variant, cell), "errors": {"skipped": lost}}
            else:
                row = measure(variant, cell, cfg, gbps)
                common.free_memory(cfg.device)
                if row.get("errors") and not common.device_alive(cfg.device):
                    lost = f"device unusable after {variant.name} at {cell.label}: {row['errors']}"[:300]
            result["rows"].append(row)
            log(progress_line(row))
            if json_path is not None:
                add_speedups(result["rows"])
                common.write_json(json_path, result)
    except KeyboardInterrupt:  # e.g. a time limit: the table and plot of what was measured
        if out_dir is not None and result["rows"]:
            add_speedups(result["rows"])
            result["targets"] = evaluate_targets(result["rows"], cfg)
            note = "interrupted before the end: only these rows were measured"
            write_outputs(result, Path(out_dir), cfg.name, [note])
        raise
    add_speedups(result["rows"])
    result["targets"] = evaluate_targets(result["rows"], cfg)
    if out_dir is not None:
        write_outputs(result, Path(out_dir), cfg.name)
    return result


def progress_line(row: dict[str, Any]) -> str:
    times = " ".join(f"{s}={common.fmt_ms(row.get(f'{s}_ms'))}ms" for s in ("fwd", "fwdbwd"))
    errors = f" errors={row['errors']}" if row.get("errors") else ""
    return f"L={row['lmax']} C={row['channels']} E={row['edges']} {row['variant']:<14} {times}{errors}"


# ---------------------------------------------------------------------------------------------------- targets


def evaluate_targets(rows: list[dict[str, Any]], cfg: BenchConfig) -> list[dict[str, Any]]:
    """Issue A's targets (GPU, one run side by side), evaluated on whatever this run measured."""
    cp = [r for r in rows if r.get("kind") == "cp" and r.get("weights") == "shared"]
    grid = [r for r in rows if r.get("kind") == "grid" and r.get("weights") == "shared"]
    out = []
    for r in [r for r in cp if r["lmax"] == 3 and r["channels"] == 128]:
        out.append(target("cp fwd+bwd >= 20x e3nn at L=3, C=128", r, r.get("speedup_fwdbwd"), 20.0))
    if cp and not any(r["source"] == "cueq" for r in rows):
        out.append({"target": "cp faster than cuEquivariance (every L)", "met": None,
                    "note": "cuEquivariance not measured in this run"})
    for r in cp if any(r["source"] == "cueq" for r in rows) else []:
        cue = find_row(rows, r, source="cueq")
        for stage in ("fwd", "fwdbwd"):
            out.append(target(f"cp {stage} faster than cuEquivariance", r, _ratio(cue, r, stage), 1.0))
    for r in [r for r in grid if r["lmax"] >= 2]:
        out.append(target("grid fwd+bwd faster than e3nn (L >= 2)", r, r.get("speedup_fwdbwd"), 1.0))
    if not cp:
        out.append({"target": "cp targets", "met": None, "note": "cp backend not registered in this run"})
    device_note = None if torch.device(cfg.device).type == "cuda" else "CPU run: the targets are GPU targets"
    for t in out:
        t.setdefault("context", device_note)
    return out


def _ratio(ref: dict[str, Any] | None, row: dict[str, Any], stage: str) -> float | None:
    t, t_ref = row.get(f"{stage}_ms"), (ref or {}).get(f"{stage}_ms")
    return t_ref / t if t and t_ref else None


def target(name: str, row: dict[str, Any], value: float | None, threshold: float,
           note: str | None = None) -> dict[str, Any]:
    met = None if value is None else value >= threshold
    if value is None and note is None:
        note = "not measured (error or missing reference)"
    elif met is False:
        note = f"missed: {value:.2f}x vs {threshold:g}x needed ({threshold / value:.1f}x short)"
    return {"target": name, "lmax": row["lmax"], "channels": row["channels"], "edges": row["edges"],
            "value": value, "threshold": threshold, "met": met, "note": note}


# ---------------------------------------------------------------------------------------------------- reports


def ordered_variants(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in sorted(rows, key=lambda r: {"e3nn": 0, "cueq": 1}.get(r["source"], 2)):
        seen.setdefault(row["variant"], None)
    return list(seen)


def cell_of(row: dict[str, Any]) -> Cell:
    return Cell(row["lmax"], row["channels"], row["edges"])


def find_variant(rows: list[dict[str, Any]], name: str, cell: Cell) -> dict[str, Any] | None:
    return next((r for r in rows if r["variant"] == name and cell_of(r) == cell), None)


def cells_of(rows: list[dict[str, Any]]) -> list[Cell]:
    seen: dict[Cell, None] = {}
    for row in rows:
        seen.setdefault(Cell(row["lmax"], row["channels"], row["edges"]), None)
    return list(seen)


def cell_labels(cells: list[Cell]) -> list[str]:
    """Tick labels naming only what varies between cells."""
    vary_c = len({c.channels for c in cells}) > 1
    vary_e = len({c.edges for c in cells}) > 1
    labels = []
    for c in cells:
        parts = [f"L={c.lmax}"] + ([f"C={c.channels}"] if vary_c else []) + ([f"E={c.edges}"] if vary_e else [])
        labels.append("\n".join(parts))
    return labels


def write_plot(result: dict[str, Any], path: Path) -> Path:
    rows = result["rows"]
    cells = cells_of(rows)
    panels: dict[str, dict[str, list[float | None]]] = {"forward": {}, "forward + backward": {}}
    for name in ordered_variants(rows):
        for panel, stage in (("forward", "fwd"), ("forward + backward", "fwdbwd")):
            values = []
            for c in cells:
                values.append((find_variant(rows, name, c) or {}).get(f"{stage}_ms"))
            panels[panel][name] = values
    meta = result["meta"]
    fixed = [f"C={cells[0].channels}"] if len({c.channels for c in cells}) == 1 else []
    fixed += [f"E={cells[0].edges}"] if len({c.edges for c in cells}) == 1 else []
    title = (f"tensor products, {meta['config']['dtype']}, {', '.join(fixed)} — {common.machine_line(meta)}\n"
             f"{meta['date']}, commit {meta['git']['commit'][:10]}")
    return common.line_plot(path, cell_labels(cells), panels, ylabel="time (ms)", title=title)


def accuracy_cell(row: dict[str, Any]) -> str:
    if row.get("target_map") == "gaunt":
        return f"n/a vs CG; {common.fmt_sci(row.get('rel_err_vs_gaunt'))} vs Gaunt"
    if row.get("rel_err_vs_cg") is None:
        return row.get("accuracy_note", "—")
    return common.fmt_sci(row["rel_err_vs_cg"])


def cp_cell(row: dict[str, Any]) -> str:
    parts = []
    if "rank" in row:
        parts.append(f"R={row['rank']}")
    elif "inner_width" in row:
        parts.append(f"Q={row['inner_width']}")
    if row.get("fit_error") is not None:
        parts.append(f"fit {row['fit_error']:.1e}")
    return ", ".join(parts) or "—"


DETAIL_HEADER = ["variant", "fwd ms", "x e3nn", "fwd+bwd ms", "x e3nn", "peak mem fwd / fwd+bwd", "rel err vs CG",
                 "equiv err f32 / f64", "paths", "w/ch", "couplings represented", "rank / width",
                 "I/O floor fwd / fwd+bwd ms", "errors"]


def detail_row(row: dict[str, Any]) -> list[str]:
    errors = "; ".join(f"{k}: {v}" for k, v in (row.get("errors") or {}).items())
    return [
        row["variant"], common.fmt_ms(row.get("fwd_ms")), common.fmt_ratio(row.get("speedup_fwd")),
        common.fmt_ms(row.get("fwdbwd_ms")), common.fmt_ratio(row.get("speedup_fwdbwd")),
        f"{common.fmt_bytes(row.get('peak_mem_fwd'))} / {common.fmt_bytes(row.get('peak_mem_fwdbwd'))}",
        accuracy_cell(row),
        f"{common.fmt_sci(row.get('equiv_err_f32'))} / {common.fmt_sci(row.get('equiv_err_f64'))}",
        str(row.get("num_paths", "—")), str(row.get("weights_per_channel", "—")), row.get("couplings", "—"),
        cp_cell(row),
        f"{common.fmt_ms(row.get('floor_fwd_ms'))} / {common.fmt_ms(row.get('floor_fwdbwd_ms'))}",
        errors[:200] or "",
    ]


def summary_table(rows: list[dict[str, Any]], key: str) -> str:
    names = ordered_variants(rows)
    body = []
    for c in cells_of(rows):
        line = [c.label]
        for name in names:
            row = find_variant(rows, name, c)
            value = (row or {}).get(key)
            fmt = common.fmt_ratio if key.startswith("speedup") else common.fmt_ms
            line.append(fmt(value) if value is not None or not (row or {}).get("errors") else "error")
        body.append(line)
    return common.markdown_table(["cell"] + names, body)


def cpu_time_section(rows: list[dict[str, Any]]) -> list[str]:
    """CPU runs: speed-ups from process CPU time, which other jobs on a shared machine disturb far less."""
    if not any(r.get("speedup_cpu_fwdbwd") for r in rows):
        return []
    return ["## Speed-up vs e3nn by process CPU time, forward + backward (CPU run; robust to other load)", "",
            summary_table(rows, "speedup_cpu_fwdbwd"), ""]


def targets_section(targets: list[dict[str, Any]]) -> str:
    if not targets:
        return "No target applies to the cells of this run (cp/grid rows missing)."
    body = []
    for t in targets:
        met = {True: "met", False: "MISSED", None: "n/a"}[t.get("met")]
        where = f"L={t['lmax']} C={t['channels']} E={t['edges']}" if "lmax" in t else ""
        body.append([t["target"], where, common.fmt_ratio(t.get("value")), met,
                     "; ".join(x for x in (t.get("note"), t.get("context")) if x)])
    return common.markdown_table(["target", "cell", "measured", "status", "note"], body)


def load_line(meta: dict[str, Any]) -> list[str]:
    load = meta["machine"].get("load_average")
    if not load or "gpu" in meta["machine"]:
        return []
    return [f"- load average at start (1/5/15 min): {' / '.join(f'{x:.1f}' for x in load)} "
            f"on {meta['machine']['cpu_count']} logical CPUs (a shared machine: see the CPU-time table)"]


def markdown_report(result: dict[str, Any], notes: Sequence[str] = ()) -> str:
    meta, rows = result["meta"], result["rows"]
    cfg = meta["config"]
    git = meta["git"]
    bandwidth = meta["copy_bandwidth"]
    bw_text = (f"{bandwidth['gb_per_s']:.1f} GB/s (clone {bandwidth['clone_gb_per_s']:.1f}, copy_ into a preallocated "
               f"tensor {bandwidth['copy_gb_per_s']:.1f}; the faster sets the floor)" if "gb_per_s" in bandwidth
               else f"error: {bandwidth.get('error')}")
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    memory_method = next((r["memory_method"] for r in rows if r.get("memory_method")), "not measured")
    lines = [
        f"# Tensor-product microbenchmark ({cfg['name']})",
        "",
        f"- machine: {common.machine_line(meta)}",
        f"- device: {meta['device']}, dtype {cfg['dtype']}, tdn path set {cfg['paths']!r}",
        f"- date: {meta['date']}; commit {git['commit']}{' (uncommitted changes)' if git.get('dirty') else ''}",
        f"- versions: {versions}",
        f"- backends registered: {', '.join(meta['backends_registered'])}; cuEquivariance: {meta['cueq_status']}",
        f"- timing: {meta['timing']}; warm-up {cfg['warmup']}, reps {cfg['reps']} (max {cfg['max_seconds']} s)",
        f"- peak memory: {memory_method}",
        *load_line(meta),
        f"- copy bandwidth (clone of {common.fmt_bytes(bandwidth.get('bytes'))}): {bw_text}",
        *[f"- {n}" for n in notes],
        "",
        "## Speed-up vs e3nn, forward + backward",
        "",
        summary_table(rows, "speedup_fwdbwd"),
        "",
        "## Speed-up vs e3nn, forward",
        "",
        summary_table(rows, "speedup_fwd"),
        "",
        *cpu_time_section(rows),
        "## Targets",
        "",
        targets_section(result.get("targets", [])),
        "",
    ]
    for c in cells_of(rows):
        lines += [f"## {c.label}", "", common.markdown_table(DETAIL_HEADER, [detail_row(r) for r in rows if
                  Cell(r["lmax"], r["channels"], r["edges"]) == c]), ""]
    lines += ["## Columns", "", *[f"- {line}" for line in COLUMN_NOTES], ""]
    return "\n".join(lines)


COLUMN_NOTES = (
    "e3nn uvu / cuEq uvu: the reference as MACE builds its convolution — every path with l_out <= L of either "
    "parity (odd-parity outputs included, which MACE's next linear layer drops), one output irrep per path. "
    "tdn rows use the path set above (\"o3\": only even l1+l2+l3), so e3nn computes more paths than they do.",
    "x e3nn: e3nn time / row time in the same cell and run. Forward runs with inputs that require grad (the graph is "
    "recorded); fwd+bwd adds autograd.grad of all three inputs for a random output gradient.",
    "rel err vs CG: |out - exact| / |exact| in float64 against the exact CG map with the SAME weight mode "
    "(e3nn: its per-path outputs, summed per l_out with tdn's normalisation, vs the exact so3 per-path map; "
    "cp: its CP fit error). Gaunt backends compute a different bilinear map (Gaunt path weights): "
    "\"n/a vs CG; x vs Gaunt\" gives their error against the exact Gaunt tensor.",
    "equiv err: max |f(Dx, Dy, w) - D f(x, y, w)| / max |f| for a seeded rotation R (and -R where parity is a "
    "symmetry), in float32 and float64, at the accuracy size (E and C below).",
    "paths / w/ch: paths of the row's path set and free weights per channel (P). couplings represented: paths found "
    "by projecting the row's effective coupling tensor (all weights 1) onto the Wigner-3j blocks; shared-weight rows "
    "fix the ratios between paths (CG or Gaunt), and any part outside every 3j block is the non-CG residual.",
    "rank / width: cp's CP rank R and fit error of M; Q: the grid's number of quadrature points (its inner width).",
    "I/O floor: bytes an ideal fused kernel must move (inputs, output, and tables/factors; for fwd+bwd also the "
    "output gradient, the inputs again and one gradient per input) / the measured copy bandwidth. A DRAM floor: "
    "where the operands fit in the CPU's last-level cache (small E) a time can beat it.",
    "peak mem: extra memory at the peak of one call (method above). Errors (OOM, failures) are recorded per cell.",
)


def write_outputs(result: dict[str, Any], out_dir: Path, name: str, notes: Sequence[str] = ()) -> dict[str, Path]:
    cfg = result["meta"]["config"]
    notes = list(notes) + [f"accuracy size: E={cfg['accuracy_edges']}, C={cfg['accuracy_channels']} "
                           "(the maps are channel-wise, so errors do not depend on C)"]
    if torch.device(cfg["device"]).type != "cuda":
        why = "" if torch.cuda.is_available() else " (no GPU was available to this run)"
        notes.append("CPU run: GPU figures (E = 100,000, the (L, C) pairs of ../shared/BENCHMARKS.md) are still to be "
                     f"measured with `--device cuda`{why}; the targets below are GPU targets.")
    paths = {"json": common.write_json(out_dir / f"{name}.json", result),
             "md": common.write_text(out_dir / f"{name}.md", markdown_report(result, notes))}
    plot, err = common.attempt(lambda: write_plot(result, out_dir / f"{name}.png"), "cpu")
    if plot is not None:
        paths["png"] = plot
    else:
        print(f"plot failed: {err}", file=sys.stderr)
    return paths


# -------------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_tp.py",
        description="Benchmark tdn's tensor-product backends against e3nn (and cuEquivariance) in one run.",
    )
    parser.add_argument("--out", required=True, help="output directory for NAME.json / .md / .png")
    parser.add_argument("--name", default=None, help="file name stem (default: tp_<device>[_quick])")
    parser.add_argument("--quick", action="store_true",
                        help=f"small CPU run: L={list(QUICK_LMAX)}, C={QUICK_CHANNELS}, E={QUICK_EDGES}, few reps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--lmax", type=int, nargs="+", help="degrees L (crossed with --channels)")
    parser.add_argument("--channels", type=int, nargs="+", help="channels C (crossed with --lmax)")
    parser.add_argument("--pairs", help="explicit L:C pairs, e.g. 1:128,3:64 (default: those of BENCHMARKS.md)")
    parser.add_argument("--edges", type=int, nargs="+", help=f"numbers of edges E (default {FULL_EDGES})")
    parser.add_argument("--backends", nargs="+", help="tdn backends (default: every registered one)")
    parser.add_argument("--references", nargs="*", default=list(REFERENCES), choices=REFERENCES,
                        help="reference columns (default: e3nn cueq; cueq is skipped when not importable)")
    parser.add_argument("--paths", default="o3", choices=("o3", "so3"), help="path set of the tdn backends")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 5; --quick 1)")
    parser.add_argument("--reps", type=int, help="timed calls, the median is reported (default 20; --quick 3)")
    parser.add_argument("--max-seconds", type=float, help="stop repeating a timing after this long")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's own; --quick uses 1, steadier on a shared CPU)")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig(cells=cells_from_args(args), device=args.device, dtype=args.dtype, paths=args.paths,
                      backends=tuple(args.backends) if args.backends else None, references=tuple(args.references),
                      memory=not args.no_memory, seed=args.seed, quick=args.quick)
    if args.quick:
        cfg.warmup, cfg.reps, cfg.max_seconds = 1, 3, 2.0
    for attr in ("warmup", "reps", "max_seconds"):
        if getattr(args, attr) is not None:
            setattr(cfg, attr, getattr(args, attr))
    cfg.name = args.name or f"tp_{torch.device(args.device).type}{'_quick' if args.quick else ''}"
    return cfg


def cells_from_args(args: argparse.Namespace) -> list[Cell]:
    if args.pairs:
        pairs = [tuple(int(v) for v in p.split(":")) for p in args.pairs.split(",")]
    elif args.lmax or args.channels or args.quick:
        lmaxes = args.lmax or (list(QUICK_LMAX) if args.quick else sorted({l for l, _ in REFERENCE_PAIRS}))
        channels = args.channels or ([QUICK_CHANNELS] if args.quick else [32])
        pairs = [(l, c) for c in channels for l in lmaxes]
    else:
        pairs = list(REFERENCE_PAIRS)
    edges = args.edges or ([QUICK_EDGES] if args.quick else [FULL_EDGES])
    return [Cell(l, c, e) for e in edges for l, c in pairs]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.cli_main(argv, parse_args, config_from_args, run)
