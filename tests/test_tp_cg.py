"""The cg backend with per-path weights: the batched product and the chunked convolution against the per-path
definition (float64), first-order chunks, any-order per-edge path."""

from __future__ import annotations

import pytest
import torch

import tdn
from tdn.tp import fused

pytestmark = pytest.mark.usefixtures("one_thread")


def case(lmax_in: int, lmax_sh: int, lmax_out: int, paths: str, num_nodes=7, num_edges=300, channels=5):
    torch.manual_seed(lmax_in + 10 * lmax_out)
    tp = tdn.tp.build("cg", lmax_in=lmax_in, lmax_sh=lmax_sh, lmax_out=lmax_out, channels=channels,
                      paths=paths, weights="path").double()  # fmt: skip
    x = torch.randn(num_nodes, channels, (lmax_in + 1) ** 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(num_edges, (lmax_sh + 1) ** 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(num_edges, channels, tp.num_weights, dtype=torch.float64, requires_grad=True)
    sender = torch.randint(0, num_nodes - 1, (num_edges,))  # the last node sends and receives nothing
    receiver = torch.randint(0, num_nodes - 1, (num_edges,))
    return tp, x, y, w, sender, receiver


def reference_conv(tp, x, y, w, sender, receiver):
    messages = tp.reference_product(x[sender], y, w)  # [E, C, d_out]
    return messages.new_zeros(x.shape[0], *messages.shape[1:]).index_add(0, receiver, messages)


DEGREES = [(0, 3, 3, "o3"), (1, 3, 3, "o3"), (2, 2, 2, "so3"), (1, 2, 0, "o3")]


@pytest.mark.parametrize("lmax_in, lmax_sh, lmax_out, paths", DEGREES)
def test_batched_product_equals_the_per_path_loop(lmax_in, lmax_sh, lmax_out, paths):
    tp, x, y, w, sender, _ = case(lmax_in, lmax_sh, lmax_out, paths)
    torch.testing.assert_close(tp(x[sender], y, w), tp.reference_product(x[sender], y, w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lmax_in, lmax_sh, lmax_out, paths", DEGREES)
@pytest.mark.parametrize("fused_option", [None, False])
def test_convolution_values_and_gradients(lmax_in, lmax_sh, lmax_out, paths, fused_option, monkeypatch):
    monkeypatch.setattr(fused, "CHUNK_ENTRIES", 2048)  # many chunks
    tp, x, y, w, sender, receiver = case(lmax_in, lmax_sh, lmax_out, paths)
    got = tp.conv(x, y, w, sender, receiver, fused=fused_option)
    want = reference_conv(tp, x, y, w, sender, receiver)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got[-1].abs().max() == 0
    grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (x, y, w), grad), torch.autograd.grad(want, (x, y, w), grad)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_chunked_convolution_is_first_order_and_the_per_edge_one_is_not():
    tp, x, y, w, sender, receiver = case(1, 2, 2, "o3", num_edges=40)
    (gx,) = torch.autograd.grad(tp.conv(x, y, w, sender, receiver).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        gx.sum().backward()
    # training on forces: the per-edge path has exact second derivatives
    small = (x[:3].detach().requires_grad_(), y[:6].detach().requires_grad_(), w[:6].detach().requires_grad_())
    s, r = sender[:6] % 3, receiver[:6] % 3
    assert torch.autograd.gradgradcheck(lambda a, b, c: tp.conv(a, b, c, s, r, fused=False), small)
