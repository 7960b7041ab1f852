"""Reference side of the training-step benchmark, run in a child process by tdn.bench.train_step: mace-torch's
model in the same training loop as tdn's (energies and forces with ``create_graph``, MSE(E/atom) + 10 MSE(F),
backward, Adam with amsgrad), on the same molecules. Never imports tdn (mace-torch pins e3nn 0.4.4).

Usage: ``python _mace_train_worker.py JOB_JSON``; prints ``ROW {json}``, ``NOTE text`` and ``VERSIONS {json}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

# the sibling script (this folder is sys.path[0])
from _mace_worker import announce_mace, build_model, describe, time_steps

# then drop this folder from the path: its profile.py would shadow the standard library's (imported by torch._dynamo)
sys.path = [p for p in sys.path if not p or Path(p).resolve() != Path(__file__).resolve().parent]


def molecules(names: list[str], seed: int = 0):
    """The same molecules and made-up labels as tdn.bench.train_step.batch_molecules."""
    from ase.build import molecule

    rng = np.random.default_rng(seed)
    out = []
    for i, name in enumerate(names):
        atoms = molecule(name)
        atoms.rattle(0.05, seed=seed + i)
        energy, forces = float(rng.normal()), rng.normal(size=(len(atoms), 3))
        out.append((atoms, energy, forces))
    return out


def mace_batch(job: dict[str, Any], widths: dict[str, Any], device: str):
    from mace import data, tools
    from mace.tools import torch_geometric

    z_table = tools.AtomicNumberTable(widths["atomic_numbers"])
    graphs = []
    for atoms, energy, forces in molecules(job["molecules"]):
        atoms.info["REF_energy"] = energy
        atoms.arrays["REF_forces"] = forces
        keys = data.KeySpecification(info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"})
        config = data.config_from_atoms(atoms, key_specification=keys)
        graphs.append(data.AtomicData.from_config(config, z_table=z_table, cutoff=widths["r_max"]))
    loader = torch_geometric.dataloader.DataLoader(graphs, batch_size=len(graphs), shuffle=False)
    return next(iter(loader)).to(device)


def measure(job: dict[str, Any], widths: dict[str, Any], dtype: str) -> dict[str, Any]:
    device = job["device"]
    path = f"{job['workdir']}/mace_train_reference.model"
    build_model(widths, path)  # float64 on disk
    model = torch.load(path, weights_only=False).to(device=device, dtype=getattr(torch, dtype)).train()
    torch.set_default_dtype(getattr(torch, dtype))
    batch = mace_batch(job, widths, device)
    natoms = (batch.ptr[1:] - batch.ptr[:-1]).to(getattr(torch, dtype))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)

    def step() -> None:
        out = model(batch.to_dict(), training=True, compute_force=True)
        loss = ((out["energy"] - batch.energy) / natoms).square().mean()
        loss = loss + 10.0 * (out["forces"] - batch.forces).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    timing = time_steps(step, device, job["warmup"], job["reps"], job["max_seconds"])
    return {"step_ms": timing["median_ms"], "min_ms": timing["min_ms"], "reps": timing["reps"],
            "steps_per_s": 1e3 / timing["median_ms"]}  # fmt: skip


def main(job: dict[str, Any]) -> None:
    if not announce_mace(job["threads"]):
        return
    for size_job in job["jobs"]:
        for dtype in job["dtypes"]:
            row: dict[str, Any] = {"impl": "mace-e3nn", "size": size_job["size"], "dtype": dtype}
            try:
                row.update(measure(job, size_job["widths"], dtype))
            except Exception as err:  # noqa: BLE001 - one failing cell must not end the run
                row["err"] = describe(err)
            print("ROW " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
