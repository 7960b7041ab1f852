"""Shared benchmark helpers: timing, peak memory, copy bandwidth, run metadata, and JSON / markdown / PNG writers.

Nothing here knows about tensor products; the tensor-product and MD benchmarks both build on it.

Timing: warm-up calls, then the median of repeated calls, measured with CUDA events on a GPU and a wall clock
(``time.perf_counter``) on a CPU. Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` above what was
allocated before the call; on a CPU there is no allocator statistic, so the peak of the bytes held by tensors
*created during the call* is tracked through a ``TorchDispatchMode`` (storages counted once, freed through
weak references). That CPU figure excludes the inputs, memory that kernels use internally and allocator
overhead; it is reported under its own method name so it is never mistaken for a GPU allocator figure.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CPU_MEMORY_METHOD = (
    "cpu: peak bytes of tensors created during the call (dispatch tracking; excl. inputs, kernel scratch)"
)
CUDA_MEMORY_METHOD = "cuda: torch.cuda.max_memory_allocated above the bytes allocated before the call"


# ----------------------------------------------------------------------------------------------------- devices


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device | str, collect: bool | None = None) -> None:
    """Return cached device memory (after a cell, and after an out-of-memory error).

    ``collect`` runs the garbage collector first (reference cycles can hold device tensors); default: on a GPU only,
    since on a CPU freed tensors go back at once and a full collection costs ~0.5 s in a big process.
    """
    device = torch.device(device)
    if collect if collect is not None else device.type == "cuda":
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_alive(device: torch.device | str) -> bool:
    """Whether a tiny kernel still runs: a CUDA error such as an illegal memory access poisons the context."""
    try:
        torch.ones(8, device=device).sum().item()
        synchronize(device)
        return True
    except Exception:  # noqa: BLE001 - any failure means the device is unusable
        return False


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set ``torch.set_default_dtype`` (modules that build their tables in the default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(error).lower()
    return "out of memory" in text or "cannot allocate memory" in text


def describe_error(error: BaseException, limit: int = 300) -> str:
    """One short line for a result table: ``OOM: ...`` for out-of-memory errors, else ``Type: message``."""
    prefix = "OOM" if is_out_of_memory(error) else type(error).__name__
    message = " ".join(str(error).split())
    return f"{prefix}: {message}"[:limit]


def attempt(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, description)`` when it raises; device memory is released after a failure."""
    try:
        return fn(), None
    except Exception as error:  # noqa: BLE001 - one failing cell must not end the benchmark
        description = describe_error(error)
    # outside the except block: the traceback (and the tensors its frames hold) is gone before memory is released
    free_memory(device, collect=True)
    return None, description


# ------------------------------------------------------------------------------------------------------ timing


