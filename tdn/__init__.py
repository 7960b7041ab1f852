"""tdn: equivariant interatomic potentials with cheap tensor products."""

__version__ = "0.1.0"

from . import o3, tp  # noqa: E402

__all__ = ["o3", "tp"]
