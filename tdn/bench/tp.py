"""Tensor-product microbenchmark: every registered tdn backend against e3nn (and cuEquivariance) in one run.

For each cell ``(L, C, E)`` (degree, channels, edges) and each variant, the benchmark measures the forward and
forward+backward time of ``tp(x [E,C,(L+1)^2], y [E,(L+1)^2], w [E,C,P])`` (inputs require grad, as in training;
the backward computes the gradients of all three inputs for a random output gradient), the peak memory of each,
and, on small float64 inputs, the accuracy and equivariance of the map:

- reference columns: e3nn's ``uvu`` ``TensorProduct`` built as MACE builds its convolution (x: C channels of every
  ``l <= L`` with natural parity, y: spherical harmonics ``l <= L``, every path with ``l_out <= L`` of either parity,
  per-edge weights, one output irrep per path) and cuEquivariance's ``ChannelWiseTensorProduct`` when importable;
- one tdn variant per registered backend and weight mode: "path" where a backend offers it (cg: MACE's exact uvu
  product) and "shared" (P = 1; cg shared is the exact sparse path-shared product cp must beat).

Accuracy: each tdn variant's output is compared with the exact CG map of the SAME weight mode (the stacked path
tensor ``M``) and, where it is a single-weight map, with the exact Gaunt map ``G``; the map a backend computes is
the closer one (cg, cp: ``M``; gaunt, grid: ``G``, a different bilinear map with Gaunt path weights). e3nn's output,
summed per output degree with tdn's path normalisation, is compared with the exact per-path CG map. The effective
coupling tensor of every tdn variant is probed on basis vectors and projected onto the Wigner-3j blocks: this gives
the paths it represents and the part that is not a CG coupling at all (zero for exact maps, the fit error for cp).

This module runs the measurement and holds the command line; the configuration and the modules timed are in
:mod:`tdn.bench.tp_ops`, the accuracy checks in :mod:`tdn.bench.tp_accuracy`, the markdown, plot and files in
:mod:`tdn.bench.tp_report`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import tp as tdn_tp
from . import common
from .tp_accuracy import accuracy, couplings
from .tp_ops import (
    REFERENCES,
    BenchConfig,
    Cell,
    Op,
    Variant,
    build_e3nn,  # noqa: F401 - re-exported: tdn.bench.conv imports it from here
    build_op,
    cell_of,
    cueq_status,
    reference_variants,
    tdn_variants,
)
from .tp_report import write_outputs

REFERENCE_PAIRS: tuple[tuple[int, int], ...] = ((1, 128), (2, 128), (3, 128), (3, 64), (4, 64), (5, 32), (6, 32))
FULL_EDGES = 100_000
QUICK_LMAX, QUICK_CHANNELS, QUICK_EDGES = (1, 2, 3), 8, 128


# ------------------------------------------------------------------------------------------------ measurement


def io_bytes(input_numel: int, output_numel: int, table_numel: int, itemsize: int) -> dict[str, int]:
    """Bytes an ideal fused kernel must move: forward reads inputs + tables and writes the output; the backward
    reads the output gradient, the inputs and the tables again and writes one gradient per input."""
    fwd = (input_numel + output_numel + table_numel) * itemsize
    bwd = (output_numel + 2 * input_numel + table_numel) * itemsize
    return {"io_bytes_fwd": fwd, "io_bytes_fwdbwd": fwd + bwd}


def table_numel(module: nn.Module) -> int:
    """Elements of the floating-point buffers (tables, factors) of ``module``."""
    return sum(b.numel() for b in module.buffers() if b.is_floating_point())


def measure_speed(op: Op, cell: Cell, cfg: BenchConfig, bandwidth: float | None) -> dict[str, Any]:
    """Times, peak memory and bandwidth floor of the forward and the forward+backward; errors per stage."""
    dtype = cfg.torch_dtype
    torch.manual_seed(cfg.seed)
    inputs, err = common.attempt(lambda: op.inputs(cell.edges, dtype, cfg.device), cfg.device)
    if err:
        return {"errors": {"inputs": err}}
    out, err = common.attempt(lambda: op.module(*inputs), cfg.device)
    if err:
        return {"errors": {"forward": err}}
    res = io_bytes(sum(t.numel() for t in inputs), out.numel(), table_numel(op.module), dtype.itemsize)
    grad_out = torch.randn_like(out).detach()
    out = None  # free before timing

    def forward() -> None:
        op.module(*inputs)

    def forward_backward() -> None:
        torch.autograd.grad(op.module(*inputs), inputs, grad_out)

    errors: dict[str, str] = {}
    for stage, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
        res.update(time_stage(stage, fn, cfg, errors))
        if bandwidth:
            res[f"floor_{stage}_ms"] = res[f"io_bytes_{stage}"] / (bandwidth * 1e9) * 1e3
    if errors:
        res["errors"] = errors
    return res


def time_stage(stage: str, fn: Callable[[], None], cfg: BenchConfig, errors: dict[str, str]) -> dict[str, Any]:
    """Median time and (unless disabled) peak memory of one stage; failures go to ``errors[stage...]``."""
    timing, err = common.attempt(
        lambda: common.time_call(fn, cfg.device, cfg.warmup, cfg.reps, cfg.max_seconds), cfg.device)
    if err:
        errors[stage] = err
        return {}
    res: dict[str, Any] = {f"{stage}_ms": timing["median_ms"], f"{stage}_min_ms": timing["min_ms"],
                           f"{stage}_reps": timing["reps"]}
    if "cpu_median_ms" in timing:
        res[f"{stage}_cpu_ms"] = timing["cpu_median_ms"]
    if cfg.memory:
        peak, err = common.attempt(lambda: common.peak_memory(fn, cfg.device), cfg.device)
        if err:
            errors[f"{stage}_memory"] = err
        else:
            res[f"peak_mem_{stage}"], res["memory_method"] = peak
    return res


def measure(variant: Variant, cell: Cell, cfg: BenchConfig, bandwidth: float | None) -> dict[str, Any]:
    """One row of the result table; every failure is recorded in ``row["errors"]``, never raised."""
    row = base_row(variant, cell)
    row.update({"dtype": cfg.dtype, "path_set": cfg.paths if variant.source == "tdn" else "so3 (MACE build)"})
    op, err = common.attempt(lambda: build_op(variant, cell.lmax, cell.channels, cfg, cfg.torch_dtype), cfg.device)
    if err:
        row["errors"] = {"build": err}
        return row
    row.update({"num_paths": op.num_paths, "weights_per_channel": op.weights_per_channel})
    row.update({k: v for k, v in op.info.items() if k in ("rank", "fit_error", "factors_source", "inner_width")})
    acc, err = common.attempt(lambda: accuracy(variant, cell.lmax, cfg, op), cfg.device)
    row.update(acc or {})
    errors = {"accuracy": err} if err else {}
    speed = measure_speed(op, cell, cfg, bandwidth)
    errors.update(speed.pop("errors", {}))
    row.update(speed)
    row["couplings"] = couplings(variant, row)
    if errors:
        row["errors"] = errors
    return row


def base_row(variant: Variant, cell: Cell) -> dict[str, Any]:
    """The identifying fields of a result row."""
    return {"variant": variant.name, "source": variant.source, "kind": variant.kind, "weights": variant.weights,
            "lmax": cell.lmax, "channels": cell.channels, "edges": cell.edges}


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """``speedup_{fwd,fwdbwd}``: the e3nn time of the same cell divided by the row's time (``speedup_cpu_*``: the
    same with process CPU times, CPU runs only)."""
    for row in rows:
        ref = find_row(rows, row, source="e3nn")
        for stage in ("fwd", "fwdbwd"):
            for key, out in ((f"{stage}_ms", f"speedup_{stage}"), (f"{stage}_cpu_ms", f"speedup_cpu_{stage}")):
                if row.get(key) is not None or out.startswith("speedup_f"):
                    row[out] = time_ratio(ref, row, key)


def time_ratio(ref: dict[str, Any] | None, row: dict[str, Any], key: str) -> float | None:
    """``ref[key] / row[key]`` (how many times faster ``row`` is), or None when either time is missing or zero."""
    t, t_ref = row.get(key), (ref or {}).get(key)
    return t_ref / t if t and t_ref else None


def find_row(rows: list[dict[str, Any]], like: dict[str, Any], **match: Any) -> dict[str, Any] | None:
    """The first row in the cell of ``like`` whose fields match ``match``, or None."""
    for row in rows:
        if cell_of(row) == cell_of(like) and all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def run(cfg: BenchConfig, out_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run every cell and variant; write ``{name}.json`` after each row and the markdown and PNG at the end.

    References (e3nn) run first in each cell; cuEquivariance runs last, in its own pass over the cells, because a
    crash inside its kernels can leave the CUDA context unusable (rows after that are marked, not attempted).
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    status = cueq_status() if "cueq" in cfg.references else "not requested"
    references = [v for v in reference_variants(cfg.references) if v.source != "cueq" or status is None]
    main = [v for v in references if v.source != "cueq"] + tdn_variants(cfg.backends)
    last = [v for v in references if v.source == "cueq"]
    meta = common.run_metadata(cfg.device, packages=("e3nn", "cuequivariance", "cuequivariance-torch"))
    meta.update({"config": {**asdict(cfg), "cells": [asdict(c) for c in cfg.cells]},
                 "backends_registered": sorted(tdn_tp.BACKENDS), "cueq_status": status or "measured",
                 "timing": "median of up to reps calls after warm-up; " + (
                     "CUDA events" if torch.device(cfg.device).type == "cuda" else "wall clock (perf_counter)")})
    bandwidth, err = common.attempt(lambda: common.copy_bandwidth(cfg.device), cfg.device)
    meta["copy_bandwidth"] = bandwidth or {"error": err}
    gbps = bandwidth["gb_per_s"] if bandwidth else None
    result: dict[str, Any] = {"meta": meta, "rows": []}
    json_path = Path(out_dir) / f"{cfg.name}.json" if out_dir is not None else None
    lost: str | None = None
    try:
        for cell, variant in [(c, v) for c in cfg.cells for v in main] + [(c, v) for c in cfg.cells for v in last]:
            if lost:
                row = {**base_row(variant, cell), "errors": {"skipped": lost}}
            else:
                row = measure(variant, cell, cfg, gbps)
                common.free_memory(cfg.device)
                if row.get("errors") and not common.device_alive(cfg.device):
                    lost = f"device unusable after {variant.name} at {cell.label}: {row['errors']}"[:300]
            result["rows"].append(row)
            log(progress_line(row))
            if json_path is not None:
                add_speedups(result["rows"])
                common.write_json(json_path, result)
    except KeyboardInterrupt:  # e.g. a time limit: the table and plot of what was measured
        if out_dir is not None and result["rows"]:
            add_speedups(result["rows"])
            result["targets"] = evaluate_targets(result["rows"], cfg)
            note = "interrupted before the end: only these rows were measured"
            write_outputs(result, Path(out_dir), cfg.name, [note])
        raise
    add_speedups(result["rows"])
    result["targets"] = evaluate_targets(result["rows"], cfg)
    if out_dir is not None:
        write_outputs(result, Path(out_dir), cfg.name)
    return result


def progress_line(row: dict[str, Any]) -> str:
    """One log line of a measured row."""
    times = " ".join(f"{s}={common.fmt_ms(row.get(f'{s}_ms'))}ms" for s in ("fwd", "fwdbwd"))
    errors = f" errors={row['errors']}" if row.get("errors") else ""
    return f"L={row['lmax']} C={row['channels']} E={row['edges']} {row['variant']:<14} {times}{errors}"


# ---------------------------------------------------------------------------------------------------- targets


def evaluate_targets(rows: list[dict[str, Any]], cfg: BenchConfig) -> list[dict[str, Any]]:
    """The benchmark's GPU targets (tdn and the references side by side in one run), evaluated on whatever this run
    measured."""
    cp = [r for r in rows if r.get("kind") == "cp" and r.get("weights") == "shared"]
    grid = [r for r in rows if r.get("kind") == "grid" and r.get("weights") == "shared"]
    out = []
    for r in [r for r in cp if r["lmax"] == 3 and r["channels"] == 128]:
        out.append(target("cp fwd+bwd >= 20x e3nn at L=3, C=128", r, r.get("speedup_fwdbwd"), 20.0))
    if cp and not any(r["source"] == "cueq" for r in rows):
        out.append({"target": "cp faster than cuEquivariance (every L)", "met": None,
                    "note": "cuEquivariance not measured in this run"})
    for r in cp if any(r["source"] == "cueq" for r in rows) else []:
        cue = find_row(rows, r, source="cueq")
        for stage in ("fwd", "fwdbwd"):
            out.append(target(f"cp {stage} faster than cuEquivariance", r, time_ratio(cue, r, f"{stage}_ms"), 1.0))
    for r in [r for r in grid if r["lmax"] >= 2]:
        out.append(target("grid fwd+bwd faster than e3nn (L >= 2)", r, r.get("speedup_fwdbwd"), 1.0))
    if not cp:
        out.append({"target": "cp targets", "met": None, "note": "cp backend not registered in this run"})
    device_note = None if torch.device(cfg.device).type == "cuda" else "CPU run: the targets are GPU targets"
    for t in out:
        t.setdefault("context", device_note)
    return out


def target(name: str, row: dict[str, Any], value: float | None, threshold: float,
           note: str | None = None) -> dict[str, Any]:
    """One target check: met when ``value >= threshold``, with a note saying by how much it was missed."""
    met = None if value is None else value >= threshold
    if value is None and note is None:
        note = "not measured (error or missing reference)"
    elif met is False:
        note = f"missed: {value:.2f}x vs {threshold:g}x needed ({threshold / value:.1f}x short)"
    return {"target": name, "lmax": row["lmax"], "channels": row["channels"], "edges": row["edges"],
            "value": value, "threshold": threshold, "met": met, "note": note}


# -------------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``scripts/bench_tp.py``."""
    parser = argparse.ArgumentParser(
        prog="bench_tp.py",
        description="Benchmark tdn's tensor-product backends against e3nn (and cuEquivariance) in one run.",
    )
    parser.add_argument("--out", required=True, help="output directory for NAME.json / .md / .png")
    parser.add_argument("--name", default=None, help="file name stem (default: tp_<device>[_quick])")
    parser.add_argument("--quick", action="store_true",
                        help=f"small CPU run: L={list(QUICK_LMAX)}, C={QUICK_CHANNELS}, E={QUICK_EDGES}, few reps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--lmax", type=int, nargs="+", help="degrees L (crossed with --channels)")
    parser.add_argument("--channels", type=int, nargs="+", help="channels C (crossed with --lmax)")
    parser.add_argument("--pairs", help="explicit L:C pairs, e.g. 1:128,3:64 (default: those of BENCHMARKS.md)")
    parser.add_argument("--edges", type=int, nargs="+", help=f"numbers of edges E (default {FULL_EDGES})")
    parser.add_argument("--backends", nargs="+", help="tdn backends (default: every registered one)")
    parser.add_argument("--references", nargs="*", default=list(REFERENCES), choices=REFERENCES,
                        help="reference columns (default: e3nn cueq; cueq is skipped when not importable)")
    parser.add_argument("--paths", default="o3", choices=("o3", "so3"), help="path set of the tdn backends")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 5; --quick 1)")
    parser.add_argument("--reps", type=int, help="timed calls, the median is reported (default 20; --quick 3)")
    parser.add_argument("--max-seconds", type=float, help="stop repeating a timing after this long")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's own; --quick uses 1, steadier on a shared CPU)")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The benchmark configuration of the parsed options (``--quick``: few repetitions)."""
    cfg = BenchConfig(cells=cells_from_args(args), device=args.device, dtype=args.dtype, paths=args.paths,
                      backends=tuple(args.backends) if args.backends else None, references=tuple(args.references),
                      memory=not args.no_memory, seed=args.seed, quick=args.quick)
    if args.quick:
        cfg.warmup, cfg.reps, cfg.max_seconds = 1, 3, 2.0
    for attr in ("warmup", "reps", "max_seconds"):
        if getattr(args, attr) is not None:
            setattr(cfg, attr, getattr(args, attr))
    cfg.name = args.name or f"tp_{torch.device(args.device).type}{'_quick' if args.quick else ''}"
    return cfg


def cells_from_args(args: argparse.Namespace) -> list[Cell]:
    """The cells to run: explicit pairs, degrees crossed with channels, or the reference pairs; each edge count."""
    if args.pairs:
        pairs = [tuple(int(v) for v in p.split(":")) for p in args.pairs.split(",")]
    elif args.lmax or args.channels or args.quick:
        lmaxes = args.lmax or (list(QUICK_LMAX) if args.quick else sorted({l for l, _ in REFERENCE_PAIRS}))
        channels = args.channels or ([QUICK_CHANNELS] if args.quick else [32])
        pairs = [(l, c) for c in channels for l in lmaxes]
    else:
        pairs = list(REFERENCE_PAIRS)
    edges = args.edges or ([QUICK_EDGES] if args.quick else [FULL_EDGES])
    return [Cell(l, c, e) for e in edges for l, c in pairs]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line: parse, run, write the JSON, markdown and PNG."""
    return common.cli_main(argv, parse_args, config_from_args, run)
