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
