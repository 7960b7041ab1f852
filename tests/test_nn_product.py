"""The product basis (MACE's symmetric contraction) for every backend, in float64."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from tdn.contractions import coupling_basis
from tdn.nn.product import ProductBasis
from tdn.o3 import degree_slice, dim, equivariance_error, gaunt_tensor, random_rotation


@pytest.fixture(autouse=True)
def float64_one_thread(tmp_path, monkeypatch):
    """float64 throughout; CP fits not shipped with the package are cached in a temporary directory. One thread:
    the tensors here are tiny, and on a shared CPU thread synchronisation costs more than the arithmetic."""
    monkeypatch.setenv("TDN_CACHE_DIR", str(tmp_path / "cache"))
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


def apply_basis(u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Brute force ``U_eta(a, ..., a)``: ``u [eta, 2L+1, D, ..., D]``, ``a [N, C, D]`` -> ``[N, C, eta, 2L+1]``."""
    x = u.unsqueeze(0).unsqueeze(0).expand(*a.shape[:2], *u.shape)
    for _ in range(u.dim() - 2):
        x = torch.einsum("ncem...d,ncd->ncem...", x, a)
    return x


def brute_force(module: ProductBasis, a: torch.Tensor, element_index: torch.Tensor) -> torch.Tensor:
    """The product basis written out term by term from the ``U`` tensors (the definition)."""
    weight = (module.weight * module.weight_scale)[element_index]  # [N, C, P]
    out = a.new_zeros(a.shape[0], a.shape[1], dim(module.lmax_out))
    for p, (nu, L, eta) in enumerate(module.weight_keys):
        if nu == 1:
            term = a[:, :, degree_slice(L)]
        else:
            term = apply_basis(coupling_basis(nu, module.lmax_in, L, module.paths)[eta : eta + 1], a)[:, :, 0]
        out[:, :, degree_slice(L)] += weight[:, :, p : p + 1] * term
    return out


# ----------------------------------------------------------------------------------------------- cg


@pytest.mark.parametrize("paths", ["o3", "so3"])
@pytest.mark.parametrize("correlation,lmax_in,lmax_out", [(1, 2, 2), (2, 2, 1), (3, 2, 1), (3, 3, 1), (4, 1, 1)])
def test_cg_equivariant(correlation, lmax_in, lmax_out, paths):
    module = ProductBasis("cg", lmax_in, lmax_out, 3, correlation, 2, paths=paths)
    a, z = torch.randn(5, 3, dim(lmax_in)), torch.tensor([0, 1, 1, 0, 1])
    rotation = random_rotation()
    assert equivariance_error(lambda x: module(x, z), [a], [lmax_in], lmax_out, rotation) < 1e-12
    if paths == "o3":
        assert equivariance_error(lambda x: module(x, z), [a], [lmax_in], lmax_out, -rotation) < 1e-12


@pytest.mark.parametrize("correlation,lmax_in,lmax_out,paths", [(3, 2, 1, "o3"), (4, 1, 1, "so3"), (2, 3, 2, "o3")])
def test_cg_matches_brute_force(correlation, lmax_in, lmax_out, paths):
    module = ProductBasis("cg", lmax_in, lmax_out, 2, correlation, 3, paths=paths)
    a, z = torch.randn(6, 2, dim(lmax_in)), torch.tensor([2, 0, 1, 2, 2, 0])
    torch.testing.assert_close(module(a, z), brute_force(module, a, z), rtol=1e-11, atol=1e-11)


def test_unit_variance_at_init():
    a, z = torch.randn(400, 64, dim(2)), torch.randint(0, 2, (400,))
    for kind in ("cg", "grid"):
        out = ProductBasis(kind, 2, 1, 64, 3, 2)(a, z)
        for L in range(2):
            assert 0.7 < out[:, :, degree_slice(L)].var().item() < 1.4, (kind, L)


# ----------------------------------------------------------------------------------------------- cp


@pytest.mark.parametrize("correlation,lmax_in,lmax_out,paths", [(3, 2, 1, "o3"), (4, 1, 1, "o3"), (3, 1, 1, "so3")])
def test_cp_matches_cg_with_same_weights(correlation, lmax_in, lmax_out, paths):
    cg = ProductBasis("cg", lmax_in, lmax_out, 4, correlation, 2, paths=paths)
    cp = ProductBasis("cp", lmax_in, lmax_out, 4, correlation, 2, paths=paths)
    assert cp.weight_keys == cg.weight_keys
    torch.testing.assert_close(cp.weight_scale, cg.weight_scale)
    cp.weight.data.copy_(cg.weight.data)
    assert set(cp.fit_errors) == set(range(2, correlation + 1))
    assert all(0 <= err <= 1e-4 for err in cp.fit_errors.values())
    a, z = torch.randn(50, 4, dim(lmax_in)), torch.randint(0, 2, (50,))
    expected = cg(a, z)
    # U^nu is approximated to relative error <= 1e-4, so the output to about that times its scale
    assert (cp(a, z) - expected).abs().max() < 2e-3 * expected.abs().max()
    assert equivariance_error(lambda x: cp(x, z), [a], [lmax_in], lmax_out) < 2e-3


