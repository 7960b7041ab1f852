"""The factorised convolution, with a fused Triton kernel and its pure-PyTorch reference.

Backends whose bilinear map factorises as ``T(x, y) = A [(B^T x) ⊙ (C^T y)]`` (cp exactly; grid with
``B = Y_in(q)``, ``C = Y_sh(q)``, ``A = w_q Y_out(q)``) turn a message-passing convolution

    out[n] = sum_{e: receiver(e) = n} w[e] T(x[sender(e)], y[e])

into three steps, only the middle one per edge:

    xb = x @ B                         [N, C, R]   per node (not per edge)
    acc[n] = sum_e xb[s(e)] * yc[e] * w[e]   [N, C, R]   yc = y @ C  [E, R]
    out = acc @ A^T                     [N, C, d_out] per node

The middle step is :func:`edge_conv`. On CUDA (or under ``TRITON_INTERPRET=1`` on the CPU) it runs as a
segment reduction over receiver-sorted edges that never stores per-edge messages; its backward is the same
kernel over sender-sorted edges (for ``grad xb``) plus one per-edge kernel (for ``grad yc``, ``grad w``).
Both are registered as ``torch.library`` custom ops (``tdn::edge_conv``, ``tdn::edge_conv_backward``), so
``torch.compile`` captures them whole. The fused path is first-order only: inside ``torch.enable_grad`` with
``create_graph`` (force training) use the reference, which autograd differentiates to any order.

Kernel arithmetic: float64 inputs accumulate in float64, everything else (float32, bfloat16, float16) is widened
to float32 before it is multiplied; every offset that scales with the number of nodes or edges is 64-bit.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .._cache import cached_on

try:  # Triton is optional: GPUs (and the CPU interpreter in tests) use it, everything else the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


def edge_conv_reference(
    xb: torch.Tensor, yc: torch.Tensor, w: torch.Tensor, sender: torch.Tensor, receiver: torch.Tensor, num_nodes: int
) -> torch.Tensor:
    """``acc[n, c, r] = sum_{e: receiver[e] = n} xb[sender[e], c, r] * yc[e, r] * w[e, c]``.

    xb [N_src, C, R], yc [E, R], w [E, C], sender/receiver [E] -> [num_nodes, C, R].
    """
    messages = xb.index_select(0, sender) * yc.unsqueeze(1) * w.unsqueeze(2)  # [E, C, R]
    return messages.new_zeros(num_nodes, *messages.shape[1:]).index_add_(0, receiver, messages)


class _ChunkedEdgeConv(torch.autograd.Function):
    """:func:`edge_conv_reference` in chunks of edges, forward and (first-order) backward written by hand: the
    per-edge ``[E, C, R]`` messages exist one chunk at a time. The CPU's counterpart of the Triton kernel."""

    @staticmethod
    def forward(ctx, xb, yc, w, sender, receiver, num_nodes):
        ctx.save_for_backward(xb, yc, w, sender, receiver)
        acc = xb.new_zeros(num_nodes, xb.shape[1], xb.shape[2])  # [N, C, R]
        for c in edge_chunks(yc.shape[0], xb.shape[1] * xb.shape[2]):
            messages = xb.index_select(0, sender[c]).mul_(yc[c].unsqueeze(1)).mul_(w[c].unsqueeze(2))  # [e, C, R]
            acc.index_add_(0, receiver[c], messages)
        return acc

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        xb, yc, w, sender, receiver = ctx.saved_tensors
        need_xb, need_yc, need_w = ctx.needs_input_grad[:3]
        grad_xb = torch.zeros_like(xb) if need_xb else None
        grad_yc = torch.empty_like(yc) if need_yc else None
        grad_w = torch.empty_like(w) if need_w else None
        for c in edge_chunks(yc.shape[0], xb.shape[1] * xb.shape[2]):
            g = grad.index_select(0, receiver[c])  # [e, C, R]
            if need_yc or need_w:
                gx = g * xb.index_select(0, sender[c])  # [e, C, R]
                if need_yc:
                    grad_yc[c] = torch.bmm(w[c].unsqueeze(1), gx).squeeze(1)  # sum over C
                if need_w:
                    grad_w[c] = torch.bmm(gx, yc[c].unsqueeze(2)).squeeze(2)  # sum over R
            if need_xb:
                grad_xb.index_add_(0, sender[c], g.mul_(yc[c].unsqueeze(1)).mul_(w[c].unsqueeze(2)))
        return grad_xb, grad_yc, grad_w, None, None, None


