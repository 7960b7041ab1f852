"""``count_syncs()``: count, on any machine, the operations of a block of code that make the host wait for an
accelerator (a CUDA device-to-host synchronisation). ``matmul_calls()``: record the matmul-family calls of a block
(each may run in TF32 on a GPU under ``torch.set_float32_matmul_precision("high")``) and who made them.

Usage (test modules import it as ``from syncs import count_syncs``; pytest puts tests/ on ``sys.path``)::

    with count_syncs() as syncs:
        atoms.get_forces()
    assert syncs.count <= 1, syncs.events      # events: one readable line per counted operation

Two layers, so that the count means the same on a CPU-only machine as on a GPU:

* **Operations that sync on CUDA** (a ``TorchDispatchMode``, which also sees the calls made inside other operators
  and in autograd's backward): ``_local_scalar_dense`` (``item``, ``bool``, ``int``, ``float`` of a tensor),
  ``is_nonzero``, ``equal``, ``nonzero`` (also behind ``argwhere`` and one-argument ``where``), ``masked_select``,
  every ``unique`` variant, ``bincount``, ``repeat_interleave`` without ``output_size``, ``index`` / ``index_put``
  with a boolean index (``x[mask]``, ``x[mask] = v``), ``_linalg_check_errors`` (``torch.linalg.inv`` and friends),
  and copies to the CPU from another device (``_to_copy``, ``copy_``).
* **Reads of tensor values by the host** (a ``TorchFunctionMode``): ``item``, ``tolist``, ``numpy``, ``__array__``,
  ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``__complex__``, ``__contains__``. On a CPU tensor these
  reach no syncing operator (``.cpu()`` returns the tensor itself and ``numpy()`` shares its memory), yet on an
  accelerator each would be a device-to-host transfer: every read counts once, as if each tensor lived on the
  device. ``.cpu()`` / ``.to("cpu")`` of a tensor on another device counts as the transfer, and reading the host
  copy it returns is then free; a read of a CPU tensor whose values a transfer already brought over counts
  again, as it would on a GPU where the read tensor is a device tensor. A host-to-device copy (``.to(device)``
  of a CPU tensor) is never counted.

Limits: on a CPU-only machine a read of a tensor that really is host data (``torch.from_numpy(a).tolist()``) counts
too, so host data is best kept in numpy; C++ code that reads a raw data pointer without going through an operator
(none in torch's own operators that we know of) is invisible.
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Reads of a tensor's values into Python or numpy objects (Tensor methods, by name).
READS = frozenset(
    {"item", "tolist", "numpy", "__array__", "__bool__", "__float__", "__int__", "__index__", "__complex__",
     "__contains__"}
)  # fmt: skip
TRANSFERS = frozenset({"cpu", "to"})  # may copy a device tensor to the host

# Operator overload packets that always sync on CUDA (a value read back, or an output size that depends on data).
ALWAYS = {
    aten._local_scalar_dense,
    aten.is_nonzero,
    aten.equal,
    aten.allclose,
    aten.nonzero,
    aten.masked_select,
    aten.bincount,
    aten._linalg_check_errors,
}
UNIQUE = {"unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive"}


@dataclass
class SyncCount:
    """What :func:`count_syncs` counted: ``events`` (one line per syncing operation, in order) and ``count``."""

    events: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.events)

    def __repr__(self) -> str:
        return f"SyncCount({self.count}: {self.events})"


def _is_bool_index(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _device_type(value: Any) -> str | None:
    return value.device.type if isinstance(value, torch.Tensor) else None


class _Dispatch(TorchDispatchMode):
    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.state.inside_read:
            reason = self._syncs(func, args, kwargs, out)
            if reason:
                self.state.record(f"{func}: {reason}")
        return out

    @staticmethod
    def _syncs(func, args: tuple, kwargs: dict, out: Any) -> str:
        packet = func.overloadpacket
        if packet in ALWAYS:
            return "reads a value or sizes its output by the data"
        if packet.__name__ in UNIQUE:
            return "output size depends on the data"
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:  # repeats as a tensor
            return "without output_size"
        if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(_is_bool_index(i) for i in indices):
                return "boolean index"
        if packet is aten._to_copy:
            source = _device_type(args[0])
            if source not in (None, "cpu") and _device_type(out) == "cpu":
                return f"copy {source} -> cpu"
        if packet is aten.copy_:
            target, source = _device_type(args[0]), _device_type(args[1])
            if target == "cpu" and source not in (None, "cpu"):
                return f"copy {source} -> cpu"
        return ""


class _Function(TorchFunctionMode):
    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if tensor is None or name not in READS | TRANSFERS:
            return func(*args, **kwargs)
        state = self.state
        state.inside_read += 1  # the operators below this call are this one read, not more
        try:
            out = func(*args, **kwargs)
        finally:
            state.inside_read -= 1
        if name in READS:
            if not state.is_host(tensor):
                state.record(f"Tensor.{name} of a {tensor.device.type} tensor {tuple(tensor.shape)}")
        elif isinstance(out, torch.Tensor) and out.device.type == "cpu" and tensor.device.type != "cpu":
            state.record(f"Tensor.{name}: copy {tensor.device.type} -> cpu {tuple(tensor.shape)}")
            state.mark_host(out)
        return out


class _State:
    def __init__(self) -> None:
        self.result = SyncCount()
        self.inside_read = 0
        self._host: dict[int, weakref.ref] = {}  # id -> tensor copied to the host by a counted transfer

    def record(self, event: str) -> None:
        self.result.events.append(event)

    def mark_host(self, tensor: torch.Tensor) -> None:
        self._host[id(tensor)] = weakref.ref(tensor)

    def is_host(self, tensor: torch.Tensor) -> bool:
        ref = self._host.get(id(tensor))
        return ref is not None and ref() is tensor


@contextlib.contextmanager
def count_syncs() -> Iterator[SyncCount]:
    """Count the syncing operations run inside the ``with`` block (see the module docstring)."""
    state = _State()
    with _Dispatch(state), _Function(state):
        yield state.result


# torch functions and Tensor methods that reach a matmul kernel (TF32 on a GPU when allowed), by name.
MATMULS = frozenset(
    {"matmul", "__matmul__", "__rmatmul__", "__imatmul__", "mm", "bmm", "mv", "dot", "vdot", "inner", "einsum",
     "tensordot", "linear", "addmm", "addbmm", "baddbmm", "addmv", "chain_matmul", "multi_dot"}
)  # fmt: skip
_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass
class MatmulCall:
    """One matmul-family call: the function's ``name`` and the ``caller`` (``path:line`` of the first frame outside
    torch and this helper)."""

    name: str
    caller: str


class _Matmuls(TorchFunctionMode):
    def __init__(self, calls: list[MatmulCall]) -> None:
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in MATMULS:
            frame = sys._getframe(1)
            while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                         or frame.f_code.co_filename == __file__):  # fmt: skip
                frame = frame.f_back
            caller = "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"
            self.calls.append(MatmulCall(name, caller))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def matmul_calls() -> Iterator[list[MatmulCall]]:
    """Record every matmul-family torch call made inside the ``with`` block (:data:`MATMULS`), in order."""
    calls: list[MatmulCall] = []
    with _Matmuls(calls):
        yield calls