# ----------------------------------------------------------------------------------------------- gaunt / grid


def test_gaunt_equals_grid():
    grid = ProductBasis("grid", 2, 2, 3, 4, 2)
    gaunt = ProductBasis("gaunt", 2, 2, 3, 4, 2)
    gaunt.load_state_dict(grid.state_dict())
    a, z = torch.randn(7, 3, dim(2)), torch.randint(0, 2, (7,))
    torch.testing.assert_close(gaunt(a, z), grid(a, z), rtol=0, atol=0)


def test_grid_matches_gaunt_tensor_powers():
    """(f^2)_k = G[k] : A A and (f^3)_k = G[k] : (f^2) A with the Gaunt tensors of tdn.o3 (band limit kept)."""
    lmax_in, lmax_out = 2, 2
    module = ProductBasis("grid", lmax_in, lmax_out, 3, 3, 2)
    a, z = torch.randn(5, 3, dim(lmax_in)), torch.tensor([0, 1, 1, 0, 0])
    square = torch.einsum("kij,nci,ncj->nck", gaunt_tensor(lmax_in, lmax_in, 2 * lmax_in), a, a)  # f^2, all degrees
    powers = {
        2: torch.einsum("kij,nci,ncj->nck", gaunt_tensor(lmax_in, lmax_in, lmax_out), a, a),
        3: torch.einsum("kij,nci,ncj->nck", gaunt_tensor(2 * lmax_in, lmax_in, lmax_out), square, a),
    }
    weight = (module.weight * module.weight_scale)[z]  # [N, C, P]
    expected = torch.zeros(5, 3, dim(lmax_out))
    for p, (nu, L, _) in enumerate(module.weight_keys):
        term = a[:, :, degree_slice(L)] if nu == 1 else powers[nu][:, :, degree_slice(L)]
        expected[:, :, degree_slice(L)] += weight[:, :, p : p + 1] * term
    torch.testing.assert_close(module(a, z), expected, rtol=1e-12, atol=1e-12)
    assert equivariance_error(lambda x: module(x, z), [a], [lmax_in], lmax_out, -random_rotation()) < 1e-12


# ----------------------------------------------------------------------------------------------- all backends


@pytest.mark.parametrize("kind", ["cg", "cp", "grid"])
def test_element_dependence(kind):
    module = ProductBasis(kind, 1, 1, 2, 3, 2)
    a = torch.randn(1, 2, dim(1)).expand(2, 2, dim(1))  # the same features on two nodes
    z = torch.tensor([0, 1])
    out = module(a, z)
    assert (out[0] - out[1]).abs().max() > 1e-3  # different elements, different outputs
    before = module(a[:1], z[:1])
    with torch.no_grad():
        module.weight[1] += 1.0  # element 1's weights do not reach element 0's node
    torch.testing.assert_close(module(a, z)[0], before[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["cg", "cp", "grid"])
def test_gradcheck(kind):
    module = ProductBasis(kind, 1, 1, 2, 3, 2)
    a = torch.randn(3, 2, dim(1), requires_grad=True)
    z = torch.tensor([1, 0, 1])
    weight = module.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: functional_call(module, {"weight": w}, (x, z)), (a, weight))
    assert torch.autograd.gradgradcheck(lambda x: module(x, z), (a,))


@pytest.mark.parametrize("kind", ["cg", "cp", "grid"])
def test_autocast_runs_the_basis_in_module_precision(kind):
    """Under bf16 autocast the basis takes bf16 features and computes in the module's dtype, not in bf16."""
    module = ProductBasis(kind, 1, 1, 4, 3, 2).float()
    a = torch.randn(5, 4, dim(1), dtype=torch.float32)
    z = torch.tensor([0, 1, 1, 0, 1])
    a16 = a.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(a16, z)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, module(a16.float(), z), rtol=1e-6, atol=1e-6)


