"""Exact Clebsch–Gordan product: the reference every other backend is measured against."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..o3 import degree_slice, path_blocks, path_tensor
from .base import TensorProduct
from .fused import edge_chunks


class CGProduct(TensorProduct):
    """``out[e, c] = sum_p w[e, c, p] CG_p(x[e, c], y[e])`` with the normalised path blocks of ``M``.

    "shared"/"degree"/"inout": the edge's ``y`` is contracted with the whole tensor first,
    ``T[e] = M . y[e]`` ``[d_out, d_in]`` (cost per edge, not per channel), then ``out = x T^T`` ("inout": one
    product per coupled input degree on its columns of ``T``, the paths without coupling apart).
    "path" (MACE's "uvu" product), all paths in one batched product: with ``Z[e, c, (p, i)] = w[e, c, p] x[e, c, i]``
    and the per-edge table ``T[e, (p, i), k] = sum_j M_p[k, i, j] y[e, j]`` (``M_p`` the path's block of ``M``,
    zero outside its degrees), ``out[e, c] = Z[e, c] T[e]``: ``[C, P d_in] x [P d_in, d_out]`` per edge. Its
    convolution (:meth:`conv`) runs that in chunks of edges with a hand-written first-order backward, so that no
    per-edge ``[E, C, P d_in]`` tensor is kept; :meth:`reference_product` is the plain per-path loop.
    """

    kind = "cg"
    default_weights = "path"  # MACE's "uvu" convolution

    def __init__(self, lmax_in: int, lmax_sh: int, lmax_out: int, channels: int, paths: str = "o3",
                 weights: str = "path") -> None:
        super().__init__(lmax_in, lmax_sh, lmax_out, channels, paths, weights)
        d_in, d_sh, d_out = self.dims
        if weights == "path":
            blocks = path_blocks(lmax_in, lmax_sh, lmax_out, paths)
            self.register_buffer("blocks", torch.cat([b.reshape(-1) for _, b in blocks]))
            table = torch.zeros(len(blocks), d_in, d_out, d_sh, dtype=torch.float64)  # [P, d_in, d_out, d_sh]
            for p, ((l1, l2, l3), block) in enumerate(blocks):
                table[p, degree_slice(l1), degree_slice(l3), degree_slice(l2)] = block.permute(1, 0, 2)
            self.register_buffer("path_table", table.permute(3, 0, 1, 2).reshape(d_sh, -1).contiguous())
        else:
            m = path_tensor(lmax_in, lmax_sh, lmax_out, paths)  # [d_out, d_in, d_sh]
            self.register_buffer("m_flat", m.reshape(d_out * d_in, d_sh).T.contiguous())  # [d_sh, d_out*d_in]

    def product(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.weights == "path":
            return torch.bmm(_weighted_inputs(x, w), _edge_table(y, self.path_table, self.dims[2]))  # [E, C, d_out]
        d_in, _, d_out = self.dims
        t = (y @ self.m_flat).view(-1, d_out, d_in)  # [E, d_out, d_in]
        if self.weights != "inout":
            return torch.bmm(x, t.transpose(1, 2)) * self.expand_weights(w)  # [E, C, d_out]
        # "inout": the paths without coupling in one product per edge, then each input degree l > 0 on its own
        # columns of T, scaled by its pairs' weights
        out = self.uncoupled_paths(x, y, w)
        for l in self.coupled_input_degrees:
            part = torch.bmm(x[:, :, degree_slice(l)], t[:, :, degree_slice(l)].transpose(1, 2))  # [E, C, d_out]
            out = out + part * self.pair_weights(w, l)
        return out

    def scalar_couplings(self) -> tuple[torch.Tensor, torch.Tensor]:
        d_in, d_sh, d_out = self.dims
        m = self.m_flat.T.reshape(d_out, d_in, d_sh)  # M [d_out, d_in, d_sh]
        return m[:, 0, :].T, m[:, :, 0].T  # [d_sh, d_out], [d_in, d_out]

    def reference_product(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The per-path loop (weights="path"): one small product per path, the definition tests compare to."""
        out = x.new_zeros(x.shape[0], x.shape[1], self.dims[2])
        start = 0
        for p, (l1, l2, l3) in enumerate(self.path_list):
            n1, n2, n3 = 2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1
            block = self.blocks[start : start + n1 * n2 * n3].view(n3 * n1, n2)
            start += n1 * n2 * n3
            t = (y[:, degree_slice(l2)] @ block.T).view(-1, n3, n1)  # [E, n3, n1]
            part = torch.bmm(x[:, :, degree_slice(l1)], t.transpose(1, 2))  # [E, C, n3]
            out[:, :, degree_slice(l3)] += w[:, :, p : p + 1] * part
        return out

    def conv(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor,
        sender: torch.Tensor,
        receiver: torch.Tensor,
        fused: bool | None = None,
    ) -> torch.Tensor:
        """Message passing (see :meth:`TensorProduct.conv`). weights="path" with ``fused`` None or True: chunks of
        edges, first order (a second derivative raises); ``fused=False`` (training on forces): per-edge messages,
        differentiable to any order."""
        if self.weights != "path" or fused is False:
            return super().conv(x, y, w, sender, receiver, fused)
        self.check_edges(y, sender, receiver)
        return _ChunkedPathConv.apply(x, y, w, sender, receiver, self.path_table)


def _weighted_inputs(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Z[e, c, (p, i)] = w[e, c, p] x[e, c, i]`` -> ``[E, C, P * d_in]``."""
    return (w.unsqueeze(-1) * x.unsqueeze(2)).flatten(2)


def _edge_table(y: torch.Tensor, path_table: torch.Tensor, d_out: int) -> torch.Tensor:
    """``T[e, (p, i), k] = sum_j M_p[k, i, j] y[e, j]`` -> ``[E, P * d_in, d_out]``."""
    return (y @ path_table).view(y.shape[0], path_table.shape[1] // d_out, d_out)


class _ChunkedPathConv(torch.autograd.Function):
    """``out[n] = sum_{e: receiver[e] = n} Z[sender[e], e] T[e]`` (weights="path") in chunks of edges: ``Z`` and the
    messages exist one cache-sized chunk at a time, in the forward and in the backward (which recomputes ``Z``)."""

    @staticmethod
    def forward(ctx, x, y, w, sender, receiver, path_table):
        ctx.save_for_backward(x, y, w, sender, receiver, path_table)
        d_out = path_table.shape[1] // (w.shape[2] * x.shape[2])
        out = x.new_zeros(x.shape[0], x.shape[1], d_out)  # [N, C, d_out]
        for c in edge_chunks(y.shape[0], x.shape[1] * w.shape[2] * x.shape[2]):
            z = _weighted_inputs(x.index_select(0, sender[c]), w[c])  # [e, C, P d_in]
            out.index_add_(0, receiver[c], torch.bmm(z, _edge_table(y[c], path_table, d_out)))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, y, w, sender, receiver, path_table = ctx.saved_tensors
        need_x, need_y, need_w = ctx.needs_input_grad[:3]
        num_paths, d_in, d_out = w.shape[2], x.shape[2], grad.shape[2]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_y = torch.empty_like(y) if need_y else None
        grad_w = torch.empty_like(w) if need_w else None
        for c in edge_chunks(y.shape[0], x.shape[1] * num_paths * d_in):
            xs = x.index_select(0, sender[c])  # [e, C, d_in]
            g = grad.index_select(0, receiver[c])  # [e, C, d_out]
            table = _edge_table(y[c], path_table, d_out)  # [e, P d_in, d_out]
            if need_y:
                grad_table = torch.bmm(_weighted_inputs(xs, w[c]).transpose(1, 2), g)  # [e, P d_in, d_out]
                grad_y[c] = grad_table.flatten(1) @ path_table.T  # [e, d_sh]
            if need_x or need_w:
                grad_z = torch.bmm(g, table.transpose(1, 2)).unflatten(2, (num_paths, d_in))  # [e, C, P, d_in]
                if need_w:
                    grad_w[c] = torch.matmul(grad_z, xs.unsqueeze(-1)).squeeze(-1)  # sum over i
                if need_x:
                    grad_x.index_add_(0, sender[c], torch.matmul(w[c].unsqueeze(2), grad_z).squeeze(2))  # sum over p
        return grad_x, grad_y, grad_w, None, None, None
