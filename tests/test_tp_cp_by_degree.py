"""cp with one weight per output degree: factors fitted per degree (A block-diagonal), so each weight scales its own
CP terms and the convolution reduces over sum_l R_l terms once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import small_model
from torch_geometric.data import Data

import tdn
from tdn.o3 import degree_slice, dim, path_tensor
from tdn.tp import cp, cp_fit
from tdn.tp.base import TensorProduct
from tdn.tp.factor_store import FactorStore, factor_plan

TOL = cp.DEFAULT_TOL


def degree_cp(lmax_in: int = 1, lmax: int = 2, paths: str = "o3", **options) -> cp.CPProduct:
    return tdn.tp.build("cp", lmax_in=lmax_in, lmax_sh=lmax, lmax_out=lmax, channels=3, paths=paths,
                        weights="degree", **options).double()  # fmt: skip


def conv_inputs(tp, num_nodes: int = 6, num_edges: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d_in, d_sh, _ = tp.dims
    x = torch.randn(num_nodes, tp.channels, d_in, generator=g, dtype=torch.float64)
    y = torch.randn(num_edges, d_sh, generator=g, dtype=torch.float64)
    w = torch.randn(num_edges, tp.channels, tp.num_weights, generator=g, dtype=torch.float64)
    sender = torch.randint(0, num_nodes, (num_edges,), generator=g)
    receiver = torch.randint(0, num_nodes, (num_edges,), generator=g)
    return x, y, w, sender, receiver


@pytest.mark.parametrize("paths", ["o3", "so3"])
@pytest.mark.parametrize(("lmax_in", "lmax"), [(0, 2), (1, 2), (1, 3), (3, 3)])
def test_factors_are_fitted_per_output_degree(lmax_in, lmax, paths):
    tp = degree_cp(lmax_in, lmax, paths)
    assert tp.factors_source == "package"
    assert tp.rank_groups is not None and len(tp.rank_groups) == lmax + 1 and sum(tp.rank_groups) == tp.rank
    left, right, project = (t.numpy() for t in tp.factors())
    # every term writes one output degree only: project [R, d_out] is zero outside the degree blocks
    mask = np.zeros_like(project, dtype=bool)
    for terms, components in tp.weight_blocks():
        mask[terms, components] = True
    assert np.abs(project[~mask]).max(initial=0.0) == 0.0
    M = path_tensor(lmax_in, lmax, lmax, paths).numpy()
    error = cp_fit.relative_error(M, project.T, left, right)
    assert error <= TOL and error == pytest.approx(tp.fit_error, rel=1e-6, abs=1e-15)
    for l, terms in enumerate(t for t, _ in tp.weight_blocks()):  # each degree's rows to the tolerance
        rows = cp_fit.reconstruct(project.T[:, terms], left[:, terms], right[:, terms])[degree_slice(l)]
        assert np.linalg.norm(rows - M[degree_slice(l)]) <= TOL * np.linalg.norm(M[degree_slice(l)])
    assert tp.weights_split_terms


def test_split_is_cheaper_than_a_reduction_per_degree():
    """The per-degree terms sum to fewer than (L + 1) x the joint rank: what the convolution reduces over."""
    split = degree_cp(1, 3)
    joint = tdn.tp.build("cp", lmax_in=1, lmax_sh=3, lmax_out=3, channels=3, weights="shared")
    assert split.rank < (split.lmax_out + 1) * joint.rank
    grid = tdn.tp.build("grid", lmax_in=1, lmax_sh=3, lmax_out=3, channels=3, weights="degree")
    assert not grid.weights_split_terms  # grid's points all meet every degree


def test_a_degree_weight_scales_only_its_degree():
    tp = degree_cp()
    x, y, w, sender, receiver = conv_inputs(tp)
    for l in range(tp.lmax_out + 1):
        only = torch.zeros_like(w)
        only[:, :, l] = w[:, :, l]
        for out in (tp(x[sender], y, only), tp.conv(x, y, only, sender, receiver, fused=False)):
            outside = torch.ones(out.shape[2], dtype=torch.bool)
            outside[degree_slice(l)] = False
            assert out[:, :, degree_slice(l)].abs().max() > 0
            assert torch.equal(out[:, :, outside], torch.zeros_like(out[:, :, outside]))


@pytest.mark.parametrize("paths", ["o3", "so3"])
def test_conv_equals_per_edge_messages(paths):
    """The one reduction per degree's terms against the plain per-edge product summed by receiver: values and
    first derivatives in float64."""
    tp = degree_cp(1, 2, paths)
    x, y, w, sender, receiver = (t.requires_grad_() if t.is_floating_point() else t for t in conv_inputs(tp))
    ours = tp.conv(x, y, w, sender, receiver, fused=False)
    reference = TensorProduct.conv(tp, x, y, w, sender, receiver)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (x, y, w), g), torch.autograd.grad(reference, (x, y, w), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ref_cg = tdn.tp.build("cg", lmax_in=1, lmax_sh=2, lmax_out=2, channels=3, paths=paths, weights="degree").double()
    expected = ref_cg.conv(x, y, w, sender, receiver).detach()
    assert float((ours.detach() - expected).norm() / expected.norm()) <= 3 * TOL


def test_fixed_rank_and_joint_model_files_stay_joint():
    """``rank=`` asks for one joint rank; a model file recording joint factors for degree weights (written before the
    split) is rebuilt with joint factors of its recorded rank."""
    fixed = degree_cp(1, 2, rank=20)
    assert fixed.rank_groups is None and fixed.rank == 20 and not fixed.weights_split_terms
    x, y, w, sender, receiver = conv_inputs(fixed)
    torch.testing.assert_close(fixed.conv(x, y, w, sender, receiver, fused=False),
                               TensorProduct.conv(fixed, x, y, w, sender, receiver), rtol=1e-12, atol=1e-12)
    joint_key = cp.STORE.key(cp.factor_name(1, 2, 2, "o3"))
    with factor_plan({joint_key: {"rank": 13, "error": 5e-5}}, origin="old.tdn"):
        old = degree_cp(1, 2)
    assert old.rank_groups is None and old.rank == 13 and old.factors_source == "model file"
    with factor_plan() as plan:
        new = degree_cp(1, 2)
    keys = sorted(plan.recorded)
    assert keys == sorted(cp.STORE.key(cp.factor_name(1, 2, 2, "o3", out_degree=l)) for l in range(3))
    assert [plan.recorded[k]["rank"] for k in keys] == list(new.rank_groups)


def water() -> Data:
    pos = torch.tensor([[0.0, 0.0, 0.1], [0.76, 0.0, -0.5], [-0.7, 0.1, -0.48]], dtype=torch.float64)
    return Data(
        pos=pos,
        atomic_numbers=torch.tensor([8, 1, 1]),
        edge_index=torch.tensor([[0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1]]),
        unit_shifts=torch.zeros(6, 3, dtype=torch.float64),
        cell=torch.zeros(1, 3, 3, dtype=torch.float64),
    )


def test_model_with_degree_weights_saves_and_loads_without_a_fit(tmp_path, monkeypatch):
    model = small_model(tp="cp", tp_weights="degree", lmax=1, elements=[1, 8], cutoff=4.0)
    assert all(block.tp.rank_groups is not None for block in model.interactions)
    tdn.save_model(model, tmp_path / "model.tdn")

    def refuse(*args, **kwargs):
        raise AssertionError("factors were fitted or a factor file was used while loading a model file")

    monkeypatch.setattr(cp, "fit_factors", refuse)
    for method in ("find", "load", "cache", "save"):
        monkeypatch.setattr(FactorStore, method, refuse)
    loaded = tdn.load_model(tmp_path / "model.tdn")
    assert [b.tp.rank_groups for b in loaded.interactions] == [b.tp.rank_groups for b in model.interactions]
    expected, got = model(water()), loaded(water())
    torch.testing.assert_close(got["energy"], expected["energy"], rtol=0, atol=1e-12)
    torch.testing.assert_close(got["forces"], expected["forces"], rtol=0, atol=1e-12)
    assert dim(1) == loaded.interactions[1].tp.dims[0]