def test_empty_batch_and_missing_elements():
    for kind in ("cg", "cp", "grid"):
        module = ProductBasis(kind, 1, 1, 2, 2, 5)
        assert module(torch.zeros(0, 2, 4), torch.zeros(0, dtype=torch.long)).shape == (0, 2, 4)
        assert module(torch.randn(3, 2, 4), torch.full((3,), 4)).shape == (3, 2, 4)


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (("xx", 2, 1, 4, 3, 2), {}, "kind must be one of"),
        (("cg", 2, 1, 4, 0, 2), {}, "correlation must be an integer in 1..4"),
        (("cg", 2, 1, 4, 5, 2), {}, "correlation must be an integer in 1..4"),
        (("cg", -1, 0, 4, 2, 2), {}, "lmax_in must be an integer"),
        (("grid", 99, 1, 4, 2, 2), {}, "lmax_in must be an integer"),
        (("cg", 1, 2, 4, 2, 2), {}, "lmax_out must be an integer in 0..1"),
        (("cg", 3, 1, 4, 4, 2), {}, "lmax_in <= 2 at correlation 4"),
        (("cg", 2, 1, 4, 2, 0), {}, "num_elements must be"),
        (("cg", 2, 1, 0, 2, 2), {}, "channels must be"),
        (("cg", 2, 1, 4, 2, 2), {"paths": "o2"}, "paths must be one of"),
        (("gaunt", 2, 1, 4, 2, 2), {"paths": "so3"}, r"'gaunt' product basis supports paths in \('o3',\), got 'so3'.*"
                                                    r"l1 \+ l2 \+ l3 even"),
        (("grid", 2, 1, 4, 2, 2), {"paths": "so3"}, r"'grid' product basis supports paths in \('o3',\)"),
        (("cg", 2, 1, 4, 2, 2), {"rank": 3}, r"unknown options for the 'cg' product basis: \['rank'\]"),
        (("cp", 2, 1, 4, 2, 2), {"tol": 0}, "tol must be"),
    ],
)
def test_constructor_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProductBasis(*args, **kwargs)


def test_forward_errors():
    module = ProductBasis("cg", 1, 1, 2, 2, 3)
    a = torch.randn(4, 2, 4)
    with pytest.raises(ValueError, match=r"element index 7 \(at row 2\) is out of range.*num_elements=3"):
        module(a, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match=r"element index -1 \(at row 0\)"):
        module(a, torch.tensor([-1, 1, 0, 2]))
    index = torch.tensor([0, 1, 2, 2])
    module(a, index)  # checked once per index tensor ...
    index[3] = 5  # ... and again after an in-place change
    with pytest.raises(ValueError, match=r"element index 5 \(at row 3\)"):
        module(a, index)
    with pytest.raises(ValueError, match=r"A must have shape \[N, 2, 4\]"):
        module(torch.randn(4, 2, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"A must have shape"):
        module(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"element_index must have shape \[4\]"):
        module(a, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="long tensor"):
        module(a, torch.zeros(4))
    with pytest.raises(TypeError, match="dtype"):
        module(a.float(), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("kind", ["cg", "grid"])
def test_checkpointed_chunks_give_the_same_values_gradients_and_less_memory(kind):
    """Large systems in eval mode run the basis in recomputed chunks: same numbers, bounded memory."""
    from tdn.bench.common import peak_memory

    module = ProductBasis(kind, 2, 1, 4, 3, 2).eval()
    a = torch.randn(300, 4, dim(2), requires_grad=True)
    z = torch.randint(0, 2, (300,))

    def step():
        out = module(a, z)
        return out, torch.autograd.grad(out.square().sum(), (a, module.weight))

    plain_peak, _ = peak_memory(step, "cpu")
    plain = step()
    module.checkpoint_above, module.checkpoint_chunk = 100, 64  # 300 nodes: 5 chunks
    chunked_peak, _ = peak_memory(step, "cpu")
    chunked = step()
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-12, atol=1e-12)
    for g_chunked, g_plain in zip(chunked[1], plain[1]):
        torch.testing.assert_close(g_chunked, g_plain, rtol=1e-12, atol=1e-12)
    assert chunked_peak < 0.7 * plain_peak, (chunked_peak, plain_peak)
    assert type(module(a, z).grad_fn).__name__ == "CatBackward0"  # the chunks, concatenated
    module.train()  # training differentiates twice: never checkpointed
    assert type(module(a, z).grad_fn).__name__ != "CatBackward0"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("lmax_in", "lmax_out", "correlation"), [(2, 1, 3), (3, 0, 3), (1, 1, 2), (2, 2, 4)])
