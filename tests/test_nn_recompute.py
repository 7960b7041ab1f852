"""Recompute-in-chunks: same values and gradients as the plain call, and no RNG state saved per chunk."""

from __future__ import annotations

import torch

from tdn.nn.recompute import recompute_if_large


def test_chunks_match_and_save_no_rng_state(monkeypatch):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2)).double()
    x = torch.randn(50, 3, dtype=torch.float64, requires_grad=True)
    plain = mlp(x)
    (g_plain,) = torch.autograd.grad(plain.square().sum(), x)
    saved = []
    original = torch.get_rng_state
    monkeypatch.setattr(torch, "get_rng_state", lambda: saved.append(1) or original())
    chunked = recompute_if_large(mlp, (x,), training=False, above=10, chunk=7)
    (g_chunked,) = torch.autograd.grad(chunked.square().sum(), x)
    torch.testing.assert_close(chunked, plain, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(g_chunked, g_plain, rtol=1e-14, atol=1e-14)
    assert saved == []  # one save (and on a GPU one host sync) per chunk otherwise
