"""Wigner-D matrices of the stacked layout and an equivariance check used by tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from e3nn import o3

from .harmonics import spherical_harmonics
from .quadrature import sphere_grid


def random_rotation(dtype: torch.dtype = torch.float64, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random proper rotation ``[3, 3]``."""
    q = torch.randn(4, dtype=torch.float64, generator=generator)
    return o3.quaternion_to_matrix(q / q.norm()).to(dtype)


def wigner_D(lmax: int, rotation: torch.Tensor) -> torch.Tensor:
    """``[D, D]`` block-diagonal matrix with ``Y(R r) = D(R) Y(r)`` for the stacked layout (float64).

    Computed by exact quadrature, ``D[k, i] = < Y_k(R r) Y_i(r) >``, so it is accurate to float64 round-off.
    An improper ``rotation`` (det = -1) includes the natural parity ``(-1)^l`` of the "o3" layout;
    features of the "so3" path set are only equivariant under proper rotations.
    """
    points, weights = sphere_grid(2 * lmax)
    rotation = rotation.to(torch.float64)
    y = spherical_harmonics(lmax, points)
    y_rotated = spherical_harmonics(lmax, points @ rotation.T)
    return torch.einsum("q,qk,qi->ki", weights, y_rotated, y)


def equivariance_error(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    lmax_in: Sequence[int | None],
    lmax_out: int,
    rotation: torch.Tensor | None = None,
) -> float:
    """Relative error ``max |fn(D x) - D fn(x)| / max |fn(x)|`` for one rotation.

    ``inputs[i]`` has its components on the last axis with degrees ``0..lmax_in[i]``; ``None`` marks an
    invariant input (weights), left unchanged. ``rotation`` defaults to a random proper rotation;
    pass ``-R`` to test inversion as well.
    """
    if rotation is None:
        rotation = random_rotation()
    dtype = inputs[0].dtype

    def act(t: torch.Tensor, lmax: int | None) -> torch.Tensor:
        if lmax is None:
            return t
        return t @ wigner_D(lmax, rotation).to(dtype).T

    with torch.no_grad():
        out = fn(*inputs)
        out_rotated_inputs = fn(*[act(t, l) for t, l in zip(inputs, lmax_in)])
        expected = act(out, lmax_out)
    scale = out.abs().max().clamp_min(torch.finfo(dtype).tiny)
    return float((out_rotated_inputs - expected).abs().max() / scale)
