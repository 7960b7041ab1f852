"""The convolution benchmark (tdn.bench.conv): the floor formula, and a tiny real run with the fused kernel on the
Triton CPU interpreter checked against the PyTorch reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tdn.bench.conv import floor_bytes, random_graph

ROOT = Path(__file__).resolve().parents[1]


def test_floor_bytes_by_hand():
    # N=10, E=40, C=2, d_in=1, d_sh=4, d_out=4, R=3, float32, int64 indices
    # fwd: N C (d_in + d_out) = 100, 4 N C R = 240, E (d_sh + 2R) = 400, E C = 80 -> 820 * 4 + 2 * 40 * 8 = 3920
    # bwd: N C d_out = 80, 4 N C R = 240, N C d_in = 20, E (3R + d_sh) = 520, 2 E C = 160 -> 1020 * 4 + 640 = 4720
    out = floor_bytes(10, 40, 2, 1, 4, 4, 3, itemsize=4)
    assert out == {"floor_bytes_fwd": 3920, "floor_bytes_fwdbwd": 3920 + 4720}


def test_random_graph_sorted_by_receiver():
    sender, receiver = random_graph(5, 3, "cpu", seed=0)
    assert receiver.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert sender.shape == (15,) and 0 <= int(sender.min()) and int(sender.max()) < 5


def test_tiny_run_with_interpreted_kernel(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_conv.py"), "--device", "cpu", "--lmax", "1", "--channels",
           "4", "--edges", "24", "--neighbors", "4", "--reps", "1",
           "--impls", "cp fused", "cp chunked", "cp ref", "e3nn uvu",
           "--out", str(tmp_path), "--name", "c"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads((tmp_path / "c.json").read_text())["rows"]}
    assert rows["cp fused"]["rel_error_vs_ref"] < 1e-5
    assert "chunked" in rows["cp chunked"]["skipped"]  # Triton (interpreted) runs here: the fused path is used
    for impl in ("cp fused", "cp ref", "e3nn uvu"):
        assert rows[impl]["fwd_ms"] > 0 and rows[impl]["fwdbwd_ms"] > 0
    assert rows["cp ref"]["rank"] == 6 and rows["cp ref"]["x_floor_fwdbwd"] > 0
    assert rows["cp ref"]["x_e3nn_fwd"] == pytest.approx(rows["e3nn uvu"]["fwd_ms"] / rows["cp ref"]["fwd_ms"])
    assert "cp fused" in (tmp_path / "c.md").read_text()
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chunked_cpu_path_in_the_benchmark(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from tdn.bench import conv

    result = conv.main(["--device", "cpu", "--lmax", "2", "--channels", "4", "--edges", "40", "--neighbors", "4",
                        "--reps", "1", "--impls", "cp chunked", "cp ref",
                        "--out", str(tmp_path), "--name", "c"])  # fmt: skip
    rows = {r["impl"]: r for r in result["rows"]}
    assert rows["cp chunked"]["rel_error_vs_ref"] < 1e-5
    assert rows["cp chunked"]["fwdbwd_ms"] > 0 and rows["cp ref"]["fwdbwd_ms"] > 0
