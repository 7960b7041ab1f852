"""The package works outside the repository: a wheel, installed (not editable) into a fresh directory, runs
``tdn-train`` with its defaults from an empty working directory, with the configs and sample data it ships."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True, timeout=600)  # fmt: skip
    (path,) = out.glob("tdn-*.whl")
    return path


def test_wheel_ships_configs_sample_and_factors(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    configs = sorted(str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml"))
    assert sorted(n.removeprefix("tdn/conf/") for n in names if n.startswith("tdn/conf/")) == configs
    assert "tdn/sample/molecules.xyz" in names and "tdn/sample/oc20/sample.lmdb" in names
    assert any(n.startswith("tdn/tp/cp_factors/") for n in names)
    assert any(n.startswith("tdn/contractions/cp_factors/") for n in names)


@pytest.mark.slow
def test_installed_wheel_trains_with_its_defaults_from_an_empty_directory(wheel, tmp_path):
    target, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=600)  # fmt: skip
    # `python -S`: no .pth files, so the editable install of this checkout cannot shadow the wheel; the
    # dependencies come from this interpreter's site-packages, after the wheel on the path.
    path = os.pathsep.join([str(target), *site.getsitepackages()])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    code = ("import sys, tdn; print('tdn from', tdn.__file__); from tdn.train.cli import main; "
            "sys.argv = ['tdn-train']; main()")
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=work, env=env, capture_output=True, text=True,
                            timeout=1200)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"tdn from {target}" in output
    (model,) = work.glob("outputs/*/*/model.pt")
    assert "reproduces the trained model" in output and model.stat().st_size > 0


def test_a_users_config_directory_layers_on_top(tmp_path):
    """`tdn-train --config-dir my_conf`: a group option of the user's own sits beside the shipped ones."""
    (tmp_path / "tp").mkdir()
    shipped = (ROOT / "conf" / "tp" / "cp.yaml").read_text()
    (tmp_path / "tp" / "mine.yaml").write_text(shipped.replace("weights: inout", "weights: degree"))
    code = "import sys; from tdn.train.cli import main; sys.argv = sys.argv[1:]; main()"
    result = subprocess.run([sys.executable, "-c", code, "tdn-train", "--config-dir", str(tmp_path), "tp=mine",
                             "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "weights: degree" in result.stdout and "kind: cp" in result.stdout
