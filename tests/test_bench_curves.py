"""The learning-curve benchmark (tdn/bench/curves.py): snapshot spacing, resumable runs, accumulating tables, and
the summary numbers against a table whose values are known."""

from __future__ import annotations

import json
import math

import pytest
from helpers import SAMPLE_DATA, needs_sample

from tdn.bench import curves
from tdn.bench.accuracy_protocol import Dataset
from tdn.bench.curves_report import error_at, reached, results_table, summary


def test_snapshot_epochs():
    assert curves.snapshot_epochs(5) == [1, 2, 3, 4, 5]
    epochs = curves.snapshot_epochs(64)
    assert epochs[0] == 1 and epochs[-1] == 64 and epochs == sorted(set(epochs))
    assert 10 <= len(epochs) <= curves.SNAPSHOTS + 1
    gaps = [b / a for a, b in zip(epochs, epochs[1:])]
    assert max(gaps) <= 2.0  # geometric, not front-loaded or linear


def point(step: int, cpu: float, force: float, wall: float | None = None) -> dict:
    return {"epoch": step, "step": step, "train_cpu_s": cpu, "train_wall_s": cpu if wall is None else wall,
            "test_forces_mae_meV_A": force, "test_energy_mae_meV": 1.0}


def test_summary_known_table():
    table = {"runs": {
        "cg/seed0": {"variant": "cg", "seed": 0, "params": 10, "final": {"forces_mae_meV_A": 10.0},
                     "points": [point(1, 4.0, 40.0), point(2, 8.0, 12.0)]},
        "cg/seed1": {"variant": "cg", "seed": 1, "params": 10, "final": {"forces_mae_meV_A": 14.0},
                     "points": [point(1, 4.0, 30.0), point(2, 8.0, 14.0)]},
        "cp/seed0": {"variant": "cp", "seed": 0, "params": 8, "final": {"forces_mae_meV_A": 15.0},
                     "points": [point(1, 2.0, 30.0), point(2, 3.0, 17.0), point(3, 5.0, 16.0)]},
        "grid/seed0": {"variant": "grid", "seed": 0, "params": 8, "final": {"forces_mae_meV_A": 30.0},
                       "points": [point(1, 2.0, 30.0)]},
        "gaunt/seed0": {"variant": "gaunt", "seed": 0, "error": "boom"},
    }}
    rows = {r["variant"]: r for r in summary(table)}
    assert set(rows) == {"cg", "cp", "grid"}  # the failed run is left out
    assert rows["cg"]["forces_mae"] == pytest.approx(12.0) and rows["cg"]["forces_range"] == (10.0, 14.0)
    assert rows["cp"]["vs_cg"] == pytest.approx(15.0 / 12.0)
    assert rows["cp"]["reach_target"] == pytest.approx(18.0)  # 1.5 x 12
    # cp crosses 18 between (2 s, 30) and (3 s, 17): log-log, t = ln(30/18) / ln(30/17) of the way
    t = math.log(30 / 18) / math.log(30 / 17)
    assert rows["cp"]["reach_s"] == pytest.approx(2 * 1.5**t) and rows["cp"]["reach_step"] == pytest.approx(2**t)
    # cg's seeds cross between (4 s, 40 | 30) and (8 s, 12 | 14); the mean of the two crossings
    cross = [4 * 2 ** (math.log(e0 / 18) / math.log(e0 / e1)) for e0, e1 in ((40, 12), (30, 14))]
    assert rows["cg"]["reach_s"] == pytest.approx(sum(cross) / 2)
    assert not rows["grid"]["reach_all"] and rows["grid"]["reach_s"] is None
    # equal compute: 2 s, the smallest training compute of any run (grid's); cg's seeds have no point there
    assert all(r["equal_s"] == 2.0 for r in rows.values())
    assert rows["cp"]["forces_at_equal"] == pytest.approx(30.0) and rows["grid"]["forces_at_equal"] == 30.0
    assert rows["cg"]["forces_at_equal"] is None
    assert rows["cp"]["ms_per_step"] == pytest.approx(1e3 * 5.0 / 3)


