"""Sums of powered projections in cache-sized chunks of rows, forward and (first-order) backward written by hand.

The "cp" contraction evaluates, per row ``n`` and channel ``c``,

    out[n, c] = sum_r (A[n, c] . b_r) ^ nu(r) * a_w[c, r]           A [N, C, D], b_r [D], a_w [C, R, D_out]

through ``[N, C, R]`` intermediates (``R`` in the hundreds at MACE-medium widths: 66 MB at 256 atoms in float32).
Through autograd they are written to memory, kept for the backward and read back, so the product basis runs at the
speed of the memory, not of the arithmetic. Here they exist one chunk of rows at a time (``CHUNK_ENTRIES`` values,
about an L2 cache), and the backward recomputes the chunk's projections instead of storing them (a ``[n C, D]`` by
``[D, R]`` matmul with a small ``D``). Same numbers as autograd; first order only (:func:`first_order`), so
training, which differentiates the forces again, keeps the autograd path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

CHUNK_ENTRIES = 1 << 18  # [c, n, R] values per tile: 1 MB in float32, cache-sized
ROW_BLOCK = 128  # rows per tile: the per-channel matmuls [n, R] x [R, D_out] need tall blocks to run fast


def tiles(rows: int, channels: int, width: int, entries: int | None = None,
          row_block: int | None = None) -> list[tuple[slice, slice]]:  # fmt: skip
    """``(rows, channels)`` slices of about ``entries`` values of ``width`` each (default :data:`CHUNK_ENTRIES`):
    blocks of up to ``row_block`` rows (default :data:`ROW_BLOCK`), as many channels as fit (at least one)."""
    entries = CHUNK_ENTRIES if entries is None else entries
    n = max(1, min(rows, ROW_BLOCK if row_block is None else row_block))
    c = max(1, min(channels, entries // max(n * width, 1)))
    return [(slice(r, r + n), slice(k, k + c)) for r in range(0, rows, n) for k in range(0, channels, c)]


def first_order(backward: Callable) -> Callable:
    """Decorate the (``once_differentiable``) backward of an eval-mode fast path: a backward asked to build a graph
    (``create_graph=True``, e.g. forces in a loss) raises, instead of returning derivatives that a second
    differentiation would silently take as constants."""

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "this eval-mode path of the model is first order and cannot differentiate twice (create_graph=True): "
                "put the model in train mode (model.train()) to differentiate forces or stress again"
            )
        return backward(ctx, *grads)

    return checked


def _project(a: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``a [n, c, D]`` -> channel-major projections ``[c, n, R]`` (one matmul)."""
    n, channels, d = a.shape
    return (a.transpose(0, 1).reshape(channels * n, d) @ directions).view(channels, n, -1)


def _raise(p: torch.Tensor, orders: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """``p [C, n, R]`` with each order's columns raised to its power, in place."""
    start = 0
    for nu, rank in orders:
        block = p[:, :, start : start + rank]
        if nu == 2:
            block.square_()
        elif nu != 1:
            block.pow_(nu)
        start += rank
    return p


class PowerSum(torch.autograd.Function):
    """``(A [n, C, D], directions [D, R], folded [C, R, D_out], orders) -> [n, C, D_out]``, the sum above in chunks
    of rows. ``orders``: ``(nu, R_nu)`` of the column blocks of ``directions`` and ``folded``, in order."""

    @staticmethod
    def forward(ctx, A, directions, folded, orders):
        ctx.save_for_backward(A, directions, folded)
        ctx.orders = orders
        out = A.new_empty(A.shape[0], A.shape[1], folded.shape[2])  # [n, C, D_out]
        for rows, chans in tiles(A.shape[0], A.shape[1], directions.shape[1]):
            q = _raise(_project(A[rows, chans], directions), orders)  # [c, n, R]
            out[rows, chans] = torch.bmm(q, folded[chans]).transpose(0, 1)  # [n, c, D_out]
        return out

    @staticmethod
    @first_order
    @once_differentiable
    def backward(ctx, grad):
        A, directions, folded = ctx.saved_tensors
        orders = ctx.orders
        need_a, need_folded = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:
            raise RuntimeError("PowerSum does not differentiate its directions (they are fixed factors)")
        grad_a = torch.empty_like(A) if need_a else None
        grad_folded = torch.zeros_like(folded) if need_folded else None
        # d(p^nu)/dp = nu p^(nu-1): the factor nu rides on the transposed directions
        scale = torch.cat([directions.new_full((rank,), float(nu)) for nu, rank in orders])
        back = (directions * scale).T.contiguous()  # [R, D]
        lowered = tuple((nu - 1, rank) for nu, rank in orders)
        folded_t = folded.transpose(1, 2)  # [C, D_out, R]
        for rows, chans in tiles(A.shape[0], A.shape[1], directions.shape[1]):
            p = _project(A[rows, chans], directions)  # [c, n, R], recomputed
            g = grad[rows, chans].transpose(0, 1)  # [c, n, D_out]
            if need_folded:
                grad_folded[chans] += torch.bmm(_raise(p.clone(), orders).transpose(1, 2), g)
            if need_a:
                gq = torch.bmm(g, folded_t[chans]).mul_(_raise(p, lowered))  # [c, n, R]
                channels, n, rank = gq.shape
                grad_a[rows, chans] = (gq.view(channels * n, rank) @ back).view(channels, n, -1).transpose(0, 1)
        return grad_a, None, grad_folded, None


def power_sum(A: torch.Tensor, directions: torch.Tensor, folded: torch.Tensor,
              orders: tuple[tuple[int, int], ...]) -> torch.Tensor:  # fmt: skip
    """``out[n, c] = sum_r (A[n, c] . directions[:, r]) ^ nu(r) * folded[c, r]`` in chunks (:class:`PowerSum`):
    ``A [n, C, D]``, ``directions [D, R]``, ``folded [C, R, D_out]``, ``orders`` the ``(nu, R_nu)`` column blocks
    -> ``[n, C, D_out]``. First order in ``A`` and ``folded``."""
    return PowerSum.apply(A, directions, folded, orders)
