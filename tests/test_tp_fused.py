"""The fused Triton convolution against its PyTorch reference, on the CPU through Triton's interpreter.

Triton decides at import time whether kernels are interpreted, so the checks run in a subprocess with
TRITON_INTERPRET=1 set before tdn is imported.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import torch
    import tdn
    from tdn.tp.fused import edge_conv, edge_conv_reference

    torch.manual_seed(0)
    # sizes that exercise masking: C and R not powers of two, a node with no edges, repeated edges
    num_nodes, num_edges, channels, rank = 7, 40, 5, 37
    xb = torch.randn(num_nodes, channels, rank, requires_grad=True)
    yc = torch.randn(num_edges, rank, requires_grad=True)
    w = torch.randn(num_edges, channels, requires_grad=True)
    sender = torch.randint(0, num_nodes - 1, (num_edges,))
    receiver = torch.randint(0, num_nodes - 1, (num_edges,))
    fused = edge_conv(xb, yc, w, sender, receiver, num_nodes, fused=True)
    ref = edge_conv_reference(xb, yc, w, sender, receiver, num_nodes)
    assert fused.shape == ref.shape
    scale = ref.abs().max()
    assert (fused - ref).abs().max() <= 1e-5 * scale, (fused - ref).abs().max()
    assert fused[-1].abs().max() == 0  # the node without edges
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fused, (xb, yc, w), grad), torch.autograd.grad(ref, (xb, yc, w), grad)):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max()

    # the whole factorised convolution of a backend, fused vs reference (float32, 1e-5 relative)
    tp = tdn.tp.build("grid", lmax=2, channels=channels)
    x = torch.randn(num_nodes, channels, 9)
    y = torch.randn(num_edges, 9)
    wt = torch.randn(num_edges, channels, 1)
    a = tp.conv(x, y, wt, sender, receiver, fused=True)
    b = tp.conv(x, y, wt, sender, receiver, fused=False)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()

    # one weight per output degree (per degree pair): one fused reduction per weight vs the per-edge product,
    # values and gradients
    for kind, weights in (("cp", "degree"), ("grid", "degree"), ("cp", "inout"), ("grid", "inout")):
        tp = tdn.tp.build(kind, lmax=2, channels=channels, weights=weights)
        x = torch.randn(num_nodes, channels, 9, requires_grad=True)
        wd = torch.randn(num_edges, channels, tp.num_weights, requires_grad=True)
        a = tp.conv(x, y, wd, sender, receiver, fused=True)
        b = tp.conv(x, y, wd, sender, receiver, fused=False)
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (kind, weights, (a - b).abs().max())
        g = torch.randn_like(b)
        for ga, gb in zip(torch.autograd.grad(a, (x, wd), g), torch.autograd.grad(b, (x, wd), g)):
            assert (ga - gb).abs().max() <= 1e-5 * gb.abs().max(), (kind, weights, (ga - gb).abs().max())
    # the kernel is first order: differentiating its backward again raises (force training uses the reference)
    out = edge_conv(xb, yc, w, sender, receiver, num_nodes, fused=True)
    (gx,) = torch.autograd.grad((out ** 2).sum(), xb, create_graph=True)
    try:
        gx.sum().backward()
    except RuntimeError as err:
        assert "once_differentiable" in str(err) or "differentiate twice" in str(err), err
    else:
        raise AssertionError("second derivative through the fused kernel did not raise")

    # a model in training mode (force loss: double backward) runs the reference, in eval mode the kernel
    from tdn.models import build_model
    model = build_model(tp="cp", elements=[1, 8], channels=4, lmax=2, lmax_hidden=1, num_layers=1, correlation=2,
                        radial_mlp=[8], readout_mlp=4, cutoff=3.0, dtype="float32")
    from torch_geometric.data import Data
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    graph = Data(pos=pos, atomic_numbers=torch.tensor([8, 1, 1]), edge_index=torch.tensor([[0, 0, 1, 1, 2, 2],
                 [1, 2, 0, 2, 0, 1]]), unit_shifts=torch.zeros(6, 3), cell=torch.zeros(1, 3, 3))
    model.train()
    out = model(graph)
    (out["forces"] ** 2).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    evaluated = model(graph)["forces"]
    assert (evaluated - out["forces"].detach()).abs().max() <= 1e-5 * out["forces"].abs().max()
    print("fused ok")
    """
)