def test_timed_axis_is_steps_times_the_step_cost():
    """Tables with timed step costs read the same curves on a second axis: steps x ms per step."""
    table = {"step_costs": {"ms": {"cg": 2000.0, "cp": 500.0}}, "runs": {
        "cg/seed0": {"variant": "cg", "seed": 0, "params": 10, "final": {"forces_mae_meV_A": 10.0},
                     "points": [point(1, 4.0, 40.0), point(4, 8.0, 10.0)]},
        "cp/seed0": {"variant": "cp", "seed": 0, "params": 8, "final": {"forces_mae_meV_A": 12.0},
                     "points": [point(2, 3.0, 30.0), point(8, 6.0, 12.0)]},
        "grid/seed0": {"variant": "grid", "seed": 0, "params": 8, "final": {"forces_mae_meV_A": 11.0},
                       "points": [point(1, 2.0, 30.0), point(2, 2.5, 11.0)]}}}
    rows = {r["variant"]: r for r in summary(table)}
    # timed compute: cg 4 steps x 2 s = 8 s, cp 8 x 0.5 = 4 s (the smallest); grid is not timed
    assert rows["cp"]["timed_equal_s"] == pytest.approx(4.0) and rows["cp"]["step_ms"] == 500.0
    assert rows["cp"]["forces_at_timed_equal"] == pytest.approx(12.0)  # its last point
    # cg after 4 s is 2 steps: between (1, 40) and (4, 10), halfway on log axes
    assert rows["cg"]["forces_at_timed_equal"] == pytest.approx(20.0)
    # the target 15 (1.5 x 10): cg reaches it at step 4 ** (ln(40/15) / ln(4)), i.e. 2 s per step later
    cg_step = 4 ** (math.log(40 / 15) / math.log(4))
    assert rows["cg"]["timed_reach_s"] == pytest.approx(2.0 * cg_step)
    cp_step = 2 * 4 ** (math.log(30 / 15) / math.log(30 / 12))
    assert rows["cp"]["timed_reach_s"] == pytest.approx(0.5 * cp_step)
    assert "step_ms" not in rows["grid"]
    text = results_table(table)
    assert "test F MAE at 4 CPU s (timed)" in text.splitlines()[0]
    assert text.splitlines()[-1].endswith("| — | — | — |")  # grid: not timed
    assert "timed" not in results_table({"runs": table["runs"]})  # untimed tables keep their columns


def test_error_at_and_reached_read_the_curve_log_log():
    points = [point(1, 1.0, 40.0), point(4, 4.0, 10.0), point(5, 8.0, 8.0)]
    assert error_at(points, 2.0, "train_cpu_s") == pytest.approx(20.0)  # halfway on log axes: sqrt(40 * 10)
    assert error_at(points, 8.0, "train_cpu_s") == pytest.approx(8.0) and error_at(points, 0.5, "train_cpu_s") is None
    assert error_at(points, 9.0, "train_cpu_s") is None
    assert error_at(points, 8.0 * (1 + 1e-13), "train_cpu_s") == 8.0  # the end, reached by another axis
    assert reached(points, 20.0, "train_cpu_s") == pytest.approx({"train_cpu_s": 2.0, "step": 2.0})
    assert reached(points, 50.0, "train_cpu_s") == {"train_cpu_s": 1.0, "step": 1}  # the first snapshot is below
    assert reached(points, 5.0, "train_cpu_s") is None


def test_gpu_tables_count_the_wall_clock_of_the_steps():
    """On a GPU the compute is the steps' wall seconds (the CPU seconds count only the launches)."""
    table = {"device": "cuda", "dataset": "ethanol", "size": "small", "steps": 2, "runs": {
        "cg/seed0": {"variant": "cg", "seed": 0, "params": 10, "final": {"forces_mae_meV_A": 10.0},
                     "points": [point(1, 4.0, 40.0, wall=1.0), point(2, 8.0, 10.0, wall=2.0)]},
        "cp/seed0": {"variant": "cp", "seed": 0, "params": 8, "final": {"forces_mae_meV_A": 12.0},
                     "points": [point(1, 3.0, 14.0, wall=0.5), point(2, 6.0, 12.0, wall=0.75)]}}}
    rows = {r["variant"]: r for r in summary(table)}
    assert rows["cp"]["train_s"] == pytest.approx(0.75) and rows["cp"]["ms_per_step"] == pytest.approx(375.0)
    assert rows["cp"]["reach_s"] == pytest.approx(0.5)  # its first point is already below 15
    assert rows["cg"]["reach_s"] == pytest.approx(2 ** (math.log(40 / 15) / math.log(40 / 10)))  # 1 s -> 2 s, log-log
    assert rows["cp"]["forces_at_equal"] == 12.0 and rows["cg"]["forces_at_equal"] is None  # cg starts at 1 s
    header = results_table(table).splitlines()[0]
    assert "training GPU s" in header and "GPU ms / step" in header and "CPU" not in header
    assert "CPU s" in results_table({**table, "device": "cpu"}).splitlines()[0]
    with pytest.raises(ValueError, match="tpu"):
        summary({**table, "device": "tpu"})


def test_gpu_runs_train_on_the_gpu_trainer_and_keep_their_own_table(tmp_path):
    spec = Dataset("sample", "sample", list(SAMPLE_DATA), 8, "test")
    cpu, gpu = (curves.CurveRun(spec, "cp", 0, "quick", steps=4, batch_size=4, device=d) for d in ("cpu", "cuda"))
    assert gpu.table == cpu.table + "_cuda" and gpu.run_dir(tmp_path) != cpu.run_dir(tmp_path)
    assert "trainer=gpu" in gpu.overrides() and not any(o.startswith("trainer=") for o in cpu.overrides())
    from tdn.train import compose

    assert compose(gpu.overrides()).trainer.accelerator == "gpu"
    assert compose(cpu.overrides()).trainer.accelerator == "cpu"
    args = curves.parse_args(["--device", "cuda", "--data-root", str(tmp_path), "--out", str(tmp_path),
                              "--work-dir", str(tmp_path), "--datasets", "ethanol", "--variants", "cp"])
    assert all(run.device == "cuda" for run in curves.plan(args))


