"""Irreps bookkeeping, spherical harmonics, coupling tensors, spherical quadrature and Wigner-D helpers."""

from .coupling import gaunt_tensor, path_blocks, path_coefficients, path_list, path_tensor
from .harmonics import spherical_harmonics
from .irreps import (
    PATH_SETS,
    check_path_set,
    degree_of_component,
    degree_slice,
    dim,
    e3nn_irreps,
    from_e3nn_layout,
    to_e3nn_layout,
)
from .quadrature import grid_shape, sphere_grid
from .rotations import equivariance_error, random_rotation, wigner_D

__all__ = [
    "PATH_SETS",
    "check_path_set",
    "degree_of_component",
    "degree_slice",
    "dim",
    "e3nn_irreps",
    "equivariance_error",
    "from_e3nn_layout",
    "gaunt_tensor",
    "grid_shape",
    "path_blocks",
    "path_coefficients",
    "path_list",
    "path_tensor",
    "random_rotation",
    "sphere_grid",
    "spherical_harmonics",
    "to_e3nn_layout",
    "wigner_D",
]
