"""The building blocks of tdn.nn: radial basis and envelope, linear maps, interaction, readouts."""

from __future__ import annotations

import pytest
import torch

import tdn.tp
from tdn.nn import (
    BesselBasis,
    ElementEmbedding,
    ElementLinear,
    EquivariantLinear,
    InteractionBlock,
    LinearReadout,
    MLPReadout,
    PolynomialCutoff,
    RadialEmbedding,
    RadialMLP,
    ScaledSiLU,
)
from tdn.o3 import dim, random_rotation, spherical_harmonics, wigner_D

torch.manual_seed(0)

pytestmark = pytest.mark.usefixtures("one_thread")


def rotate(x: torch.Tensor, lmax: int, rotation: torch.Tensor) -> torch.Tensor:
    return x @ wigner_D(lmax, rotation).to(x.dtype).T


# ---------------------------------------------------------------------------------------------- radial
def test_envelope_is_smooth_at_the_cutoff():
    cutoff = 4.0
    envelope = PolynomialCutoff(cutoff, p=5)
    r = torch.tensor([cutoff], dtype=torch.float64, requires_grad=True)
    f = envelope(r)
    (d1,) = torch.autograd.grad(f.sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    assert abs(f.item()) < 1e-12 and abs(d1.item()) < 1e-12 and abs(d2.item()) < 1e-10
    inside = envelope(torch.tensor([0.0, 1.0, 3.999], dtype=torch.float64))
    assert inside[0] == 1.0 and (inside > 0).all()
    assert (envelope(torch.tensor([4.0, 4.5, 10.0], dtype=torch.float64)) == 0).all()


def test_bessel_basis_values():
    basis = BesselBasis(cutoff=5.0, num_basis=4)
    r = torch.tensor([0.7, 2.3], dtype=torch.float64)
    values = basis(r)
    n = torch.arange(1, 5, dtype=torch.float64)
    expected = (2 / 5.0) ** 0.5 * torch.sin(n * torch.pi * r[:, None] / 5.0) / r[:, None]
    assert values.shape == (2, 4) and torch.allclose(values, expected)


def test_radial_mlp_vanishes_at_and_beyond_the_cutoff():
    embedding = RadialEmbedding(cutoff=3.0, num_basis=6)
    mlp = RadialMLP(6, [16, 16], channels=5, num_weights=3).double()
    r = torch.tensor([0.9, 2.0, 3.0, 3.5], dtype=torch.float64)
    weights = mlp(embedding(r))
    assert weights.shape == (4, 5, 3)
    assert weights[:2].abs().min() > 0
    assert (weights[2:] == 0).all()


def test_scaled_silu_has_unit_second_moment():
    z = torch.randn(400_000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert ScaledSiLU()(z).square().mean().item() == pytest.approx(1.0, abs=1e-2)


# ---------------------------------------------------------------------------------------------- linear
@pytest.mark.parametrize(("lmax_in", "lmax_out"), [(2, 2), (1, 3), (3, 1)])
def test_equivariant_linear_is_equivariant_and_degree_separated(lmax_in, lmax_out):
    linear = EquivariantLinear(lmax_in, lmax_out, 5, 3).double()
    x = torch.randn(7, 5, dim(lmax_in), dtype=torch.float64)
    out = linear(x)
    assert out.shape == (7, 3, dim(lmax_out))
    rotation = random_rotation()
    for r in (rotation, -rotation):  # proper rotation and with inversion
        assert torch.allclose(linear(rotate(x, lmax_in, r)), rotate(out, lmax_out, r), atol=1e-12)
    if lmax_out > lmax_in:
        assert (out[:, :, dim(lmax_in) :] == 0).all()
    # degree 1 of the input does not reach degree 0 of the output
    x2 = x.clone()
    x2[:, :, 1:4] += 1.0
    assert torch.equal(linear(x2)[:, :, 0], out[:, :, 0])


def test_element_linear_uses_each_nodes_own_weights():
    linear = ElementLinear(1, 2, 4, 3, num_elements=3).double()
    x = torch.randn(6, 4, dim(1), dtype=torch.float64)
    element = torch.tensor([0, 2, 1, 1, 0, 2])
    out = linear(x, element)
    for k in range(3):
        plain = EquivariantLinear(1, 2, 4, 3).double()
        with torch.no_grad():
            plain.weight.copy_(linear.weight[k])
        assert torch.allclose(out[element == k], plain(x[element == k]))
    rotation = random_rotation()
    assert torch.allclose(linear(rotate(x, 1, rotation), element), rotate(out, 2, rotation), atol=1e-12)


def gathered_element_linear(linear: ElementLinear, x: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
    """The definition: every node's ``[C_in, C_out]`` matrices gathered, ``out[n] = W[z_n, l]^T x[n] / sqrt(C_in)``."""
    blocks = [torch.einsum("ncm,nco->nom", x[:, :, l * l : (l + 1) ** 2], linear.weight[element, l])
              for l in range(linear.num_degrees)]
    out = torch.cat(blocks, dim=2) * linear.channels_in**-0.5
    return torch.cat([out, out.new_zeros(out.shape[0], out.shape[1], dim(linear.lmax_out) - out.shape[2])], dim=2)


def test_element_linear_groups_by_element_same_numbers_less_memory():
    """One matmul per element group: the numbers of the gathered per-node weights, without their memory."""
    from tdn.bench.common import peak_memory

    linear = ElementLinear(1, 1, 64, 64, num_elements=4).double()
    x = torch.randn(2000, 64, dim(1), dtype=torch.float64)
    element = torch.randint(0, 3, (2000,))  # element 3 absent
    expected = gathered_element_linear(linear, x, element)
    torch.testing.assert_close(linear(x, element), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linear.gathered(x, element), expected, rtol=1e-12, atol=1e-12)
    grouped_peak, _ = peak_memory(lambda: linear(x, element), "cpu")
    gathered_peak, _ = peak_memory(lambda: gathered_element_linear(linear, x, element), "cpu")
    assert grouped_peak < 0.5 * gathered_peak, (grouped_peak, gathered_peak)  # N C D vs N C^2 floats
    empty = linear(x[:0], element[:0])
    assert empty.shape == (0, 64, dim(1))


def test_element_linear_compiles_without_graph_breaks():
    """Inside torch.compile the node's matrices are gathered (no host sync): one graph, the same numbers."""
    linear = ElementLinear(1, 1, 4, 4, num_elements=3).double()
    x = torch.randn(10, 4, dim(1), dtype=torch.float64)
    element = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1, 0])
    compiled = torch.compile(linear, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, element), linear(x, element), rtol=1e-12, atol=1e-12)


