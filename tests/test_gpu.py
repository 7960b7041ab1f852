"""Checks that need a CUDA device: the fused convolution, the model, the calculator, the MD engine, a training step
and the neighbour list on the GPU against their CPU references, and the host syncs of one MD step.

Every test is marked ``gpu`` and skipped when CUDA is not available. ``TDN_TEST_DEVICE`` names the device under
test (default ``cuda``); ``TDN_TEST_DEVICE=cpu`` runs the same test bodies on the CPU, where the device-vs-CPU
comparisons are trivial but every code path of the tests runs (add ``TRITON_INTERPRET=1`` for the fused kernel)::

    TRITON_INTERPRET=1 TDN_TEST_DEVICE=cpu python -m pytest -m gpu -q tests/test_gpu.py
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list
from helpers import ase_graph
from torch_geometric.data import Batch, Data

import tdn
from tdn import TDNCalculator
from tdn.models import build_model
from tdn.tp.fused import edge_conv, edge_conv_reference, triton_available

DEVICE = torch.device(os.environ.get("TDN_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        ON_CUDA and not torch.cuda.is_available(),
        reason="needs a CUDA device and none is available (TDN_TEST_DEVICE=cpu runs these checks on the CPU)",
    ),
    pytest.mark.usefixtures("one_thread"),  # the CPU references are tiny: threads only add overhead
]

needs_kernel = pytest.mark.skipif(
    not triton_available(DEVICE), reason=f"the fused kernel needs Triton on CUDA or TRITON_INTERPRET=1 ({DEVICE})"
)

BACKENDS = ("cg", "cp", "gaunt", "grid")
ELEMENTS = [1, 6, 8, 13, 29]
# The interpreter runs the kernel in Python: smaller cells on the CPU (still several channel tiles and a long segment).
HUB_EDGES = 2500 if ON_CUDA else 300  # edges into one node of the "hub" graph
WIDE = (128, 53) if ON_CUDA else (40, 53)  # (C, R) of the wide cell: MACE-medium's channels and cp rank at L = 3


@pytest.fixture(autouse=True)
def _chunked_models_on_the_cpu(request, monkeypatch):
    """On the CPU, only the kernel test interprets the Triton kernel; whole models take the chunked PyTorch path
    (``tdn.tp.fused.triton_available`` reads the variable at every call), which is hundreds of times faster."""
    if not ON_CUDA and request.node.originalname != "test_fused_edge_conv_matches_reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")


# ------------------------------------------------------------------------------------------------ helpers
def max_error(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> tuple[float, float]:
    """``(max |actual - expected|, max |expected|)``, both on the host in float64."""
    a = torch.as_tensor(np.asarray(actual.detach().cpu() if torch.is_tensor(actual) else actual), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(expected.detach().cpu() if torch.is_tensor(expected) else expected),
                        dtype=torch.float64)  # fmt: skip
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.numel() == 0:
        return 0.0, 0.0
    return float((a - b).abs().max()), float(b.abs().max())


def assert_relative(actual, expected, rtol: float, what: str = "") -> None:
    """``max |actual - expected| <= rtol * max |expected|`` (exact equality when the expected values are all 0)."""
    error, scale = max_error(actual, expected)
    assert error <= rtol * scale, f"{what}: max error {error:.3e} > {rtol:.0e} x {scale:.3e}"


def tiny_model(kind: str = "cp", dtype: str = "float64", seed: int = 0, **overrides):
    """An untrained model of the "tiny" preset with smooth, non-zero forces, in eval mode."""
    torch.manual_seed(seed)
    options = dict(tp=kind, preset="tiny", elements=ELEMENTS, cutoff=3.5, avg_num_neighbors=10.0, dtype=dtype,
                   atomic_energies=[-1.0, -2.0, -3.0, -4.0, -5.0])  # fmt: skip
    return build_model(**{**options, **overrides}).eval()


def cu_al(repeat=(2, 1, 1), seed: int = 1) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(repeat)
    atoms.numbers[::3] = 13
    atoms.rattle(0.08, seed=seed)
    return atoms


def triclinic() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 1))  # primitive fcc vectors: a skewed cell
    atoms.set_cell(atoms.cell.array + np.array([[0.0, 0.1, 0.2], [0.1, 0.0, -0.1], [0.2, 0.0, 0.05]]), scale_atoms=True)
    atoms.numbers[1] = 13
    atoms.numbers[2] = 8
    atoms.rattle(0.05, seed=2)
    return atoms


def methanol() -> Atoms:
    atoms = molecule("CH3OH")
    atoms.rattle(0.05, seed=1)
    return atoms


# --------------------------------------------------------------------------------------------- fused convolution
def conv_graph(name: str, seed: int = 0) -> tuple[int, torch.Tensor]:
    """``(num_nodes, edge_index [2, E])`` of a named test graph (CPU tensors)."""
    gen = torch.Generator().manual_seed(seed)
    if name == "random":  # nodes 45..59 receive nothing; some nodes send nothing
        n = 60
        senders, receivers = torch.randint(0, n, (500,), generator=gen), torch.randint(0, 45, (500,), generator=gen)
        edge_index = torch.stack([senders, receivers])
    elif name == "hub":  # node 0 receives HUB_EDGES edges, node 1 sends 60 % as many: long segments both ways
        n, size, out = 40, HUB_EDGES, HUB_EDGES * 3 // 5
        into_hub = torch.stack([torch.randint(0, n, (size,), generator=gen), torch.zeros(size, dtype=torch.long)])
        from_hub = torch.stack([torch.ones(out, dtype=torch.long), torch.randint(0, n, (out,), generator=gen)])
        rest = torch.randint(0, n, (2, 300), generator=gen)
        edge_index = torch.cat([into_hub, from_hub, rest], dim=1)
        edge_index = edge_index[:, torch.randperm(edge_index.shape[1], generator=gen)]
    elif name == "empty":
        n, edge_index = 7, torch.zeros(2, 0, dtype=torch.long)
    elif name == "transposed":  # pairs.T: both rows are strided views
        n = 30
        edge_index = torch.randint(0, n, (400, 2), generator=gen).T
        assert not edge_index[0].is_contiguous()
    else:
        raise ValueError(name)
    return n, edge_index


@needs_kernel
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["float32", "float64"])
@pytest.mark.parametrize("channels, rank", [(5, 37), WIDE], ids=["narrow", "wide"])
@pytest.mark.parametrize("graph", ["random", "hub", "empty", "transposed"])
def test_fused_edge_conv_matches_reference(graph, channels, rank, dtype, rtol):
    num_nodes, edge_index = conv_graph(graph)
    num_edges = edge_index.shape[1]
    gen = torch.Generator().manual_seed(1)
    host = [torch.randn(num_nodes, channels, rank, generator=gen, dtype=dtype),
            torch.randn(num_edges, rank, generator=gen, dtype=dtype),
            torch.randn(num_edges, channels, generator=gen, dtype=dtype)]  # fmt: skip
    grad_out = torch.randn(num_nodes, channels, rank, generator=gen, dtype=dtype).to(DEVICE)
    if graph == "transposed":  # keep the strided layout on the device
        edge_index = edge_index.T.contiguous().to(DEVICE).T
        assert not edge_index[0].is_contiguous()
    else:
        edge_index = edge_index.to(DEVICE)
    sender, receiver = edge_index[0], edge_index[1]

    results = []
    for fused in (True, False):
        xb, yc, w = (t.to(DEVICE).requires_grad_(True) for t in host)
        if fused:
            out = edge_conv(xb, yc, w, sender, receiver, num_nodes, fused=True)
        else:
            out = edge_conv_reference(xb, yc, w, sender, receiver, num_nodes)
        grads = torch.autograd.grad(out, (xb, yc, w), grad_out, allow_unused=True)
        results.append((out.detach(), *(torch.zeros_like(t) if g is None else g for t, g in zip((xb, yc, w), grads))))
    (out, gx, gy, gw), (ref, rx, ry, rw) = results
    assert out.shape == (num_nodes, channels, rank) and out.dtype == dtype and out.device.type == DEVICE.type
    assert_relative(out, ref, rtol, "forward")
    assert_relative(gx, rx, rtol, "grad xb")
    assert_relative(gy, ry, rtol, "grad yc")
    assert_relative(gw, rw, rtol, "grad w")
    idle = torch.ones(num_nodes, dtype=torch.bool)
    idle[receiver.cpu()] = False
    assert not out.cpu()[idle].any(), "a node that receives no edge must get exactly zero"
    if graph != "empty":
        assert float(ref.abs().max()) > 0


# --------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("kind", BACKENDS)
def test_model_energy_forces_stress_match_cpu_in_float64(kind):
    """Energy, forces and stress of a batch (a skewed periodic cell and a molecule) on the device vs the CPU."""
    model = tiny_model(kind, correlation=3)
    batch = Batch.from_data_list([ase_graph(triclinic(), 3.5), ase_graph(methanol(), 3.5)])
    ref = model(batch, compute_stress=True)
    assert float(ref["forces"].abs().max()) > 1e-4 and float(ref["stress"].abs().max()) > 1e-6
    out = copy.deepcopy(model).to(DEVICE)(batch.to(DEVICE), compute_stress=True)
    for key in ("energy", "node_energy", "forces", "stress"):
        assert out[key].device.type == DEVICE.type
        assert_relative(out[key], ref[key], 1e-10, f"{kind} {key}")


# --------------------------------------------------------------------------------------------- calculator
@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gpu_model") / "tiny.pt"
    tdn.save_model(tiny_model(), path)
    return path


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_calculator_on_the_device_matches_the_cpu(model_file, dtype):
    """Two geometries (a fresh neighbour list, then one reused within the skin) on both devices."""
    atoms = cu_al(repeat=(2, 2, 1))
    on_cpu, on_device = atoms.copy(), atoms.copy()
    on_cpu.calc = TDNCalculator(model_file, device="cpu", default_dtype=dtype)
    on_device.calc = TDNCalculator(model_file, device=str(DEVICE), default_dtype=dtype)
    rng = np.random.default_rng(0)
    for step in range(2):
        if step:
            shift = rng.uniform(-0.05, 0.05, size=(len(atoms), 3))  # < skin / 2: the list is reused
            on_cpu.positions += shift
            on_device.positions += shift
        e_ref, f_ref, s_ref = on_cpu.get_potential_energy(), on_cpu.get_forces(), on_cpu.get_stress()
        energy, forces, stress = on_device.get_potential_energy(), on_device.get_forces(), on_device.get_stress()
        assert np.abs(f_ref).max() > 1e-3 and np.abs(s_ref).max() > 1e-6
        if dtype == "float64":
            assert energy == pytest.approx(e_ref, rel=1e-10, abs=1e-10)
            assert_relative(forces, f_ref, 1e-10, "forces")
            assert_relative(stress, s_ref, 1e-10, "stress")
        else:  # float32 vs float64 on a CPU differ here by 3e-8 (energy), 2e-6 (forces), 1e-5 (stress), relative
            assert energy == pytest.approx(e_ref, rel=1e-6)
            assert_relative(forces, f_ref, 1e-4, "float32 forces")
            assert_relative(stress, s_ref, 5e-4, "float32 stress")
    assert on_device.calc.neighbor_list_builds == 1


# --------------------------------------------------------------------------------------------- MD engine
def test_torch_dynamics_nve_conserves_energy_on_the_device():
    """tests/test_dynamics.py's NVE drift check (64 atoms at 1500 K, skin 0.3 Å, 300 steps) on the device."""
    from tdn.dynamics import TorchDynamics
    from tdn.md import initialise_velocities

    model = tiny_model()
    atoms = cu_al(repeat=(2, 2, 2))
    initialise_velocities(atoms, 1500.0, 1)
    steps = 300
    dyn = TorchDynamics(model, atoms, 1.0, dtype="float64", device=str(DEVICE), skin=0.3, check_interval=10)
    assert dyn.positions.device.type == DEVICE.type
    rows = dyn.run(steps, log_interval=10)
    assert [row.step for row in rows] == list(range(0, steps + 1, 10))
    totals = np.array([row.etot for row in rows])
    assert min(row.temperature for row in rows) > 300  # it moved
    drift = (totals.max() - totals.min()) / len(atoms)
    assert drift < 1e-4, f"total energy varies by {drift:.2e} eV/atom over {steps} steps"
    assert 3 <= dyn.neighbor_list_builds < steps
    assert dyn.missed_rebuilds == 0
    dyn.sync_atoms()
    probe = atoms.copy()  # the list in use at the end is still complete: a fresh list inside the cutoff agrees
    probe.calc = TDNCalculator(model, device=str(DEVICE), default_dtype="float64", skin=0.0)
    assert atoms.get_potential_energy() == pytest.approx(probe.get_potential_energy(), abs=1e-10)
    assert np.abs(atoms.get_forces() - probe.get_forces()).max() < 1e-10


