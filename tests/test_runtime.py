"""tdn.runtime: what the calculator, the MD engine and the integrations share."""

from __future__ import annotations

import warnings

import pytest
import torch
from ase.build import molecule
from helpers import ase_graph, small_model

from tdn.runtime import check_cell, compile_energy, model_dtype


def test_a_compile_failure_at_the_first_call_falls_back_to_eager(monkeypatch):
    """torch.compile fails lazily (at the first call); the step still runs, eagerly, with one warning."""
    model = small_model(tp="cp", elements=[1, 8])
    eager = model.node_energies

    def broken(fn, **options):
        def call(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    compile_energy(model)
    graph = ase_graph(molecule("H2O"), 3.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(graph)
    assert any("running eagerly" in str(w.message) for w in caught)
    assert model.node_energies == eager  # later calls go straight to the eager function
    torch.testing.assert_close(out["energy"], small_model(tp="cp", elements=[1, 8])(graph)["energy"])


def test_dtype_and_cell_checks_name_the_option():
    assert model_dtype("float64") is torch.float64 and model_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="default_dtype must be one of"):
        model_dtype("float16")
    with pytest.raises(ValueError, match="pbc is True along b but cell vector b"):
        check_cell([[3.0, 0, 0], [0, 0, 0], [0, 0, 3.0]], [True, True, True])
    with pytest.raises(ValueError, match="zero volume"):
        check_cell([[3.0, 0, 0], [3.0, 0, 0], [0, 0, 3.0]], [True, True, True])
    check_cell([[0.0] * 3] * 3, [False, False, False])  # a molecule needs no cell
