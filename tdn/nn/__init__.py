"""Building blocks of the MACE-like network, one module per physical idea.

``ProductBlock`` needs :mod:`tdn.nn.product` and imports it when built.
"""

from .embedding import ElementEmbedding
from .interaction import InteractionBlock
from .linear import ElementLinear, EquivariantLinear
from .product_block import ProductBlock
from .radial import BesselBasis, PolynomialCutoff, RadialEmbedding, RadialMLP, ScaledSiLU
from .readout import LinearReadout, MLPReadout


def __getattr__(name: str):
    if name == "ProductBasis":  # tdn.nn.product is imported on first use
        from .product import ProductBasis

        return ProductBasis
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BesselBasis",
    "ElementEmbedding",
    "ElementLinear",
    "EquivariantLinear",
    "InteractionBlock",
    "LinearReadout",
    "MLPReadout",
    "PolynomialCutoff",
    "ProductBasis",
    "ProductBlock",
    "RadialEmbedding",
    "RadialMLP",
    "ScaledSiLU",
]
