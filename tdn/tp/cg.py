"""Exact Clebsch–Gordan product: the reference every other backend is measured against."""

from __future__ import annotations

import torch

from ..o3 import degree_slice, path_blocks, path_tensor
from .base import TensorProduct


class CGProduct(TensorProduct):
    """``out[e, c] = sum_p w[e, c, p] CG_p(x[e, c], y[e])`` with the normalised path blocks of ``M``.

    "shared"/"degree": the edge's ``y`` is contracted with the whole tensor first,
    ``T[e] = M . y[e]`` ``[d_out, d_in]`` (cost per edge, not per channel), then ``out = x T^T``.
    "path": the same per path, weighted per channel before the paths are summed.
    """

    kind = "cg"

    def __init__(self, lmax_in: int, lmax_sh: int, lmax_out: int, channels: int, paths: str = "o3",
                 weights: str = "path") -> None:
        super().__init__(lmax_in, lmax_sh, lmax_out, channels, paths, weights)
        d_in, d_sh, d_out = self.dims
        if weights == "path":
            self.register_buffer(
                "blocks", torch.cat([b.reshape(-1) for _, b in path_blocks(lmax_in, lmax_sh, lmax_out, paths)])
            )
        else:
            m = path_tensor(lmax_in, lmax_sh, lmax_out, paths)  # [d_out, d_in, d_sh]
            self.register_buffer("m_flat", m.reshape(d_out * d_in, d_sh).T.contiguous())  # [d_sh, d_out*d_in]

    def product(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.weights == "path":
            return self._per_path(x, y, w)
        d_in, _, d_out = self.dims
        t = (y @ self.m_flat).view(-1, d_out, d_in)  # [E, d_out, d_in]
        out = torch.bmm(x, t.transpose(1, 2))  # [E, C, d_out]
        return out * self.expand_weights(w)

    def _per_path(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
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
