"""tdn.contractions: the generalised CG basis, the registry of contractions and the symmetric CP factors."""

from __future__ import annotations

import itertools

import pytest
import torch

import tdn.contractions
from tdn.contractions import CONTRACTIONS, build, contraction, coupling_basis, factors, symmetric_cp
from tdn.nn.product import ProductBasis
from tdn.o3 import degree_slice, dim, path_blocks, random_rotation, wigner_D

KINDS = ("cg", "cp", "gaunt", "grid")


@pytest.fixture(autouse=True)
def float64_one_thread(tmp_path, monkeypatch):
    """float64 throughout; CP fits not shipped with the package are cached in a temporary directory."""
    monkeypatch.setenv("TDN_CACHE_DIR", str(tmp_path / "cache"))
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    factors.clear_memory()
    yield
    factors.clear_memory()
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


def rotate(u: torch.Tensor, d_in: torch.Tensor, d_out: torch.Tensor) -> torch.Tensor:
    """``U(D^T ., ..., D^T .)`` mapped back by ``D_L``: equals ``u`` for an equivariant ``u [eta, 2L+1, D, ...]``."""
    nu = u.dim() - 2
    out = torch.einsum("mn,en...->em...", d_out.T, u)
    for slot in range(nu):
        out = torch.movedim(torch.tensordot(out, d_in, dims=([2 + slot], [0])), -1, 2 + slot)
    return out


# ----------------------------------------------------------------------------------------------- the U basis


@pytest.mark.parametrize("paths", ["o3", "so3"])
@pytest.mark.parametrize("nu,lmax_in", [(1, 2), (2, 2), (3, 2), (4, 1)])
def test_basis_orthonormal_symmetric_equivariant(nu, lmax_in, paths):
    rotation = random_rotation()
    d_in = wigner_D(lmax_in, -rotation if paths == "o3" else rotation)  # inversion too for natural parity
    for L in range(3):
        u = coupling_basis(nu, lmax_in, L, paths)  # [eta, 2L+1, D, ..., D]
        flat = u.reshape(u.shape[0], -1)
        assert torch.allclose(flat @ flat.T, torch.eye(u.shape[0]), atol=1e-12)
        for perm in itertools.permutations(range(nu)):
            assert torch.allclose(u.permute(0, 1, *(2 + p for p in perm)), u, atol=1e-13)
        d_out = wigner_D(L, -rotation if paths == "o3" else rotation)[degree_slice(L), degree_slice(L)]
        assert torch.allclose(rotate(u, d_in, d_out), u, atol=1e-12)


def test_basis_sizes():
    # lmax_in = 3 -> lmax_out = 1 (MACE-medium): eta per (nu, L)
    sizes = {(nu, L): coupling_basis(nu, 3, L, "o3").shape[0] for nu in (1, 2, 3) for L in (0, 1)}
    assert sizes == {(1, 0): 1, (1, 1): 1, (2, 0): 4, (2, 1): 3, (3, 0): 8, (3, 1): 12}
    assert [coupling_basis(3, 3, L, "so3").shape[0] for L in (0, 1)] == [8, 16]


@pytest.mark.parametrize("paths", ["o3", "so3"])
def test_nu2_basis_spans_the_symmetrised_cg_paths(paths):
    """Brute force for nu = 2: every CG coupling A ⊗ A -> L (tdn.o3 path blocks), symmetrised, lies in the span of
    U^{2,L}, and together they span it."""
    lmax_in, lmax_out = 3, 2
    d = dim(lmax_in)
    for L in range(lmax_out + 1):
        u = coupling_basis(2, lmax_in, L, paths).reshape(-1, (2 * L + 1) * d * d)
        couplings = []
        for (l1, l2, l3), block in path_blocks(lmax_in, lmax_in, lmax_out, paths):
            if l3 != L:
                continue
            t = torch.zeros(2 * L + 1, d, d)
            t[:, degree_slice(l1), degree_slice(l2)] = block
            couplings.append((t + t.transpose(1, 2)).reshape(-1))
        c = torch.stack(couplings)
        residual = c - (c @ u.T) @ u
        assert residual.abs().max() < 1e-12
        assert torch.linalg.matrix_rank(c, atol=1e-10) == u.shape[0]


