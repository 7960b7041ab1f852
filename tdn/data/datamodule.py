"""The LightningDataModule: readers -> splits -> graphs -> capped batches, plus training statistics."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from .base import ConcatAtoms
from .formats import EmptyDatasetError, infer_format, read
from .graph import GraphDataset, atoms_to_graph, collate
from .sampler import BalancedBatchSampler, EpochSampler
from .splits import split_indices
from .statistics import compute_statistics, load_statistics, save_statistics

logger = logging.getLogger("tdn.data")


def _as_paths(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    return [str(v) for v in value]


def _file_identity(path: str) -> list:
    """Path, size and mtime of a file or of the files in a directory: changes invalidate caches."""
    p = Path(path)
    files = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p]
    return [[str(q.resolve()), q.stat().st_size, q.stat().st_mtime_ns] for q in files if q.exists()]


# cache_graphs="auto" keeps the graphs of splits up to this many structures in memory (tens to hundreds of MB for
# molecules); larger sets, and loaders with worker processes (each would hold its own copy), build them per epoch
CACHE_GRAPHS_AUTO_MAX = 20_000


class TDNDataModule(L.LightningDataModule):
    """Train / val / test graphs from dataset files, batched under atom or edge caps.

    Args:
        train: path (or list of paths) of the training data. Any format :func:`tdn.data.read` reads.
        val: validation path(s); None splits validation off ``train`` (``val_size``).
        test: test path(s); None splits a test set off ``train`` when ``test_size`` > 0.
        format: reader format for all paths; None infers it per path.
        reader_options: keyword options for :func:`tdn.data.read` (e.g. ``{"molecule": True}`` for
            rMD17, ``{"stages": ["DFT_1st"]}`` for PubChemQCR, ``{"ref_energies": ...}`` for OC20).
        train_size: training structures taken from ``train``: float fraction, int count, or None for
            all that is not validation/test.
        val_size: validation part of ``train`` when ``val`` is None: float fraction or int count.
        test_size: test part of ``train`` when ``test`` is None: float fraction or int count.
            Splits are by system id (OC20 sid, PubChemQCR CID) when the format has one — sizes then
            count systems — otherwise by structure; always with ``seed``.
        cutoff: neighbour-list cutoff in Å.
        max_neighbors: cap on neighbours per atom (nearest kept), None for none.
        dtype: float dtype of the graphs, "float32" or "float64".
        batch_size: at most this many structures per training batch (None: no count cap).
        max_atoms: at most this many atoms per batch (None: no cap).
        max_edges: at most this many edges per batch (None: no cap).
        eval_batch_size: structures per validation/test batch (default: ``batch_size``); the atom and
            edge caps apply as well.
        num_workers: DataLoader worker processes (LMDB / SQLite handles reopen in each worker).
        cache_graphs: keep built graphs in memory (read and neighbour-listed once, not every epoch): true, false,
            or "auto" (splits of at most ``CACHE_GRAPHS_AUTO_MAX`` structures, without worker processes).
        pin_memory: DataLoader pin_memory.
        seed: seed of the split and of the per-epoch shuffling (identical on every rank).
        skip_invalid: skip invalid records (counted by reason and logged) instead of failing.
            Scans each split once to know which records are usable.
        e0: per-element reference energies for :meth:`statistics`: "least_squares", "zero", or given
            references ({Z or symbol: eV}, an .npz path with ``coeff`` indexed by Z, or a JSON path).
        stats_file: JSON file where :meth:`statistics` is cached ("next to the run"); reused only if
            its fingerprint (data files, split, cutoff, e0) matches. None: no caching.
        stats_max_structures: compute statistics on a seeded random subset of at most this many
            training structures (for very large datasets); None uses all.
        cache_dir: directory for per-split size indices and the PubChemQCR frame index; None: no caching.

    With several GPUs (DDP) each rank takes every world-size-th batch of the same global batch list.
    Lightning's default ``use_distributed_sampler=True`` works (it re-creates the batch sampler with a
    DistributedSampler, whose rank is used); so does ``use_distributed_sampler=False``.
    """

    def __init__(
        self,
        train: str | Sequence[str],
        val: str | Sequence[str] | None = None,
        test: str | Sequence[str] | None = None,
        format: str | None = None,
        reader_options: Mapping | None = None,
        train_size: float | int | None = None,
        val_size: float | int = 0.05,
        test_size: float | int = 0.0,
        cutoff: float = 5.0,
        max_neighbors: int | None = None,
        dtype: str = "float32",
        batch_size: int | None = 16,
        max_atoms: int | None = None,
        max_edges: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        skip_invalid: bool = False,
        e0="least_squares",
        stats_file: str | None = None,
        stats_max_structures: int | None = None,
        cache_dir: str | None = None,
        cache_graphs: bool | str = "auto",
    ):
        super().__init__()
        self.train_paths = _as_paths(train)
        self.val_paths = _as_paths(val)
        self.test_paths = _as_paths(test)
        if not self.train_paths:
            raise ValueError("train: give at least one path")
        self.format = format
        self.reader_options = dict(reader_options or {})
        self.train_size = train_size
        self.val_size = val_size
        self.test_size = test_size
        self.cutoff = float(cutoff)
        self.max_neighbors = max_neighbors
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_atoms = max_atoms
        self.max_edges = max_edges
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.seed = int(seed)
        self.skip_invalid = bool(skip_invalid) or bool(self.reader_options.get("skip_invalid", False))
        self.e0 = e0
        self.stats_file = stats_file
        self.stats_max_structures = stats_max_structures
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if cache_graphs not in (True, False, "auto"):
            raise ValueError(f"cache_graphs must be true, false or auto, got {cache_graphs!r}")
        self.cache_graphs = cache_graphs
        if batch_size is None and max_atoms is None and max_edges is None:
            raise ValueError("give at least one of batch_size, max_atoms, max_edges")
        self.datasets: dict[str, GraphDataset] = {}
        self._prepared: dict[str, tuple[GraphDataset, np.ndarray | None, np.ndarray | None]] = {}
        self._stats: dict | None = None
        self.skipped: dict[str, dict[str, int]] = {}

    # -- reading and splitting --------------------------------------------------------------------
    def _open(self, paths: list[str]):
        options = dict(self.reader_options)
        options["skip_invalid"] = self.skip_invalid
        fmt = self.format or infer_format(paths[0])
        if fmt == "pubchemqcr" and self.cache_dir is not None:
            options.setdefault("index_cache", str(self.cache_dir))
        dataset = read(paths if len(paths) > 1 else paths[0], format=self.format, **options)
        for part in dataset.datasets if isinstance(dataset, ConcatAtoms) else [dataset]:
            if len(part) == 0:  # said here: an empty split would only surface as a confusing split error
                raise EmptyDatasetError(str(part.path))
        return dataset

    def _graphs(self, atoms, indices=None) -> GraphDataset:
        size = len(atoms) if indices is None else len(indices)
        cache = self.cache_graphs is True or (
            self.cache_graphs == "auto" and self.num_workers == 0 and size <= CACHE_GRAPHS_AUTO_MAX
        )
        return GraphDataset(atoms, self.cutoff, dtype=self.dtype, max_neighbors=self.max_neighbors, indices=indices,
                            cache={} if cache else None)  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        """Open the files and build the splits (idempotent; cheap: nothing is decoded here but split ids)."""
        if self.datasets:
            return
        train_atoms = self._open(self.train_paths)
        sizes: dict[str, float | int | None] = {"train": self.train_size}
        if self.val_paths is None:
            sizes["val"] = self.val_size
        if self.test_paths is None and self.test_size:
            sizes["test"] = self.test_size
        if self.train_size is not None:
            sizes["rest"] = None  # whatever is left over stays unused
        if len(sizes) == 1:  # all of it is training data: no split, and no pass to collect system ids
            parts = {"train": np.arange(len(train_atoms), dtype=np.int64)}
        else:
            parts = split_indices(len(train_atoms), sizes, groups=train_atoms.groups(), seed=self.seed)
        self.datasets["train"] = self._graphs(train_atoms, parts["train"])
        if "val" in parts:
            self.datasets["val"] = self._graphs(train_atoms, parts["val"])
        else:
            self.datasets["val"] = self._graphs(self._open(self.val_paths))
        if "test" in parts:
            self.datasets["test"] = self._graphs(train_atoms, parts["test"])
        elif self.test_paths is not None:
            self.datasets["test"] = self._graphs(self._open(self.test_paths))

    # -- sizes for the batch sampler ------------------------------------------------------------
    def _fingerprint(self, *extra) -> str:
        config = {
            "train": [_file_identity(p) for p in self.train_paths],
            "val": [_file_identity(p) for p in self.val_paths or []],
            "test": [_file_identity(p) for p in self.test_paths or []],
            "format": self.format,
            "reader_options": {k: str(v) for k, v in sorted(self.reader_options.items())},
            "split": [self.train_size, self.val_size, self.test_size, self.seed],
            "graph": [self.cutoff, self.max_neighbors],
            "skip_invalid": self.skip_invalid,
            "extra": [str(e) for e in extra],
        }
        return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()

    def _scan(self, name: str, dataset: GraphDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Valid positions, atoms and (if edge-capped) edges per position; cached in ``cache_dir``."""
        if not self.skip_invalid and self.max_edges is None:
            hint = dataset.natoms_hint()  # e.g. fairchem metadata.npz: no pass over the data needed
            if hint is not None:
                return np.arange(len(dataset), dtype=np.int64), hint, None
        cache = None
        if self.cache_dir is not None:
            cache = self.cache_dir / f"sizes-{name}-{self._fingerprint(name, self.max_edges is not None)[:16]}.npz"
            if cache.exists():
                with np.load(cache) as npz:  # the fingerprint says whether edges were counted
                    return npz["valid"], npz["natoms"], npz["nedges"] if self.max_edges is not None else None
        valid, natoms, nedges = [], [], []
        for k in range(len(dataset)):
            atoms = dataset.atoms_at(k)
            if atoms is None:
                continue  # invalid and skipped: counted in the reader's skip log
            valid.append(k)
            natoms.append(len(atoms))
            if self.max_edges is not None:
                graph = atoms_to_graph(atoms, self.cutoff, dtype=dataset.dtype, max_neighbors=self.max_neighbors)
                nedges.append(graph.edge_index.shape[1])
        valid = np.asarray(valid, dtype=np.int64)
        natoms = np.asarray(natoms, dtype=np.int64)
        nedges_arr = np.asarray(nedges, dtype=np.int64) if self.max_edges is not None else None
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, valid=valid, natoms=natoms, nedges=np.zeros(0) if nedges_arr is None else nedges_arr)
            tmp.replace(cache)
        return valid, natoms, nedges_arr

    def prepared(self, name: str) -> tuple[GraphDataset, np.ndarray | None, np.ndarray | None]:
        """The usable graphs of a split with their atom and edge counts (None when no cap needs them)."""
        if name not in self._prepared:
            self.setup()
            if name not in self.datasets:
                raise KeyError(f"no {name!r} split (give a path or a size for it)")
            dataset = self.datasets[name]
            natoms = nedges = None
            if self.skip_invalid or self.max_atoms is not None or self.max_edges is not None:
                valid, natoms, nedges = self._scan(name, dataset)
                dropped = len(dataset) - len(valid)
                if dropped:
                    log = dataset.atoms.skipped
                    self.skipped[name] = dict(log.counts)
                    logger.warning("%s split: %d of %d records skipped as invalid\n%s", name, dropped,
                                   len(dataset), log.summary())
                    dataset = dataset.subset(valid)
            self._prepared[name] = (dataset, natoms, nedges)
        return self._prepared[name]

    # -- loaders ----------------------------------------------------------------------------------
    def _loader(self, name: str, shuffle: bool, batch_size: int | None) -> DataLoader:
        dataset, natoms, nedges = self.prepared(name)
        sampler = BalancedBatchSampler(
            EpochSampler(len(dataset)),
            natoms,
            nedges,
            batch_size=batch_size,
            max_atoms=self.max_atoms,
            max_edges=self.max_edges,
            shuffle=shuffle,
            seed=self.seed,
        )
        return self._batch_loader(dataset, sampler)

    def _batch_loader(self, dataset, batch_sampler) -> DataLoader:
        """A DataLoader of ``dataset`` in the batches of ``batch_sampler``, with this module's worker settings."""
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, batch_size=self.eval_batch_size)

    # -- statistics -------------------------------------------------------------------------------
    def statistics(self) -> dict:
        """Training-split statistics for building the model (see :func:`tdn.data.compute_statistics`).

        Returns a dict with num_structures, num_atoms, elements (sorted Z), avg_num_neighbors,
        e0 ({Z: eV}), e0_method, e0_kind, e0_rank, mean_interaction_energy_per_atom (eV/atom),
        std_interaction_energy_per_atom, force_rms (eV/Å), mean_num_atoms, cutoff (Å), fingerprint.
        Cached in ``stats_file`` when given; safe to call before ``setup``.
        """
        if self._stats is not None:
            return self._stats
        # "e0_kind": statistics cached before that key existed are recomputed
        fingerprint = self._fingerprint("statistics", self.e0, self.stats_max_structures, "e0_kind")
        if self.stats_file is not None and Path(self.stats_file).exists():
            try:
                cached = load_statistics(self.stats_file)
            except (ValueError, KeyError) as exc:
                logger.warning("ignoring unreadable statistics cache %s: %s", self.stats_file, exc)
                cached = None
            if cached is not None and cached.get("fingerprint") == fingerprint:
                self._stats = cached
                return cached
        dataset, _, _ = self.prepared("train")
        if self.stats_max_structures is not None and len(dataset) > self.stats_max_structures:
            rng = np.random.default_rng(self.seed)
            dataset = dataset.subset(np.sort(rng.choice(len(dataset), self.stats_max_structures, replace=False)))
        stats = compute_statistics((dataset[k] for k in range(len(dataset))), cutoff=self.cutoff, e0=self.e0)
        stats["fingerprint"] = fingerprint
        if self.stats_file is not None:
            save_statistics(stats, self.stats_file)
        self._stats = stats
        return stats
