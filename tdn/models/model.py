"""The MACE-like model: embedding, ``num_layers`` x (interaction -> product basis -> readout), energies, and
forces / stress / virials by automatic differentiation.

Per layer ``t`` (node features ``h`` with ``l <= lmax_hidden``; scalars only into the first and out of the last):

    A   = InteractionBlock(h)                              atomic basis, l <= lmax       [N, C, (lmax+1)^2]
    h'  = ProductBlock(A, element) + ElementLinear(h)      self-connection from layer 2 on (MACE)
    e_t = readout_t(h')                                    linear; a small MLP after the last layer

    node_energy = E0[element] + scale * sum_t e_t + shift,   energy = sum over the graph's atoms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._cache import cached_on
from ..nn import (
    ElementEmbedding,
    ElementLinear,
    InteractionBlock,
    LinearReadout,
    MLPReadout,
    ProductBlock,
    RadialEmbedding,
)
from ..o3 import spherical_harmonics
from ..tp.factor_store import factor_plan
from .config import ModelConfig
from .geometry import cell_volume, strained_geometry

MAX_ATOMIC_NUMBER = 118


class UnknownElementError(KeyError, ValueError):
    """An atomic number the model was not built for (both a KeyError and a ValueError)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TDNModel(nn.Module):
    """``model(batch, compute_forces=True, compute_stress=False)`` -> dict with ``energy [B]``,
    ``node_energy [N]``, ``forces [N, 3]``, ``stress [B, 3, 3]``, ``virials [B, 3, 3]`` (None when not computed).

    ``batch``: a torch_geometric ``Data``/``Batch`` with the fields of docs/CONTRACTS.md (``pos``,
    ``atomic_numbers``, ``edge_index``, ``unit_shifts``, ``cell``, and ``batch`` when batched).
    Build it with :func:`tdn.models.build_model`.
    """

    def __init__(self, config: ModelConfig, *, factors_from: str | None = None) -> None:
        """Build the model ``config`` describes and record its CP factor sets in ``config.cp_factors``.

        ``factors_from``: the model file whose state dict is loaded right after (what :func:`tdn.load_model` does):
        the CP factors recorded in ``config.cp_factors`` are then built as zeros of the recorded ranks, without a
        lookup, a fit or a cache write; sets it does not record are looked up as usual.
        """
        super().__init__()
        self.config = config
        placeholders = config.cp_factors if factors_from is not None else None
        # Built in float64, then cast: constant tables (CG, grids, CP factors) keep full precision in a float64
        # model (the backends build in the default dtype).
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            with factor_plan(placeholders, origin=factors_from or "") as plan:
                self._build(config)
        finally:
            torch.set_default_dtype(previous)
        config.cp_factors = plan.recorded
        self.to(config.torch_dtype)

    def _build(self, config: ModelConfig) -> None:
        c = config
        self.num_elements = len(c.elements)
        last = c.num_layers - 1

        z_to_index = torch.full((MAX_ATOMIC_NUMBER + 1,), -1, dtype=torch.long)
        z_to_index[torch.tensor(c.elements)] = torch.arange(self.num_elements)
        self.register_buffer("z_to_index", z_to_index, persistent=False)
        self.register_buffer("atomic_energies", torch.tensor(c.atomic_energies, dtype=torch.float64))
        self.register_buffer("scale", torch.tensor(c.scale, dtype=torch.float64))
        self.register_buffer("shift", torch.tensor(c.shift, dtype=torch.float64))

        self.radial = RadialEmbedding(c.cutoff, c.num_bessel, c.envelope_exponent)
        self.embedding = ElementEmbedding(self.num_elements, c.channels)

        self.interactions = nn.ModuleList()
        self.self_connections = nn.ModuleList()
        self.products = nn.ModuleList()
        self.readouts = nn.ModuleList()
        for t in range(c.num_layers):
            l_in = 0 if t == 0 else c.lmax_hidden  # degrees of h entering layer t
            l_out = 0 if t == last else c.lmax_hidden  # ... and leaving it (only scalars are read after the last)
            self.interactions.append(
                InteractionBlock(
                    c.tp,
                    lmax_node=l_in,
                    lmax_sh=c.lmax,
                    lmax_out=c.lmax,
                    channels=c.channels,
                    num_radial=c.num_bessel,
                    radial_hidden=c.radial_mlp,
                    avg_num_neighbors=c.avg_num_neighbors,
                    paths=c.paths,
                    weights=c.tp_weights,
                    tp_options=c.tp_options,
                )
            )
            has_residual = t > 0 or c.residual_first
            self.self_connections.append(
                ElementLinear(l_in, l_out, c.channels, c.channels, self.num_elements) if has_residual else nn.Identity()
            )
            self.products.append(
                ProductBlock(
                    c.tp,
                    c.lmax,
                    l_out,
                    c.channels,
                    c.correlation,
                    self.num_elements,
                    paths=c.paths,
                    **c.product_options,
                )
            )
            self.readouts.append(MLPReadout(c.channels, c.readout_mlp) if t == last else LinearReadout(c.channels))
        self._has_residual = [t > 0 or c.residual_first for t in range(c.num_layers)]

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.atomic_energies.dtype

    def element_index(self, atomic_numbers: torch.Tensor) -> torch.Tensor:
        """Atomic numbers ``[N]`` -> positions in ``config.elements``; an unknown one is an UnknownElementError.

        Cached on ``atomic_numbers`` (:func:`tdn._cache.cached_on`, keyed by the elements): the same, unmodified
        tensor gets the same index tensor back without a new check, so an MD step needs no host synchronisation here
        (nor in the product basis, which caches its element grouping on the index tensor).
        """
        key = ("element_index", tuple(self.config.elements))
        return cached_on(atomic_numbers, key, lambda: self._element_index(atomic_numbers))

    def _element_index(self, atomic_numbers: torch.Tensor) -> torch.Tensor:
        clamped = atomic_numbers.clamp(0, MAX_ATOMIC_NUMBER)
        index = self.z_to_index[clamped]
        unknown = (index < 0) | (clamped != atomic_numbers)
        if bool(unknown.any()):
            bad = sorted({int(z) for z in atomic_numbers[unknown].tolist()})
            raise UnknownElementError(f"atomic number(s) {bad} not in the model's elements {self.config.elements}")
        return index

    def set_statistics(
        self,
        avg_num_neighbors: float | None = None,
        atomic_energies: list[float] | dict[int, float] | None = None,
        scale: float | None = None,
        shift: float | None = None,
    ) -> None:
        """Set dataset statistics after construction (buffers and config stay in step)."""
        c = self.config
        if avg_num_neighbors is not None:
            c.avg_num_neighbors = float(avg_num_neighbors)
            for block in self.interactions:
                block.avg_num_neighbors = c.avg_num_neighbors
        if atomic_energies is not None:
            if isinstance(atomic_energies, dict):
                atomic_energies = [float(atomic_energies[z]) for z in c.elements]
            if len(atomic_energies) != self.num_elements:
                raise ValueError(f"atomic_energies needs {self.num_elements} values, got {len(atomic_energies)}")
            self.atomic_energies.copy_(torch.as_tensor(atomic_energies, dtype=self.dtype))
        if scale is not None:
            self.scale.fill_(float(scale))
        if shift is not None:
            self.shift.fill_(float(shift))
        self.sync_config()

    def sync_config(self) -> ModelConfig:
        """Write the statistics buffers back into ``config`` (done before saving) and return it."""
        c = self.config
        c.atomic_energies = [float(e) for e in self.atomic_energies.tolist()]
        c.scale, c.shift = float(self.scale), float(self.shift)
        c.dtype = str(self.dtype).removeprefix("torch.")
        return c

    def compile_energy(self, **options: Any) -> TDNModel:
        """``torch.compile`` the energy network (:meth:`node_energies`, tensors in and out) in place; returns self.

        Forces and stress still come from ``torch.autograd.grad`` in :meth:`forward`, which runs the compiled
        backward that AOTAutograd generated with the forward. Options go to ``torch.compile``
        (default ``dynamic=True``: atom and edge counts change every step).

        Inference only: AOTAutograd's compiled backward cannot itself be differentiated, so a training step with
        a force or stress loss (``create_graph=True``, i.e. train mode) raises "torch.compile with aot_autograd
        does not currently support double backward". An energy-only loss does train. The whole forward
        (with the ``autograd.grad`` call) is not compiled: Dynamo breaks the graph at ``torch.autograd.grad``
        (and at the unknown-element check, which reads a value back to Python).

        Graph breaks: none in this model's own code (tested with ``fullgraph=True`` at correlation 1). At
        correlation >= 2, :class:`tdn.nn.product.ProductBasis` groups the nodes by element with a host sync
        (``bincount(...).tolist()``), which Dynamo cannot capture: the layer loop then falls back to eager and its
        blocks are compiled one by one. Results are still exact, but ``fullgraph=True`` fails and the first call
        compiles for minutes on a small CPU. Inductor on a CPU: about 70 s for a one-layer model on 2 busy cores.
        """
        options.setdefault("dynamic", True)
        self.node_energies = torch.compile(self.node_energies, **options)  # instance attribute shadows the method
        return self

    # ----------------------------------------------------------------------------------------------- energy
    def node_energies(
        self,
        pos: torch.Tensor,  # [N, 3]
        element_index: torch.Tensor,  # [N]
        edge_index: torch.Tensor,  # [2, E]: sender, receiver
        edge_shift: torch.Tensor,  # [E, 3]: unit_shifts @ cell, in Å
        exchange: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-atom energies ``[N]`` from positions: the network itself, tensors in and out.

        ``exchange(h, t)``, if given, runs on the node features ``h [N, C, D]`` that enter layer ``t >= 1`` and
        returns them with the rows of ghost atoms (copies of atoms owned by another domain) refreshed from their
        owners. Domain decomposition (LAMMPS) needs it: a ghost's features after layer ``t - 1`` depend on
        neighbours that only its owner sees. It must be differentiable (the reverse exchange sums the gradients
        of the ghost rows back to their owners).
        """
        sender, receiver = edge_index[0], edge_index[1]
        vectors = pos[receiver] - pos[sender] + edge_shift  # [E, 3]
        lengths = torch.linalg.vector_norm(vectors, dim=-1)  # [E]
        edge_sh = spherical_harmonics(self.config.lmax, vectors)  # [E, (lmax+1)^2]
        edge_radial = self.radial(lengths)  # [E, num_bessel]

        h = self.embedding(element_index)  # [N, C, 1]
        interaction_energy = pos.new_zeros(pos.shape[0])  # [N]
        for layer, (interaction, self_connection, product, readout, has_residual) in enumerate(zip(
            self.interactions, self.self_connections, self.products, self.readouts, self._has_residual
        )):
            if exchange is not None and layer > 0:
                h = exchange(h, layer)  # [N, C, D]
            residual = self_connection(h, element_index) if has_residual else None  # [N, C, D_out]
            atomic_basis = interaction(h, edge_sh, edge_radial, edge_index)  # [N, C, (lmax+1)^2]
            h = product(atomic_basis, element_index, residual)  # [N, C, D_out]
            interaction_energy = interaction_energy + readout(h)  # [N]

        return self.atomic_energies[element_index] + self.scale * interaction_energy + self.shift  # [N]

    # ----------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        batch: Any,
        compute_forces: bool = True,
        compute_stress: bool = False,
        training: bool | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Energies, and forces / stress / virials as derivatives of the total energy.

        ``training`` (default ``self.training``) keeps the graph of the derivatives (``create_graph``) so that
        a loss on forces or stress can be backpropagated.
        """
        create_graph = self.training if training is None else training
        dtype = self.dtype
        pos = batch.pos.to(dtype)  # [N, 3]
        num_atoms = pos.shape[0]
        edge_index = batch.edge_index  # [2, E]
        element_index = self.element_index(batch.atomic_numbers)  # [N]
        batch_index = getattr(batch, "batch", None)
        if batch_index is None:
            batch_index = torch.zeros(num_atoms, dtype=torch.long, device=pos.device)
        cell = getattr(batch, "cell", None)
        if cell is None:  # molecules given without a cell
            num_graphs = getattr(batch, "num_graphs", None) or (int(batch_index.max()) + 1 if num_atoms else 1)
            cell = pos.new_zeros(num_graphs, 3, 3)
        cell = cell.to(dtype).view(-1, 3, 3)  # [B, 3, 3]
        num_graphs = cell.shape[0]
        unit_shifts = getattr(batch, "unit_shifts", None)
        if unit_shifts is None:
            unit_shifts = pos.new_zeros(edge_index.shape[1], 3)
        unit_shifts = unit_shifts.to(dtype)  # [E, 3]

        with torch.enable_grad():
            inputs: list[torch.Tensor] = []
            if compute_forces or compute_stress:
                if not pos.requires_grad:
                    pos = pos.detach().requires_grad_(True)
                inputs.append(pos)
            displacement = None
            if compute_stress:
                # Strain everything by (1 + eps) with eps the symmetric part of a zero displacement:
                # dE/d(displacement) at 0 is then the (symmetric) derivative of E with respect to strain.
                displacement = pos.new_zeros(num_graphs, 3, 3, requires_grad=True)
                inputs.append(displacement)
            strained_pos, edge_shift = strained_geometry(
                pos, cell, unit_shifts, batch_index, edge_index[0], displacement
            )  # [N, 3], [E, 3]

            node_energy = self.node_energies(strained_pos, element_index, edge_index, edge_shift)  # [N]
            energy = node_energy.new_zeros(num_graphs).index_add(0, batch_index, node_energy)  # [B]

            grads: list[torch.Tensor | None] = [None] * len(inputs)
            if inputs and energy.requires_grad:
                grads = list(
                    torch.autograd.grad(
                        energy.sum(),  # graphs are independent, so d(sum)/d(pos of graph b) = dE_b/d(pos)
                        inputs,
                        create_graph=create_graph,
                        retain_graph=create_graph,
                        allow_unused=True,
                    )
                )

        if grads and not create_graph:  # the graph is freed: hand back plain tensors
            energy, node_energy = energy.detach(), node_energy.detach()
            grads = [g.detach() if g is not None else None for g in grads]
        out: dict[str, torch.Tensor | None] = {
            "energy": energy,
            "node_energy": node_energy,
            "forces": None,
            "stress": None,
            "virials": None,
        }
        if compute_forces:
            out["forces"] = -grads[0] if grads[0] is not None else torch.zeros_like(pos)
        if compute_stress:
            d_energy_d_strain = grads[-1] if grads[-1] is not None else torch.zeros_like(cell)  # [B, 3, 3]
            volume = cell_volume(cell)  # [B]; zero for molecules
            virials = -d_energy_d_strain
            has_volume = (volume > 0).view(-1, 1, 1)
            out["virials"] = virials
            out["stress"] = torch.where(
                has_volume, d_energy_d_strain / volume.clamp_min(1e-30).view(-1, 1, 1), torch.zeros_like(virials)
            )  # ASE sign: stress = (1/V) dE/d(strain) = -virials / V
        return out
