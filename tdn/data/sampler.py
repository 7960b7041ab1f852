"""Batches capped by number of structures, atoms and/or edges, consistent across distributed ranks.

Every rank builds the same global list of batches from the same seeded order (seed and epoch)
and takes every ``num_replicas``-th batch, so all ranks run the same number of steps (batches are
repeated to pad, as DistributedSampler repeats samples). Lightning, with
``use_distributed_sampler=True``, re-creates this sampler with a DistributedSampler as
``sampler``; its rank and world size are used, its order is not. With
``use_distributed_sampler=False`` the rank comes from torch.distributed when it is initialised.
"""

from __future__ import annotations

import logging

import numpy as np
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler, Sampler

logger = logging.getLogger("tdn.data")


def pack_batches(order: np.ndarray, natoms: np.ndarray, nedges: np.ndarray | None, *,
                 batch_size: int | None, max_atoms: int | None, max_edges: int | None) -> list[list[int]]:
    """Greedy packing of positions (in ``order``) into batches under the caps.

    A structure that alone exceeds a cap gets a batch of its own (and a warning) rather than being dropped.
    """
    batches, current, atoms, edges = [], [], 0, 0
    oversized = 0
    for pos in order.tolist():
        a = int(natoms[pos])
        e = int(nedges[pos]) if nedges is not None else 0
        full = (
            (batch_size is not None and len(current) >= batch_size)
            or (max_atoms is not None and atoms + a > max_atoms)
            or (max_edges is not None and edges + e > max_edges)
        )
        if current and full:
            batches.append(current)
            current, atoms, edges = [], 0, 0
        if (max_atoms is not None and a > max_atoms) or (max_edges is not None and e > max_edges):
            oversized += 1
        current.append(pos)
        atoms += a
        edges += e
    if current:
        batches.append(current)
    if oversized:
        logger.warning("%d structure(s) exceed the batch cap (max_atoms=%s, max_edges=%s) and form batches alone",
                       oversized, max_atoms, max_edges)
    return batches


class EpochSampler(Sampler):
    """Positions 0..n-1 in order, remembering the epoch Lightning sets on it.

    Lightning calls ``set_epoch`` on ``batch_sampler.sampler``, not on the batch sampler, so the
    epoch (which seeds the shuffling) travels through this object.
    """

    def __init__(self, n: int):
        self.n = int(n)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


class BalancedBatchSampler(BatchSampler):
    """Yield lists of dataset positions whose totals stay under the caps.

    The number of batches is the same in every epoch (that of epoch 0), so that Lightning's batch
    count, progress and learning-rate schedules hold and no batch is cut off: a shuffled packing
    with more batches is redrawn, one with fewer has its largest batches split.

    Args:
        sampler: the positions to batch are ``range(len(sampler))`` (an EpochSampler or a
            SequentialSampler over the dataset); if it is a DistributedSampler,
            ``range(len(sampler.dataset))``, and its ``num_replicas`` and ``rank`` shard the batches.
            Its ``epoch`` attribute, when it has one, is the epoch.
        natoms: atoms per position [len(dataset)]; None counts structures only.
        nedges: edges per position, needed only with ``max_edges``.
        batch_size: at most this many structures per batch (None: no count cap).
        max_atoms: at most this many atoms per batch (None: no cap).
        max_edges: at most this many edges per batch (None: no cap).
        shuffle: reshuffle every epoch (seeded by ``seed`` and the epoch); False keeps dataset order.
        seed: base seed, identical on every rank.
        drop_last: drop trailing batches instead of repeating batches to equalise ranks.
        num_replicas, rank: override the distributed set-up (default: from ``sampler`` or torch.distributed).
    """

    redraws = 8  # shuffled packings tried per epoch before falling back to epoch 0's batches

    def __init__(self, sampler, natoms=None, nedges=None, batch_size: int | None = None,
                 max_atoms: int | None = None, max_edges: int | None = None, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, num_replicas: int | None = None, rank: int | None = None):
        if batch_size is None and max_atoms is None and max_edges is None:
            raise ValueError("give at least one of batch_size, max_atoms, max_edges")
        if max_edges is not None and nedges is None:
            raise ValueError("max_edges needs nedges")
        # A DistributedSampler's own length is its per-rank share: count the dataset instead.
        n = len(sampler.dataset) if isinstance(sampler, DistributedSampler) else len(sampler)
        self.sampler = sampler
        self.natoms = np.ones(n, dtype=np.int64) if natoms is None else np.asarray(natoms, dtype=np.int64)
        self.nedges = None if nedges is None else np.asarray(nedges, dtype=np.int64)
        if len(self.natoms) != n or (self.nedges is not None and len(self.nedges) != n):
            raise ValueError(f"sizes do not match the {n} positions of the sampler")
        self.batch_size = batch_size
        self.max_atoms = max_atoms
        self.max_edges = max_edges
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_replicas = num_replicas
        self.rank = rank
        self._epoch = 0
        self._cache: dict[int, list[list[int]]] = {}

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", self._epoch))

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (Lightning sets it on ``self.sampler``; both work)."""
        self._epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _world(self) -> tuple[int, int]:
        if self.num_replicas is not None:
            return int(self.num_replicas), int(self.rank or 0)
        if isinstance(self.sampler, DistributedSampler):
            return int(self.sampler.num_replicas), int(self.sampler.rank)
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        return pack_batches(order, self.natoms, self.nedges, batch_size=self.batch_size,
                            max_atoms=self.max_atoms, max_edges=self.max_edges)

    def _order(self, *key: int) -> np.ndarray:
        n = len(self.natoms)
        return np.random.default_rng([self.seed, *key]).permutation(n) if self.shuffle else np.arange(n)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if 0 not in self._cache:
            self._cache[0] = self._pack(self._order(0, 0))
        base = self._cache[0]
        if epoch == 0 or not self.shuffle:
            return base
        if epoch not in self._cache:
            target = len(base)
            for attempt in range(self.redraws):
                batches = self._pack(self._order(epoch, attempt))
                if len(batches) <= target:
                    break
            else:  # keep epoch 0's batches, in a new order
                rng = np.random.default_rng([self.seed, epoch])
                batches = [base[i] for i in rng.permutation(target)]
            while len(batches) < target:  # split the batch with most structures (always > 1 here)
                k = max(range(len(batches)), key=lambda i: len(batches[i]))
                half = len(batches[k]) // 2
                batches[k:k + 1] = [batches[k][:half], batches[k][half:]]
            self._cache = {0: base, epoch: batches}
        return self._cache[epoch]

    def _rank_batches(self) -> list[list[int]]:
        batches = self._epoch_batches(self.epoch)
        world, rank = self._world()
        if world > 1:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % world]
            elif len(batches) % world:
                pad = world - len(batches) % world
                batches = batches + [batches[k % len(batches)] for k in range(pad)]
            batches = batches[rank::world]
        return batches

    def __iter__(self):
        yield from (list(b) for b in self._rank_batches())

    def __len__(self) -> int:
        return len(self._rank_batches())
