"""Reference side of the MD benchmark, run in a child process by tdn.bench.md: mace-torch's MACECalculator with an
untrained MACE of the given widths, timed with exactly the step and statistics that tdn's side uses.

It never imports tdn (mace-torch pins e3nn 0.4.4, tdn needs e3nn >= 0.5). Usage: ``python _mace_worker.py JOB_JSON``.
Prints ``ROW {json}`` per measurement, ``NOTE text`` for what was skipped, ``VERSIONS {json}``.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch


def note(text: str) -> None:
    print("NOTE " + text, flush=True)


def build_model(widths: dict[str, Any], path: str) -> None:
    from e3nn import o3
    from mace import modules

    interaction = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    model = modules.ScaleShiftMACE(
        r_max=widths["r_max"],
        num_bessel=widths["num_bessel"],
        num_polynomial_cutoff=widths["num_polynomial_cutoff"],
        max_ell=widths["max_ell"],
        interaction_cls=interaction,
        interaction_cls_first=interaction,
        num_interactions=widths["num_interactions"],
        num_elements=len(widths.get("atomic_numbers", [29])),
        hidden_irreps=o3.Irreps(widths["hidden_irreps"]),
        MLP_irreps=o3.Irreps(widths["MLP_irreps"]),
        gate=torch.nn.functional.silu,
        atomic_energies=np.full(len(widths.get("atomic_numbers", [29])), -3.0),
        avg_num_neighbors=widths["avg_num_neighbors"],
        atomic_numbers=widths.get("atomic_numbers", [29]),
        correlation=widths["correlation"],
        radial_type="bessel",
        radial_MLP=widths["radial_MLP"],
        atomic_inter_scale=1.0,
        atomic_inter_shift=0.0,
    )
    torch.save(model, path)


def time_steps(step, device: str, warmup: int, reps: int, max_seconds: float | None) -> dict[str, float]:
    """The same statistic as tdn.bench.common.time_call: median ms, CUDA events on a GPU."""
    for _ in range(warmup):
        step()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    times: list[float] = []
    start_all = time.perf_counter()
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
        if max_seconds is not None and len(times) >= 3 and time.perf_counter() - start_all > max_seconds:
            break
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": len(times)}


def cu_fcc(natoms: int, lattice: float):
    from ase.build import bulk

    n = round((natoms / 4) ** (1 / 3))
    atoms = bulk("Cu", "fcc", a=lattice, cubic=True).repeat((n, n, n))
    atoms.rattle(0.05, seed=0)
    return atoms


def measure(job: dict[str, Any], model_path: str, natoms: int, dtype: str, cueq: bool) -> dict[str, Any]:
    from mace.calculators import MACECalculator

    device = job["device"]
    calc = MACECalculator(model_paths=model_path, device=device, default_dtype=dtype, enable_cueq=cueq)
    atoms = cu_fcc(natoms, job["lattice"])
    atoms.calc = calc
    rng = np.random.default_rng(0)

    def step() -> None:
        atoms.positions += rng.normal(scale=job["noise"], size=atoms.positions.shape)
        atoms.get_forces()

    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timing = time_steps(step, device, job["warmup"], job["reps"], job["max_seconds"])
    return {
        "step_ms": timing["median_ms"],
        "min_ms": timing["min_ms"],
        "reps": timing["reps"],
        "steps_per_s": 1e3 / timing["median_ms"],
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None,
    }


def describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    oom = isinstance(error, torch.OutOfMemoryError | MemoryError) or "out of memory" in text.lower()
    return f"{'OOM' if oom else type(error).__name__}: {text}"[:300]


def announce_mace(threads: int) -> bool:
    """Set the torch threads, import mace-torch and print its ``VERSIONS``; False (with a note) if it cannot be
    imported here."""
    torch.set_num_threads(threads)
    try:
        import e3nn
        import mace
        from mace import data, tools  # noqa: F401
        from mace.calculators import MACECalculator  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means no reference
        note(f"mace-torch reference skipped: cannot import it ({type(err).__name__}: {err})")
        return False
    versions = {"mace-torch": getattr(mace, "__version__", "?"), "e3nn": e3nn.__version__}
    print("VERSIONS " + json.dumps(versions), flush=True)
    return True


def main(job: dict[str, Any]) -> None:
    if not announce_mace(job["threads"]):
        return
    variants = []
    if "mace-e3nn" in job["references"]:
        variants.append(("mace-e3nn", False))
    if "mace-cueq" in job["references"]:
        try:
            import cuequivariance_torch  # noqa: F401

            if not job["device"].startswith("cuda"):
                note("mace-cueq skipped: cuEquivariance's kernels need a CUDA device")
            else:
                variants.append(("mace-cueq", True))
        except Exception as err:  # noqa: BLE001
            note(f"mace-cueq skipped: cuequivariance_torch not importable ({type(err).__name__})")
    model_path = f"{job['workdir']}/mace_reference.model"
    build_model(job["widths"], model_path)
    for impl, cueq in variants:
        for dtype in job["dtypes"]:
            oom_at = None
            for natoms in job["sizes"]:
                row: dict[str, Any] = {"impl": impl, "atoms": natoms, "dtype": dtype}
                if oom_at is not None:
                    row["err"] = f"skipped: out of memory at {oom_at} atoms"
                else:
                    try:
                        row.update(measure(job, model_path, natoms, dtype, cueq))
                    except Exception as err:  # noqa: BLE001 - one failing cell must not end the run
                        row["err"] = describe(err)
                        if row["err"].startswith("OOM"):
                            oom_at = natoms
                    gc.collect()
                    if job["device"].startswith("cuda"):
                        torch.cuda.empty_cache()
                print("ROW " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
