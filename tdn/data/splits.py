"""Reproducible train/val/test splits, by system id where the data has one (no molecule leaks across splits)."""

from __future__ import annotations

import numpy as np


def _count(size: float | int | None, total: int, name: str) -> int:
    """A split size given as a fraction (float in [0, 1)) or a count (int) -> a count."""
    if size is None:
        return 0
    if isinstance(size, (bool, np.bool_)):
        raise TypeError(f"{name} must be a fraction or a count, got {size!r}")
    if isinstance(size, (int, np.integer)):
        count = int(size)
    else:
        if not 0.0 <= float(size) < 1.0:
            raise ValueError(f"{name}={size}: a float size is a fraction in [0, 1); use an int for a count")
        count = int(round(float(size) * total))
    if count < 0 or count > total:
        raise ValueError(f"{name}={size} does not fit {total} items")
    return count


def split_indices(
    n: int,
    sizes: dict[str, float | int | None],
    *,
    groups: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Split positions 0..n-1 into named parts.

    Args:
        n: number of records.
        sizes: part name -> fraction (float) or count (int); exactly one part may be None, meaning
            "the rest". With ``groups``, sizes count groups (systems), not records.
        groups: a system id per record (OC20 sid, PubChemQCR CID); records of one group always land
            in the same part.
        seed: the permutation seed; the same seed gives the same split.

    Returns:
        part name -> sorted int64 positions.
    """
    rest = [name for name, size in sizes.items() if size is None]
    if len(rest) > 1:
        raise ValueError(f"only one split may take the rest, got {rest}")
    rng = np.random.default_rng(seed)
    if groups is None:
        units = rng.permutation(n)
        members = None
        total = n
    else:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise ValueError(f"{len(groups)} group ids for {n} records")
        unique, inverse = np.unique(groups, return_inverse=True)
        units = rng.permutation(len(unique))
        members = inverse
        total = len(unique)

    counts = {name: _count(size, total, name) for name, size in sizes.items() if size is not None}
    taken = sum(counts.values())
    if taken > total:
        raise ValueError(f"split sizes {sizes} add up to more than the {total} available")
    if rest:
        counts[rest[0]] = total - taken

    out, start = {}, 0
    for name in sizes:
        chosen = units[start:start + counts[name]]
        start += counts[name]
        if members is None:
            out[name] = np.sort(chosen).astype(np.int64)
        else:
            out[name] = np.flatnonzero(np.isin(members, chosen)).astype(np.int64)
    return out
