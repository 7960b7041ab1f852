"""Backend-generic tests of tdn.tp: every registered backend (``tdn.tp.BACKENDS`` at collection time).

Exactness: cg == e3nn's uvu TensorProduct, cg "shared"/"degree" == "path" with expanded weights, gaunt == grid ==
the Gaunt tensor. For every backend, weight mode and path set it supports: rotation equivariance (and inversion
for "o3"), gradcheck and gradgradcheck, float32 agreement, and the argument errors.
"""

from __future__ import annotations

import re

import pytest
import torch
from e3nn import o3 as e3nn_o3

import tdn
from tdn.o3 import (
    degree_slice,
    e3nn_irreps,
    equivariance_error,
    from_e3nn_layout,
    gaunt_tensor,
    random_rotation,
    to_e3nn_layout,
)
from tdn.tp import BACKENDS, MAX_LMAX, WEIGHT_MODES
from tdn.tp.base import inout_key

pytestmark = pytest.mark.usefixtures("one_thread", "float64", "seed")

KINDS = sorted(BACKENDS)
GAUNT_KINDS = [k for k in ("grid", "gaunt") if k in BACKENDS]

# (lmax_in, lmax_sh, lmax_out): square and not, with lmax_out above and below the product's band
DEGREES = [(1, 1, 1), (2, 1, 3), (3, 2, 2), (2, 3, 1)]
CG_DEGREES = [(0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3), (2, 1, 3), (3, 2, 1), (0, 2, 2), (1, 3, 4)]
GAUNT_DEGREES = [(0, 0, 0), (1, 1, 1), (3, 3, 3), (2, 1, 3), (3, 2, 1), (4, 1, 2), (1, 4, 6), (6, 6, 6)]


def degrees_for(kind: str) -> list[tuple[int, int, int]]:
    # cp ships fitted factors for lmax_in = lmax_sh = lmax_out only; other degrees would be fitted on first use
    return [(1, 1, 1), (2, 2, 2)] if kind == "cp" else DEGREES


def supported(kind: str) -> list[tuple[str, str]]:
    """``(paths, weights)`` pairs the backend accepts."""
    cls = BACKENDS[kind]
    return [(p, w) for p in cls.supported_paths for w in cls.supported_weights]


def build(kind: str, degrees: tuple[int, int, int], channels: int = 3, **kwargs) -> tdn.tp.TensorProduct:
    l_in, l_sh, l_out = degrees
    return tdn.tp.build(kind, lmax_in=l_in, lmax_sh=l_sh, lmax_out=l_out, channels=channels, **kwargs)


def random_inputs(tp: tdn.tp.TensorProduct, num_edges: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d_in, d_sh, _ = tp.dims
    x = torch.randn(num_edges, tp.channels, d_in)  # [E, C, D_in]
    y = torch.randn(num_edges, d_sh)  # [E, D_sh]
    w = torch.randn(num_edges, tp.channels, tp.num_weights)  # [E, C, P]
    return x, y, w


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    ("kind", "name"), [("cg", "CGProduct"), ("cp", "CPProduct"), ("gaunt", "GauntProduct"), ("grid", "GridProduct")]
)
def test_build_returns_the_backend_of_each_kind(kind, name):
    """Each kind of the public API builds its own module's class, which names itself by that kind."""
    tp = tdn.tp.build(kind, lmax=1, channels=2)
    assert (type(tp).__module__, type(tp).__name__) == (f"tdn.tp.{kind}", name)
    assert tp.kind == kind and tdn.tp.backend(kind) is type(tp)


