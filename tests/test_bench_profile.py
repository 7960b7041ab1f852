"""The MD-step profiler (tdn.bench.profile): phases add up to the step, every model block is timed, files written."""

from __future__ import annotations

import json

import pytest
import torch

from tdn.bench import profile


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_profile_tiny_model(tmp_path):
    result = profile.main(["--backends", "cp", "--natoms", "32", "--reps", "2", "--preset", "tiny", "--device", "cpu",
                           "--out", str(tmp_path), "--name", "p"])  # fmt: skip
    (run,) = result["runs"]
    phases = run["phases_ms"]
    expected = {"inputs", "backward", "to_host", "forward/other", "forward/interaction.0", "forward/product.0"}
    assert expected <= set(phases)
    assert all(v >= 0 for v in phases.values()) and phases["backward"] > 0
    assert run["step_ms"] == pytest.approx(sum(phases.values()))
    assert run["edges"] > 0 and run["top_ops"] and all(0 <= o["share"] <= 1 for o in run["top_ops"])
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["runs"][0]["phases_ms"] == pytest.approx(phases)
    assert "forward/interaction.0" in (tmp_path / "p.md").read_text()
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_block_timer_sees_every_block():
    from tdn.models import build_model

    model = build_model(preset="tiny", elements=[29])
    blocks = profile.model_blocks(model)
    assert {"radial", "embedding"} <= set(blocks)
    assert sum(k.startswith("interaction.") for k in blocks) == model.config.num_layers
    assert sum(k.startswith("product.") for k in blocks) == model.config.num_layers
