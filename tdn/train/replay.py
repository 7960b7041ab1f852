"""Replay: structures of another dataset (e.g. the pretraining data) mixed into every training epoch.

``finetune.replay.data`` (path or list of paths, any format :func:`tdn.data.read` reads) and
``finetune.replay.fraction``: every epoch trains on the whole new training split plus
``round(fraction * len(train))`` structures drawn from the replay data (without replacement when it has enough),
drawn again every epoch from ``(seed, epoch)``, so a resumed run draws what the uninterrupted run would. Replay
structures take part in the loss like any other; statistics and E0s come from the new training split alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from ..data import EpochSampler
from ..data.sampler import pack_batches
from .errors import ConfigError

REPLAY_KEYS = ("data", "fraction", "format", "reader_options")
REDRAWS = 8  # packings tried per epoch before falling back to epoch 0's batches (as tdn.data's sampler does)
DRAW_STREAM = 7  # keeps the replay draw's random stream apart from the shuffle's


@dataclass
class ReplayOptions:
    """``finetune.replay``: ``paths`` to draw from, ``fraction`` of the training split per epoch."""

    paths: list[str]
    fraction: float = 0.2
    format: str | None = None
    reader_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, values: Mapping[str, Any] | None) -> ReplayOptions | None:
        """None when no replay data is given; a ConfigError names a bad key or path."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(REPLAY_KEYS))
        if unknown:
            raise ConfigError(f"unknown finetune.replay option(s) {unknown}; known: {sorted(REPLAY_KEYS)}")
        data = values.get("data")
        if data in (None, "", []):
            return None
        paths = [str(data)] if isinstance(data, (str, Path)) else [str(p) for p in data]
        for path in paths:
            if not Path(path).exists():
                raise ConfigError(f"finetune.replay.data: no such file or directory: {path}")
        fraction = values.get("fraction", 0.2)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not fraction > 0:
            raise ConfigError(f"finetune.replay.fraction must be a number > 0, got {fraction!r} (e.g. 0.2)")
        options = {k: v for k, v in (values.get("reader_options") or {}).items() if v is not None}
        return cls(paths, float(fraction), values.get("format"), options)

    def count(self, num_train: int) -> int:
        """Replay structures per epoch for a training split of ``num_train``."""
        return max(1, int(round(self.fraction * num_train)))


class ReplayBatchSampler:
    """Batches of the training split (positions ``0..num_train-1``) plus ``count`` replay structures (positions
    ``num_train + k``, k drawn from ``0..num_replay-1`` per epoch), shuffled together and packed under the caps.

    As :class:`tdn.data.BalancedBatchSampler`: the number of batches is epoch 0's in every epoch (a packing with more
    is redrawn, one with fewer has its largest batches split), and under DDP every rank takes every world-size-th
    batch of the same list. Lightning sets the epoch on ``self.sampler``.
    """

    def __init__(
        self,
        natoms: np.ndarray | None,
        nedges: np.ndarray | None,
        num_train: int,
        num_replay: int,
        count: int,
        *,
        batch_size: int | None,
        max_atoms: int | None = None,
        max_edges: int | None = None,
        seed: int = 0,
    ) -> None:
        total = num_train + num_replay
        self.natoms = np.ones(total, dtype=np.int64) if natoms is None else np.asarray(natoms, dtype=np.int64)
        self.nedges = None if nedges is None else np.asarray(nedges, dtype=np.int64)
        if len(self.natoms) != total:
            raise ValueError(f"{len(self.natoms)} sizes for {total} positions")
        self.num_train, self.num_replay, self.count = int(num_train), int(num_replay), int(count)
        self.batch_size, self.max_atoms, self.max_edges = batch_size, max_atoms, max_edges
        self.seed = int(seed)
        self.sampler = EpochSampler(num_train + count)
        self._cache: dict[int, list[list[int]]] = {}

    @property
    def epoch(self) -> int:
        return int(self.sampler.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def replay_draw(self, epoch: int) -> np.ndarray:
        """Indices into the replay data used in ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch, DRAW_STREAM])
        return rng.choice(self.num_replay, self.count, replace=self.count > self.num_replay)

    def _pack(self, epoch: int, attempt: int) -> list[list[int]]:
        positions = np.concatenate([np.arange(self.num_train), self.num_train + self.replay_draw(epoch)])
        order = np.random.default_rng([self.seed, epoch, attempt]).permutation(positions)
        return pack_batches(order, self.natoms, self.nedges, batch_size=self.batch_size, max_atoms=self.max_atoms,
                            max_edges=self.max_edges)  # fmt: skip

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global list of batches of ``epoch`` (positions in train + replay)."""
        if 0 not in self._cache:
            self._cache[0] = self._pack(0, 0)
        base = self._cache[0]
        if epoch == 0:
            return base
        if epoch not in self._cache:
            target = len(base)
            for attempt in range(REDRAWS):
                batches = self._pack(epoch, attempt)
                if len(batches) <= target:
                    break
            else:  # epoch 0's batches in a new order
                batches = [base[i] for i in np.random.default_rng([self.seed, epoch]).permutation(target)]
            while len(batches) < target:  # split the batch with most structures
                k = max(range(len(batches)), key=lambda i: len(batches[i]))
                half = len(batches[k]) // 2
                batches[k : k + 1] = [batches[k][:half], batches[k][half:]]
            self._cache = {0: base, epoch: batches}
        return self._cache[epoch]

    def _rank_batches(self) -> list[list[int]]:
        batches = self.epoch_batches(self.epoch)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world, rank = dist.get_world_size(), dist.get_rank()
            pad = -len(batches) % world
            batches = (batches + [batches[k % len(batches)] for k in range(pad)])[rank::world]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(b) for b in self._rank_batches())

    def __len__(self) -> int:
        return len(self._rank_batches())
