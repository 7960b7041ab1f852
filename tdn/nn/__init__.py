"""Building blocks of the MACE-like network, one module per physical idea.

The ν-body contractions behind :class:`ProductBasis` live in :mod:`tdn.contractions`.
"""

from .embedding import ElementEmbedding
from .interaction import InteractionBlock
from .linear import ElementLinear, EquivariantLinear
from .product import ProductBasis
from .product_block import ProductBlock
from .radial import BesselBasis, PolynomialCutoff, RadialEmbedding, RadialMLP, ScaledSiLU
from .readout import LinearReadout, MLPReadout

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
