"""The fused Triton convolution against its PyTorch reference, on the CPU through Triton's interpreter.

Triton decides at import time whether kernels are interpreted, so the checks run in a subprocess with
TRITON_INTERPRET=1 set before tdn is imported.
"""

import os
import subprocess
import sys
import textwrap

import pytest

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

    # one weight per output degree: one fused reduction per degree vs the per-edge product, values and gradients
    for kind in ("cp", "grid"):
        tp = tdn.tp.build(kind, lmax=2, channels=channels, weights="degree")
        x = torch.randn(num_nodes, channels, 9, requires_grad=True)
        wd = torch.randn(num_edges, channels, 3, requires_grad=True)
        a = tp.conv(x, y, wd, sender, receiver, fused=True)
        b = tp.conv(x, y, wd, sender, receiver, fused=False)
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (kind, (a - b).abs().max())
        g = torch.randn_like(b)
        for ga, gb in zip(torch.autograd.grad(a, (x, wd), g), torch.autograd.grad(b, (x, wd), g)):
            assert (ga - gb).abs().max() <= 1e-5 * gb.abs().max(), (kind, (ga - gb).abs().max())
    print("fused ok")
    """
)


def test_fused_edge_conv_matches_reference_on_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fused ok" in result.stdout


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