def test_train_command_resumes_or_restarts(tmp_path):
    spec = Dataset("sample", "sample", list(SAMPLE_DATA), 8, "test")
    run = curves.CurveRun(spec, "cp", 0, "quick", steps=4, batch_size=4)
    assert run.table == "curves_sample_quick_steps4"  # another budget never shares a table with the default one
    assert curves.CurveRun(spec, "cp", 0, "small", curves.DEFAULT_STEPS).table == "curves_sample_small"
    cosine = curves.CurveRun(spec, "cp", 0, "quick", steps=4, batch_size=4, schedule="cosine")
    assert cosine.table == run.table + "_cosine" and cosine.run_dir(tmp_path) != run.run_dir(tmp_path)
    from tdn.train import compose

    scheduler = compose(cosine.overrides()).training_module.lr_scheduler
    assert scheduler.name == "cosine" and scheduler.min_lr_ratio == 0.01
    assert compose(run.overrides()).training_module.lr_scheduler.name == "plateau"
    run_dir = run.run_dir(tmp_path)
    assert not any(a.startswith(("ckpt_path=", "overwrite=")) for a in curves.train_command(run, run_dir))
    run_dir.mkdir(parents=True)
    assert "overwrite=true" in curves.train_command(run, run_dir)  # stopped before its first checkpoint
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}" in curves.train_command(run, run_dir)


@needs_sample
def test_runs_accumulate(tmp_path):
    spec = Dataset("sample", "sample", [*SAMPLE_DATA, "data.val_size=4", "data.test_size=4"], 8, "held out")
    run = curves.CurveRun(spec, "cp", 0, "quick", steps=4, batch_size=4)  # 2 epochs of 2 steps
    lines: list[str] = []
    out, work = tmp_path / "out", tmp_path / "work"
    record = curves.run_all([run], work, out, jobs=1, log=lines.append)[0]
    assert "error" not in record, record
    assert [p["epoch"] for p in record["points"]] == [1, 2] and [p["step"] for p in record["points"]] == [2, 4]
    assert 0 < record["points"][0]["train_cpu_s"] < record["points"][1]["train_cpu_s"]
    assert all(p["test_forces_mae_meV_A"] > 0 for p in record["points"])
    table = json.loads((out / f"{run.table}.json").read_text())
    assert table["runs"]["cp/seed0"]["complete"] and (out / f"{run.table}.md").is_file()
    assert (out / f"{run.table}.png").is_file()
    # a second command adds a seed to the same table and leaves the finished run alone
    other = curves.CurveRun(spec, "cp", 1, "quick", steps=4, batch_size=4)
    curves.run_all([run, other], work, out, jobs=2, log=lines.append)
    table = json.loads((out / f"{run.table}.json").read_text())
    assert set(table["runs"]) == {"cp/seed0", "cp/seed1"}
    assert table["runs"]["cp/seed0"] == {**record, "complete": True}
    assert any(line.endswith(f"(in {run.table}.json)") for line in lines)
    # the step cost of the table's variant, timed with its run's model on the dataset's batch
    costs = curves.store_step_costs(run, out, reps=2)
    assert costs["errors"] == {} and costs["ms"]["cp"] > 0 and costs["structures"] == 4
    assert json.loads((out / f"{run.table}.json").read_text())["step_costs"]["ms"] == costs["ms"]


def test_report_only_rewrites_tables_and_page(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    table = {"dataset": "ethanol", "size": "small", "steps": 10, "runs": {
        "cg/seed0": {"variant": "cg", "seed": 0, "params": 10, "final": {"forces_mae_meV_A": 10.0},
                     "points": [point(1, 4.0, 40.0), point(2, 8.0, 12.0)]},
        "cp/seed0": {"variant": "cp", "seed": 0, "params": 8, "final": {"forces_mae_meV_A": 13.0},
                     "points": [point(1, 2.0, 30.0), point(2, 3.0, 13.0)]}}}
    (out / "curves_ethanol_small.json").write_text(json.dumps(table))
    doc = tmp_path / "page.md"
    doc.write_text("before\n<!-- BEGIN curves_ethanol_small -->\nold\n<!-- END curves_ethanol_small -->\nafter\n")
    curves.main(["--report-only", "--datasets", "ethanol", "--out", str(out), "--work-dir", str(tmp_path),
                 "--data-root", str(tmp_path), "--doc", str(doc)])
    page = doc.read_text()
    assert "old" not in page and page.startswith("before") and page.endswith("after\n")
    assert "| cp | 0 | 8 | 13.0 | 1.30x |" in page  # the summary row of cp: 13 / 10 of cg
    assert (out / "curves_ethanol_small.png").is_file() and (out / "curves_ethanol_small.md").is_file()