def test_declared_facts():
    """What each backend declares on its class: consistent, and the defaults the model configuration uses."""
    from tdn.models.config import DEFAULT_TP_WEIGHTS

    assert {kind: BACKENDS[kind].default_weights for kind in KINDS} == DEFAULT_TP_WEIGHTS
    for kind in KINDS:
        cls = BACKENDS[kind]
        assert cls.default_weights in cls.supported_weights
        assert set(cls.supported_paths) <= {"o3", "so3"} and set(cls.supported_weights) <= set(WEIGHT_MODES)
    assert {kind: BACKENDS[kind].options for kind in KINDS} == {
        "cg": (), "cp": ("rank", "tol", "seed"), "gaunt": (), "grid": ()
    }
    assert tdn.tp.build("cp", lmax=2).rank == tdn.tp.build("cp", lmax=2).x_factor.shape[1]
    assert tdn.tp.build("grid", lmax=2).rank == tdn.tp.build("grid", lmax=2).num_points


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_option_names_the_backend(kind):
    option = "rank" if kind != "cp" else "ranks"
    with pytest.raises(ValueError, match=rf"unknown options for the '{kind}' backend: \['{option}'\]"):
        tdn.tp.build(kind, lmax=1, **{option: 3})


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("degrees", CG_DEGREES)
@pytest.mark.parametrize("paths", ["o3", "so3"])
def test_cg_matches_e3nn_uvu(paths, degrees):
    l_in, l_sh, l_out = degrees
    channels = 4
    tp = build("cg", degrees, channels, paths=paths, weights="path")
    x, y, w = random_inputs(tp, num_edges=7)
    reference = e3nn_o3.TensorProduct(  # built under float64 default dtype (fixture), so its w3j are float64
        e3nn_irreps(l_in, channels, paths),
        e3nn_irreps(l_sh, 1, paths),
        e3nn_irreps(l_out, channels, paths),
        [(l1, l2, l3, "uvu", True) for l1, l2, l3 in tp.path_list],
        internal_weights=False,
        shared_weights=False,
    )
    expected = reference(to_e3nn_layout(x, l_in), y, w.transpose(1, 2).reshape(w.shape[0], -1))
    expected = from_e3nn_layout(expected, l_out, channels)
    assert relative_error(tp(x, y, w), expected) < 1e-10


@pytest.mark.parametrize("degrees", [(2, 2, 2), (2, 1, 3), (3, 2, 1)])
@pytest.mark.parametrize("paths", ["o3", "so3"])
@pytest.mark.parametrize("weights", ["shared", "degree"])
def test_cg_shared_and_degree_equal_path_with_expanded_weights(weights, paths, degrees):
    tp = build("cg", degrees, paths=paths, weights=weights)
    per_path = build("cg", degrees, paths=paths, weights="path")
    x, y, w = random_inputs(tp)
    if weights == "shared":
        expanded = w.expand(-1, -1, per_path.num_paths)  # one weight for every path
    else:
        l_out = torch.tensor([l3 for _, _, l3 in per_path.path_list])
        expanded = w[:, :, l_out]  # the weight of the path's output degree
    assert relative_error(tp(x, y, w), per_path(x, y, expanded)) < 1e-12


def inout_weights_per_path(tp: tdn.tp.TensorProduct, w: torch.Tensor) -> torch.Tensor:
    """"inout" weights ``[E, C, keys]`` -> the per-path weights ``[E, C, paths]`` of the same map."""
    index = torch.tensor([tp.inout_keys.index(inout_key(path)) for path in tp.path_list])
    return w[:, :, index]


def test_inout_keys():
    """Paths of one (l_in, l_out) pair share a weight, except the scalar harmonic's (l, 0, l)."""
    assert [inout_key(p) for p in [(0, 2, 2), (1, 0, 1), (1, 2, 1), (1, 1, 2), (1, 3, 2), (2, 0, 2)]] == [
        (0, 2, False), (1, 1, True), (1, 1, False), (1, 2, False), (1, 2, False), (2, 2, True)]
    tp = build("cg", (1, 2, 2), weights="inout")  # the small model's second layer: every path has its own weight
    assert tp.num_weights == tp.num_paths == 7
    tp = build("cg", (1, 3, 3), weights="inout")  # (1, 1, 2) and (1, 3, 2) share one
    assert (tp.num_weights, tp.num_paths) == (9, 10)