def time_call(
    fn: Callable[[], Any],
    device: torch.device | str,
    warmup: int = 5,
    reps: int = 20,
    max_seconds: float | None = None,
) -> dict[str, float | int]:
    """Median time of ``fn()`` in milliseconds after ``warmup`` calls.

    CUDA events on a GPU, ``time.perf_counter`` on a CPU. On a CPU the median process CPU time is returned too
    (``cpu_median_ms``): on a machine shared with other jobs it is far less disturbed by their load than the wall
    clock (it counts this process's threads only, so it equals the work done, not the latency, with several
    threads). ``max_seconds`` stops repeating early (after at least three timed calls) so that one slow cell cannot
    hold up a run; the number of timed calls is returned.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    cpu_times: list[float] = []
    start_all = time.perf_counter()
    for _ in range(reps):
        cpu_start = time.process_time()
        times.append(_time_once(fn, device))
        cpu_times.append((time.process_time() - cpu_start) * 1e3)
        if max_seconds is not None and len(times) >= 3 and time.perf_counter() - start_all > max_seconds:
            break
    out: dict[str, float | int] = {"median_ms": statistics.median(times), "min_ms": min(times), "reps": len(times)}
    if device.type != "cuda":
        out["cpu_median_ms"] = statistics.median(cpu_times)
    return out


def time_interleaved(
    calls: dict[str, Callable[[], Any]],
    device: torch.device | str,
    warmup: int = 1,
    rounds: int = 7,
    steps: int = 1,
    max_seconds: float | None = None,
) -> dict[str, dict[str, float]]:
    """Every call once per round, in turn, so that load from other jobs on a shared machine hits all alike.

    Per name: ``step_ms`` / ``min_ms`` (median / min wall ms per step, one call being ``steps`` steps), ``cpu_ms``
    (median process CPU ms per step; NaN on a GPU) and ``reps``. ``max_seconds`` ends the timed rounds early (after
    at least three).
    """
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    start = None
    for round_ in range(warmup + rounds):
        if round_ == warmup:
            start = time.perf_counter()
        for name, call in calls.items():
            timing = time_call(call, device, warmup=0, reps=1)
            if round_ >= warmup:
                wall[name].append(timing["median_ms"] / steps)
                cpu[name].append(timing.get("cpu_median_ms", float("nan")) / steps)
        timed = round_ + 1 - warmup
        if max_seconds is not None and start is not None and timed >= 3 and time.perf_counter() - start > max_seconds:
            break
    return {name: {"step_ms": statistics.median(wall[name]), "min_ms": min(wall[name]),
                   "cpu_ms": statistics.median(cpu[name]), "reps": len(wall[name])} for name in calls}  # fmt: skip


def _time_once(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3


def copy_bandwidth(device: torch.device | str, nbytes: int | None = None, reps: int = 10) -> dict[str, float]:
    """Device copy bandwidth in GB/s (bytes read + bytes written) from copying a large float32 tensor.

    Two measurements: ``clone_gb_per_s`` (a fresh output each time, as an op allocating its result does; on a CPU
    this includes the page faults of new memory) and ``copy_gb_per_s`` (``copy_`` into a preallocated tensor).
    ``gb_per_s`` is the faster of the two, so that a floor computed from it is a lower bound.
    Default size: 1 GiB on a GPU, 64 MiB on a CPU (beyond the caches).
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**26
    numel = nbytes // 4
    clone_ms, copy_ms = _time_copies(numel, device, reps)
    free_memory(device)
    moved = 2 * numel * 4
    clone, copy = moved / (clone_ms * 1e-3) / 1e9, moved / (copy_ms * 1e-3) / 1e9
    return {"gb_per_s": max(clone, copy), "clone_gb_per_s": clone, "copy_gb_per_s": copy, "bytes": float(nbytes)}


def _time_copies(numel: int, device: torch.device, reps: int) -> tuple[float, float]:
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    clone = time_call(src.clone, device, warmup=2, reps=reps)["median_ms"]
    copy = time_call(lambda: dst.copy_(src), device, warmup=2, reps=reps)["median_ms"]
    return clone, copy


# ------------------------------------------------------------------------------------------------ peak memory


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes held by tensors created inside the ``with`` block (CPU stand-in for the CUDA allocator stats).

    Every storage an operator returns is counted once (views and in-place results of existing storages are not)
    and subtracted again when it is freed. Inputs and tensors that existed before the block are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._owned: dict[int, weakref.finalize] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._owned.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch protocol
        out = func(*args, **(kwargs or {}))
        existing = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if _is_dense(t)}
        for tensor in tree_flatten(out)[0]:
            if _is_dense(tensor):
                self._track(tensor, existing)
        return out

    def _track(self, tensor: torch.Tensor, existing: set[int]) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in existing or key in self._owned:
            return
        self._owned[key] = weakref.finalize(storage, self._release, key, nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)


def _is_dense(obj: object) -> bool:
    return isinstance(obj, torch.Tensor) and obj.layout == torch.strided and obj.device.type != "meta"


