"""The eval-mode convolution of factorised backends as one matrix product per receiver (tdn.nn.receiver_conv)."""

from __future__ import annotations

import pytest
import torch

import tdn.tp
from tdn.nn import InteractionBlock, RadialEmbedding
from tdn.nn import receiver_conv as rc
from tdn.o3 import dim, random_rotation, spherical_harmonics, wigner_D

pytestmark = pytest.mark.usefixtures("one_thread")


def graph(num_nodes: int = 30, num_edges: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Uneven in-degrees, the last two nodes receive nothing."""
    g = torch.Generator().manual_seed(seed)
    receiver = torch.cat([torch.arange(num_edges - 20) % (num_nodes - 2), torch.randint(0, 10, (20,), generator=g)])
    receiver = receiver[torch.randperm(num_edges, generator=g)]
    sender = torch.randint(0, num_nodes, (num_edges,), generator=g)
    return sender, receiver


@pytest.mark.parametrize(("kind", "weights"), [("cp", "shared"), ("cp", "degree"), ("cp", "inout"),
                                               ("grid", "shared"), ("grid", "degree"), ("grid", "inout")])  # fmt: skip
@pytest.mark.parametrize("lmax_in", [0, 1, 2])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_receiver_conv_equals_the_backend_conv(kind, weights, lmax_in, dtype, tol, monkeypatch):
    """Values and first derivatives (x, y, w) of tp.conv's reference, in several chunks of receivers."""
    monkeypatch.setattr(rc, "CHUNK_ENTRIES", 2000)  # a few receivers per chunk
    tp = tdn.tp.build(kind, lmax_in=lmax_in, lmax_sh=2, lmax_out=2, channels=8, weights=weights).to(dtype)
    sender, receiver = graph()
    torch.manual_seed(0)
    x = torch.randn(30, 8, dim(lmax_in), dtype=dtype, requires_grad=True)
    y = torch.randn(200, dim(2), dtype=dtype, requires_grad=True)
    w = torch.randn(200, 8, tp.num_weights, dtype=dtype, requires_grad=True)
    ours = rc.receiver_conv(tp, x, y, w, sender, receiver)
    reference = tp.conv(x, y, w, sender, receiver, fused=False)
    scale = float(reference.abs().max())
    torch.testing.assert_close(ours, reference, rtol=tol, atol=tol * scale)
    assert torch.equal(ours[28:], torch.zeros_like(ours[28:]))  # nodes without edges
    g = torch.randn_like(reference)
    for a, b in zip(torch.autograd.grad(ours, (x, y, w), g), torch.autograd.grad(reference, (x, y, w), g)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


def test_receiver_conv_declines_what_it_does_not_cover():
    """Per-path weights, a hub that would need too much padding, no edges: None, and the caller runs tp.conv."""
    x, y = torch.randn(30, 4, dim(1)), torch.randn(200, dim(2))
    sender, receiver = graph()
    cg = tdn.tp.build("cg", lmax_in=1, lmax_sh=2, lmax_out=2, channels=4, weights="path")
    assert rc.receiver_conv(cg, x, y, torch.randn(200, 4, cg.num_weights), sender, receiver) is None
    cp = tdn.tp.build("cp", lmax_in=1, lmax_sh=2, lmax_out=2, channels=4)
    w = torch.randn(200, 4, 1)
    assert rc.receiver_conv(cp, x, y, w, sender, receiver) is not None
    hub = receiver.clone()
    hub[:150] = 0  # one receiver with 150 edges: 30 x 150 slots for 200 edges
    assert rc.receiver_conv(cp, x, y, w, sender, hub) is None
    empty = torch.zeros(0, dtype=torch.long)
    assert rc.receiver_conv(cp, x, y[:0], w[:0], empty, empty) is None


def test_slot_table_is_built_once_per_neighbour_list(monkeypatch):
    builds = []
    original = rc._build_slots
    monkeypatch.setattr(rc, "_build_slots", lambda *a: builds.append(1) or original(*a))
    cp = tdn.tp.build("cp", lmax_in=1, lmax_sh=2, lmax_out=2, channels=4)
    sender, receiver = graph()
    edge_index = torch.stack([sender, receiver])
    x, y, w = torch.randn(30, 4, dim(1)), torch.randn(200, dim(2)), torch.randn(200, 4, 1)
    for _ in range(3):  # layers and MD steps pass views of the same edge_index
        rc.receiver_conv(cp, x, y, w, edge_index[0], edge_index[1])
    assert len(builds) == 1
    edge_index[1, 0] = 1  # an in-place change (a rebuilt list written into the same tensor): rebuilt
    rc.receiver_conv(cp, x, y, w, edge_index[0], edge_index[1])
    assert len(builds) == 2


@pytest.mark.parametrize(("kind", "weights"), [("cp", "shared"), ("grid", "degree"), ("cg", "path")])
def test_interaction_eval_equals_train_and_stays_equivariant(kind, weights, monkeypatch):
    """The block in eval mode (receiver products where they apply) computes what train mode computes, forces
    included, and is equivariant; train mode never takes the first-order path."""
    torch.manual_seed(1)
    calls = []
    original = rc.receiver_conv
    monkeypatch.setattr("tdn.nn.interaction.receiver_conv", lambda *a: calls.append(1) or original(*a))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        block = InteractionBlock(kind, 1, 2, 2, channels=4, num_radial=5, radial_hidden=[8], weights=weights,
                                 avg_num_neighbors=3.0)  # fmt: skip
    finally:
        torch.set_default_dtype(previous)
    sender, receiver = graph(num_nodes=12, num_edges=60)
    keep = sender != receiver
    edge_index = torch.stack([sender[keep], receiver[keep]])
    radial = RadialEmbedding(cutoff=8.0, num_basis=5)
    pos = (torch.randn(12, 3, dtype=torch.float64) * 2).requires_grad_(True)
    h = torch.randn(12, 4, dim(1), dtype=torch.float64)

    def apply(pos: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        vectors = pos[edge_index[1]] - pos[edge_index[0]]
        return block(h, spherical_harmonics(2, vectors), radial(vectors.norm(dim=-1)), edge_index)

    out = {}
    for mode in (True, False):
        block.train(mode)
        calls.clear()
        value = apply(pos, h)
        out[mode] = value, torch.autograd.grad(value.square().sum(), pos)[0]
        assert bool(calls) is not mode  # consulted in eval mode only
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))
    rotation = random_rotation()
    rotated = apply(pos @ rotation.T, h @ wigner_D(1, rotation).T)
    error = (rotated - out[False][0] @ wigner_D(2, rotation).T).abs().max()
    assert error <= (2e-3 if kind == "cp" else 1e-10) * out[False][0].abs().max()


def test_receiver_conv_is_first_order():
    """Asked for a graph of its derivatives (create_graph) the eval-mode path raises, naming train mode."""
    cp = tdn.tp.build("cp", lmax_in=1, lmax_sh=2, lmax_out=2, channels=4)
    sender, receiver = graph()
    x = torch.randn(30, 4, dim(1), requires_grad=True)
    out = rc.receiver_conv(cp, x, torch.randn(200, dim(2)), torch.randn(200, 4, 1), sender, receiver)
    with pytest.raises(RuntimeError, match="first order.*model.train"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