@pytest.mark.parametrize("degrees", [(1, 2, 2), (2, 2, 2), (2, 1, 3), (3, 2, 1), (0, 2, 2), (1, 3, 3), (1, 1, 1)])
@pytest.mark.parametrize("paths", ["o3", "so3"])
def test_inout_weights_equal_path_weights_shared_within_each_key(paths, degrees):
    """cg "inout" is the per-path product whose paths of one key share a weight; cp "inout" is it up to the fit
    error of its factors; grid "inout" is the Gaunt tensor's paths, weighted the same way."""
    tp = build("cg", degrees, paths=paths, weights="inout")
    per_path = build("cg", degrees, paths=paths, weights="path")
    x, y, w = random_inputs(tp)
    expected = per_path(x, y, inout_weights_per_path(tp, w))
    assert relative_error(tp(x, y, w), expected) < 1e-12
    if degrees[1] == degrees[2]:  # shipped cp factors (other degrees would be fitted on first use)
        cp = build("cp", degrees, paths=paths, weights="inout")
        assert cp.inout_keys == tp.inout_keys
        assert relative_error(cp(x, y, w), expected) < 20 * cp.fit_error
    if paths == "o3":
        grid = build("grid", degrees, weights="inout")
        gaunt = gaunt_tensor(*degrees)  # [d_out, d_in, d_sh]
        per_key = inout_weights_per_path(grid, w)
        expected = torch.zeros(x.shape[0], x.shape[1], gaunt.shape[0])
        for p, (l1, l2, l3) in enumerate(grid.path_list):
            block = gaunt[degree_slice(l3), degree_slice(l1), degree_slice(l2)]
            part = torch.einsum("kij,eci,ej->eck", block, x[:, :, degree_slice(l1)], y[:, degree_slice(l2)])
            expected[:, :, degree_slice(l3)] += per_key[:, :, p : p + 1] * part
        assert relative_error(grid(x, y, w), expected) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_degree_weights_scale_each_output_degree(kind, dtype):
    tp = build(kind, (2, 2, 2), weights="degree").to(dtype)
    w = torch.tensor([1.5, -2.0, 0.25], dtype=dtype).expand(4, tp.channels, 3).clone().requires_grad_()
    expanded = tp.expand_weights(w)
    expected = torch.tensor([1.5] + [-2.0] * 3 + [0.25] * 5, dtype=dtype).expand(4, tp.channels, 9)
    assert expanded.dtype == dtype and torch.equal(expanded, expected)
    # the gradient sums each degree's components: 1, 3 and 5 of them
    (grad,) = torch.autograd.grad(expanded.sum(), w)
    assert torch.equal(grad, torch.tensor([1.0, 3.0, 5.0], dtype=dtype).expand(4, tp.channels, 3))


@pytest.mark.parametrize("degrees", GAUNT_DEGREES)
@pytest.mark.parametrize("weights", ["shared", "degree"])
@pytest.mark.parametrize("kind", GAUNT_KINDS)
def test_gaunt_products_equal_the_gaunt_tensor(kind, weights, degrees):
    tp = build(kind, degrees, weights=weights)
    x, y, w = random_inputs(tp)
    expected = torch.einsum("kij,eci,ej->eck", gaunt_tensor(*degrees), x, y) * tp.expand_weights(w)
    assert relative_error(tp(x, y, w), expected) < 1e-10


@pytest.mark.skipif("gaunt" not in BACKENDS, reason="gaunt backend not present")
@pytest.mark.parametrize("degrees", GAUNT_DEGREES + [(MAX_LMAX,) * 3])
def test_gaunt_matches_grid(degrees):
    gaunt, grid = build("gaunt", degrees, weights="degree"), build("grid", degrees, weights="degree")
    x, y, w = random_inputs(gaunt)
    assert relative_error(gaunt(x, y, w), grid(x, y, w)) < 1e-8


@pytest.mark.skipif("gaunt" not in BACKENDS, reason="gaunt backend not present")
@pytest.mark.parametrize("lmax", range(5))
def test_gaunt_fourier_change_of_basis_is_exact(lmax):
    from tdn.tp.gaunt import fourier_to_sh, sh_to_fourier

    to_fourier = sh_to_fourier(lmax)  # [d, 2L+1, 2L+1]
    # Y_lm has only v = +-m and u = l mod 2: the change of basis is sparse
    for l in range(lmax + 1):
        for m in range(-l, l + 1):
            nonzero = to_fourier[l * l + l + m].abs() > 0
            u, v = nonzero.nonzero().unbind(1)
            assert set((v - lmax).abs().tolist()) == {abs(m)}
            assert all((uu - lmax - l) % 2 == 0 for uu in u.tolist())
    # projecting Y_i's Fourier modes back gives <Y_k Y_i> = delta_ki (component normalisation)
    gram = torch.einsum("kuv,iuv->ki", fourier_to_sh(lmax, lmax), to_fourier)
    assert gram.imag.abs().max() < 1e-14
    assert (gram.real - torch.eye(gram.shape[0])).abs().max() < 1e-13


# ----------------------------------------------------------------------------------- symmetry and gradients


def equivariance_tolerance(tp: tdn.tp.TensorProduct) -> float:
    # cp approximates the coupling tensor, so it is equivariant only up to its fit error
    return max(1e-10, 10 * tp.fit_error) if tp.kind == "cp" else 1e-10


EQUIVARIANCE_CASES = [
    (kind, paths, weights, degrees)
    for kind in KINDS
    for paths, weights in supported(kind)
    for degrees in degrees_for(kind)
]


