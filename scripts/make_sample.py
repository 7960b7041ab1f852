"""Generate the small bundled sample in datasets/sample/ (deterministic; ASE EMT labels).

    python scripts/make_sample.py [--out datasets/sample]

Writes
  oc20/sample.lmdb   80 frames in the OC20 S2EF LMDB layout: Cu and Pt fcc(111) / fcc(100) 2x2x3
                     slabs with O, H, OH or CO adsorbed (16 systems x 5 frames of growing rattle),
                     tags 0 subsurface / 1 surface / 2 adsorbate, subsurface atoms fixed, sid/fid,
                     total EMT energies (eV) and forces (eV/Å, zero on fixed atoms). Arrays are numpy
                     (not tensors) so the file is small and byte-identical between runs.
  molecules.xyz      80 frames: 16 small H/C/N/O molecules x 5 rattled geometries, extxyz with
                     energy= and forces, pbc F.
EMT is a toy potential (fast, deterministic, available everywhere): the sample exercises the data
and training code, it is not physics.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc111, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from tdn.data.oc import atoms_to_data_fields, write_oc_lmdb

SEED = 20240601
FRAMES = 5
METALS = ("Cu", "Pt")
FACETS = {"111": (fcc111, ("ontop", "fcc")), "100": (fcc100, ("ontop", "hollow"))}
ADSORBATES = {
    "O": Atoms("O"),
    "H": Atoms("H"),
    "OH": Atoms("OH", positions=[(0, 0, 0), (0, 0, 0.97)]),
    "CO": Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.15)]),
}
HEIGHTS = {"O": 1.3, "H": 1.0, "OH": 1.4, "CO": 1.8}
MOLECULES = ("H2", "N2", "CO", "H2O", "NH3", "CH4", "CO2", "HCN", "C2H2", "C2H4", "C2H6", "CH3OH",
             "HCOOH", "CH3CHO", "H2CO", "CH3CN")


def label(atoms: Atoms) -> Atoms:
    """EMT energy and forces on float32-rounded positions (as stored), frozen into a SinglePointCalculator."""
    atoms.positions = atoms.positions.astype(np.float32).astype(np.float64)
    atoms.cell = atoms.cell.array.astype(np.float32).astype(np.float64)
    atoms.calc = EMT()
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()  # FixAtoms zeroes fixed atoms, as in OC20
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def adslab(metal: str, facet: str, adsorbate: str, site: str) -> Atoms:
    """A 2x2x3 slab (12 atoms) with one adsorbate, OC20 tags and the subsurface layers fixed."""
    build, _ = FACETS[facet]
    slab = build(metal, size=(2, 2, 3), vacuum=7.0)
    # ase.build tags layers 1 (top) .. 3 (bottom); OC20 uses 1 surface, 0 subsurface, 2 adsorbate.
    surface = slab.get_tags() == 1
    slab.set_tags(surface.astype(int))
    add_adsorbate(slab, ADSORBATES[adsorbate].copy(), HEIGHTS[adsorbate], site)
    tags = slab.get_tags()
    tags[12:] = 2
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == 0))
    slab.pbc = True  # OC20 slabs are periodic in all three directions, with vacuum along z
    return slab


def oc20_frames(rng: np.random.Generator) -> list[dict]:
    records, sid = [], 0
    for metal in METALS:
        for facet, (_, sites) in FACETS.items():
            for k, adsorbate in enumerate(ADSORBATES):
                base = adslab(metal, facet, adsorbate, sites[k % len(sites)])
                free = ~np.isin(np.arange(len(base)), base.constraints[0].get_indices())
                for fid in range(FRAMES):
                    atoms = base.copy()
                    step = rng.normal(scale=0.03 + 0.03 * fid, size=(len(atoms), 3))
                    atoms.positions[free] += step[free]
                    records.append(atoms_to_data_fields(label(atoms), sid=sid, fid=fid, arrays="numpy"))
                sid += 1
    return records


def molecule_frames(rng: np.random.Generator) -> list[Atoms]:
    frames = []
    for name in MOLECULES:
        base = molecule(name)
        for k in range(FRAMES):
            atoms = base.copy()
            atoms.positions += rng.normal(scale=0.02 + 0.02 * k, size=atoms.positions.shape)
            atoms.info = {"name": name, "frame": k}
            frames.append(label(atoms))
    return frames


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "datasets" / "sample"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    rng = np.random.default_rng(SEED)
    records = oc20_frames(rng)
    write_oc_lmdb(out / "oc20" / "sample.lmdb", records)
    frames = molecule_frames(rng)
    ase.io.write(out / "molecules.xyz", frames, format="extxyz")
    print(f"wrote {len(records)} OC20-layout frames to {out / 'oc20' / 'sample.lmdb'}")
    print(f"wrote {len(frames)} molecule frames to {out / 'molecules.xyz'}")


if __name__ == "__main__":
    main()
