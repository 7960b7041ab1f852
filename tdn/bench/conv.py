"""Convolution benchmark: ``out[n] = sum_{e: receiver(e) = n} tp(x[sender(e)], y[e], w[e])``, forward and
forward+backward (gradients of x, y and w: what forces and training need), on a graph with a fixed number of
neighbours per node, with the DRAM floor of the factorised convolution next to every time.

Implementations (the same graph and sizes):

- ``cp fused`` / ``grid fused``: :func:`tdn.tp.fused.edge_conv` as a Triton segment reduction (GPU only here;
  the CPU interpreter is for tests, not timing), node-side matmuls around it;
- ``cp chunked`` / ``grid chunked``: the CPU's first-order path (``fused=None`` without Triton): the same
  factorisation in PyTorch, messages one cache-sized chunk of edges at a time, hand-written backward;
- ``cp ref`` / ``grid ref``: the same factorisation in plain PyTorch (per-edge ``[E, C, R]`` messages, index_add;
  what training differentiates twice);
- ``cp-degree fused`` / ``cp-degree ref``: cp with one weight per output degree (one fused reduction per degree;
  the reference, also the CPU's path for it, runs the product per edge); ``cp-inout`` / ``grid-inout`` the same
  with "inout" weights;
- ``cg[shared]``: the exact sparse CG product per edge, then index_add;
- ``e3nn uvu``: e3nn's ``TensorProduct`` in MACE's uvu mode per edge (one weight per channel and path) and
  index_add, as MACE's convolution runs it.

Floor of the factorised convolution (bytes an ideal implementation moves; R = rank, d_* = (l+1)^2):

    forward:  x, out: N C (d_in + d_out);  xb = x B and acc, written and read: 4 N C R;
              y and yc = y C: E (d_sh + 2 R);  w: E C;  sender, receiver: 2 E index bytes
    backward: grad out N C d_out, grad acc written and read 2 N C R, xb and grad xb 2 N C R, grad x N C d_in,
              yc read, grad yc written and read, grad y: E (3 R + d_sh);  w read, grad w written: 2 E C;  indices

divided by the measured copy bandwidth (read + write bytes per second). Node arrays are counted once, as if
gathers hit the cache: a floor, not a model.

    python scripts/bench_conv.py --device cuda                      # L = 1..4, C = 128, E = 100,000
    python scripts/bench_conv.py --quick --device cpu
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import tp as tdn_tp
from ..tp.fused import triton_available
from . import common
from .tp import build_e3nn

FULL_CELLS = ((1, 128), (2, 128), (3, 128), (4, 128), (3, 64))
QUICK_CELLS = ((1, 16), (2, 16), (3, 16))
MORE_IMPLS = ("cp-inout fused", "cp-inout ref", "grid-inout fused", "grid-inout ref")  # on request (--impls)


@dataclass
class ConvBenchConfig:
    device: str = "cpu"
    cells: tuple[tuple[int, int], ...] = FULL_CELLS  # (L, C)
    edges: int = 100_000
    neighbors: int = 40  # edges per receiver: N = edges / neighbors
    dtype: str = "float32"
    paths: str = "o3"
    impls: tuple[str, ...] = (
        "cp fused", "cp chunked", "cp ref", "cp-degree fused", "cp-degree ref",
        "grid fused", "grid chunked", "grid ref", "cg[shared]", "e3nn uvu",
    )  # fmt: skip
    warmup: int = 3
    reps: int = 15
    max_seconds: float = 20.0
    seed: int = 0
    name: str = "conv_cpu"


def floor_bytes(nodes: int, edges: int, channels: int, d_in: int, d_sh: int, d_out: int, rank: int,
                itemsize: int, index_itemsize: int = 8) -> dict[str, int]:  # fmt: skip
    """DRAM bytes of an ideal factorised convolution, forward and forward+backward (see the module docstring)."""
    n, e, c, r = nodes, edges, channels, rank
    index = 2 * e * index_itemsize
    fwd = (n * c * (d_in + d_out) + 4 * n * c * r + e * (d_sh + 2 * r) + e * c) * itemsize + index
    bwd = (n * c * d_out + 4 * n * c * r + n * c * d_in + e * (3 * r + d_sh) + 2 * e * c) * itemsize + index
    return {"floor_bytes_fwd": fwd, "floor_bytes_fwdbwd": fwd + bwd}


def random_graph(nodes: int, neighbors: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``neighbors`` random senders per receiver, edges sorted by receiver (as neighbour lists give them)."""
    gen = torch.Generator().manual_seed(seed)
    receiver = torch.arange(nodes).repeat_interleave(neighbors)
    sender = torch.randint(0, nodes, (nodes * neighbors,), generator=gen)
    return sender.to(device), receiver.to(device)