@pytest.mark.parametrize(("kind", "paths", "weights", "degrees"), EQUIVARIANCE_CASES)
def test_rotation_equivariance(kind, paths, weights, degrees):
    tp = build(kind, degrees, paths=paths, weights=weights)
    x, y, w = random_inputs(tp)
    l_in, l_sh, l_out = degrees
    rotation = random_rotation()
    tol = equivariance_tolerance(tp)
    assert equivariance_error(tp, [x, y, w], [l_in, l_sh, None], l_out, rotation) < tol
    if paths == "o3":  # natural parity: the improper rotation -R too
        assert equivariance_error(tp, [x, y, w], [l_in, l_sh, None], l_out, -rotation) < tol


def test_inversion_check_has_teeth():
    # the odd ("so3"-only) paths of cg are rotation- but not inversion-equivariant in this layout
    tp = build("cg", (1, 1, 1), paths="so3", weights="path")
    x, y, w = random_inputs(tp)
    rotation = random_rotation()
    assert equivariance_error(tp, [x, y, w], [1, 1, None], 1, rotation) < 1e-10
    assert equivariance_error(tp, [x, y, w], [1, 1, None], 1, -rotation) > 1e-2


@pytest.mark.parametrize(
    ("kind", "paths", "weights"), [(kind, p, w) for kind in KINDS for p, w in supported(kind)]
)
def test_gradcheck(kind, paths, weights):
    degrees = degrees_for(kind)[0] if kind == "cp" else (1, 1, 2)
    tp = build(kind, degrees, channels=2, paths=paths, weights=weights)
    inputs = tuple(t.requires_grad_() for t in random_inputs(tp, num_edges=2))
    assert torch.autograd.gradcheck(tp, inputs)
    assert torch.autograd.gradgradcheck(tp, inputs)  # forces in the loss need the second derivative


@pytest.mark.parametrize("kind", KINDS)
def test_float32_matches_float64(kind):
    tp = build(kind, degrees_for(kind)[-1], weights="shared")
    x, y, w = random_inputs(tp)
    expected = tp(x, y, w)
    tp32 = tp.float()
    out = tp32(x.float(), y.float(), w.float())
    assert out.dtype == torch.float32
    assert relative_error(out.double(), expected) < 1e-5


def test_build_returns_the_default_dtype():
    for dtype in (torch.float64, torch.float32):
        torch.set_default_dtype(dtype)  # the float64 fixture restores the default afterwards
        for kind in KINDS:
            tp = build(kind, degrees_for(kind)[0])
            assert {b.dtype for b in tp.buffers() if b.is_floating_point()} <= {dtype}
            assert tp(*random_inputs(tp)).dtype == dtype


@pytest.mark.parametrize("kind", KINDS)
def test_num_weights(kind):
    degrees = degrees_for(kind)[-1]
    for paths, weights in supported(kind):
        tp = build(kind, degrees, paths=paths, weights=weights)
        keys = {inout_key(path) for path in tp.path_list}
        expected = {"shared": 1, "degree": degrees[2] + 1, "inout": len(keys), "path": len(tp.path_list)}[weights]
        assert tp.num_weights == expected
        x, y, w = random_inputs(tp)
        assert tp(x, y, w).shape == (x.shape[0], tp.channels, (degrees[2] + 1) ** 2)


# ------------------------------------------------------------------------------------------------- errors


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"kind must be one of .*'cg'.*, got 'nope'"):
        tdn.tp.build("nope", lmax=1)
    with pytest.raises(ValueError, match=r"kind must be one of .*'cg'.*, got 'nope'"):
        tdn.tp.backend("nope")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["lmax_in", "lmax_sh", "lmax_out"])