# --------------------------------------------------------------------------------------------- training
def labelled_batch() -> Batch:
    """Two structures with (random) energy and force labels."""
    gen = torch.Generator().manual_seed(3)
    graphs = []
    for atoms in (triclinic(), methanol()):
        graph = ase_graph(atoms, 3.5)
        graph.energy = torch.tensor([-3.0 * len(atoms)], dtype=torch.float64)
        graph.forces = 0.3 * torch.randn(len(atoms), 3, generator=gen, dtype=torch.float64)
        graphs.append(graph)
    return Batch.from_data_list(graphs)


def training_gradients(module, batch: Data, device: torch.device, bf16: bool = False) -> dict[str, torch.Tensor]:
    """Parameter gradients of one ``training_step`` (energy + force loss) on ``device``, as CPU float64."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = copy.deepcopy(module).to(device)
    module.train()
    batch = module.on_after_batch_transfer(batch.clone().to(device), 0)
    context = MixedPrecision("bf16-mixed", device=device.type).forward_context() if bf16 else torch.enable_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        with context:
            loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    grads = {name: p.grad.detach().cpu().double() for name, p in module.named_parameters() if p.grad is not None}
    assert grads, "no parameter received a gradient"
    return grads


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_step_gradients_match_the_cpu(precision):
    """One training step with the force loss (forces differentiated again) on the device vs the same float32 model
    evaluated in float64 on the CPU: float32 to 1e-4 of each gradient's norm, bf16-mixed to 0.1 (on a CPU: 1.4e-6 and
    2e-2 at worst)."""
    from tdn.train.module import PotentialModule

    config = dict(tp="cp", elements=ELEMENTS, cutoff=3.5, avg_num_neighbors=10.0, dtype="float32",
                  channels=8, lmax_hidden=1, lmax=2, correlation=2, num_layers=2, radial_mlp=[16], readout_mlp=8,
                  atomic_energies=[-1.0, -2.0, -3.0, -4.0, -5.0])  # fmt: skip
    torch.manual_seed(0)
    module = PotentialModule(config, loss={"energy_weight": 1.0, "forces_weight": 100.0}, ema={"enabled": False})
    batch = labelled_batch()
    reference = training_gradients(module.double(), batch, torch.device("cpu"))
    module.float()
    grads = training_gradients(module, batch, DEVICE, bf16=precision == "bf16-mixed")
    assert grads.keys() == reference.keys()
    rtol = 1e-4 if precision == "32-true" else 0.1
    total = torch.cat([g.flatten() for g in reference.values()]).norm()
    assert float(total) > 0
    for name, ref in reference.items():
        # each gradient against its own norm, or the whole gradient's for a tensor whose gradient is tiny
        scale = max(float(ref.norm()), 1e-3 * float(total))
        error = float((grads[name] - ref).norm())
        assert error <= rtol * scale, f"{precision} {name}: |error| {error:.2e} > {rtol:.0e} x {scale:.2e}"


# --------------------------------------------------------------------------------------------- neighbour list
def edge_set(sender, receiver, shifts) -> set:
    sender = torch.as_tensor(sender).cpu().numpy()
    receiver = torch.as_tensor(receiver).cpu().numpy()
    shifts = np.asarray(torch.as_tensor(shifts).cpu().numpy()).round().astype(int)
    return set(zip(sender.tolist(), receiver.tolist(), map(tuple, shifts.tolist())))


def skewed_cells(seed: int, count: int):
    rng = np.random.default_rng(seed)
    while count:
        cell = rng.normal(size=(3, 3)) * rng.uniform(2.0, 7.0)
        if abs(np.linalg.det(cell)) < 0.3 * np.prod(np.linalg.norm(cell, axis=1)):
            continue  # too degenerate for a fair test; skew is still large
        n = int(rng.integers(1, 40))
        pbc = rng.random(3) < 0.75
        positions = rng.normal(size=(n, 3)) * 4.0  # not wrapped into the cell on purpose
        yield Atoms(numbers=[1] * n, positions=positions, cell=cell, pbc=pbc), float(rng.uniform(1.0, 5.0))
        count -= 1


def neighbour_cases() -> list[tuple[str, Atoms, float]]:
    cases = []
    big = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((4, 4, 4))
    big.rattle(0.05, seed=4)
    cases.append(("periodic-256", big, 5.0))
    cases.append(("one-atom-cell", bulk("Cu", "fcc", a=3.6), 5.0))  # an atom sees its own images
    cases.append(("thin-skewed", Atoms("Cu2", positions=[(0, 0, 0), (1.2, 0.7, 0.9)],
                                       cell=[[2.1, 0, 0], [1.9, 1.3, 0], [0.4, 1.1, 2.3]], pbc=True), 4.0))  # fmt: skip
    slab = fcc111("Cu", size=(3, 3, 3), vacuum=6.0, a=3.6)
    slab.rattle(0.05, seed=5)
    cases.append(("slab", slab, 4.5))
    cases.append(("molecule", methanol(), 2.5))
    for k, (atoms, cutoff) in enumerate(skewed_cells(7, 12)):
        cases.append((f"skewed-{k}", atoms, cutoff))
    return cases


def test_device_neighbour_list_matches_ase():
    from tdn.data.neighbors import neighbor_list_torch

    for name, atoms, cutoff in neighbour_cases():
        expected = edge_set(*ase_neighbor_list("ijS", atoms, cutoff))
        sender, receiver, shifts = neighbor_list_torch(
            torch.tensor(atoms.positions, dtype=torch.float64, device=DEVICE),
            torch.tensor(atoms.cell.array, dtype=torch.float64, device=DEVICE),
            torch.tensor(atoms.pbc, device=DEVICE),
            cutoff,
        )
        assert sender.device.type == DEVICE.type
        assert edge_set(sender, receiver, shifts) == expected, (name, atoms.cell.array, atoms.pbc, cutoff)
        keys = list(zip(sender.cpu().tolist(), receiver.cpu().tolist(), map(tuple, shifts.cpu().long().tolist())))
        assert keys == sorted(keys), f"{name}: edges not sorted by (sender, receiver, shift)"


# --------------------------------------------------------------------------------------------- host syncs
def test_calculator_step_between_rebuilds_syncs_at_most_twice(model_file, record_property):
    """One TDNCalculator energy+forces call between neighbour-list rebuilds under CUDA's sync debug mode: at most
    one results transfer and one more. The count and the Python lines that synced go to the JUnit report."""
    atoms = cu_al(repeat=(3, 3, 3))
    atoms.calc = TDNCalculator(model_file, device=str(DEVICE), default_dtype="float32")
    rng = np.random.default_rng(0)
    for _ in range(2):  # the first call builds the list and caches; the second is a reuse already
        atoms.positions += rng.uniform(-0.01, 0.01, size=(len(atoms), 3))
        atoms.get_forces()
    atoms.positions += rng.uniform(-0.01, 0.01, size=(len(atoms), 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if ON_CUDA:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            forces = atoms.get_forces()
        finally:
            if ON_CUDA:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    sites = [f"{Path(w.filename).name}:{w.lineno}" for w in syncs]
    record_property("cuda_syncs_per_step", len(syncs))
    record_property("cuda_sync_sites", " ".join(sites))
    print(f"host syncs in one calculator step: {len(syncs)} at {sites}")
    assert atoms.calc.neighbor_list_builds == 1, "the measured step must reuse the list"
    assert np.isfinite(forces).all()
    assert len(syncs) <= 2, f"{len(syncs)} host syncs in one step, at {sites}"


def test_benchmark_machine_record_names_the_device():
    from tdn.bench.common import machine_info

    info = machine_info(DEVICE)
    if ON_CUDA:
        assert info["gpu"] == torch.cuda.get_device_name(DEVICE)
    else:
        assert "gpu" not in info and info["cpu"]
