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
The fused path is first-order only: inside ``torch.enable_grad`` with ``create_graph`` (force training) use
the reference, which autograd differentiates to any order.
"""

from __future__ import annotations

import os

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
        for c in _chunks(yc.shape[0], xb.shape[1] * xb.shape[2]):
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
        for c in _chunks(yc.shape[0], xb.shape[1] * xb.shape[2]):
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


def _chunks(num_edges: int, width: int) -> list[slice]:
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


if triton is not None:

    @triton.jit
    def _segment_kernel(
        src_ptr, gather_ptr, perm_ptr, rowptr_ptr, yc_ptr, w_ptr, out_ptr,
        C, R,
        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # out[n, c, r] = sum_{k in segment n} src[gather[perm[k]], c, r] * yc[perm[k], r] * w[perm[k], c]
        n = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_c = offs_c < C
        mask_r = offs_r < R
        mask = mask_c[:, None] & mask_r[None, :]
        start = tl.load(rowptr_ptr + n)
        end = tl.load(rowptr_ptr + n + 1)
        acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
        for k in range(start, end):
            e = tl.load(perm_ptr + k)
            row = tl.load(gather_ptr + e)
            x = tl.load(src_ptr + row * C * R + offs_c[:, None] * R + offs_r[None, :], mask=mask, other=0.0)
            y = tl.load(yc_ptr + e * R + offs_r, mask=mask_r, other=0.0)
            wc = tl.load(w_ptr + e * C + offs_c, mask=mask_c, other=0.0)
            acc += (x * y[None, :] * wc[:, None]).to(tl.float32)
        out_tile = out_ptr + n * C * R + offs_c[:, None] * R + offs_r[None, :]
        tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _edge_grad_kernel(
        grad_ptr, xb_ptr, yc_ptr, w_ptr, sender_ptr, receiver_ptr, grad_yc_ptr, grad_w_ptr,
        C, R,
        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # t[c, r] = grad[receiver[e], c, r] * xb[sender[e], c, r]
        # grad_yc[e, r] = sum_c t[c, r] w[e, c];  grad_w[e, c] = sum_r t[c, r] yc[e, r]
        e = tl.program_id(0)
        s = tl.load(sender_ptr + e)
        t_row = tl.load(receiver_ptr + e)
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        wc = tl.load(w_ptr + e * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        grad_w = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            mask = mask_c[:, None] & mask_r[None, :]
            tile = offs_c[:, None] * R + offs_r[None, :]
            g = tl.load(grad_ptr + t_row * C * R + tile, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(xb_ptr + s * C * R + tile, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(yc_ptr + e * R + offs_r, mask=mask_r, other=0.0).to(tl.float32)
            t = g * x
            tl.store(grad_yc_ptr + e * R + offs_r, tl.sum(t * wc[:, None], axis=0).to(grad_yc_ptr.dtype.element_ty),
                     mask=mask_r)
            grad_w += tl.sum(t * y[None, :], axis=1)
        tl.store(grad_w_ptr + e * C + offs_c, grad_w.to(grad_w_ptr.dtype.element_ty), mask=mask_c)


def _csr(index: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges sorted by ``index`` (``perm``) and segment pointers ``rowptr [num_segments + 1]``, cached on
    ``edge_index`` (:func:`tdn._cache.cached_on`): every layer of a model and every MD step between two
    neighbour-list builds reuse one sort."""
    return cached_on(index, ("csr", num_segments), lambda: _sort_segments(index, num_segments))


def _sort_segments(index: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=num_segments)
    rowptr = torch.zeros(num_segments + 1, dtype=torch.long, device=index.device)
    rowptr[1:] = torch.cumsum(counts, 0)
    return perm, rowptr


def _blocks(channels: int, rank: int) -> tuple[int, int]:
    return min(32, triton.next_power_of_2(channels)), min(64, triton.next_power_of_2(rank))


def _segment(src, gather, perm, rowptr, yc, w, num_segments):
    channels, rank = src.shape[1], src.shape[2]
    out = src.new_empty(num_segments, channels, rank)
    block_c, block_r = _blocks(channels, rank)
    grid = (num_segments, triton.cdiv(channels, block_c), triton.cdiv(rank, block_r))
    _segment_kernel[grid](src, gather, perm, rowptr, yc, w, out, channels, rank, BLOCK_C=block_c, BLOCK_R=block_r)
    return out


class _EdgeConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xb, yc, w, sender, receiver, num_nodes):
        xb, yc, w = xb.contiguous(), yc.contiguous(), w.contiguous()
        perm, rowptr = _csr(receiver, num_nodes)
        ctx.save_for_backward(xb, yc, w, sender, receiver)
        return _segment(xb, sender, perm, rowptr, yc, w, num_nodes)

    @staticmethod
    @once_differentiable  # a second derivative (force training) raises instead of silently missing terms
    def backward(ctx, grad):
        xb, yc, w, sender, receiver = ctx.saved_tensors
        grad = grad.contiguous()
        channels, rank = xb.shape[1], xb.shape[2]
        grad_xb = grad_yc = grad_w = None
        if ctx.needs_input_grad[0]:
            perm, rowptr = _csr(sender, xb.shape[0])
            grad_xb = _segment(grad, receiver, perm, rowptr, yc, w, xb.shape[0])
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_yc, grad_w = torch.empty_like(yc), torch.empty_like(w)
            block_c = triton.next_power_of_2(channels)
            block_r = max(1, min(64, 4096 // block_c, triton.next_power_of_2(rank)))
            _edge_grad_kernel[(yc.shape[0],)](
                grad, xb, yc, w, sender, receiver, grad_yc, grad_w, channels, rank, BLOCK_C=block_c, BLOCK_R=block_r
            )
        return grad_xb, grad_yc, grad_w, None, None, None


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
        return _EdgeConv.apply(xb, yc, w, sender, receiver, num_nodes)
    return edge_conv_reference(xb, yc, w, sender, receiver, num_nodes)