def tdn_conv(kind: str, weights: str, lmax: int, channels: int, paths: str, fused: bool | None):
    """``(module, fn(x, y, w, sender, receiver), rank or None)`` for a tdn backend."""
    tp = tdn_tp.build(kind, lmax=lmax, channels=channels, paths=paths, weights=weights)
    rank = tp.factors()[0].shape[1] if isinstance(tp, tdn_tp.base.FactorisedProduct) else None
    return tp, (lambda x, y, w, s, r: tp.conv(x, y, w, s, r, fused=fused)), rank


def e3nn_conv(lmax: int, channels: int):
    op = build_e3nn(lmax, channels)

    def conv(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        messages = op.module(x.index_select(0, s), y, w)  # [E, dim_out]
        return messages.new_zeros(x.shape[0], messages.shape[1]).index_add_(0, r, messages)

    return op, conv


def measure_cell(impl: str, lmax: int, channels: int, cfg: ConvBenchConfig, bandwidth: float) -> dict[str, Any]:
    dtype = getattr(torch, cfg.dtype)
    device = cfg.device
    nodes = cfg.edges // cfg.neighbors
    row: dict[str, Any] = {"impl": impl, "lmax": lmax, "channels": channels, "edges": nodes * cfg.neighbors,
                           "nodes": nodes}  # fmt: skip
    has_triton = triton_available(torch.device(device))
    if impl.endswith("fused") and not has_triton:
        row["skipped"] = f"the fused kernel needs Triton on CUDA; device is {device}"
        return row
    if impl.endswith("chunked") and has_triton:
        row["skipped"] = "the chunked PyTorch path is the CPU's (Triton runs here)"
        return row
    torch.manual_seed(cfg.seed)
    with common.default_dtype(dtype):
        if impl == "e3nn uvu":
            op, fn = e3nn_conv(lmax, channels)
            module = op.module.to(device)
            shapes = (op.shapes[0], op.shapes[1], op.shapes[2])
        else:
            kind, variant = impl.split(" ") if " " in impl else ("cg", "ref")
            kind, _, weights = kind.removesuffix("[shared]").partition("-")  # "cp-degree": cp, weights "degree"
            weights = weights or "shared"
            fused = {"fused": True, "chunked": None, "ref": False}[variant]
            module, fn, rank = tdn_conv(kind, weights, lmax, channels, cfg.paths, fused=fused)
            module = module.to(device)
            d_in, d_sh, _ = module.dims
            shapes = ((channels, d_in), (d_sh,), (channels, module.num_weights))
            if rank is not None and weights == "shared":  # the floor formula is the shared-weight one
                row["rank"] = int(rank)
                row.update(floor_bytes(nodes, row["edges"], channels, d_in, d_sh, module.dims[2], int(rank),
                                       dtype.itemsize))  # fmt: skip
    sender, receiver = random_graph(nodes, cfg.neighbors, device, cfg.seed)
    x = torch.randn(nodes, *shapes[0], dtype=dtype, device=device, requires_grad=True)
    y = torch.randn(row["edges"], *shapes[1], dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(row["edges"], *shapes[2], dtype=dtype, device=device, requires_grad=True)
    out = fn(x, y, w, sender, receiver)
    grad_out = torch.randn_like(out)
    if impl.endswith(("fused", "chunked")):  # the benchmark's check of the fast paths against the reference
        reference = module.conv(x, y, w, sender, receiver, fused=False)
        row["rel_error_vs_ref"] = float((out - reference).norm() / reference.norm())
    del out

    def forward() -> None:
        with torch.no_grad():
            fn(x, y, w, sender, receiver)

    def forward_backward() -> None:
        torch.autograd.grad(fn(x, y, w, sender, receiver), (x, y, w), grad_out)

    for stage, call in (("fwd", forward), ("fwdbwd", forward_backward)):
        timing, err = common.attempt(
            lambda c=call: common.time_call(c, device, cfg.warmup, cfg.reps, cfg.max_seconds), device
        )
        if err:
            row[f"error_{stage}"] = err
            continue
        row[f"{stage}_ms"] = timing["median_ms"]
        if f"floor_bytes_{stage}" in row:
            row[f"floor_{stage}_ms"] = row[f"floor_bytes_{stage}"] / (bandwidth * 1e9) * 1e3
            row[f"x_floor_{stage}"] = row[f"{stage}_ms"] / row[f"floor_{stage}_ms"]
    return row


def run(cfg: ConvBenchConfig, out_dir: str | Path) -> dict[str, Any]:
    """Measure every cell, writing the JSON after each row; the table and plot at the end, or with the rows measured
    so far when interrupted (KeyboardInterrupt, e.g. a time limit)."""
    meta = common.run_metadata(cfg.device, packages=("e3nn", "triton"))
    bandwidth = common.copy_bandwidth(cfg.device)
    meta["copy_bandwidth"] = bandwidth
    rows: list[dict[str, Any]] = []
    result = {"meta": meta, "config": asdict(cfg), "rows": rows}
    out = Path(out_dir)
    try:
        for lmax, channels in cfg.cells:
            for impl in cfg.impls:
                row, err = common.attempt(
                    lambda i=impl, L=lmax, C=channels: measure_cell(i, L, C, cfg, bandwidth["gb_per_s"]), cfg.device
                )
                row = row or {"impl": impl, "lmax": lmax, "channels": channels, "error": err}
                print(progress_line(row), flush=True)
                rows.append(row)
                common.write_json(out / f"{cfg.name}.json", result)
    except KeyboardInterrupt:
        if rows:
            result["interrupted"] = True
            write_results(result, out, cfg.name)
        raise
    write_results(result, out, cfg.name)
    return result


def write_results(result: dict[str, Any], out: Path, name: str) -> None:
    add_speedups(result["rows"])
    common.write_json(out / f"{name}.json", result)
    common.write_text(out / f"{name}.md", markdown_report(result))
    plot(result, out / f"{name}.png")


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """``x_e3nn_<stage>``: e3nn's time over this row's, in the same cell."""
    for row in rows:
        ref = next((r for r in rows if r["impl"] == "e3nn uvu" and (r["lmax"], r["channels"]) ==
                    (row["lmax"], row["channels"])), None)  # fmt: skip
        for stage in ("fwd", "fwdbwd"):
            if ref and ref.get(f"{stage}_ms") and row.get(f"{stage}_ms"):
                row[f"x_e3nn_{stage}"] = ref[f"{stage}_ms"] / row[f"{stage}_ms"]


def progress_line(row: dict[str, Any]) -> str:
    cell = f"L={row['lmax']} C={row['channels']}"
    if "fwd_ms" not in row:
        return f"{cell:>12} {row['impl']:>11}: {row.get('skipped') or row.get('error') or row.get('error_fwd')}"
    both = common.fmt_ms(row.get("fwdbwd_ms"))
    floor = common.fmt_ms(row.get("floor_fwdbwd_ms"))
    return f"{cell:>12} {row['impl']:>11}: fwd {common.fmt_ms(row['fwd_ms'])} ms, fwd+bwd {both} ms, floor {floor} ms"


def _cell_text(row: dict[str, Any] | None, stage: str) -> str:
    if row is None or f"{stage}_ms" not in row:
        return "—" if row is None else ("skipped" if "skipped" in row else "error")
    text = common.fmt_ms(row[f"{stage}_ms"])
    if row.get(f"x_e3nn_{stage}"):
        text += f" ({common.fmt_ratio(row[f'x_e3nn_{stage}'])})"
    if row.get(f"x_floor_{stage}"):
        text += f", {row[f'x_floor_{stage}']:.1f}x floor"
    return text


def markdown_report(result: dict[str, Any]) -> str:
    meta, cfg, rows = result["meta"], result["config"], result["rows"]
    git = meta["git"]
    cells = list(dict.fromkeys((r["lmax"], r["channels"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines = [
        f"# Convolution benchmark ({cfg['name']})",
        "",
        f"- machine: {common.machine_line(meta)}",
        f"- date: {meta['date']}; commit {git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- graph: {rows[0].get('nodes', '?')} nodes x {cfg['neighbors']} neighbours = {rows[0].get('edges', '?')} "
        f"edges (random senders, sorted by receiver); dtype {cfg['dtype']}; paths {cfg['paths']!r}; weights shared "
        "for tdn (the mode after the dash where one is named: cp-degree, cp-inout), per path for e3nn uvu",
        f"- copy bandwidth {meta['copy_bandwidth']['gb_per_s']:.1f} GB/s sets the floor (see tdn/bench/conv.py)",
        "- cell: median ms (speed-up vs e3nn uvu), time / floor of the factorised convolution",
        "",
    ]
    for stage, title in (("fwdbwd", "forward + backward (grads of x, y, w)"), ("fwd", "forward")):
        lines += [f"## {title}", ""]
        header = ["impl"] + [f"L={L} C={C}" for L, C in cells]
        body = []
        for impl in impls:
            body.append([impl] + [_cell_text(next((r for r in rows if r["impl"] == impl and
                                                   (r["lmax"], r["channels"]) == cell), None), stage)
                                  for cell in cells])  # fmt: skip
        lines += [common.markdown_table(header, body), ""]
    ranks = {(r["lmax"], r["impl"].split(" ")[0]): r["rank"] for r in rows if "rank" in r}
    if ranks:
        lines.append("- inner width R (cp rank, grid points): "
                     + ", ".join(f"{k} L={L}: {v}" for (L, k), v in sorted(ranks.items())))  # fmt: skip
    errors = [f"{r['impl']} L={r['lmax']} C={r['channels']}: {r['rel_error_vs_ref']:.1e}"
              for r in rows if "rel_error_vs_ref" in r]  # fmt: skip
    if errors:
        lines.append("- fused / chunked vs the PyTorch reference, relative error: " + ", ".join(errors))
    skipped = sorted({r["skipped"] for r in rows if "skipped" in r})
    lines += [f"- skipped: {s}" for s in skipped]
    if result.get("interrupted"):
        lines.append("- interrupted before the end (e.g. a time limit): only the rows above were measured")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    rows = result["rows"]
    cells = list(dict.fromkeys((r["lmax"], r["channels"]) for r in rows))
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if any("fwd_ms" in r for r in rows if r["impl"] == i)]

    def series(key: str, impl: str) -> list[float | None]:
        return [next((r.get(key) for r in rows if r["impl"] == impl and (r["lmax"], r["channels"]) == c), None)
                for c in cells]  # fmt: skip

    panels = {}
    for stage, title in (("fwd", "forward"), ("fwdbwd", "forward + backward")):
        panel = {impl: series(f"{stage}_ms", impl) for impl in impls}
        panel["cp floor"] = series(f"floor_{stage}_ms", "cp ref")
        panels[title] = panel
    return common.line_plot(path, [f"L={L}\nC={C}" for L, C in cells], panels, "ms", result["config"]["name"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small CPU run: L = 1..3, C = 16, E = 4000")
    p.add_argument("--lmax", type=int, nargs="+", default=None, help="L values (with --channels)")
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--edges", type=int, default=None)
    p.add_argument("--neighbors", type=int, default=40)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--impls", nargs="+", default=None, help=f"subset of {ConvBenchConfig.impls + MORE_IMPLS}")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    p.add_argument("--name", default=None, help="output name (default conv_<device type>[_quick])")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = ConvBenchConfig(device=args.device, neighbors=args.neighbors, dtype=args.dtype, reps=args.reps)
    if args.quick:
        cfg.cells, cfg.edges, cfg.max_seconds = QUICK_CELLS, 4000, 5.0
    if args.lmax is not None:
        cfg.cells = tuple((L, args.channels or 128) for L in args.lmax)
    if args.edges is not None:
        cfg.edges = args.edges
    if args.impls is not None:
        unknown = set(args.impls) - set(ConvBenchConfig.impls + MORE_IMPLS)
        if unknown:
            raise ValueError(f"unknown --impls {sorted(unknown)}; known: {ConvBenchConfig.impls + MORE_IMPLS}")
        cfg.impls = tuple(args.impls)
    cfg.name = args.name or f"conv_{torch.device(cfg.device).type}" + ("_quick" if args.quick else "")
    return run(cfg, args.out)
