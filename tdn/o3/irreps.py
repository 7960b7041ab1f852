"""Bookkeeping for the stacked feature layout ``[N, C, D]``.

Every degree ``l = 0..L`` appears once per channel, in e3nn order (``l`` ascending, ``m = -l..l``),
so ``D = (L + 1)^2`` and degree ``l`` occupies components ``l^2 .. (l + 1)^2 - 1``.
With ``paths="o3"`` degree ``l`` carries natural parity ``(-1)^l``; with ``paths="so3"`` parity is not tracked.
"""

from __future__ import annotations

import torch
from e3nn import o3

PATH_SETS = ("o3", "so3")


def dim(lmax: int) -> int:
    """Number of components ``(lmax + 1)^2`` of one channel."""
    return (lmax + 1) ** 2


def degree_slice(l: int) -> slice:
    """Components of degree ``l`` in the stacked layout."""
    return slice(l * l, (l + 1) * (l + 1))


def degree_of_component(lmax: int) -> torch.Tensor:
    """``[D]`` long tensor: the degree ``l`` of every component."""
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(lmax + 1)])


def check_path_set(paths: str) -> str:
    if paths not in PATH_SETS:
        raise ValueError(f"paths must be one of {PATH_SETS}, got {paths!r}")
    return paths


def e3nn_irreps(lmax: int, channels: int = 1, paths: str = "o3") -> o3.Irreps:
    """The e3nn irreps of the stacked layout: natural parity for "o3", all even for "so3".

    All-even parity makes e3nn's selection rule reduce to the triangle rule, which is how the
    "so3" path set is expressed in e3nn.
    """
    check_path_set(paths)
    parity = (lambda l: (-1) ** l) if paths == "o3" else (lambda l: 1)
    return o3.Irreps([(channels, (l, parity(l))) for l in range(lmax + 1)])


def to_e3nn_layout(x: torch.Tensor, lmax: int) -> torch.Tensor:
    """``[N, C, D]`` -> e3nn's ``[N, C*D]`` "mul_ir" layout (per degree: channel-major blocks)."""
    n, c, _ = x.shape
    return torch.cat([x[:, :, degree_slice(l)].reshape(n, c * (2 * l + 1)) for l in range(lmax + 1)], dim=1)


def from_e3nn_layout(x: torch.Tensor, lmax: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`to_e3nn_layout`: ``[N, C*D]`` -> ``[N, C, D]``."""
    n = x.shape[0]
    blocks, start = [], 0
    for l in range(lmax + 1):
        size = channels * (2 * l + 1)
        blocks.append(x[:, start : start + size].reshape(n, channels, 2 * l + 1))
        start += size
    return torch.cat(blocks, dim=2)
