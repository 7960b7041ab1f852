"""tdn: equivariant interatomic potentials with cheap tensor products."""

__version__ = "0.1.0"

from . import models, o3, tp  # noqa: E402
from .io import load_model, save_model  # noqa: E402

__all__ = ["load_model", "models", "o3", "save_model", "tp"]
from .calculator import TDNCalculator  # noqa: E402, F401
from .dynamics import TorchDynamics  # noqa: E402, F401
