"""The interface every tensor-product backend implements, with its argument checks.

A backend is a bilinear, channel-wise map ``out[e, c] = T(x[e, c], y[e]) * weights`` on the stacked layout:
``x [E, C, (lmax_in+1)^2]`` (features), ``y [E, (lmax_sh+1)^2]`` (edge spherical harmonics),
``w [E, C, P]`` (per-edge, per-channel weights) -> ``[E, C, (lmax_out+1)^2]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from ..o3 import check_path_set, degree_of_component, degree_slice, dim, path_list
from .fused import edge_conv, triton_available

MAX_LMAX = 8
WEIGHT_MODES = ("shared", "degree", "inout", "path")


def inout_key(path: tuple[int, int, int]) -> tuple[int, int, bool]:
    """The "inout" weight of a path ``(l1, l2, l3)``: ``(l1, l3, through the scalar harmonic)``.

    Paths that share a key share a weight: those of one (input degree, output degree) pair, except the path
    ``(l, 0, l)`` for ``l > 0`` (the input feature passed on unchanged, times the harmonic's constant), which has a
    weight of its own. Paths with a scalar input ``(0, l, l)`` are alone in their pair anyway.
    """
    l1, l2, l3 = path
    return l1, l3, l2 == 0 and l1 > 0


def weights_per_channel(weights: str, paths: list[tuple[int, int, int]], lmax_out: int) -> int:
    """``P``, the weights per channel of mode ``weights`` for the coupling paths ``paths`` (``(l1, l2, l3)``)."""
    if weights == "shared":
        return 1
    if weights == "degree":
        return lmax_out + 1
    if weights == "inout":
        return len({inout_key(p) for p in paths})
    return len(paths)


def check_lmax(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LMAX:
        raise ValueError(f"{name} must be an integer in 0..{MAX_LMAX}, got {value!r}")
    return value


def check_support(
    kind: str,
    component: Any,
    what: str = "backend",
    *,
    paths: str | None = None,
    weights: str | None = None,
    options: Iterable[str] = (),
) -> None:
    """The one check of a requested path set, weight mode and options against what a component declares.

    ``component`` is a tensor-product backend or a product-basis contraction (class or instance) with the class
    attributes ``supported_paths``, ``unsupported_reason`` (why other path sets are not), ``options`` (the keyword
    options it takes) and, for weight modes, ``supported_weights`` and ``unsupported_weights_reason``. ``kind`` and
    ``what`` name it in the message ("the 'grid' backend", "the 'cp' product basis"). Unsupported or unknown
    values are one ValueError naming the component and the option.
    """
    if paths is not None:
        check_path_set(paths)
        if paths not in component.supported_paths:
            reason = component.unsupported_reason
            raise ValueError(
                f"the {kind!r} {what} supports paths in {component.supported_paths}, got {paths!r}"
                + (f": {reason}" if reason else "")
            )
    if weights is not None:
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
        if weights not in component.supported_weights:
            reason = component.unsupported_weights_reason
            raise ValueError(
                f"the {kind!r} {what} supports weights in {component.supported_weights}, got {weights!r}"
                + (f": {reason}" if reason else "")
            )
    unknown = sorted(set(options) - set(component.options))
    if unknown:
        raise ValueError(
            f"unknown options for the {kind!r} {what}: {unknown} (allowed: {sorted(component.options) or 'none'})"
        )


class TensorProduct(nn.Module):
    """Base class: checks arguments, defines ``num_weights`` and the weight modes.

    weights="shared": P = 1, one weight per channel multiplies every path;
    weights="degree": P = lmax_out + 1, one weight per channel and output degree;
    weights="inout":  one weight per channel and (input degree, output degree) pair, with the path through the
                      scalar harmonic, ``(l, 0, l)`` (the neighbour's feature passed on unchanged), apart from its
                      pair's other paths (:func:`inout_key`): only paths that differ in a harmonic of degree > 0
                      share a weight. Factorised products run each input degree on its rows of their factors
                      and the paths without coupling apart (:meth:`uncoupled_paths`);
    weights="path":   P = number of paths, one weight per channel and path (MACE's "uvu" product).
    """

    # What the backend supports, declared once on its class and read by tdn.tp.build, the checks here
    # (:func:`check_support`) and the model's configuration. ``default_weights``: the weight mode a model uses
    # when its configuration names none; ``options``: the keyword options the constructor takes beyond the common
    # ones (e.g. "rank", "tol" for cp).
    kind: ClassVar[str] = ""
    supported_paths: ClassVar[tuple[str, ...]] = ("o3", "so3")
    supported_weights: ClassVar[tuple[str, ...]] = WEIGHT_MODES
    default_weights: ClassVar[str] = "shared"
    options: ClassVar[tuple[str, ...]] = ()
    unsupported_reason: ClassVar[str] = ""  # why paths outside supported_paths are not offered
    unsupported_weights_reason: ClassVar[str] = ""  # why weights outside supported_weights are not offered

    def __init__(self, lmax_in: int, lmax_sh: int, lmax_out: int, channels: int, paths: str, weights: str) -> None:
        super().__init__()
        self.lmax_in = check_lmax("lmax_in", lmax_in)
        self.lmax_sh = check_lmax("lmax_sh", lmax_sh)
        self.lmax_out = check_lmax("lmax_out", lmax_out)
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        check_support(self.kind, type(self), paths=paths, weights=weights)
        self.channels, self.paths, self.weights = channels, paths, weights
        self.path_list = path_list(lmax_in, lmax_sh, lmax_out, paths)
        if not self.path_list:
            raise ValueError(
                f"no coupling path for lmax_in={lmax_in}, lmax_sh={lmax_sh}, lmax_out={lmax_out}, paths={paths!r}"
            )
        self.num_paths = len(self.path_list)
        self.inout_keys = sorted({inout_key(p) for p in self.path_list})  # the "inout" weights, in order
        self.num_weights = weights_per_channel(weights, self.path_list, lmax_out)
        # [L+1, D_out] one-hot of each component's degree: expanding degree weights by a matmul differentiates
        # (twice, in force training) far cheaper than indexing, whose backward is a scatter (2.4x, CPU)
        expansion = nn.functional.one_hot(degree_of_component(lmax_out), lmax_out + 1).T.double()
        self.register_buffer("_degree_expansion", expansion, persistent=False)
        # [P, D_out] one-hot of each "inout" pair weight's output components (zero rows: the scalar-harmonic
        # paths, added apart); the weights of one input degree are consecutive (sorted), so that degree's part is
        # scaled by w[:, :, keys] @ E[keys]
        pairs = torch.zeros(len(self.inout_keys), dim(lmax_out), dtype=torch.float64)
        for p, (_, l3, scalar_harmonic) in enumerate(self.inout_keys):
            pairs[p, degree_slice(l3)] = float(not scalar_harmonic)
        self.register_buffer("_pair_expansion", pairs, persistent=False)
        # the scalar-harmonic paths (l, 0, l), l = 1 .. min(lmax_in, lmax_out): their input components, the
        # difference of weights each gets (own minus its pair's) and the block of its output degree
        own = [(p, l) for p, (l, _, scalar_harmonic) in enumerate(self.inout_keys) if scalar_harmonic]
        self._self_components = slice(1, dim(own[-1][1]) if own else 1)
        delta = torch.zeros(len(self.inout_keys), self._self_components.stop - 1, dtype=torch.float64)
        mask = torch.zeros(self._self_components.stop - 1, dim(lmax_out), dtype=torch.float64)
        for p, l in own:
            rows = slice(l * l - 1, (l + 1) ** 2 - 1)
            delta[p, rows] = 1.0
            if (l, l, False) in self.inout_keys:
                delta[self.inout_keys.index((l, l, False)), rows] = -1.0
            mask[rows, degree_slice(l)] = 1.0
        self.register_buffer("_self_delta", delta, persistent=False)  # [P, n_self]
        self.register_buffer("_self_mask", mask, persistent=False)  # [n_self, D_out]
        # per input degree: its "inout" weights (a slice of w's last dimension); the coupled degrees (l > 0)
        self._pairs_of: dict[int, slice] = {}
        for p, (l_in, _, _) in enumerate(self.inout_keys):  # sorted: each degree's keys are consecutive
            self._pairs_of[l_in] = slice(self._pairs_of.get(l_in, slice(p, p)).start, p + 1)
        self.coupled_input_degrees = sorted(l_in for l_in in self._pairs_of if l_in > 0)
        # [P, L_out+1, D_in]: the "inout" weight of output degree l and input component i is its pair's (zero for
        # the scalar-harmonic keys, added apart); the CPU receiver convolution expands w by it per chunk
        per_component = torch.zeros(len(self.inout_keys), lmax_out + 1, dim(lmax_in), dtype=torch.float64)
        for p, (l_in, l, scalar_harmonic) in enumerate(self.inout_keys):
            per_component[p, l, degree_slice(l_in)] = float(not scalar_harmonic)
        self.register_buffer("_component_expansion", per_component, persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # Tables are computed in float64. Casting float64 -> float32 -> float64 would keep float32 round-off,
        # so every cast re-derives the floating buffers from the originals captured at the first cast.
        if "_tables" not in self.__dict__:
            self._tables = {
                n: b.detach().clone() for n, b in self._buffers.items() if b is not None and b.is_floating_point()
            }
        super()._apply(fn, recurse)
        for name, table in self._tables.items():
            buffer = self._buffers[name]
            self._buffers[name] = table.to(device=buffer.device, dtype=buffer.dtype)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Loaded tables (e.g. cp factors fitted elsewhere) replace the originals, at the precision they come in,
        # so that a later cast re-derives them and not the tables this module was built with.
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if "_tables" in self.__dict__:
            for name in self._tables:
                if prefix + name in state_dict:
                    self._tables[name] = state_dict[prefix + name].detach().clone()

    @property
    def dims(self) -> tuple[int, int, int]:
        """``(d_in, d_sh, d_out)``."""
        return dim(self.lmax_in), dim(self.lmax_sh), dim(self.lmax_out)

    def extra_repr(self) -> str:
        return (
            f"lmax_in={self.lmax_in}, lmax_sh={self.lmax_sh}, lmax_out={self.lmax_out}, channels={self.channels}, "
            f"paths={self.paths!r}, weights={self.weights!r}"
        )

    def check_inputs(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, num_edges: int | None = None) -> None:
        """Shapes, dtypes and devices of ``x [E, C, D_in]``, ``y [E, D_sh]``, ``w [E, C, P]``.

        ``num_edges`` given: ``x`` holds node features (any number of rows) and E comes from it.
        """
        d_in, d_sh, _ = self.dims
        if x.dim() != 3 or x.shape[1:] != (self.channels, d_in):
            raise ValueError(f"x must have shape [E, {self.channels}, {d_in}], got {list(x.shape)}")
        num_edges = x.shape[0] if num_edges is None else num_edges
        if y.shape != (num_edges, d_sh):
            raise ValueError(f"y must have shape [{num_edges}, {d_sh}], got {list(y.shape)}")
        if w.shape != (num_edges, self.channels, self.num_weights):
            raise ValueError(
                f"w must have shape [{num_edges}, {self.channels}, {self.num_weights}] "
                f"(weights={self.weights!r}), got {list(w.shape)}"
            )
        # under autocast the inputs may differ (bf16 features, float32 harmonics): autocast casts the matmuls
        mixed_ok = torch.is_autocast_enabled(x.device.type)
        if not x.is_floating_point() or (not mixed_ok and (y.dtype != x.dtype or w.dtype != x.dtype)):
            raise TypeError(f"x, y, w must share one floating dtype, got {x.dtype}, {y.dtype}, {w.dtype}")
        if y.device != x.device or w.device != x.device:
            raise ValueError(f"x, y, w must be on one device, got {x.device}, {y.device}, {w.device}")

    def check_edges(self, y: torch.Tensor, sender: torch.Tensor, receiver: torch.Tensor) -> None:
        if sender.shape != (y.shape[0],) or receiver.shape != (y.shape[0],):
            raise ValueError(
                f"sender and receiver must have shape [{y.shape[0]}] (one entry per row of y), "
                f"got {list(sender.shape)} and {list(receiver.shape)}"
            )

    def expand_weights(self, w: torch.Tensor) -> torch.Tensor:
        """``w [E, C, P]`` -> per-component output scale ``[E, C, 1 or D_out]`` (modes "shared", "degree")."""
        if self.weights == "degree":
            return w @ self._degree_expansion.to(w.dtype)  # [E, C, L+1] @ [L+1, D_out]
        return w

    def pairs_of(self, l_in: int) -> slice:
        """The "inout" weights of input degree ``l_in``: a slice of ``w``'s last dimension (empty without a path)."""
        return self._pairs_of.get(l_in, slice(0, 0))

    def pair_weights(self, w: torch.Tensor, l_in: int) -> torch.Tensor:
        """``w [E, C, P]`` ("inout") -> the output scale ``[E, C, D_out]`` of the part from input degree ``l_in``
        (zero on the output degrees it has no path to). The part includes its path through the scalar harmonic at
        its pair's weight; :meth:`uncoupled_paths` corrects that to the path's own weight."""
        pairs = self.pairs_of(l_in)
        return w[:, :, pairs] @ self._pair_expansion[pairs].to(w.dtype)  # [E, C, P_l] @ [P_l, D_out]

    def scalar_couplings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This product's couplings through a scalar: ``(m0 [D_sh, D_out], m_self [D_in, D_out])`` with
        ``T(e_0, y) = y @ m0`` (a scalar input) and ``T(x, e_0) = x @ m_self`` (the scalar harmonic); the exact
        ones for the exact product, the backend's own (fit error included) for a factorised one."""
        raise NotImplementedError

    def uncoupled_paths(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The "inout" paths that need no coupling, as one product per edge: ``x [E, C, D_in]``, ``y [E, D_sh]``,
        ``w [E, C, P]`` -> ``[E, C, D_out]``.

        The scalar input's paths ``(0, l, l)`` at their weights, plus, for ``l > 0``, the scalar harmonic's path
        ``(l, 0, l)`` at its own weight minus its pair's (which the coupled part of degree ``l`` applied to it):
        ``U [E, C, n] = [x_0 w_(0, l) ..., x_l (w_self - w_pair) ...]`` times the per-edge ``G [E, n, D_out]`` of
        the couplings (per edge, not per channel).
        """
        m0, m_self = (m.to(x.dtype) for m in self.scalar_couplings())
        pairs0 = self.pairs_of(0)
        u = [x[:, :, :1] * w[:, :, pairs0]]  # [E, C, n0]
        g = [(y @ m0).unsqueeze(1) * self._pair_expansion[pairs0].to(x.dtype)]  # [E, n0, D_out]
        if self._self_components.stop > 1:
            u.append(x[:, :, self._self_components] * (w @ self._self_delta.to(x.dtype)))  # [E, C, n_self]
            coupling = m_self[self._self_components] * self._self_mask.to(x.dtype)  # [n_self, D_out]
            g.append(y[:, :1].unsqueeze(2) * coupling)  # [E, n_self, D_out]
        return torch.bmm(torch.cat(u, 2), torch.cat(g, 1))  # [E, C, D_out]

    def forward(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, y, w)
        return self.product(x, y, w)

    def product(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def conv(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor,
        sender: torch.Tensor,
        receiver: torch.Tensor,
        fused: bool | None = None,
    ) -> torch.Tensor:
        """Message passing with this product: ``out[n] = sum_{e: receiver[e] = n} tp(x[sender[e]], y[e], w[e])``.

        x [N, C, D_in] node features, y [E, D_sh], w [E, C, P], sender/receiver [E] -> [N, C, D_out].
        ``fused`` is used by factorised backends (see :mod:`tdn.tp.fused`); ignored here.
        """
        self.check_edges(y, sender, receiver)
        messages = self(x.index_select(0, sender), y, w)  # [E, C, D_out]
        return messages.new_zeros(x.shape[0], *messages.shape[1:]).index_add_(0, receiver, messages)


class FactorisedProduct(TensorProduct):
    """A product of the form ``T(x, y) = ((x @ left) ⊙ (y @ right)) @ project``, rank ``R``.

    ``left [D_in, R]``, ``right [D_sh, R]``, ``project [R, D_out]``. With shared weights the convolution
    moves both matmuls to the nodes and keeps only an ``R``-wide elementwise product per edge
    (:func:`tdn.tp.fused.edge_conv`).
    """

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(left [D_in, R], right [D_sh, R], project [R, D_out])``."""
        raise NotImplementedError

    @property
    def rank(self) -> int:
        """``R``, the width of the factorised form (CP terms for "cp", grid points for "grid")."""
        return self.factors()[0].shape[1]

    def product(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        left, right, project = self.factors()
        if self.weights != "inout":
            return (((x @ left) * (y @ right).unsqueeze(1)) @ project) * self.expand_weights(w)  # [E, C, D_out]
        # "inout": the paths without coupling in one product per edge, then each input degree l > 0 on its own
        # rows of ``left``, scaled by its pairs' weights
        out = self.uncoupled_paths(x, y, w)  # [E, C, D_out]
        yc = (y @ right).unsqueeze(1)  # [E, 1, R]
        for l in self.coupled_input_degrees:
            part = ((x[:, :, degree_slice(l)] @ left[degree_slice(l)]) * yc) @ project  # [E, C, D_out]
            out = out + part * self.pair_weights(w, l)
        return out

    def scalar_couplings(self) -> tuple[torch.Tensor, torch.Tensor]:
        left, right, project = self.factors()
        return (right * left[0]) @ project, (left * right[0]) @ project  # [D_sh, D_out], [D_in, D_out]

    def conv(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor,
        sender: torch.Tensor,
        receiver: torch.Tensor,
        fused: bool | None = None,
    ) -> torch.Tensor:
        # degree weights: one reduction per output degree pays with the kernel; without it the per-edge product
        # is faster (measured on a CPU: 34 vs 100 ms fwd+bwd at L = 3, docs/benchmarks/conv_cpu_quick.md)
        per_degree = fused if fused is not None else triton_available(x.device)
        if self.weights == "path" or (self.weights in ("degree", "inout") and not per_degree):
            return super().conv(x, y, w, sender, receiver, fused)  # per-edge messages
        self.check_inputs(x, y, w, num_edges=y.shape[0])
        self.check_edges(y, sender, receiver)
        left, right, project = self.factors()
        yc = y @ right  # [E, R]
        if self.weights == "shared":
            xb = x @ left  # [N, C, R]
            return edge_conv(xb, yc, w[:, :, 0], sender, receiver, x.shape[0], fused) @ project  # [N, C, D_out]
        # one reduction per weight, projected onto the rows of its output degree: per output degree l ("degree"),
        # per pair (l_in, l) on the terms of input degree l_in alone ("inout"; its scalar-harmonic paths apart)
        if self.weights == "inout":  # the coupled pairs (l_in > 0); the uncoupled paths per edge, added below
            weight_of = [p for p, (l_in, _, scalar_harmonic) in enumerate(self.inout_keys)
                         if l_in > 0 and not scalar_harmonic]  # fmt: skip
            pairs = [self.inout_keys[p][:2] for p in weight_of]
        else:
            pairs, weight_of = [(None, l) for l in range(self.lmax_out + 1)], list(range(self.lmax_out + 1))
        xb = {l_in: x @ left if l_in is None else x[:, :, degree_slice(l_in)] @ left[degree_slice(l_in)]
              for l_in in dict.fromkeys(l_in for l_in, _ in pairs)}  # fmt: skip  # [N, C, R] each
        per_degree_parts: list[list[torch.Tensor]] = [[] for _ in range(self.lmax_out + 1)]
        for p, (l_in, l) in zip(weight_of, pairs):
            summed = edge_conv(xb[l_in], yc, w[:, :, p], sender, receiver, x.shape[0], fused)  # [N, C, R]
            per_degree_parts[l].append(summed @ project[:, degree_slice(l)])
        parts = [sum(ps) if ps else x.new_zeros(x.shape[0], x.shape[1], 2 * l + 1)
                 for l, ps in enumerate(per_degree_parts)]  # fmt: skip
        return self.add_uncoupled_paths(torch.cat(parts, dim=2), x, y, w, sender, receiver)  # [N, C, D_out]

    def add_uncoupled_paths(self, summed: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                            sender: torch.Tensor, receiver: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """``summed [N, C, D_out]`` plus the "inout" :meth:`uncoupled_paths` of the edges, summed on their
        receivers (per-edge ``[E, C, D_out]`` messages, ``x`` node features); ``summed`` for other modes."""
        if self.weights != "inout":
            return summed
        return summed.index_add(0, receiver, self.uncoupled_paths(x.index_select(0, sender), y, w))