def peak_memory(fn: Callable[[], Any], device: torch.device | str) -> tuple[int, str]:
    """``(bytes, method)``: extra memory at the peak of one call of ``fn`` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before), CUDA_MEMORY_METHOD
    tracker = TensorMemoryTracker()
    with tracker:
        fn()
    return int(tracker.peak), CPU_MEMORY_METHOD


# --------------------------------------------------------------------------------------------------- metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"commit": sha or "unknown", "dirty": bool or None}`` of the repository holding ``path`` (read-only)."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"commit": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def machine_info(device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "gpu": props.name,
            "gpu_memory_gb": round(props.total_memory / 1e9, 1),
            "cuda": torch.version.cuda,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        })
    return info


def run_metadata(device: torch.device | str, packages: Iterable[str] = ()) -> dict[str, Any]:
    """Machine, date (UTC), torch / package versions and the git commit, for the header of every result file."""
    device = torch.device(device)
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "machine": machine_info(device),
        "git": git_commit(),
        "versions": {"torch": torch.__version__},
    }
    for name in packages:
        meta["versions"][name] = package_version(name)
    return meta


def package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return None


def machine_line(meta: Mapping[str, Any]) -> str:
    """``"NVIDIA H100 80GB (CUDA 12.x)"`` or ``"CPU: AMD EPYC, 2 threads"``."""
    machine = meta["machine"]
    if "gpu" in machine:
        return f"{machine['gpu']} (CUDA {machine.get('cuda')}), host CPU {machine['cpu']}"
    return f"CPU: {machine['cpu']} ({machine['cpu_count']} logical CPUs), torch threads: {machine['torch_threads']}"


# ---------------------------------------------------------------------------------------------------- writers


def jsonable(obj: Any) -> Any:
    """Plain JSON values: NaN / inf become null, tuples lists, dtypes and devices strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write atomically (a crash mid-run leaves the previous complete file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=1) + "\n")
    tmp.replace(path)
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |")
    return "\n".join(lines)


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_report(
    result: dict[str, Any],
    out_dir: str | os.PathLike,
    name: str,
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], Path],
) -> list[Path]:
    """``NAME.json``, ``NAME.md`` (``markdown(result)``) and ``NAME.png`` (``plot(result, path)``) in ``out_dir``; a
    plot that fails is reported on stderr and costs nothing else (the measurements are already written)."""
    out_dir = Path(out_dir)
    paths = [write_json(out_dir / f"{name}.json", result), write_text(out_dir / f"{name}.md", markdown(result))]
    try:
        paths.append(plot(result, out_dir / f"{name}.png"))
    except Exception as err:  # noqa: BLE001 - a broken plot must not lose the measurements
        import sys

        print(f"plot failed: {err}", file=sys.stderr)
    return paths


def line_plot(
    path: str | os.PathLike,
    x_labels: Sequence[str],
    panels: Mapping[str, Mapping[str, Sequence[float | None]]],
    ylabel: str,
    title: str = "",
    logy: bool = True,
) -> Path:
    """One subplot per panel, one line per series over the categorical ``x_labels``; ``None`` leaves a gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    positions = list(range(len(x_labels)))
    for ax, (panel, series) in zip(axes[0], panels.items()):
        for name, values in series.items():
            ys = [math.nan if v is None else v for v in values]
            ax.plot(positions, ys, marker="o", label=name)
        ax.set_xticks(positions, list(x_labels))
        ax.set_title(panel)
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cli_main(
    argv: Sequence[str] | None,
    parse_args: Callable[[Sequence[str] | None], Any],
    config_from_args: Callable[[Any], Any],
    run: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """The ``main`` of a benchmark script: parse, set torch threads (``--threads``; one for ``--quick``), run."""
    args = parse_args(argv)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    cfg = config_from_args(args)
    result = run(cfg, out_dir=args.out)
    print(f"wrote {Path(args.out) / cfg.name}.json, .md, .png")
    return result


# ------------------------------------------------------------------------------------------------- formatting


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def fmt_sci(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"
