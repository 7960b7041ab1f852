"""Small fixtures shared by every test module (opt-in: nothing here is autouse)."""

import pytest
import torch


@pytest.fixture
def seed() -> int:
    """Seed torch's global generator with 0 for the test."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def float64():
    """Make float64 the default dtype for the test and restore the previous default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module's tests, the previous setting restored afterwards. The models and
    tensors of the tests are tiny: OpenMP threads only add synchronisation (and spin-wait badly on a busy, shared
    CPU). A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def structure(tmp_path_factory):
    """An extxyz file of a rattled 8-atom Cu fcc cell, the input structure of the MD command-line tests."""
    from ase.build import bulk
    from ase.io import write

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.03, seed=0)
    path = tmp_path_factory.mktemp("md_structure") / "cu.extxyz"
    write(path, atoms)
    return path