def test_element_embedding_gives_scalars():
    embedding = ElementEmbedding(3, 6)
    out = embedding(torch.tensor([2, 0, 0]))
    assert out.shape == (3, 6, 1) and torch.equal(out[1], out[2])


# ---------------------------------------------------------------------------------------------- interaction
@pytest.mark.parametrize("kind", ["cg", "cp", "gaunt", "grid"])
@pytest.mark.parametrize("lmax_node", [0, 1])
def test_interaction_is_equivariant(kind, lmax_node):
    if kind not in tdn.tp.BACKENDS:
        pytest.skip(f"tensor-product backend {kind!r} is not importable from tdn.tp yet")
    torch.manual_seed(1)
    weights = {"cg": "path", "cp": "shared"}.get(kind, "degree")
    torch.set_default_dtype(torch.float64)  # the backends build their tables in the default dtype
    try:
        block = InteractionBlock(
            kind, lmax_node, 2, 2, channels=4, num_radial=5, radial_hidden=[8], weights=weights, avg_num_neighbors=2.0
        )
    finally:
        torch.set_default_dtype(torch.float32)
    num_nodes = 5
    pos = torch.randn(num_nodes, 3, dtype=torch.float64) * 1.5
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 0, 2], [1, 0, 3, 2, 0, 4, 1]])
    radial = RadialEmbedding(cutoff=6.0, num_basis=5)
    h = torch.randn(num_nodes, 4, dim(lmax_node), dtype=torch.float64)

    def apply(pos: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        vectors = pos[edge_index[1]] - pos[edge_index[0]]
        return block(h, spherical_harmonics(2, vectors), radial(vectors.norm(dim=-1)), edge_index)

    out = apply(pos, h)
    assert out.shape == (num_nodes, 4, dim(2))
    assert out.abs().max() > 1e-3
    rotation = random_rotation()
    error = (apply(pos @ rotation.T, rotate(h, lmax_node, rotation)) - rotate(out, 2, rotation)).abs().max()
    tolerance = 2e-3 if kind == "cp" else 1e-10  # cp: CP factors of M with relative error <= 1e-4
    assert error <= tolerance * out.abs().max()
    # node 3 only receives from node 2
    h2 = h.clone()
    h2[0] += 1.0
    assert torch.equal(apply(pos, h2)[3], out[3])


def test_interaction_checkpoints_the_radial_mlp_for_many_edges_in_eval():
    """Above ``checkpoint_above`` edges (eval mode) the radial MLP is recomputed in the backward: same values and
    gradients, less memory kept."""
    from tdn.bench.common import peak_memory

    torch.manual_seed(0)
    block = InteractionBlock("cp", 1, 2, 2, channels=4, num_radial=8, radial_hidden=[64, 64, 64]).double().eval()
    num_nodes, num_edges = 40, 2000
    edge_index = torch.stack([torch.randint(0, num_nodes, (num_edges,)), torch.randint(0, num_nodes, (num_edges,))])
    vectors = (torch.randn(num_edges, 3, dtype=torch.float64) * 2).requires_grad_(True)
    h = torch.randn(num_nodes, 4, dim(1), dtype=torch.float64)
    radial = RadialEmbedding(cutoff=6.0, num_basis=8)

    def step():
        out = block(h, spherical_harmonics(2, vectors), radial(vectors.norm(dim=-1)), edge_index)
        return out, torch.autograd.grad(out.square().sum(), vectors)[0]

    plain_peak, _ = peak_memory(step, "cpu")
    plain = step()
    block.checkpoint_above = block.checkpoint_above_cpu = 1000
    block.checkpoint_chunk = 300
    kept_peak, _ = peak_memory(step, "cpu")
    kept = step()
    torch.testing.assert_close(kept[0], plain[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kept[1], plain[1], rtol=1e-12, atol=1e-12)
    assert kept_peak < 0.6 * plain_peak, (kept_peak, plain_peak)



def test_recompute_threshold_follows_the_device():
    block = InteractionBlock("cp", 1, 2, 2, channels=4, num_radial=8, radial_hidden=[8])
    block.checkpoint_above, block.checkpoint_above_cpu = 11, 22
    assert block.recompute_above(torch.zeros(1)) == 22
    assert block.recompute_above(torch.zeros(1, device="meta")) == 11  # any accelerator


# ---------------------------------------------------------------------------------------------- readouts
@pytest.mark.parametrize("readout", [LinearReadout(6), MLPReadout(6, 4)])
def test_readouts_read_only_scalars(readout):
    readout = readout.double()
    h = torch.randn(3, 6, dim(1), dtype=torch.float64)
    out = readout(h)
    assert out.shape == (3,)
    h2 = h.clone()
    h2[:, :, 1:] = torch.randn(3, 6, 3, dtype=torch.float64)
    assert torch.equal(readout(h2), out)
    assert (readout(torch.zeros_like(h)) == 0).all()