CHUNK_ENTRIES = 1 << 19  # message entries per chunk of the CPU path: 2 MB in float32, cache-sized


def edge_chunks(num_edges: int, width: int) -> list[slice]:
    """Edge slices of about ``CHUNK_ENTRIES`` message entries each."""
    size = max(1, CHUNK_ENTRIES // max(width, 1))
    return [slice(start, start + size) for start in range(0, num_edges, size)]


def triton_available(device: torch.device) -> bool:
    """Whether the fused kernels can run on tensors of ``device``."""
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------ kernels
if triton is not None:

    @triton.jit
    def _segment_kernel(
        src_ptr, gather_ptr, perm_ptr, rowptr_ptr, yc_ptr, w_ptr, out_ptr,
        C, R,
        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
    ):
        # out[n, c, r] = sum_{k in segment n} src[gather[perm[k]], c, r] * yc[perm[k], r] * w[perm[k], c]
        n = tl.program_id(0).to(tl.int64)  # 64-bit: n * C * R passes 2^31 on large systems
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_c = offs_c < C
        mask_r = offs_r < R
        mask = mask_c[:, None] & mask_r[None, :]
        tile = offs_c[:, None] * R + offs_r[None, :]  # within one row: C * R < 2^31
        start = tl.load(rowptr_ptr + n)
        end = tl.load(rowptr_ptr + n + 1)
        acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=ACC)
        for k in range(start, end):
            e = tl.load(perm_ptr + k)  # int64: the edge and its source row are loaded once per tile of C x R
            row = tl.load(gather_ptr + e)
            x = tl.load(src_ptr + row * C * R + tile, mask=mask, other=0.0).to(ACC)
            y = tl.load(yc_ptr + e * R + offs_r, mask=mask_r, other=0.0).to(ACC)
            wc = tl.load(w_ptr + e * C + offs_c, mask=mask_c, other=0.0).to(ACC)
            acc += x * y[None, :] * wc[:, None]
        tl.store(out_ptr + n * C * R + tile, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _edge_grad_kernel(
        grad_ptr, xb_ptr, yc_ptr, w_ptr, sender_ptr, receiver_ptr, grad_yc_ptr, grad_w_ptr,
        C, R,
        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
    ):
        # t[c, r] = grad[receiver[e], c, r] * xb[sender[e], c, r]
        # grad_yc[e, r] = sum_c t[c, r] w[e, c];  grad_w[e, c] = sum_r t[c, r] yc[e, r]
        e = tl.program_id(0).to(tl.int64)
        s = tl.load(sender_ptr + e)
        t_row = tl.load(receiver_ptr + e)
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        wc = tl.load(w_ptr + e * C + offs_c, mask=mask_c, other=0.0).to(ACC)
        grad_w = tl.zeros((BLOCK_C,), dtype=ACC)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            mask = mask_c[:, None] & mask_r[None, :]
            tile = offs_c[:, None] * R + offs_r[None, :]
            g = tl.load(grad_ptr + t_row * C * R + tile, mask=mask, other=0.0).to(ACC)
            x = tl.load(xb_ptr + s * C * R + tile, mask=mask, other=0.0).to(ACC)
            y = tl.load(yc_ptr + e * R + offs_r, mask=mask_r, other=0.0).to(ACC)
            t = g * x
            tl.store(grad_yc_ptr + e * R + offs_r, tl.sum(t * wc[:, None], axis=0).to(grad_yc_ptr.dtype.element_ty),
                     mask=mask_r)
            grad_w += tl.sum(t * y[None, :], axis=1)
        tl.store(grad_w_ptr + e * C + offs_c, grad_w.to(grad_w_ptr.dtype.element_ty), mask=mask_c)


class LaunchConfig(NamedTuple):
    """Tile sizes and warps of one kernel launch (``BLOCK_C x BLOCK_R`` values per program)."""

    block_c: int
    block_r: int
    num_warps: int


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Values per program and thread. Chosen with the AOT-compiled register counts (tests/test_tp_kernels_aot.py and
# docs/benchmarks/NOTES.md): 16 live values per thread and array keep both kernels far below 255 registers and
# free of spills for float32 and float64 at every channel count up to 256.
_TILE_PER_THREAD = 16
_THREADS_PER_WARP = 32


def segment_config(channels: int, rank: int, dtype: torch.dtype) -> LaunchConfig:
    """Launch of :func:`_segment_kernel`: all channels of a node in one program (up to 128), so an edge's index,
    harmonics and weights are read once per tile of ranks; warps sized to the tile."""
    block_c = min(128, _next_power_of_2(channels))
    block_r = min(_next_power_of_2(rank), max(1, 4096 // block_c))
    return LaunchConfig(block_c, block_r, _warps(block_c * block_r, dtype))


def edge_grad_config(channels: int, rank: int, dtype: torch.dtype) -> LaunchConfig:
    """Launch of :func:`_edge_grad_kernel`: one edge per program, every channel (it reduces over them), ranks in
    tiles of at most 2048 values."""
    block_c = _next_power_of_2(channels)
    block_r = max(1, min(64, 2048 // block_c, _next_power_of_2(rank)))
    return LaunchConfig(block_c, block_r, _warps(block_c * block_r, dtype))


def _warps(tile: int, dtype: torch.dtype) -> int:
    per_thread = _TILE_PER_THREAD // 2 if dtype == torch.float64 else _TILE_PER_THREAD
    return max(1, min(8, tile // (per_thread * _THREADS_PER_WARP)))


def _accumulator(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not the current one (``cuda:1`` while the current device is ``cuda:0``)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def _segment(src, gather, perm, rowptr, yc, w, num_segments):
    channels, rank = src.shape[1], src.shape[2]
    out = src.new_empty(num_segments, channels, rank)
    if num_segments == 0 or out.numel() == 0:
        return out
    cfg = segment_config(channels, rank, src.dtype)
    grid = (num_segments, triton.cdiv(channels, cfg.block_c), triton.cdiv(rank, cfg.block_r))
    with _device_guard(src):
        _segment_kernel[grid](
            src, gather, perm, rowptr, yc, w, out, channels, rank,
            BLOCK_C=cfg.block_c, BLOCK_R=cfg.block_r, ACC=_accumulator(src.dtype), num_warps=cfg.num_warps,
        )  # fmt: skip
    return out


def _edge_grads(grad, xb, yc, w, sender, receiver):
    grad_yc, grad_w = torch.empty_like(yc), torch.empty_like(w)
    num_edges, channels, rank = yc.shape[0], xb.shape[1], xb.shape[2]
    if num_edges == 0:
        return grad_yc, grad_w
    cfg = edge_grad_config(channels, rank, xb.dtype)
    with _device_guard(xb):
        _edge_grad_kernel[(num_edges,)](
            grad, xb, yc, w, sender, receiver, grad_yc, grad_w, channels, rank,
            BLOCK_C=cfg.block_c, BLOCK_R=cfg.block_r, ACC=_accumulator(xb.dtype), num_warps=cfg.num_warps,
        )  # fmt: skip
    return grad_yc, grad_w


# ------------------------------------------------------------------------------------------------ sorting
def sort_segments(index: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges sorted by ``index`` (``perm [E]``) and segment pointers ``rowptr [num_segments + 1]``.

    ``searchsorted`` on the sorted index instead of ``bincount``: nothing is read back to the host, so a GPU
    never waits here (``bincount`` reads the maximum back to size its output).
    """
    perm = torch.argsort(index, stable=True)
    bounds = torch.arange(num_segments + 1, dtype=index.dtype, device=index.device)
    return perm, torch.searchsorted(index[perm], bounds)


def _csr(index: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sort_segments`, cached on ``edge_index`` (:func:`tdn._cache.cached_on`) in eager mode: every layer
    of a model and every MD step between two neighbour-list builds reuse one sort. Under ``torch.compile`` the
    sort is part of the graph (the cache is Python state that a traced region must not hold)."""
    if torch.compiler.is_compiling():
        return sort_segments(index, num_segments)
    return cached_on(index, ("csr", num_segments), lambda: sort_segments(index, num_segments))


# ------------------------------------------------------------------------------------------------ custom ops
if triton is not None:

    @torch.library.custom_op("tdn::edge_conv", mutates_args=())
    def _edge_conv_op(
        xb: torch.Tensor, yc: torch.Tensor, w: torch.Tensor, sender: torch.Tensor, receiver: torch.Tensor,
        perm_r: torch.Tensor, rowptr_r: torch.Tensor, perm_s: torch.Tensor, rowptr_s: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Fused forward; the sender sort (``perm_s``, ``rowptr_s``) rides along for the backward."""
        return _segment(xb, sender, perm_r, rowptr_r, yc, w, rowptr_r.shape[0] - 1)

    @_edge_conv_op.register_fake
    def _(xb, yc, w, sender, receiver, perm_r, rowptr_r, perm_s, rowptr_s):
        return xb.new_empty(rowptr_r.shape[0] - 1, xb.shape[1], xb.shape[2])

    @torch.library.custom_op("tdn::edge_conv_backward", mutates_args=())
    def _edge_conv_backward_op(
        grad: torch.Tensor, xb: torch.Tensor, yc: torch.Tensor, w: torch.Tensor, sender: torch.Tensor,
        receiver: torch.Tensor, perm_s: torch.Tensor, rowptr_s: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(grad xb, grad yc, grad w)``: the segment kernel over sender-sorted edges, then the per-edge one."""
        grad_xb = _segment(grad, receiver, perm_s, rowptr_s, yc, w, xb.shape[0])
        grad_yc, grad_w = _edge_grads(grad, xb, yc, w, sender, receiver)
        return grad_xb, grad_yc, grad_w

    @_edge_conv_backward_op.register_fake
    def _(grad, xb, yc, w, sender, receiver, perm_s, rowptr_s):
        return torch.empty_like(xb), torch.empty_like(yc), torch.empty_like(w)

    def _setup_context(ctx, inputs, output):
        xb, yc, w, sender, receiver, _, _, perm_s, rowptr_s = inputs
        ctx.save_for_backward(xb, yc, w, sender, receiver, perm_s, rowptr_s)

    def _backward(ctx, grad):
        xb, yc, w, sender, receiver, perm_s, rowptr_s = ctx.saved_tensors
        grad_xb, grad_yc, grad_w = _edge_conv_backward_op(grad.contiguous(), xb, yc, w, sender, receiver, perm_s,
                                                          rowptr_s)  # fmt: skip
        return grad_xb, grad_yc, grad_w, None, None, None, None, None, None

    def _no_second_derivative(ctx, *grads):
        raise RuntimeError(
            "the fused edge convolution is first order and cannot differentiate twice: a loss on forces or stress "
            "(create_graph=True) needs edge_conv(..., fused=False)"
        )

    _edge_conv_op.register_autograd(_backward, setup_context=_setup_context)
    _edge_conv_backward_op.register_autograd(_no_second_derivative, setup_context=lambda ctx, inputs, output: None)


def _fused_edge_conv(xb, yc, w, sender, receiver, num_nodes):
    # The kernels read every operand with unit stride: `edge_index` given as `pairs.T` has strided rows.
    xb, yc, w = xb.contiguous(), yc.contiguous(), w.contiguous()
    perm_r, rowptr_r = _csr(receiver, num_nodes)
    if torch.is_grad_enabled() and (xb.requires_grad or yc.requires_grad or w.requires_grad):
        perm_s, rowptr_s = _csr(sender, xb.shape[0])  # the backward's sort, also cached
    else:  # no backward will run
        perm_s, rowptr_s = perm_r[:0], rowptr_r[:0]
    return _edge_conv_op(xb, yc, w, sender.contiguous(), receiver.contiguous(), perm_r, rowptr_r, perm_s, rowptr_s)


def edge_conv(
    xb: torch.Tensor,
    yc: torch.Tensor,
    w: torch.Tensor,
    sender: torch.Tensor,
    receiver: torch.Tensor,
    num_nodes: int,
    fused: bool | None = None,
) -> torch.Tensor:
    """:func:`edge_conv_reference`, fused when possible.

    ``fused=None`` picks the Triton kernel when it can run on this device, else the chunked PyTorch version (same
    numbers, one chunk of messages in memory at a time); ``True`` insists on the kernel; ``False`` runs the plain
    reference, which autograd differentiates to any order. The kernel and the chunked version are first order:
    callers that need ``create_graph`` (training on forces) pass ``fused=False``.
    """
    if fused is None:
        if not triton_available(xb.device):
            return _ChunkedEdgeConv.apply(xb, yc, w, sender, receiver, num_nodes)
        fused = True
    if fused:
        if not triton_available(xb.device):
            raise RuntimeError(
                f"fused edge_conv needs Triton on CUDA (or TRITON_INTERPRET=1 on the CPU); tensors are on {xb.device}"
            )
        return _fused_edge_conv(xb, yc, w, sender, receiver, num_nodes)
    return edge_conv_reference(xb, yc, w, sender, receiver, num_nodes)
