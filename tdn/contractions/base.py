"""What every product-basis contraction shares: the interface, its declared facts and checks, and the grouping of a
batch's rows by element.

A contraction evaluates the orders ``nu = 2..correlation`` of MACE's symmetric contraction (the product basis,
:class:`tdn.nn.product.ProductBasis`) with element-dependent weights:

    out[n, c] = sum_{nu >= 2} sum_{L, eta} w[z_n, c, (nu, L, eta)] * U^{nu,L}_eta(A[n, c], ..., A[n, c])

``A [N, C, (lmax_in+1)^2]``, ``element_index [N]`` (``z_n``), ``w [E, C, P']`` -> ``[N, C, (lmax_out+1)^2]``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .._cache import cached_on
from ..tp.base import MAX_LMAX, check_support

MAX_CORRELATION = 4
# Largest lmax_in per correlation order for the contractions that store U^nu densely ([eta, 2L+1, D^nu]): the Horner
# scheme costs (lmax_out+1)^2 D^nu per node and channel, D = (lmax_in+1)^2.
MAX_LMAX_DENSE = {2: MAX_LMAX, 3: 4, 4: 2}

WeightKey = tuple[int, int, int]  # (nu, L, eta)


def check_int(name: str, value: Any, low: int, high: int | None, why: str = "") -> None:
    """``value`` is an int (not a bool) in ``low..high`` (``high`` None: no upper bound), else a ValueError."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}{why}, got {value!r}")


class Contraction(nn.Module):
    """``(A [N, C, D], element_index [N], w [E, C, P']) -> [N, C, D_out]`` for the orders ``nu >= 2``.

    Declared on the class (read by :func:`tdn.contractions.build` and the product basis): ``supported_paths`` with
    ``unsupported_reason``, the keyword ``options`` the constructor takes, ``max_lmax_in`` (``{nu: largest
    lmax_in}`` for contractions that store ``U^nu`` densely, None if unbounded) and ``bounded_memory_in_eval``.

    Set by the constructor: ``weight_keys`` lists the ``(nu, L, eta)`` of the ``P'`` weights, ``basis_sizes`` the
    basis size per ``(nu, L)`` and ``moments`` its ``E|term|^2`` for unit weights and ``A ~ N(0, I)``.
    """

    kind: ClassVar[str] = ""
    supported_paths: ClassVar[tuple[str, ...]] = ("o3", "so3")
    unsupported_reason: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    max_lmax_in: ClassVar[dict[int, int] | None] = None
    # True: in eval mode the backward keeps only the inputs (the intermediates are recomputed tile by tile), so the
    # product basis needs no checkpointing to bound its memory on large systems
    bounded_memory_in_eval: ClassVar[bool] = False

    weight_keys: list[WeightKey]
    basis_sizes: dict[tuple[int, int], int]
    moments: dict[tuple[int, int], float]

    def __init__(self, lmax_in: int, lmax_out: int, correlation: int, paths: str, kind: str | None = None) -> None:
        super().__init__()
        self.kind = kind or type(self).kind
        self.check(self.kind, lmax_in, lmax_out, correlation, paths)
        self.lmax_in, self.lmax_out, self.correlation, self.paths = lmax_in, lmax_out, correlation, paths

    @classmethod
    def check(cls, kind: str, lmax_in: int, lmax_out: int, correlation: int, paths: str,
              options: dict[str, Any] | None = None) -> None:
        """Degrees, order, path set and option names against what the class declares: one ValueError naming
        the contraction and the offending value."""
        check_int("correlation", correlation, 1, MAX_CORRELATION)
        check_int("lmax_in", lmax_in, 0, MAX_LMAX)
        check_int("lmax_out", lmax_out, 0, lmax_in, " (the product basis does not raise the degree of A)")
        check_support(kind, cls, "product basis", paths=paths, options=options or {})
        for nu in range(2, correlation + 1):
            if cls.max_lmax_in is not None and lmax_in > cls.max_lmax_in[nu]:
                raise ValueError(
                    f"the {kind!r} product basis supports lmax_in <= {cls.max_lmax_in[nu]} at correlation {nu} "
                    f"(its coupling tensors have (lmax_in+1)^(2 nu) entries per row), got lmax_in={lmax_in}; "
                    "use kind='grid' or a lower correlation"
                )


class ElementGroups:
    """The rows of a batch grouped by element, so that each element's weights are applied to a contiguous block.

    ``order`` sorts the rows by element (stable) and ``counts`` holds the rows per element: one host sync to build.
    Use :meth:`of`, which builds them once per index tensor (:func:`tdn._cache.cached_on`): every layer of a model,
    and every MD step that passes the same (unmodified) tensor, reuses them without touching the host.
    """

    def __init__(self, element_index: torch.Tensor, num_elements: int) -> None:
        self.order = torch.argsort(element_index, stable=True)  # [N]
        self.counts = torch.bincount(element_index, minlength=num_elements).tolist()

    @classmethod
    def of(cls, element_index: torch.Tensor, num_elements: int) -> ElementGroups:
        return cached_on(element_index, ("groups", num_elements), lambda: cls(element_index, num_elements))

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, ...]`` -> its rows sorted by element ``[N, ...]``."""
        return x.index_select(0, self.order)

    def unsort(self, x_sorted: torch.Tensor) -> torch.Tensor:
        """Rows sorted by element ``[N, ...]`` -> the original row order ``[N, ...]`` (inverse of :meth:`sort`)."""
        return x_sorted.new_zeros(x_sorted.shape).index_copy(0, self.order, x_sorted)

    def channel_major(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, C, F]`` -> rows sorted by element, channels first: ``[C, N, F]`` (a view after one gather)."""
        return self.sort(x).transpose(0, 1)

    def chunks(self) -> list[tuple[int, int, int]]:
        """``(element, start, stop)`` of every element present, in sorted-row coordinates."""
        out, start = [], 0
        for z, count in enumerate(self.counts):
            if count:
                out.append((z, start, start + count))
            start += count
        return out

    def restore(self, parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
        """Per-element outputs ``[C, n_z, F]`` (in :meth:`chunks` order) -> ``[N, C, F]`` in the original row order."""
        if not parts:
            return empty
        return self.unsort(torch.cat(parts, dim=1).transpose(0, 1))  # [N, C, F]
