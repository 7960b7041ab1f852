"""Ahead-of-time compilation of the fused convolution kernels for a CUDA target, with no GPU present.

Triton compiles for a named architecture with the ``ptxas`` in its own wheel, so that a kernel which fails to
compile, spills registers, or does 32-bit arithmetic on offsets that grow with the system is caught on any
machine. :func:`compile_kernel` builds one (kernel, dtype, launch shape, architecture); :func:`kernel_report`
sweeps what the launchers can choose and returns registers, spills and shared memory per case.

    python -m tdn.tp.fused_aot --out report.json      # table on stdout, JSON to --out
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from . import fused

TRITON_DTYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16"}
ARCHITECTURES = {"sm_90": 90, "sm_80": 80}  # H100 / H200, A100
KERNELS = ("segment", "edge_grad")
MACE_MEDIUM_CHANNELS = 128


@dataclass(frozen=True)
class KernelCase:
    kernel: str  # "segment" | "edge_grad"
    dtype: str  # "float32" | "float64" | "bfloat16"
    arch: str  # "sm_90" | "sm_80"
    block_c: int
    block_r: int
    num_warps: int


@dataclass
class KernelResult:
    case: KernelCase
    registers: int
    spills: int
    shared_bytes: int
    narrow_offsets: list[str]  # scalar address offsets computed in 32 bits (see narrow_scalar_offsets)


def launch_config(kernel: str, channels: int, rank: int, dtype: torch.dtype) -> fused.LaunchConfig:
    """The launch the dispatcher of :mod:`tdn.tp.fused` picks for these sizes."""
    pick = fused.segment_config if kernel == "segment" else fused.edge_grad_config
    return pick(channels, rank, dtype)


def _signature(kernel: str, dtype: torch.dtype) -> tuple[object, dict[str, str]]:
    value = "*" + TRITON_DTYPES[dtype]
    if kernel == "segment":
        names = {"src_ptr": value, "gather_ptr": "*i64", "perm_ptr": "*i64", "rowptr_ptr": "*i64",
                 "yc_ptr": value, "w_ptr": value, "out_ptr": value}  # fmt: skip
        fn = fused._segment_kernel
    else:
        names = {"grad_ptr": value, "xb_ptr": value, "yc_ptr": value, "w_ptr": value, "sender_ptr": "*i64",
                 "receiver_ptr": "*i64", "grad_yc_ptr": value, "grad_w_ptr": value}  # fmt: skip
        fn = fused._edge_grad_kernel
    names.update(C="i32", R="i32", BLOCK_C="constexpr", BLOCK_R="constexpr", ACC="constexpr")
    return fn, names


def compile_kernel(case: KernelCase):
    """The compiled kernel for one case: ``.asm`` holds its Triton IR, PTX and cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dtype = getattr(torch, case.dtype)
    fn, signature = _signature(case.kernel, dtype)
    constexprs = {"BLOCK_C": case.block_c, "BLOCK_R": case.block_r, "ACC": fused._accumulator(dtype)}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    target = GPUTarget("cuda", ARCHITECTURES[case.arch], 32)
    return triton.compile(source, target=target, options={"num_warps": case.num_warps})


_SCALAR_ADDPTR = re.compile(r"tt\.addptr\s+%[\w.]+,\s*(%[\w.]+)\s*:\s*!tt\.ptr<[^>]+>,\s*(i\d+)")


def narrow_scalar_offsets(ttir: str) -> list[str]:
    """Scalar pointer offsets of 32 bits that are not constants, from the Triton IR.

    An offset such as ``n * C * R`` (node times row size) or ``e * R`` computed in 32 bits wraps past 2^31
    (17 M edges at 128 channels) and reads the wrong memory. Tile offsets (tensors, bounded by one row) may be
    32-bit; every scalar offset that scales with the system must be 64-bit.
    """
    return [
        line.strip()
        for line in ttir.splitlines()
        if (m := _SCALAR_ADDPTR.search(line)) and m.group(2) != "i64" and not m.group(1).startswith("%c")
    ]


def compile_case(case: KernelCase) -> KernelResult:
    kernel = compile_kernel(case)
    registers, spills = _resources(kernel)
    return KernelResult(case, registers, spills, int(kernel.metadata.shared), narrow_scalar_offsets(kernel.asm["ttir"]))


def _resources(kernel) -> tuple[int, int]:
    """Registers per thread and spilled bytes, read from ``ptxas``'s own report of the cubin."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    capability = int(re.sub(r"\D", "", kernel.metadata.arch))  # "sm90" -> 90
    ptxas = get_ptxas(capability)
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"  # Triton targets sm_90a on Hopper
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        report = subprocess.run(
            [ptxas.path, "-v", f"--gpu-name={arch}", ptx.name, "-o", "/dev/null"],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return registers, spills


def cases(channels: Iterable[int], ranks: Iterable[int], dtypes: Iterable[torch.dtype],
          archs: Iterable[str]) -> list[KernelCase]:  # fmt: skip
    """Every distinct launch the dispatcher picks for these sizes, per kernel, dtype and architecture."""
    found: dict[KernelCase, None] = {}
    for kernel in KERNELS:
        for dtype in dtypes:
            for c in channels:
                for r in ranks:
                    cfg = launch_config(kernel, c, r, dtype)
                    for arch in archs:
                        name = str(dtype).removeprefix("torch.")
                        found[KernelCase(kernel, name, arch, cfg.block_c, cfg.block_r, cfg.num_warps)] = None
    return list(found)


def backend_ranks(lmax_values: Iterable[int] = (1, 2, 3)) -> list[int]:
    """The rank R (the middle width of the factorised convolution) of cp and grid at these degrees."""
    from . import build

    ranks = set()
    for kind in ("cp", "grid"):
        for lmax in lmax_values:
            ranks.add(build(kind, lmax=lmax, channels=1).factors()[0].shape[1])
    return sorted(ranks)


def kernel_report(channels=(16, 32, 64, 128, 256), lmax_values=(1, 2, 3),
                  dtypes=tuple(TRITON_DTYPES), archs=tuple(ARCHITECTURES)) -> list[KernelResult]:  # fmt: skip
    return [compile_case(c) for c in cases(channels, backend_ranks(lmax_values), dtypes, archs)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args(argv)
    results = kernel_report()
    print(f"{'kernel':10} {'dtype':9} {'arch':6} {'BLOCK_C':>7} {'BLOCK_R':>7} {'warps':>5} {'regs':>5} {'spill':>5}")
    for r in results:
        c = r.case
        print(f"{c.kernel:10} {c.dtype:9} {c.arch:6} {c.block_c:7d} {c.block_r:7d} {c.num_warps:5d} "
              f"{r.registers:5d} {r.spills:5d}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as fh:
            json.dump([{**asdict(r.case), **{k: v for k, v in asdict(r).items() if k != "case"}} for r in results],
                      fh, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
