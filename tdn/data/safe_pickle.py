"""A restricted unpickler for LMDB records (OC20/OC22 Data objects, PubChemQCR step dicts).

Unpickling runs code named by the file, so a dataset from the internet could execute anything.
This unpickler resolves only an allow-list of globals: torch tensor rebuilding, numpy array
rebuilding, and the torch_geometric Data / storage classes. The torch_geometric classes are
replaced by inert stand-ins that only keep their pickled state, so no torch_geometric code runs
either, and pickles written by PyG 1 (fields directly in ``__dict__``) and PyG 2 (fields in
``_store._mapping``) are read the same way. ``torch.storage._load_from_bytes`` (how tensors
pickle themselves) would call ``torch.load(weights_only=False)``, a second unrestricted
unpickler; it is replaced by a ``weights_only=True`` load.

``loads(data, trusted=True)`` is the explicit opt-out: plain ``pickle.loads``.
"""

from __future__ import annotations

import collections
import io
import pickle

import numpy as np
import torch

from .errors import RecordProblem


class UnsafePickle(RecordProblem):
    """The pickle names a global outside the allow-list."""

    def __init__(self, module: str, name: str):
        super().__init__(
            "unsafe_pickle",
            f"pickle wants {module}.{name}, which is not on the allow-list; "
            "pass trusted=True only if you trust the file",
        )


class PickledObject:
    """Inert stand-in for an allowed torch_geometric class: keeps the pickled state, runs nothing."""

    pickled_class = "?"

    def __init__(self, *args, **kwargs):
        self.args = args
        self.state: dict = {}

    def __setstate__(self, state):
        # PyG pickles its state as a dict; protocol-2 may pass (dict, slots) pairs.
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = dict(state) if isinstance(state, dict) else {"state": state}


def _stand_in(qualname: str) -> type:
    return type(f"Pickled[{qualname}]", (PickledObject,), {"pickled_class": qualname})


_PYG_CLASSES = {
    ("torch_geometric.data.data", "Data"),
    ("torch_geometric.data.data", "DataEdgeAttr"),
    ("torch_geometric.data.data", "DataTensorAttr"),
    ("torch_geometric.data.storage", "GlobalStorage"),
    ("torch_geometric.data.storage", "BaseStorage"),
    ("torch_geometric.data.batch", "Batch"),
}
_STAND_INS = {key: _stand_in(".".join(key)) for key in _PYG_CLASSES}


def _safe_load_from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def _reconstructor(cls, base, state):
    # copyreg._reconstructor (protocol 0/1 pickles of plain classes): only for allowed stand-ins.
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)) or base is not object:
        raise UnsafePickle("copyreg", "_reconstructor")
    obj = cls()
    if state is not None:
        obj.__setstate__(state)
    return obj


def _latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles write bytes as _codecs.encode(text, "latin1"): allow exactly that.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickle("_codecs", "encode")
    return text.encode("latin1")


def _numpy_multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _numpy_frombuffer():
    def frombuffer(buffer, dtype, shape, order):
        # Same semantics as numpy's own helper: a copy, so the array owns writable memory.
        return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy()

    return frombuffer


def _allowed_globals() -> dict:
    ma = _numpy_multiarray()
    allowed = {
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _safe_load_from_bytes,
        ("torch", "Size"): torch.Size,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("_codecs", "encode"): _latin1_bytes,
        ("builtins", "object"): object,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "slice"): slice,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = ma._reconstruct
        allowed[(module, "scalar")] = ma.scalar
    frombuffer = _numpy_frombuffer()  # arrays pickled with protocol 5
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = frombuffer
    for name in dir(torch):  # torch dtypes (torch.float32, ...) appear in some tensor pickles
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    if hasattr(np, "dtypes"):  # numpy >= 1.25 pickles dtypes as numpy.dtypes.Float64DType etc.
        for name in dir(np.dtypes):
            if name.endswith("DType"):
                allowed[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    allowed.update(_STAND_INS)
    return allowed


_ALLOWED = None


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that only resolves allow-listed globals (see module docstring)."""

    def find_class(self, module: str, name: str):
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickle(module, name) from None


def loads(data: bytes, trusted: bool = False):
    """Unpickle ``data``; restricted unless ``trusted`` (then torch_geometric objects are real)."""
    if trusted:
        return pickle.loads(data)
    return RestrictedUnpickler(io.BytesIO(data)).load()


def load_file(path, key: str, trusted: bool = False, data: bytes | None = None):
    """Unpickle the file ``path`` (or ``data`` read from it under ``key``): a refused global raises
    :class:`tdn.data.UnsafePickleError` naming the file and the key, anything else undecodable
    :class:`tdn.data.InvalidRecordError` ("corrupt")."""
    from .errors import InvalidRecordError, UnsafePickleError

    raw = open(path, "rb").read() if data is None else data
    try:
        return loads(raw, trusted=trusted)
    except UnsafePickle as problem:
        raise UnsafePickleError(str(path), key, problem.reason, problem.detail) from None
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the bytes are damaged
        raise InvalidRecordError(str(path), key, "corrupt", f"{type(error).__name__}: {error}") from error


def record_fields(obj) -> dict:
    """The field dict of a pickled Data, whatever its layout.

    Accepts a plain dict, a restricted-unpickler stand-in, or (trusted mode) a real
    torch_geometric Data in the PyG 2 layout (``_store``) or the PyG 1 layout (fields in ``__dict__``).
    """
    if isinstance(obj, dict):
        return dict(obj)
    state = obj.state if isinstance(obj, PickledObject) else getattr(obj, "__dict__", None)
    if state is None:
        raise RecordProblem("corrupt", f"record is a {type(obj).__name__}, not a Data object or dict")
    store = state.get("_store")
    if store is not None:
        inner = store.state if isinstance(store, PickledObject) else getattr(store, "__dict__", {})
        mapping = inner.get("_mapping", {})
        return dict(mapping)
    return {k: v for k, v in state.items() if not k.startswith("_") and v is not None}
