"""Grimme's D3 dispersion correction for :class:`tdn.TDNCalculator`, from torch-dftd (``pip install tdn[d3]``).

``TDNCalculator(path, dispersion="d3bj", functional="pbe")`` adds the D3 energy of the functional the model was
trained on (PBE for most materials datasets) to the model's: energy, free_energy, forces, stress and per-atom
``stresses``. torch-dftd ships the reference C6 coefficients and the damping parameters of each functional, runs in
plain torch on the model's device and dtype, and handles periodic cells through the edge list it is given, so the
whole term is differentiated by autograd like the model (through the shift vectors: see :mod:`tdn.edge_forces`).

The energy (Grimme et al., J. Chem. Phys. 132, 154104 (2010); Becke–Johnson damping: J. Comput. Chem. 32, 1456
(2011)), with ``r`` the distance of a pair of atoms ``A``, ``B`` (each pair of a periodic system and its images)::

    E = -1/2 sum_{A != B} [ s6 C6_AB / (r^6 + f^6) + s8 C8_AB / (r^8 + f^8) ] * sw(r)      (d3bj)
    f = a1 sqrt(C8_AB / C6_AB) + a2,   C8_AB = 3 C6_AB sqrt(Q_A Q_B)

where ``C6_AB`` is interpolated from reference values by the coordination numbers of ``A`` and ``B`` (the CN counts
neighbours within the same cutoff). ``d3zero`` (zero damping), ``d3bjm`` and ``d3zerom`` (the modified variants) use
the library's other damping functions. ``sw`` switches the pair terms (and the CN counting) smoothly to zero over
the last Bohr before ``cutoff`` (torch-dftd's ``"poly"`` smoothing): forces are continuous, MD conserves energy and a
neighbour list with a skin gives the same result as a fresh one. Default cutoff 40 Bohr (21.2 Å), as MACE's D3
calculator; the three-body (ATM) term is not included (as there).

Cost: its own neighbour list (built and reused with the model's, same skin) and, on an accelerator, one more host
synchronisation per step (torch-dftd selects the coordination-number pairs with ``nonzero``).

Per-atom energies: torch-dftd gives the total dispersion energy only, so ``energies`` stay the model's per-atom
energies and do NOT include the dispersion energy (their sum is ``energy - dispersion_energy``; the calculator
reports ``dispersion_energy``). Per-atom ``stresses`` do include it (the pair split of :mod:`tdn.edge_forces`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from ase.data import chemical_symbols
from ase.units import Bohr

from .edge_forces import derivatives, edge_forces, edge_vectors
from .runtime import neighbor_list, shift_vectors

__all__ = ["DAMPINGS", "DEFAULT_CUTOFF", "D3Dispersion", "MAX_ELEMENT"]

DAMPINGS = {"d3bj": "bj", "d3zero": "zero", "d3bjm": "bjm", "d3zerom": "zerom"}  # tdn name -> torch-dftd damping
DEFAULT_CUTOFF = 40.0 * Bohr  # Å
MAX_ELEMENT = 94  # torch-dftd's reference tables end at Pu


class D3Dispersion:
    """The D3 term for a calculator: its parameters, neighbour pairs and edge forces.

    Args:
        method: ``"d3bj"``, ``"d3zero"``, ``"d3bjm"`` or ``"d3zerom"``.
        functional: the density functional whose damping parameters to use, as torch-dftd names them (lower case:
            ``"pbe"``, ``"pbe0"``, ``"revpbe"``, ``"b3-lyp"``, ``"r2scan"``, ...).
        elements: the model's atomic numbers (each must have D3 reference data: Z <= 94).
        device, dtype: where and in which precision the term is computed (the model's).
        cutoff: pair (and coordination-number) cutoff in Å, switched off smoothly over its last Bohr.

    Raises ValueError naming an unknown method, a functional torch-dftd has no parameters for, or an element
    without reference data; ImportError with the install line when torch-dftd is missing.
    """

    def __init__(self, method: str, functional: str, elements: Sequence[int], device: torch.device,
                 dtype: torch.dtype, cutoff: float = DEFAULT_CUTOFF) -> None:  # fmt: skip
        if method not in DAMPINGS:
            raise ValueError(f"dispersion={method!r} is not a dispersion correction tdn knows: use one of "
                             f"{sorted(DAMPINGS)} (or None)")  # fmt: skip
        if not cutoff > 1.0:
            raise ValueError(f"dispersion_cutoff must be > 1 Å (it is switched off over its last Bohr), got {cutoff}")
        unknown = [z for z in elements if not 1 <= int(z) <= MAX_ELEMENT]
        if unknown:
            names = ", ".join(f"{chemical_symbols[z] if z < len(chemical_symbols) else '?'} (Z={z})" for z in unknown)
            raise ValueError(f"D3 has no reference data for element {names} of the model (Z <= {MAX_ELEMENT} only)")
        try:
            from torch_dftd.dftd3_xc_params import get_dftd3_default_params
            from torch_dftd.nn.dftd3_module import DFTD3Module
        except ImportError as err:
            raise ImportError(
                f"dispersion={method!r} needs torch-dftd: pip install 'tdn[d3]' (or pip install torch-dftd)"
            ) from err
        self.method, self.damping = method, DAMPINGS[method]
        self.functional = str(functional).lower()
        try:
            params = get_dftd3_default_params(damping=self.damping, xc=self.functional)
        except (ValueError, KeyError):
            raise ValueError(
                f"functional={functional!r} has no D3({self.damping}) damping parameters in torch-dftd; its names "
                "are lower case with its own hyphens, e.g. 'pbe', 'pbe0', 'revpbe', 'b3-lyp', 'r2scan'"
            ) from None
        self.cutoff = float(cutoff)
        self.module = DFTD3Module(params, cutoff=self.cutoff, cnthr=self.cutoff, abc=False, dtype=dtype,
                                  bidirectional=True, cutoff_smoothing="poly").to(device)  # fmt: skip

    def __repr__(self) -> str:
        return f"D3Dispersion({self.method!r}, functional={self.functional!r}, cutoff={self.cutoff:.4g} Å)"

    def neighbors(self, pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, cell64: torch.Tensor, skin: float,
                  method: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Pairs within ``cutoff + skin`` (both directions, periodic images included): ``edge_index [2, E]``,
        ``unit_shifts [E, 3]`` and shift vectors ``[E, 3]`` in Å (:func:`tdn.runtime.neighbor_list`). Pairs beyond
        the cutoff contribute exactly nothing, so the list can be reused while atoms move less than ``skin / 2``."""
        edge_index, unit_shifts = neighbor_list(pos, cell, pbc, self.cutoff + skin, method)
        return edge_index, unit_shifts, shift_vectors(unit_shifts, cell64, pos.dtype)

    def evaluate(self, numbers: torch.Tensor, pos: torch.Tensor, cell: torch.Tensor, edge_index: torch.Tensor,
                 edge_shift: torch.Tensor, *, with_virial: bool = False,
                 with_atom_virials: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
        """The D3 term of one structure for the pairs ``edge_index`` with shift vectors ``edge_shift`` (Å):
        ``energy`` (eV, a float64 scalar tensor), ``forces [N, 3]`` and, as asked, ``virial [3, 3]`` and
        ``atom_virials [N, 3, 3]`` (eV) from its edge forces (:func:`tdn.edge_forces.derivatives`); ``numbers [N]``
        atomic numbers, ``cell`` the cell (rows; zeros for a molecule)."""
        cell = cell.reshape(3, 3)  # not None: torch-dftd then adds the shift vectors to the receivers' positions

        def energy(shift: torch.Tensor) -> torch.Tensor:
            return self.module.calc_energy_batch(numbers, pos, edge_index, cell=cell, shift_pos=shift,
                                                 damping=self.damping)  # fmt: skip

        value, g = edge_forces(energy, edge_shift)
        vectors = edge_vectors(pos, edge_index, edge_shift)
        out = derivatives(g, vectors, edge_index, pos.shape[0], with_virial=with_virial,
                          with_atom_virials=with_atom_virials)  # fmt: skip
        return {"energy": value.sum(), **out}