def test_fused_edge_conv_matches_reference_on_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fused ok" in result.stdout


FAULTS_SCRIPT = textwrap.dedent(
    r"""
import torch
from tdn.tp import fused
from tdn.tp.fused import edge_conv, edge_conv_reference

torch.manual_seed(0)


def graph(num_nodes, num_edges, hub_edges=0):
    pairs = torch.randint(0, num_nodes - 1, (num_edges, 2))  # the last node receives nothing
    if hub_edges:  # one node with thousands of incoming edges
        hub = torch.stack([torch.randint(0, num_nodes - 1, (hub_edges,)), torch.zeros(hub_edges, dtype=torch.long)], 1)
        pairs = torch.cat([pairs, hub])
    return pairs.T  # [2, E] with strided rows, as `pairs.T` arrives from a neighbour list


def check(dtype, tol, num_nodes=6, num_edges=30, channels=5, rank=19, hub_edges=0, grad_dtype=None):
    edge_index = graph(num_nodes, num_edges, hub_edges)
    assert not edge_index[0].is_contiguous()
    sender, receiver = edge_index[0], edge_index[1]
    num_edges = sender.shape[0]
    xb = torch.randn(num_nodes, channels, rank, dtype=torch.float64).to(dtype).requires_grad_()
    yc = torch.randn(num_edges, rank, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(num_edges, channels, dtype=torch.float64).to(dtype).requires_grad_()
    out = edge_conv(xb, yc, w, sender, receiver, num_nodes, fused=True)
    assert out.dtype == dtype and out.shape == (num_nodes, channels, rank)
    # the reference in float64 on the same (rounded) inputs
    leaves = [t.detach().double().requires_grad_() for t in (xb, yc, w)]
    ref = edge_conv_reference(*leaves, sender.contiguous(), receiver.contiguous(), num_nodes)
    scale = ref.abs().max().clamp_min(1e-30)
    err = ((out.double() - ref).abs().max() / scale).item()
    assert err <= tol, (dtype, "forward", err)
    assert out[-1].abs().max() == 0  # the node without incoming edges
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (xb, yc, w), grad.to(dtype))
    want = torch.autograd.grad(ref, leaves, grad)
    for name, a, b in zip(("xb", "yc", "w"), got, want):
        e = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert e <= tol, (dtype, name, e)
    return err


print("float64", check(torch.float64, 1e-12))
print("float32", check(torch.float32, 1e-5))
print("bfloat16", check(torch.bfloat16, 2e-2))  # widened before multiplying, rounded once on the way out
print("hub", check(torch.float64, 1e-12, num_nodes=5, num_edges=10, channels=3, rank=5, hub_edges=2000))

# E = 0: nothing launches, zeros come back, gradients are zeros / empty
xb = torch.randn(4, 3, 5, requires_grad=True)
out = edge_conv(xb, torch.zeros(0, 5), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.long), 4, fused=True)
assert out.shape == (4, 3, 5) and out.abs().max() == 0
(gx,) = torch.autograd.grad(out.sum(), xb)
assert gx.abs().max() == 0

# every launch runs under the tensors' device guard (cuda:1 while cuda:0 is current)
entered = []
original = fused._device_guard
fused._device_guard = lambda t: (entered.append(t.device), original(t))[1]
check(torch.float32, 1e-5)
fused._device_guard = original
assert len(entered) == 3, entered  # forward, backward segment, backward per-edge

# torch.compile captures the fused convolution whole (custom ops, no cache inside the traced region)
edge_index = graph(6, 30)
xb = torch.randn(6, 4, 7, requires_grad=True)
yc, w = torch.randn(30, 7), torch.randn(30, 4)


def energy(xb, yc, w, edge_index):
    return edge_conv(xb, yc, w, edge_index[0], edge_index[1], 6, fused=True).square().sum()


compiled = torch.compile(energy, backend="aot_eager", fullgraph=True)
(g_compiled,) = torch.autograd.grad(compiled(xb, yc, w, edge_index), xb)
(g_eager,) = torch.autograd.grad(energy(xb, yc, w, edge_index), xb)
assert torch.allclose(g_compiled, g_eager, rtol=1e-5, atol=1e-6)
print("faults ok")
    """
)


