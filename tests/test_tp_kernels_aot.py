"""The fused kernels compile for Hopper (sm_90: H100, H200) and Ampere (sm_80: A100) with no GPU present.

Every launch the dispatcher can pick for common widths (16-256 channels) and the ranks of cp and grid at
L = 1..3, in float32, float64 and bfloat16: it compiles, spills nothing, and computes every address offset that
grows with the system in 64 bits. At MACE-medium widths (128 channels) a kernel keeps to 128 registers per thread.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is an optional dependency (the fused GPU kernels)")

from tdn.tp import fused_aot  # noqa: E402

CASES = fused_aot.cases(
    channels=(16, 32, 64, 128, 256),
    ranks=fused_aot.backend_ranks((1, 2, 3)),
    dtypes=list(fused_aot.TRITON_DTYPES),
    archs=list(fused_aot.ARCHITECTURES),
)


def case_id(case: fused_aot.KernelCase) -> str:
    return f"{case.kernel}-{case.dtype}-{case.arch}-{case.block_c}x{case.block_r}-w{case.num_warps}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_compiles_without_spills_and_with_wide_offsets(case):
    result = fused_aot.compile_case(case)
    assert result.spills == 0, result
    assert result.narrow_offsets == [], result.narrow_offsets
    assert 0 < result.registers <= 255
    if case.block_c == fused_aot.MACE_MEDIUM_CHANNELS:
        assert result.registers <= 128, result  # a quarter of an SM's threads or more can be resident


def test_every_dispatch_is_covered():
    """The sweep holds the launches picked at MACE-medium widths for every backend rank and dtype."""
    for kernel in fused_aot.KERNELS:
        for dtype in fused_aot.TRITON_DTYPES:
            for rank in fused_aot.backend_ranks((1, 2, 3)):
                cfg = fused_aot.launch_config(kernel, 128, rank, dtype)
                name = str(dtype).removeprefix("torch.")
                assert fused_aot.KernelCase(kernel, name, "sm_90", *cfg) in CASES


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _narrow_offset_kernel(x_ptr, out_ptr, C, R, BLOCK: tl.constexpr):
        n = tl.program_id(0)  # 32-bit: n * C * R wraps past 2^31
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + n * C * R + offs, tl.load(x_ptr + n * C * R + offs))


def test_narrow_offsets_are_detected():
    """The offset check itself finds a 32-bit ``n * C * R``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"x_ptr": "*fp32", "out_ptr": "*fp32", "C": "i32", "R": "i32", "BLOCK": "constexpr"}
    source = ASTSource(fn=_narrow_offset_kernel, signature=signature, constexprs={"BLOCK": 32})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert len(fused_aot.narrow_scalar_offsets(compiled.asm["ttir"])) == 2


def test_launch_shapes_fit_the_accumulator():
    """float64 accumulates in float64 (twice the registers), so it gets at least as many warps as float32."""
    for channels in (16, 64, 128, 256):
        for rank in (6, 20, 53, 200):
            for pick in (fused_aot.fused.segment_config, fused_aot.fused.edge_grad_config):
                single, double = pick(channels, rank, torch.float32), pick(channels, rank, torch.float64)
                assert (single.block_c, single.block_r) == (double.block_c, double.block_r)
                assert double.num_warps >= single.num_warps
                assert single.block_c * single.block_r <= 4096
