"""save_model / load_model: one self-describing file, a fresh process, any dtype, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import small_model
from torch_geometric.data import Data

import tdn
from tdn.io import FORMAT_VERSION, ModelFileError, read_model_file

pytestmark = pytest.mark.usefixtures("one_thread")


def water_model(**overrides):
    """The small test model for H and O (``overrides`` win)."""
    options = dict(cutoff=4.0, elements=[1, 8], atomic_energies=[-0.5, -2.0], avg_num_neighbors=3.0)
    return small_model(**{**options, **overrides})


def water() -> Data:
    pos = torch.tensor([[0.0, 0.0, 0.1], [0.76, 0.0, -0.5], [-0.7, 0.1, -0.48]], dtype=torch.float64)
    edge_index = torch.tensor([[0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1]])
    return Data(
        pos=pos,
        atomic_numbers=torch.tensor([8, 1, 1]),
        edge_index=edge_index,
        unit_shifts=torch.zeros(6, 3, dtype=torch.float64),
        cell=torch.zeros(1, 3, 3, dtype=torch.float64),
    )


def test_round_trip_in_a_fresh_process(tmp_path):
    model = water_model(tp_weights="degree")
    model.set_statistics(scale=1.7, shift=0.1, atomic_energies={1: -0.4, 8: -2.1})
    path = tmp_path / "model.tdn"
    tdn.save_model(model, path)
    graph = water()
    expected = model(graph)
    torch.save({"pos": graph.pos, "z": graph.atomic_numbers, "edge_index": graph.edge_index}, tmp_path / "g.pt")
    script = textwrap.dedent(
        f"""
        import json, torch, tdn
        from torch_geometric.data import Data
        g = torch.load({str(tmp_path / "g.pt")!r}, weights_only=True)
        model = tdn.load_model({str(path)!r})
        out = model(Data(pos=g["pos"], atomic_numbers=g["z"], edge_index=g["edge_index"]))
        print(json.dumps({{"energy": out["energy"].tolist(), "forces": out["forces"].tolist(),
                          "dtype": str(out["energy"].dtype), "config": model.config.to_dict()}}))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["dtype"] == "torch.float64"
    assert torch.allclose(torch.tensor(got["energy"], dtype=torch.float64), expected["energy"], rtol=1e-12)
    assert torch.allclose(torch.tensor(got["forces"], dtype=torch.float64), expected["forces"], atol=1e-12)
    assert got["config"] == model.config.to_dict()
    assert got["config"]["scale"] == 1.7 and got["config"]["atomic_energies"] == [-0.4, -2.1]


def test_file_is_plain_and_loads_with_weights_only(tmp_path):
    path = tmp_path / "m.tdn"
    tdn.save_model(water_model(), path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "tdn-model" and payload["format_version"] == FORMAT_VERSION
    assert json.loads(payload["config"])["tp"] == "cg"
    assert all(isinstance(t, torch.Tensor) for t in payload["state_dict"].values())


def test_load_in_another_dtype_and_device(tmp_path):
    model = water_model()
    path = tmp_path / "m.tdn"
    tdn.save_model(model, path)
    graph = water()
    reference = model(graph)
    as32 = tdn.load_model(path, dtype=torch.float32)
    assert as32.config.dtype == "float32" and all(p.dtype == torch.float32 for p in as32.parameters())
    out32 = as32(graph)
    assert out32["energy"].dtype == torch.float32
    assert torch.allclose(out32["energy"].double(), reference["energy"], rtol=1e-5)
    assert torch.allclose(out32["forces"].double(), reference["forces"], atol=1e-4)
    # a float32 file loads back in float64 with the float32 weights
    tdn.save_model(as32, tmp_path / "m32.tdn")
    as64 = tdn.load_model(tmp_path / "m32.tdn", dtype="float64")
    assert as64.dtype == torch.float64
    assert torch.allclose(as64(graph)["energy"], reference["energy"], rtol=1e-5)
    if torch.cuda.is_available():
        on_gpu = tdn.load_model(path, device="cuda")
        gpu_graph = graph.to("cuda")
        assert torch.allclose(on_gpu(gpu_graph)["energy"].cpu(), reference["energy"], rtol=1e-10)


@pytest.mark.parametrize("kind", ["cp", "gaunt", "grid"])
def test_round_trip_other_backends(tmp_path, kind):
    if kind not in tdn.tp.BACKENDS:
        pytest.skip(f"tensor-product backend {kind!r} is not importable from tdn.tp yet")
    model = water_model(tp=kind)
    tdn.save_model(model, tmp_path / "m.tdn")
    loaded = tdn.load_model(tmp_path / "m.tdn")
    graph = water()
    assert torch.allclose(loaded(graph)["energy"], model(graph)["energy"], rtol=1e-12)


def test_corrupt_and_incompatible_files(tmp_path):
    path = tmp_path / "m.tdn"
    tdn.save_model(water_model(), path)
    data = path.read_bytes()

    truncated = tmp_path / "truncated.tdn"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="not a readable tdn model file"):
        tdn.load_model(truncated)

    garbage = tmp_path / "garbage.tdn"
    garbage.write_bytes(b"this is not a model" * 10)
    with pytest.raises(ModelFileError, match="not a readable tdn model file"):
        tdn.load_model(garbage)

    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ModelFileError, match="not a tdn model file"):
        tdn.load_model(other)

    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "tdn-model", "x": ValueError("a pickled class")}, pickled)
    with pytest.raises(ModelFileError, match="not a readable"):
        tdn.load_model(pickled)

    payload = read_model_file(path)
    future = {**payload, "format_version": FORMAT_VERSION + 1, "config": json.dumps(payload["config"])}
    torch.save(future, tmp_path / "future.tdn")
    with pytest.raises(ModelFileError, match="format version 2.*upgrade tdn"):
        tdn.load_model(tmp_path / "future.tdn")

    config = {**payload["config"], "new_field": 1}
    torch.save({**payload, "config": json.dumps(config)}, tmp_path / "newfield.tdn")
    with pytest.raises(ModelFileError, match="new_field"):
        tdn.load_model(tmp_path / "newfield.tdn")

    config = {**payload["config"], "channels": 6}
    torch.save({**payload, "config": json.dumps(config)}, tmp_path / "mismatch.tdn")
    with pytest.raises(ModelFileError, match="weights do not fit"):
        tdn.load_model(tmp_path / "mismatch.tdn")

    with pytest.raises(FileNotFoundError):
        tdn.load_model(tmp_path / "missing.tdn")
    assert issubclass(ModelFileError, ValueError)


def test_save_rejects_other_modules(tmp_path):
    with pytest.raises(TypeError, match="TDNModel"):
        tdn.save_model(torch.nn.Linear(2, 2), tmp_path / "x.tdn")
