"""The operations of the tensor-product microbenchmark (:mod:`tdn.bench.tp`): its configuration (cells, variants,
settings) and the modules it times, built as MACE builds its convolution (e3nn, cuEquivariance) or through tdn's
backend registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import tp as tdn_tp

REFERENCES = ("e3nn", "cueq")


# --------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Cell:
    """One benchmark cell: degree L, channels C and edges E."""

    lmax: int
    channels: int
    edges: int

    @property
    def label(self) -> str:
        return f"L={self.lmax} C={self.channels} E={self.edges}"


def cell_of(row: dict[str, Any]) -> Cell:
    """The cell of a result row."""
    return Cell(row["lmax"], row["channels"], row["edges"])


@dataclass(frozen=True)
class Variant:
    """One column of the benchmark: a tdn backend in a weight mode, or a reference."""

    name: str
    source: str  # "tdn" | "e3nn" | "cueq"
    kind: str = ""
    weights: str = ""


@dataclass
class BenchConfig:
    """Everything a run measures and how (cells, device, dtype, variants, repetitions)."""

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
    """The reference columns (e3nn, cuEquivariance) requested."""
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
    """A registered tdn backend in weight mode ``weights``, with its rank, fit error and inner width."""
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
    """e3nn's uvu TensorProduct as MACE builds its convolution (per-edge weights, one output irrep per path)."""
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
    """The module of ``variant`` for one cell, on the configured device and in ``dtype``."""
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
