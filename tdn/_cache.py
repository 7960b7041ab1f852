"""Results derived from a tensor, cached on the tensor that owns its memory.

Index tensors that stay the same between calls (a system's atomic numbers, a neighbour list's ``edge_index`` during
MD) let every layer and every step reuse what was derived from them once: element groupings, sorts, checks. Those
derivations sync the host, so caching them is what keeps an MD step free of host synchronisation. The cache lives and
dies with the tensor (a weak reference; nothing is stored on the tensor, which therefore pickles as before); an
in-place change (a new ``_version`` of the owner) makes it stale.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# id(owner) -> (weak reference to the owner, its cache); the entry goes when the owner does
_CACHES: dict[int, tuple[weakref.ref, dict[Hashable, Any]]] = {}


def _cache_of(owner: torch.Tensor) -> dict[Hashable, Any]:
    key = id(owner)
    entry = _CACHES.get(key)
    if entry is None or entry[0]() is not owner:
        entry = _CACHES[key] = (weakref.ref(owner, lambda _, k=key: _CACHES.pop(k, None)), {})
    return entry[1]


def cached_on(tensor: torch.Tensor, key: Hashable, build: Callable[[], T]) -> T:
    """``build()``, computed once per ``key``, view of ``tensor`` and version of its memory's owner.

    The owner is ``tensor._base`` for a view (``edge_index`` for ``edge_index[1]``), so views taken afresh on every
    call share one cache. ``build`` raising caches nothing.

    Inference tensors (made under ``torch.inference_mode``) keep no version counter, so an in-place change could
    not be seen: for them ``build()`` runs on every call.
    """
    owner = tensor if tensor._base is None else tensor._base
    if owner.is_inference():
        return build()
    version = owner._version
    full_key = (key, tensor.storage_offset(), tuple(tensor.stride()), tuple(tensor.shape), version)
    cache = _cache_of(owner)
    if full_key not in cache:
        for stale in [k for k in cache if k[-1] != version]:  # written in place since
            del cache[stale]
        cache[full_key] = build()
    return cache[full_key]