def test_fused_edge_conv_precision_strides_devices_and_compile_on_the_interpreter():
    """Transposed ``edge_index`` (strided rows), float64 to 1e-12, bf16 widened before multiplying, a node with
    thousands of edges, E = 0, launches under the tensors' device guard, and ``torch.compile(fullgraph=True)``."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "faults ok" in result.stdout


def test_fused_without_triton_device_is_a_clear_error():
    import torch

    from tdn.tp.fused import edge_conv, triton_available

    if triton_available(torch.device("cpu")):
        pytest.skip("TRITON_INTERPRET=1 is set: the CPU can run the kernel")
    x = torch.randn(2, 1, 3)
    with pytest.raises(RuntimeError, match="Triton"):
        edge_conv(
            x,
            torch.randn(1, 3),
            torch.randn(1, 1),
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1, dtype=torch.long),
            2,
            fused=True,
        )


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_chunked_cpu_path_matches_reference(dtype, tol, monkeypatch):
    """fused=None on a CPU without Triton: the chunked first-order version, same values and gradients."""
    from tdn.tp import fused
    from tdn.tp.fused import _ChunkedEdgeConv, edge_chunks, edge_conv_reference

    monkeypatch.setattr(fused, "CHUNK_ENTRIES", 4096)
    torch.manual_seed(0)
    num_nodes, num_edges, channels, rank = 9, 700, 6, 37  # several chunks at a small target
    xb = torch.randn(num_nodes, channels, rank, dtype=dtype, requires_grad=True)
    yc = torch.randn(num_edges, rank, dtype=dtype, requires_grad=True)
    w = torch.randn(num_edges, channels, dtype=dtype, requires_grad=True)
    sender = torch.randint(0, num_nodes - 1, (num_edges,))
    receiver = torch.randint(0, num_nodes - 1, (num_edges,))
    assert len(edge_chunks(num_edges, channels * rank)) > 1
    chunked = _ChunkedEdgeConv.apply(xb, yc, w, sender, receiver, num_nodes)
    ref = edge_conv_reference(xb, yc, w, sender, receiver, num_nodes)
    torch.testing.assert_close(chunked, ref, rtol=tol, atol=tol * float(ref.abs().max()))
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(chunked, (xb, yc, w), grad), torch.autograd.grad(ref, (xb, yc, w), grad)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))
    (gx,) = torch.autograd.grad(_ChunkedEdgeConv.apply(xb, yc, w, sender, receiver, num_nodes).square().sum(), xb,
                                create_graph=True)  # fmt: skip
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        gx.sum().backward()


def test_edge_sort_is_cached_per_neighbour_list(monkeypatch):
    """The fused kernel's receiver / sender sorts are computed once per edge_index (all layers, all MD steps until
    the list changes) and recomputed after an in-place change."""
    from tdn.tp import fused

    calls = []
    original = fused.sort_segments
    monkeypatch.setattr(fused, "sort_segments", lambda index, n: calls.append(1) or original(index, n))
    edge_index = torch.tensor([[0, 2, 1, 2, 0], [1, 0, 2, 2, 1]])
    for _ in range(3):  # three "layers" or "steps": rows 0 and 1 are sorted once each
        perm_r, rowptr_r = fused._csr(edge_index[1], 3)
        perm_s, _ = fused._csr(edge_index[0], 3)
    assert len(calls) == 2
    assert edge_index[1][perm_r].tolist() == [0, 1, 1, 2, 2] and rowptr_r.tolist() == [0, 1, 3, 5]
    assert edge_index[0][perm_s].tolist() == [0, 0, 1, 2, 2]
    edge_index[1, 0] = 2  # a new list written in place
    perm_r, rowptr_r = fused._csr(edge_index[1], 3)
    assert len(calls) == 3 and rowptr_r.tolist() == [0, 1, 2, 5]