def test_cp_eval_tiles_equal_autograd_with_bounded_memory(lmax_in, lmax_out, correlation, dtype):
    """In eval mode the cp contraction runs in cache-sized tiles with a hand-written backward
    (tdn.contractions.chunked): the numbers and gradients of the autograd path (training), far less memory, and no
    checkpointing on top; three elements with one absent, several tiles."""
    from tdn.bench.common import peak_memory
    from tdn.contractions import chunked

    module = ProductBasis("cp", lmax_in, lmax_out, 16, correlation, 3).to(dtype)
    a = torch.randn(300, 16, dim(lmax_in), dtype=dtype, requires_grad=True)
    z = torch.randint(0, 2, (300,))  # element 2 absent

    def step():
        out = module(a, z)
        return out, torch.autograd.grad(out.square().sum(), (a, module.weight))

    module.train()
    whole_peak, _ = peak_memory(step, "cpu")
    whole = step()
    module.eval()
    tile = chunked.CHUNK_ENTRIES
    chunked.CHUNK_ENTRIES = 16 * 64 * sum(module.ranks.values())  # 64-row tiles: several per element
    try:
        tiled_peak, _ = peak_memory(step, "cpu")
        tiled = step()
    finally:
        chunked.CHUNK_ENTRIES = tile
    # float32: relative to the largest entry; the CP sums of nu-th powers cancel (both paths are ~1e-3 off float64)
    tol = 1e-11 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(tiled[0], whole[0], rtol=tol, atol=tol * float(whole[0].abs().max()))
    for g_tiled, g_whole in zip(tiled[1], whole[1]):
        torch.testing.assert_close(g_tiled, g_whole, rtol=tol, atol=tol * float(g_whole.abs().max()))
    if sum(module.ranks.values()) > 4 * dim(lmax_in):  # intermediates [N, C, R] dominate the whole path's memory
        assert tiled_peak < 0.5 * whole_peak, (tiled_peak, whole_peak)
    module.checkpoint_above, module.checkpoint_chunk = 100, 64
    assert type(module(a, z).grad_fn).__name__ != "CatBackward0"  # no checkpointed chunks: nothing to bound
    with torch.no_grad():
        torch.testing.assert_close(module(a, z), whole[0], rtol=tol, atol=tol * float(whole[0].abs().max()))


def test_cp_eval_tiles_are_first_order():
    """The tiled backward is first order: asked for a graph of the derivatives (create_graph) it raises instead of
    returning derivatives whose own derivatives would silently miss terms; train mode differentiates twice."""
    module = ProductBasis("cp", 2, 1, 4, 3, 1).eval()
    a = torch.randn(10, 4, dim(2), requires_grad=True)
    z = torch.zeros(10, dtype=torch.long)
    with pytest.raises(RuntimeError, match="first order.*model.train"):
        torch.autograd.grad(module(a, z).sum(), a, create_graph=True)
    (g,) = torch.autograd.grad(module.train()(a, z).sum(), a, create_graph=True)
    torch.autograd.grad(g.sum(), a)


# ----------------------------------------------------------------------------------------------- model numbers

# Energies of two structures (a methanol molecule, an 8-atom cell of four elements) and a projection of the forces,
# recorded for small float64 models of every kind at correlation 2 and 3 (self-connections in every layer). They pin
# what the product basis, the contractions and the self-connection compute: moving code between modules must not
# change them; a deliberate change of the math updates them.
PINNED = {
    ("cg", 2): (-14.213453805186989, -25.090274002815345, -0.8322981911636165),
    ("cg", 3): (-5.375737745676425, -30.11988835841067, 1.2699851885566944),
    ("cp", 2): (-34.94013150836083, -35.53369053954396, 0.592902365816412),
    ("cp", 3): (-7.787029137917898, -18.391021834870195, 0.4338204446924028),
    ("gaunt", 2): (-14.14901326239748, -19.40980332199382, -0.5181632042395556),
    ("gaunt", 3): (-8.749946502617222, -31.717605062896858, -0.4186803743429177),
    ("grid", 2): (-14.14901326239748, -19.40980332199382, -0.5181632042395563),
    ("grid", 3): (-8.749946502617222, -31.717605062896858, -0.4186803743429188),
}


@pytest.mark.parametrize(("kind", "correlation"), sorted(PINNED))
def test_model_numbers_are_pinned(kind, correlation):
    from ase.build import bulk, molecule
    from helpers import ase_graph, small_model
    from torch_geometric.data import Batch

    mol = molecule("CH3OH")
    mol.rattle(0.05, seed=1)
    cell = bulk("Cu", "fcc", a=3.7) * (2, 2, 2)
    cell.numbers[[1, 2, 5]] = [8, 6, 1]
    cell.rattle(0.08, seed=3)
    pinned_weights = {"cp": {"tp_weights": "shared"}}.get(kind, {})  # the pinned cp model
    model = small_model(0, tp=kind, correlation=correlation, cutoff=3.0, elements=[1, 6, 8, 29],
                        atomic_energies=[-1.0, -2.0, -3.0, -4.0], residual_first=True, avg_num_neighbors=4.0,
                        **pinned_weights)
    out = model(Batch.from_data_list([ase_graph(mol, 3.0), ase_graph(cell, 3.0)]))
    forces = out["forces"]
    projection = (forces * torch.cos(torch.arange(forces.numel(), dtype=torch.float64)).view_as(forces)).sum()
    got = [*out["energy"].tolist(), float(projection)]
    assert got == pytest.approx(list(PINNED[(kind, correlation)]), rel=1e-9, abs=1e-9)
