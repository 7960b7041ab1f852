"""LAMMPS's spatial domain decomposition, emulated in Python, to run an ML-IAP unified potential on several "ranks"
without LAMMPS and check it against the whole-system calculation.

What is emulated (as LAMMPS does it with ``pair_style mliap`` under KOKKOS):

* the periodic cell is cut into a ``px x py x pz`` grid of subdomains in fractional coordinates (LAMMPS's
  ``processors`` grid, triclinic cells in their lamda coordinates); a rank owns the atoms whose wrapped fractional
  coordinates fall in its subdomain (local atoms, rows ``0..nlocal-1``);
* its ghost atoms (rows ``nlocal..ntotal-1``) are all periodic images of any atom, its own included, inside the
  subdomain grown by the ghost cutoff ``rc + skin`` on every side (along axis k by ``(rc + skin) / d_k`` in
  fractional units, ``d_k`` the spacing of the cell's lattice planes), except the local atoms themselves;
* the neighbour list is full and for local centres only: a pair (i, j) for every local i and every row j != i with
  ``|x[j] - x[i]| < rc``, ``rc = 2 * rcutfac``; ``rij = x[j] - x[i]``;
* ``forward_exchange`` copies each ghost row from its owner's local row, ``reverse_exchange`` adds each ghost row
  into its owner's row and zeroes the ghosts (LAMMPS's forward and reverse communication). Both are collective:
  the ranks run in threads and meet at a barrier, as MPI ranks would;
* afterwards, as LAMMPS does with the pair forces: ``f[i] += fij``, ``f[j] -= fij`` (ghost forces go back to
  their owners), virial ``W = -sum rij ⊗ fij`` over every rank's pairs, energy the sum of the ranks' energies.

Only fully periodic cells are emulated. The potential object is shared by the threads (each MPI rank of LAMMPS has
its own copy; the results are the same).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.stress import full_3x3_to_voigt_6_stress


# ------------------------------------------------------------------------------------------------ communication
class EmulatedComm:
    """Forward and reverse communication of per-atom rows among the ranks of one force call.

    ``owners[r]``: for the ghost rows of rank r, the owning rank and the owner's local row, ``[nghost_r, 2]``.
    """

    def __init__(self, nlocal: Sequence[int], owners: Sequence[np.ndarray], timeout: float = 120.0) -> None:
        self.nranks = len(nlocal)
        self.nlocal = list(nlocal)
        self.owners = [torch.as_tensor(o, dtype=torch.long).view(-1, 2) for o in owners]
        self.barrier = threading.Barrier(self.nranks, timeout=timeout)
        self.board: list[torch.Tensor | None] = [None] * self.nranks
        self.widths: list[int | None] = [None] * self.nranks
        self.calls = {"forward": 0, "reverse": 0}  # on rank 0, for tests

    def _post(self, rank: int, src: torch.Tensor, vec_len: int) -> None:
        if src.dim() != 2 or src.shape[1] != vec_len:
            raise ValueError(f"rank {rank}: exchange of shape {tuple(src.shape)} with vec_len {vec_len}")
        self.board[rank], self.widths[rank] = src, vec_len
        self.barrier.wait()
        if len(set(self.widths)) != 1:
            raise RuntimeError(f"ranks exchange rows of different widths {self.widths}: their calls do not pair up")

    def forward(self, rank: int, src: Any, dst: Any, vec_len: int) -> None:
        """``dst = src`` with every ghost row replaced by its owner's row."""
        src_t, dst_t = torch.as_tensor(src), torch.as_tensor(dst)
        self._post(rank, src_t, vec_len)
        dst_t.copy_(src_t)
        owners, nlocal = self.owners[rank], self.nlocal[rank]
        for owner in range(self.nranks):
            mine = (owners[:, 0] == owner).nonzero().squeeze(1)  # ghost rows owned by `owner`
            if mine.numel():
                dst_t[nlocal + mine] = self.board[owner][owners[mine, 1]].to(dst_t.device)
        self.barrier.wait()
        if rank == 0:
            self.calls["forward"] += 1

    def reverse(self, rank: int, src: Any, dst: Any, vec_len: int) -> None:
        """``dst = src`` plus, on owned rows, the ghost rows of every rank that copy them; ghost rows zeroed."""
        src_t, dst_t = torch.as_tensor(src), torch.as_tensor(dst)
        self._post(rank, src_t, vec_len)
        dst_t.copy_(src_t)
        dst_t[self.nlocal[rank] :] = 0
        for other in range(self.nranks):
            owners = self.owners[other]
            mine = (owners[:, 0] == rank).nonzero().squeeze(1)  # ghost rows of `other` owned by this rank
            if mine.numel():
                rows = self.board[other][self.nlocal[other] + mine].to(dst_t.device)
                dst_t.index_add_(0, owners[mine, 1].to(dst_t.device), rows)
        self.barrier.wait()
        if rank == 0:
            self.calls["reverse"] += 1