# ----------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    ("kind", "module", "name"),
    [("cg", "cg", "CGContraction"), ("cp", "cp", "CPContraction"), ("gaunt", "sphere", "SpherePowerContraction"),
     ("grid", "sphere", "SpherePowerContraction")],
)
def test_build_returns_the_contraction_of_each_kind(kind, module, name):
    built = build(kind, 1, 1, 3)
    assert (type(built).__module__, type(built).__name__) == (f"tdn.contractions.{module}", name)
    assert built.kind == kind and contraction(kind) is type(built)
    assert {nu for nu, _, _ in built.weight_keys} == {2, 3}


def test_registry_covers_every_tensor_product_kind_with_the_same_path_sets():
    """The model uses one kind for its convolution and its product basis: both registries know it, and the two
    parts support the same path sets."""
    assert set(CONTRACTIONS) == set(tdn.tp.BACKENDS) == set(KINDS)
    for kind in KINDS:
        assert contraction(kind).supported_paths == tdn.tp.backend(kind).supported_paths, kind


def test_product_basis_builds_through_the_registry(monkeypatch):
    built = []

    class Recording(tdn.contractions.CGContraction):
        def __init__(self, *args, **kwargs):
            built.append(kwargs["kind"])
            super().__init__(*args, **kwargs)

    monkeypatch.setitem(CONTRACTIONS, "cg", Recording)
    module = ProductBasis("cg", 1, 1, 2, 2, 3)
    assert built == ["cg"] and type(module.contraction) is Recording


def test_unknown_kind():
    for make in (lambda: build("xx", 1, 1, 2), lambda: ProductBasis("xx", 1, 1, 2, 2, 1)):
        with pytest.raises(ValueError, match=r"kind must be one of \('cg', 'cp', 'gaunt', 'grid'\), got 'xx'"):
            make()


@pytest.mark.parametrize("kind", ["gaunt", "grid"])
def test_unsupported_paths_name_the_kind_and_say_why(kind):
    message = rf"the '{kind}' product basis supports paths in \('o3',\), got 'so3': a Gaunt product .* l1 \+ l2"
    with pytest.raises(ValueError, match=message):
        build(kind, 1, 1, 2, paths="so3")
    with pytest.raises(ValueError, match=message):
        ProductBasis(kind, 1, 1, 2, 2, 1, paths="so3")
    with pytest.raises(ValueError, match=rf"the '{kind}' backend supports paths in \('o3',\), got 'so3': a Gaunt"):
        tdn.tp.build(kind, lmax=1, paths="so3")  # the same check, the same words, for the tensor product


def test_unknown_options_and_dense_limits():
    with pytest.raises(ValueError, match=r"unknown options for the 'grid' product basis: \['tol'\] \(allowed: none\)"):
        build("grid", 1, 1, 2, tol=1e-3)
    with pytest.raises(ValueError, match=r"unknown options for the 'cp' product basis: \['ranks'\] \(allowed: "):
        build("cp", 1, 1, 2, ranks=3)
    with pytest.raises(ValueError, match=r"'cp' product basis supports lmax_in <= 2 at correlation 4"):
        build("cp", 3, 1, 4)
    assert build("grid", 3, 1, 4).correlation == 4  # the sphere powers have no dense tensor
    with pytest.raises(ValueError, match=r"lmax_out must be an integer in 0\.\.1"):
        build("cg", 1, 2, 2)


def test_correlation_one_is_an_empty_contraction():
    for kind in KINDS:
        assert build(kind, 2, 1, 1).weight_keys == []


# ----------------------------------------------------------------------------------------------- symmetric CP


def test_cp_rank_option_and_disk_cache(tmp_path):
    found = symmetric_cp(2, 1, 1, "o3", rank=6)
    assert found.rank == 6 and found.source == "fitted"
    assert (tmp_path / "cache" / "product_cp" / factors.factor_name(2, 1, 1, "o3", rank=6)).is_file()
    module = ProductBasis("cp", 1, 1, 2, 2, 1, rank={2: 6})
    assert module.ranks == {2: 6} and module.fit_errors[2] == pytest.approx(found.error)
    factors.clear_memory()
    again = symmetric_cp(2, 1, 1, "o3", rank=6)
    assert again.source == "cache" and torch.equal(again.directions, found.directions)


def test_cp_shipped_factors_for_mace_medium():
    for nu in (2, 3):
        found = symmetric_cp(nu, 3, 1, "o3")
        assert found.source == "package"
        assert found.error <= 1e-4


def test_every_shipped_combination_is_in_the_package():
    names = {path.name for path in factors.PACKAGE_DIR.glob("*.npz")}
    expected = {factors.factor_name(nu, l_in, l_out, paths) for nu, l_in, l_out, paths in factors.SHIPPED_COMBOS}
    assert names == expected
