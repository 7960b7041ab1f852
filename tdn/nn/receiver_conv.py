"""The factorised convolution as one matrix product per receiver: the CPU's fast path in eval mode.

A factorised backend (:class:`tdn.tp.base.FactorisedProduct`: cp, grid) couples ``x`` and ``y`` as
``T(x, y) = ((x @ B) ⊙ (y @ C)) @ A`` (``B [d_in, R]``, ``C [d_sh, R]``, ``A [R, d_out]``). Summed over the edges of
a receiver ``n`` (sender ``s(e)``, weight ``w[e, c]``, ``yc = y @ C``)::

    acc[n, c, r] = sum_e w[e, c] xb[s(e), c, r] yc[e, r]
                 = sum_{e, i} (w[e, c] x[s(e), c, i]) (B[i, r] yc[e, r])        = (U_n^T V_n)[c, r]
    out[n] = acc[n] @ A

with ``U_n [(e, i), C]`` and ``V_n [(e, i), R]`` stacked over the receiver's edges: one ``[R, K d_in] x [K d_in, C]``
matrix product per receiver (``K`` edge slots, the receiver-major table of :func:`receiver_slots`). The per-edge
``[E, C, R]`` messages of :func:`tdn.tp.fused.edge_conv` (gathered, multiplied, scattered: the memory's speed) become
gathers of ``[E, d_in, C]`` (``d_in`` = 1 or 4 against ``R`` = 16..28 at MACE-medium widths) and dense products that
run at the arithmetic's speed. Same numbers up to rounding.

Used by :class:`tdn.nn.InteractionBlock` in eval mode where the Triton kernel does not run (the CPU): the backward is
written by hand, first order (:func:`tdn.contractions.chunked.first_order`; training differentiates the forces again
and keeps the backend's own path). Receivers are padded to the largest in-degree ``K``; where that would more than
double the work (``MAX_PADDING``: a hub, a very uneven graph) the backend's own path runs instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .._cache import cached_on
from ..contractions.chunked import first_order
from ..o3 import degree_slice
from ..tp.base import FactorisedProduct
from ..tp.fused import triton_available

CHUNK_ENTRIES = 1 << 18  # gathered [n K d_in, C] values per chunk of receivers: 1 MB in float32, cache-sized
MAX_PADDING = 2.0  # receivers padded to the largest in-degree: at most this many slots per edge


class ReceiverSlots(NamedTuple):
    """The edges of each receiver, padded to the largest in-degree ``K``: ``slots [N, K]`` edge ids (padding: edge
    0) and ``valid [N, K]`` (False on padding)."""

    slots: torch.Tensor
    valid: torch.Tensor


def receiver_slots(receiver: torch.Tensor, num_nodes: int, max_padding: float = MAX_PADDING) -> ReceiverSlots | None:
    """The receiver-major slot table of ``receiver [E]``, or None when it would hold more than ``max_padding``
    slots per edge (or there are no edges). One host sync to build (the largest in-degree); cached on ``receiver``
    (:func:`tdn._cache.cached_on`), so every layer and every MD step between two neighbour-list builds reuse it."""
    return cached_on(receiver, ("receiver_slots", num_nodes, max_padding),
                     lambda: _build_slots(receiver, num_nodes, max_padding))  # fmt: skip


def _build_slots(receiver: torch.Tensor, num_nodes: int, max_padding: float) -> ReceiverSlots | None:
    num_edges = receiver.shape[0]
    if num_edges == 0 or num_nodes == 0:
        return None
    counts = torch.bincount(receiver, minlength=num_nodes)
    k = int(counts.max())
    if num_nodes * k > max_padding * num_edges:
        return None
    perm = torch.argsort(receiver, stable=True)
    ordered = receiver[perm]
    start = torch.cumsum(counts, 0) - counts  # first slot of each receiver in the sorted order
    position = torch.arange(num_edges, device=receiver.device) - start[ordered]
    slots = torch.zeros(num_nodes, k, dtype=torch.long, device=receiver.device)
    valid = torch.zeros(num_nodes, k, dtype=torch.bool, device=receiver.device)
    slots[ordered, position] = perm
    valid[ordered, position] = True
    return ReceiverSlots(slots, valid)


def _chunks(rows: int, width: int) -> list[slice]:
    size = max(1, CHUNK_ENTRIES // max(width, 1))
    return [slice(start, start + size) for start in range(0, rows, size)]


class _ReceiverConv(torch.autograd.Function):
    """``(x [N, C, d_in], yc [E, R], w [E, C, P], left [d_in, R], project [R, d_out], sender [E], slots, valid,
    blocks, expansion) -> [N, C, d_out]``; block ``b`` covers the output components ``blocks[b] = (start, stop)``.

    ``expansion`` None: weight ``b`` scales block ``b`` (P = number of blocks). Else ``[P, B, d_in]``: block ``b``'s
    weight of input component ``i`` is ``w @ expansion[:, b, i]`` (a weight per block and input degree), formed
    per chunk of receivers, never for all edges at once."""

    @staticmethod
    def forward(ctx, x, yc, w, left, project, sender, slots, valid, blocks, expansion=None):
        num_nodes, channels, d_in = x.shape
        rank, k = left.shape[1], slots.shape[1]
        xt = x.transpose(1, 2).contiguous()  # [N, d_in, C]: a receiver's gathered rows stack into [K d_in, C]
        acc = x.new_empty(len(blocks), num_nodes, channels, rank)  # per weight p: [N, C, R]
        for rows in _chunks(num_nodes, k * d_in * channels):
            edges = slots[rows].reshape(-1)  # [n K]
            n = edges.shape[0] // k
            xs = xt.index_select(0, sender.index_select(0, edges))  # [n K, d_in, C]
            v = _edge_factor(yc, edges, valid[rows], left).view(n, k * d_in, rank)  # [n, K d_in, R]
            w_slots = _slot_weights(w.index_select(0, edges), expansion)  # [n K, C, P] or [n K, B, d_in, C]
            for p in range(len(blocks)):
                w_p = _block_weight(w_slots, p, expansion)  # [n K, 1 or d_in, C]
                u = xs.mul_(w_p) if len(blocks) == 1 else xs * w_p  # [n K, d_in, C]
                torch.bmm(u.view(n, k * d_in, channels).transpose(1, 2), v, out=acc[p, rows])  # [n, C, R]
        ctx.save_for_backward(xt, yc, w, left, project, sender, slots, valid)
        ctx.blocks, ctx.expansion = blocks, expansion
        # the output projection once for all receivers: [N C, R] x [R, d_out_p] per weight p
        parts = [acc[p].view(-1, rank) @ project[:, start:stop] for p, (start, stop) in enumerate(blocks)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).view(num_nodes, channels, -1)

    @staticmethod
    @first_order
    @once_differentiable
    def backward(ctx, grad):
        xt, yc, w, left, project, sender, slots, valid = ctx.saved_tensors
        if any(ctx.needs_input_grad[3:5]):
            raise RuntimeError("the receiver convolution does not differentiate the backend's factors")
        need_x, need_yc, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        num_nodes, d_in, channels = xt.shape
        rank, k = left.shape[1], slots.shape[1]
        grad_xt = torch.zeros_like(xt) if need_x else None
        grad_yc = torch.zeros_like(yc) if need_yc else None
        grad_w = torch.zeros_like(w) if need_w else None
        flat = grad.reshape(-1, grad.shape[2])  # [N C, d_out]
        grad_acc = [(flat[:, start:stop] @ project[:, start:stop].T).view(num_nodes, channels, rank)
                    for start, stop in ctx.blocks]  # fmt: skip  # per weight p: [N, C, R]
        for rows in _chunks(num_nodes, k * d_in * channels):
            edges = slots[rows].reshape(-1)
            n = edges.shape[0] // k
            senders = sender.index_select(0, edges)
            xs = xt.index_select(0, senders)  # [n K, d_in, C]
            w_slots = _slot_weights(w.index_select(0, edges), ctx.expansion)  # [n K, C, P] or [n K, B, d_in, C]
            v = _edge_factor(yc, edges, valid[rows], left).view(n, k * d_in, rank)
            grad_xs = grad_v = None  # sums over the weights p, started by the first (no zero fill)
            for p in range(len(ctx.blocks)):
                g = grad_acc[p][rows]  # [n, C, R]
                w_p = _block_weight(w_slots, p, ctx.expansion)  # [n K, 1 or d_in, C]
                if need_x or need_w:
                    grad_u = torch.bmm(v, g.transpose(1, 2)).view(n * k, d_in, channels)  # zero on padding (v is)
                    if need_w and ctx.expansion is None:
                        grad_w[:, :, p].index_add_(0, edges, (grad_u * xs).sum(1))
                    elif need_w:  # back through the expansion: [n K, C, d_in] @ [d_in, P]
                        grad_w.index_add_(0, edges, (grad_u * xs).transpose(1, 2) @ ctx.expansion[:, p].T)
                    if need_x:
                        grad_xs = grad_u.mul_(w_p) if grad_xs is None else grad_xs.addcmul_(grad_u, w_p)
                if need_yc:
                    u = (xs * w_p).view(n, k * d_in, channels)
                    grad_v = torch.bmm(u, g) if grad_v is None else grad_v.baddbmm_(u, g)  # [n, K d_in, R]
            if need_x:
                grad_xt.index_add_(0, senders, grad_xs)
            if need_yc:
                per_edge = (grad_v.view(n * k, d_in, rank) * left).sum(1)  # [n K, R]
                grad_yc.index_add_(0, edges, per_edge.mul_(valid[rows].reshape(-1, 1)))
        grad_x = grad_xt.transpose(1, 2) if need_x else None
        return grad_x, grad_yc, grad_w, None, None, None, None, None, None, None


def _slot_weights(w_slots: torch.Tensor, expansion: torch.Tensor | None) -> torch.Tensor:
    """The gathered edges' weights ``[n K, C, P]``, expanded once per chunk to ``[n K, B, d_in, C]`` where
    ``expansion [P, B, d_in]`` is given."""
    if expansion is None:
        return w_slots
    num_weights, num_blocks, d_in = expansion.shape
    expanded = w_slots @ expansion.reshape(num_weights, -1)  # [n K, C, B d_in]
    return expanded.view(w_slots.shape[0], w_slots.shape[1], num_blocks, d_in).permute(0, 2, 3, 1).contiguous()


def _block_weight(w_slots: torch.Tensor, p: int, expansion: torch.Tensor | None) -> torch.Tensor:
    """Block ``p``'s weights of the gathered edges (:func:`_slot_weights`) -> ``[n K, 1, C]`` (one per block) or
    ``[n K, d_in, C]`` (per input component)."""
    return w_slots[:, None, :, p] if expansion is None else w_slots[:, p]


def _edge_factor(yc: torch.Tensor, edges: torch.Tensor, valid: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """``V[(e, i), r] = B[i, r] yc[e, r]`` for the slots ``edges`` (zero on padding) -> ``[n K, d_in, R]``."""
    ye = yc.index_select(0, edges).mul_(valid.reshape(-1, 1))  # [n K, R]
    return ye.unsqueeze(1) * left  # [n K, d_in, R]


def receiver_conv(
    tp: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    sender: torch.Tensor,
    receiver: torch.Tensor,
) -> torch.Tensor | None:
    """``tp.conv(x, y, w, sender, receiver)`` as one matrix product per receiver (module docstring): ``x [N, C,
    d_in]``, ``y [E, d_sh]``, ``w [E, C, P]`` -> ``[N, C, d_out]``; first order only.

    None where it does not apply: a backend that is not factorised or has per-path weights, a device where the
    Triton kernel runs, ``torch.compile`` tracing, autocast, no edges, or a graph whose padding would exceed
    ``MAX_PADDING``. The caller then runs ``tp.conv``.
    """
    if not isinstance(tp, FactorisedProduct) or tp.weights not in ("shared", "degree", "inout"):
        return None
    if triton_available(x.device) or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return None
    tp.check_inputs(x, y, w, num_edges=y.shape[0])
    tp.check_edges(y, sender, receiver)
    table = receiver_slots(receiver, x.shape[0])
    if table is None:
        return None
    left, right, project = tp.factors()
    yc = y @ right  # [E, R]
    if tp.weights == "shared":
        blocks: tuple[tuple[int, int], ...] = ((0, project.shape[1]),)
    elif tp.weights == "degree":  # one weight per output degree l: components l^2 .. (l+1)^2
        blocks = tuple((l * l, (l + 1) ** 2) for l in range(tp.lmax_out + 1))
    else:
        return _inout_receiver_conv(tp, x, y, yc, w, sender, table)
    return _ReceiverConv.apply(x, yc, w, left, project, sender, table.slots, table.valid, blocks)


def _inout_receiver_conv(tp: FactorisedProduct, x: torch.Tensor, y: torch.Tensor, yc: torch.Tensor, w: torch.Tensor,
                         sender: torch.Tensor, table: ReceiverSlots) -> torch.Tensor:  # fmt: skip
    """"inout" weights: one receiver product with a weight per output degree and input component (its pair's,
    through the backend's ``_component_expansion``), plus one per scalar-harmonic path ``(l, 0, l)`` (rank
    ``2l+1``: its coupling as ``left``, the harmonic ``y_0`` as ``yc``, its own weight minus its pair's) on its
    columns."""
    left, _, project = tp.factors()
    blocks = tuple((l * l, (l + 1) ** 2) for l in range(tp.lmax_out + 1))
    # a scalar input (the first layer): its pairs (0, l) are the blocks, in order; no expansion needed
    plain = tp.lmax_in == 0 and tp.num_weights == tp.lmax_out + 1
    expansion = None if plain else tp._component_expansion.to(x.dtype)
    out = _ReceiverConv.apply(x, yc, w, left, project, sender, table.slots, table.valid, blocks, expansion)
    _, m_self = tp.scalar_couplings()
    for l in range(1, tp.lmax_in + 1):
        rows, width = degree_slice(l), 2 * l + 1
        if rows.stop > tp._self_components.stop:
            break
        # own weight minus its pair's, the same for the degree's components: the first one's column
        delta = w @ tp._self_delta[:, rows.start - 1 : rows.start].to(w.dtype)  # [E, C, 1]
        y0 = y[:, :1].expand(-1, width).contiguous()  # [E, 2l+1]
        identity = torch.eye(width, dtype=x.dtype, device=x.device)
        part = _ReceiverConv.apply(x[:, :, rows].contiguous(), y0, delta, m_self[rows, rows], identity, sender,
                                   table.slots, table.valid, ((0, width),))  # fmt: skip  # [N, C, 2l+1]
        out = out.index_add(2, torch.arange(rows.start, rows.stop, device=x.device), part)
    return out