@dataclass
class EmulatedMLIAPData:
    """One rank's ML-IAP data (the KOKKOS host flavour: readable ``eatoms``, ``forward_exchange`` and
    ``reverse_exchange``); ``fij`` keeps what the potential passed to ``update_pair_forces``."""

    rank: int
    nlocal: int
    ntotal: int
    elems: np.ndarray  # [ntotal] int32, index into element_types
    pair_i: np.ndarray  # [npairs] int32
    pair_j: np.ndarray  # [npairs] int32
    rij: np.ndarray  # [npairs, 3] float64
    comm: EmulatedComm | None = None
    eatoms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    energy: float = 0.0
    fij: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.eatoms = np.zeros(self.nlocal)

    @property
    def npairs(self) -> int:
        return int(self.pair_i.shape[0])

    @property
    def nlistatoms(self) -> int:
        return self.nlocal

    @property
    def jatoms(self) -> np.ndarray:
        return self.pair_j

    def update_pair_forces(self, fij: Any) -> None:
        fij = np.asarray(fij, dtype=np.float64)
        if fij.shape != (self.npairs, 3):
            raise ValueError(f"pair forces of shape {fij.shape}, expected {(self.npairs, 3)}")
        self.fij = fij.copy()

    def forward_exchange(self, src: Any, dst: Any, vec_len: int) -> None:
        self.comm.forward(self.rank, src, dst, vec_len)

    def reverse_exchange(self, src: Any, dst: Any, vec_len: int) -> None:
        self.comm.reverse(self.rank, src, dst, vec_len)


class PlainMLIAPData(EmulatedMLIAPData):
    """The data of ML-IAP's plain (non-KOKKOS) build: no exchange methods."""

    forward_exchange = None  # type: ignore[assignment]
    reverse_exchange = None  # type: ignore[assignment]


class NoCommMLIAPData(EmulatedMLIAPData):
    """Exchange methods that communicate nothing (ghost rows keep what the rank computed for them, ghost gradients
    are dropped): what a potential gets wrong when its ghosts are not refreshed."""

    def forward_exchange(self, src: Any, dst: Any, vec_len: int) -> None:
        torch.as_tensor(dst).copy_(torch.as_tensor(src))

    def reverse_exchange(self, src: Any, dst: Any, vec_len: int) -> None:
        out = torch.as_tensor(dst)
        out.copy_(torch.as_tensor(src))
        out[self.nlocal :] = 0


DATA_CLASSES = {"lammps": EmulatedMLIAPData, "plain": PlainMLIAPData, "none": NoCommMLIAPData}


# ------------------------------------------------------------------------------------------------ decomposition
@dataclass
class Subdomain:
    """The atoms of one rank: rows ``0..nlocal-1`` local, then ghosts; ``atom[row]`` is the atom a row copies."""

    rank: int
    nlocal: int
    atom: np.ndarray  # [ntotal] index of the atom in the whole system
    positions: np.ndarray  # [ntotal, 3] Å, ghosts at their image positions
    owners: np.ndarray  # [nghost, 2] owning rank and its local row, per ghost row
    pair_i: np.ndarray  # [npairs]
    pair_j: np.ndarray  # [npairs]
    rij: np.ndarray  # [npairs, 3]

    @property
    def ntotal(self) -> int:
        return int(self.atom.shape[0])


def decompose(atoms: Atoms, grid: Sequence[int], cutoff: float, skin: float = 1.0) -> list[Subdomain]:
    """Cut the periodic ``atoms`` into ``grid`` subdomains, with ghosts out to ``cutoff + skin`` and full neighbour
    lists of the local atoms within ``cutoff`` (see the module docstring)."""
    if not np.asarray(atoms.pbc).all():
        raise ValueError(f"the emulated decomposition needs a fully periodic cell, got pbc={atoms.pbc.tolist()}")
    grid = np.asarray(grid, dtype=int)
    if grid.shape != (3,) or (grid < 1).any():
        raise ValueError(f"grid must be three positive integers, got {grid.tolist()}")
    cell = np.asarray(atoms.cell, dtype=np.float64)  # [3, 3] rows are lattice vectors
    inverse = np.linalg.inv(cell)  # [3, 3]
    frac = atoms.positions @ inverse  # [N, 3]
    frac = frac - np.floor(frac)
    frac[frac >= 1.0] = 0.0  # -1e-17 wraps to 1.0 in floating point
    cell_index = np.minimum((frac * grid).astype(int), grid - 1)  # [N, 3]
    ranks = np.ravel_multi_index(cell_index.T, grid)  # [N] owner of each atom
    ghost_cut = cutoff + skin
    extension = ghost_cut * np.linalg.norm(inverse, axis=0)  # [3] fractional growth per axis: rc / d_k
    local_rows = [np.flatnonzero(ranks == r) for r in range(int(grid.prod()))]
    local_row_of = np.empty(len(atoms), dtype=int)
    for rows in local_rows:
        local_row_of[rows] = np.arange(rows.shape[0])

    subdomains = []
    for rank, local in enumerate(local_rows):
        index = np.array(np.unravel_index(rank, grid))
        lo, hi = index / grid - extension, (index + 1) / grid + extension  # [3], [3]
        shift_ranges = [range(int(np.floor(lo[k])) - 1, int(np.ceil(hi[k])) + 1) for k in range(3)]
        ghost_atoms, ghost_frac = [], []
        for shift in itertools.product(*shift_ranges):
            image = frac + np.asarray(shift, dtype=np.float64)  # [N, 3]
            inside = ((image >= lo) & (image < hi)).all(axis=1)
            if shift == (0, 0, 0):
                inside &= ranks != rank
            ghost_atoms.append(np.flatnonzero(inside))
            ghost_frac.append(image[inside])
        ghosts = np.concatenate(ghost_atoms)
        all_atoms = np.concatenate([local, ghosts])  # [ntotal]
        positions = np.concatenate([frac[local], *ghost_frac]) @ cell  # [ntotal, 3]
        owners = np.stack([ranks[ghosts], local_row_of[ghosts]], axis=1).reshape(-1, 2)  # [nghost, 2]
        delta = positions[None, :, :] - positions[: local.shape[0], None, :]  # [nlocal, ntotal, 3]
        distance2 = (delta**2).sum(-1)  # [nlocal, ntotal]
        within = distance2 < cutoff**2
        within[np.arange(local.shape[0]), np.arange(local.shape[0])] = False
        pair_i, pair_j = np.nonzero(within)  # ordered by i, as LAMMPS's neighbour list
        subdomains.append(
            Subdomain(rank, int(local.shape[0]), all_atoms, positions, owners, pair_i, pair_j, delta[pair_i, pair_j])
        )
    return subdomains