@pytest.mark.parametrize("value", [-1, MAX_LMAX + 1, 1.0, "1", True])
def test_bad_lmax(kind, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be an integer in 0\.\.{MAX_LMAX}, got {value!r}"):
        tdn.tp.build(kind, lmax=1, **{name: value})


@pytest.mark.parametrize("kind", KINDS)
def test_bad_lmax_through_lmax(kind):
    with pytest.raises(ValueError, match=rf"lmax_in must be an integer in 0\.\.{MAX_LMAX}, got -1"):
        tdn.tp.build(kind, lmax=-1)
    with pytest.raises(ValueError, match="give lmax or lmax_in"):
        tdn.tp.build(kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels", [0, -2, 2.0, None])
def test_bad_channels(kind, channels):
    with pytest.raises(ValueError, match=rf"channels must be a positive integer, got {channels!r}"):
        tdn.tp.build(kind, lmax=1, channels=channels)


@pytest.mark.parametrize("kind", KINDS)
def test_unsupported_and_unknown_paths(kind):
    cls = BACKENDS[kind]
    for paths in ("o3", "so3"):
        if paths not in cls.supported_paths:
            with pytest.raises(ValueError, match=rf"paths in \('o3',\), got '{paths}'") as info:
                tdn.tp.build(kind, lmax=1, paths=paths)
            assert cls.unsupported_reason and cls.unsupported_reason in str(info.value)  # says why
            if kind in ("grid", "gaunt"):
                assert "l1 + l2 + l3 even" in str(info.value)
    with pytest.raises(ValueError, match=r"paths must be one of \('o3', 'so3'\), got 'se3'"):
        tdn.tp.build(kind, lmax=1, paths="se3")


@pytest.mark.parametrize("kind", KINDS)
def test_unsupported_and_unknown_weights(kind):
    cls = BACKENDS[kind]
    paths = cls.supported_paths[0]
    for weights in WEIGHT_MODES:
        if weights not in cls.supported_weights:
            with pytest.raises(ValueError, match=rf"the '{kind}' backend supports weights in .*, got '{weights}'"):
                tdn.tp.build(kind, lmax=1, paths=paths, weights=weights)
    if kind in ("grid", "gaunt"):
        assert "path" not in cls.supported_weights
    with pytest.raises(ValueError, match=r"weights must be one of \('shared', 'degree', 'inout', 'path'\), got 'edge'"):
        tdn.tp.build(kind, lmax=1, paths=paths, weights="edge")


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_shapes(kind):
    tp = build(kind, degrees_for(kind)[0], channels=2)
    d_in, d_sh, _ = tp.dims
    x, y, w = random_inputs(tp, num_edges=3)
    p = tp.num_weights
    bad_x = [x[:, :1], x[..., :-1], x[0], torch.randn(3, 3, d_in)]  # channels mismatch, wrong D, 2-D, channels
    for bad in bad_x:
        got = re.escape(str(list(bad.shape)))
        with pytest.raises(ValueError, match=rf"x must have shape \[E, 2, {d_in}\], got {got}"):
            tp(bad, y, w)
    for bad in [y[:2], y[:, :-1], y[:, None]]:  # wrong E, wrong D, 3-D
        with pytest.raises(ValueError, match=rf"y must have shape \[3, {d_sh}\], got"):
            tp(x, bad, w)
    for bad in [w[:2], w[:, :1], torch.randn(3, 2, p + 1), w[..., 0]]:  # wrong E, channels, P, 2-D
        with pytest.raises(ValueError, match=rf"w must have shape \[3, 2, {p}\] \(weights='shared'\), got"):
            tp(x, y, bad)


@pytest.mark.parametrize("kind", KINDS)
def test_mismatched_dtypes(kind):
    tp = build(kind, degrees_for(kind)[0], channels=2)
    x, y, w = random_inputs(tp, num_edges=3)
    for args in [(x, y.float(), w), (x, y, w.float()), (x.float(), y, w)]:
        with pytest.raises(TypeError, match=r"x, y, w must share one floating dtype, got"):
            tp(*args)
    with pytest.raises(TypeError, match="floating dtype"):
        tp(x.long(), y.long(), w.long())


def test_loaded_tables_survive_dtype_casts():
    """Factors loaded from a state dict (e.g. fitted elsewhere) are what later casts re-derive, not the built ones."""
    tp = build("cp", (2, 2, 2), weights="shared").float()  # the float64 originals are captured at the first cast
    state = {k: v.double() for k, v in tp.state_dict().items()}
    state["x_factor"] = torch.randn_like(state["x_factor"])
    tp.load_state_dict(state)  # loaded in float32
    for cast in (tp.double, tp.float, tp.double):
        cast()
        assert torch.equal(tp.x_factor, state["x_factor"].to(tp.x_factor.dtype))


@pytest.mark.parametrize("kind", ["cg", "cp", "gaunt", "grid"])
@pytest.mark.parametrize("fused", [None, False])
def test_no_edges(kind, fused):
    """A structure with no pair inside the cutoff (an isolated atom): zero messages, no error, gradients defined."""
    tp = tdn.tp.build(kind, lmax=2, channels=3, weights=tdn.tp.backend(kind).default_weights)
    x = torch.randn(4, 3, 9, requires_grad=True)
    none = torch.zeros(0, dtype=torch.long)
    out = tp.conv(x, torch.zeros(0, 9), torch.zeros(0, 3, tp.num_weights), none, none, fused=fused)
    assert out.shape == (4, 3, 9) and out.abs().max() == 0
    (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True, materialize_grads=True)
    assert grad.abs().max() == 0
    assert tp(torch.zeros(0, 3, 9), torch.zeros(0, 9), torch.zeros(0, 3, tp.num_weights)).shape == (0, 3, 9)