# ------------------------------------------------------------------------------------------------ running
@dataclass
class DecomposedResult:
    """Totals assembled from the ranks as LAMMPS would (ASE units and conventions)."""

    energy: float
    energies: np.ndarray  # [N] per-atom energies (eatoms of the owners)
    forces: np.ndarray  # [N, 3]
    virial: np.ndarray  # [3, 3] W = -sum rij ⊗ fij (eV)
    stress: np.ndarray  # [6] Voigt, ASE sign: -W / V
    subdomains: list[Subdomain]
    exchanges: dict[str, int]  # forward / reverse exchanges made by each rank


def run_decomposed(
    potential: Any,
    atoms: Atoms,
    grid: Sequence[int],
    skin: float = 1.0,
    exchange: str = "lammps",
    timeout: float = 120.0,
) -> DecomposedResult:
    """Run ``potential.compute_forces`` on each subdomain of ``atoms`` (one thread per rank) and assemble the totals.

    ``exchange``: ``"lammps"`` (forward and reverse communication as LAMMPS does), ``"plain"`` (ML-IAP data without
    the exchange methods: the plain build) or ``"none"`` (methods that communicate nothing). The element of each
    atom must be in ``potential.element_types``.
    """
    if exchange not in DATA_CLASSES:
        raise ValueError(f"exchange must be one of {tuple(DATA_CLASSES)}, got {exchange!r}")
    cutoff = 2.0 * float(potential.rcutfac)
    subdomains = decompose(atoms, grid, cutoff, skin)
    types = list(potential.element_types)
    symbols = atoms.get_chemical_symbols()
    missing = sorted(set(symbols) - set(types))
    if missing:
        raise ValueError(f"elements {missing} of the structure are not in the potential's element_types {types}")
    elem_of_atom = np.array([types.index(s) for s in symbols], dtype=np.int32)
    comm = EmulatedComm([s.nlocal for s in subdomains], [s.owners for s in subdomains], timeout)
    data_class = DATA_CLASSES[exchange]
    datas = [
        data_class(
            rank=s.rank,
            nlocal=s.nlocal,
            ntotal=s.ntotal,
            elems=elem_of_atom[s.atom],
            pair_i=s.pair_i.astype(np.int32),
            pair_j=s.pair_j.astype(np.int32),
            rij=np.ascontiguousarray(s.rij),
            comm=comm,
        )
        for s in subdomains
    ]
    errors: list[BaseException | None] = [None] * len(datas)

    def work(rank: int) -> None:
        try:
            potential.compute_forces(datas[rank])
        except BaseException as error:  # noqa: BLE001 - handed to the caller below
            errors[rank] = error
            comm.barrier.abort()  # the other ranks must not wait for this one

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(len(datas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    if first is None:
        first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first

    n = len(atoms)
    energies = np.zeros(n)
    forces = np.zeros((n, 3))
    virial = np.zeros((3, 3))
    for s, data in zip(subdomains, datas):
        energies[s.atom[: s.nlocal]] = data.eatoms
        row_forces = np.zeros((s.ntotal, 3))  # LAMMPS's f of local and ghost rows
        if data.npairs:
            np.add.at(row_forces, s.pair_i, data.fij)
            np.add.at(row_forces, s.pair_j, -data.fij)
            virial -= s.rij.T @ data.fij
        np.add.at(forces, s.atom, row_forces)  # local rows, and ghost rows back to their owners
    energy = float(sum(data.energy for data in datas))
    stress = full_3x3_to_voigt_6_stress(-virial / abs(np.linalg.det(np.asarray(atoms.cell))))
    return DecomposedResult(energy, energies, forces, virial, stress, subdomains, dict(comm.calls))
