"""From the ``data`` config group to a :class:`tdn.data.TDNDataModule`, with the checks made before training.

Three keys of the group are not the data module's: ``source`` (free values the paths are built from), ``metrics``
(the metric families of the dataset's field) and ``free_atoms_only`` (OC20/OC22: forces count on free atoms only).
Everything else is passed to :class:`tdn.data.TDNDataModule` as is.

Validation and test loaders are replaced by ones that are exact under DDP: every rank still gets the same number
of batches (the data module pads by repeating batches, so that collective calls line up), but repeated batches are
marked (``batch.padding``) and left out of the losses and metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ..data import EmptyDatasetError, InvalidRecordError, TDNDataModule, read
from ..data.formats import CONTENT_NAMES, CONTENT_READERS, canonical_format, check_format, sniff_format
from ..data.sampler import pack_batches
from .errors import ConfigError
from .replay import ReplayBatchSampler, ReplayOptions

logger = logging.getLogger("tdn.train")

TRAIN_KEYS = ("metrics", "free_atoms_only", "source")  # not data module arguments
PATH_KEYS = ("train", "val", "test")
REFERENCE_KEYS = ("ref_energies", "linear_reference", "atom_refs")
ELEMENT_SCAN_LIMIT = 20_000  # val/test splits up to this size are scanned for elements the model lacks


def _paths(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    return [str(v) for v in value]


def check_paths(data: Mapping[str, Any]) -> None:
    """Every data path given must exist: a ConfigError naming the key and the path otherwise."""
    if data.get("train") in (None, "", "???"):
        raise ConfigError("data.train is required: give data.train=/path/to/training/data (a file or a directory)")
    checks = [(f"data.{key}", p) for key in PATH_KEYS for p in _paths(data.get(key))]
    e0 = data.get("e0")
    if isinstance(e0, str) and e0 not in ("least_squares", "zero"):
        checks.append(("data.e0", e0))
    for key in REFERENCE_KEYS:
        value = (data.get("reader_options") or {}).get(key)
        if isinstance(value, str):
            checks.append((f"data.reader_options.{key}", value))
    for key, path in checks:
        if not Path(path).exists():
            raise ConfigError(f"{key}: no such file or directory: {path}")
    fmt = data.get("format")
    for key in PATH_KEYS:
        for path in _paths(data.get(key)):
            check_path_format(f"data.{key}", path, fmt)


def check_path_format(key: str, path: str, fmt: str | None) -> None:
    """A ConfigError when ``data.format`` cannot read ``path`` (a directory for a file format, a file of another
    kind), saying which ``data.format`` would."""
    if fmt is None:
        return
    try:
        canonical_format(fmt)
    except ValueError as exc:
        raise ConfigError(f"data.format: {exc}") from None
    try:
        check_format(path, fmt)
    except IsADirectoryError:
        raise ConfigError(
            f"{key}: {path} is a directory, but data.format={fmt} reads single files: give the file itself, or a "
            f"list of files ({key}=[a.xyz,b.xyz])"
        ) from None
    except ValueError:
        kind = sniff_format(path)
        readers = CONTENT_READERS.get(kind or "", ())
        raise ConfigError(
            f"{key}: {path} is {CONTENT_NAMES.get(kind or '', 'another format')}, but data.format={fmt} "
            f"(the format was not guessed from the file): set data.format={readers[0] if readers else 'null'}, "
            "or data.format=null to infer each file's format from its name"
        ) from None


def datamodule_kwargs(data: Mapping[str, Any]) -> dict[str, Any]:
    """The data module's arguments: the group without the training-side keys; reader options set to null are left
    out (the reader's default), so that one option list can serve files of several formats."""
    kwargs = {k: v for k, v in data.items() if k not in TRAIN_KEYS}
    kwargs["reader_options"] = {k: v for k, v in (kwargs.get("reader_options") or {}).items() if v is not None}
    return kwargs


# ---------------------------------------------------------------------------------------------- exact evaluation
class _MarkPadding(Dataset):
    """Graphs of ``dataset`` at positions ``(k, is_padding)``, with ``graph.padding`` set."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, bool]):
        k, padding = item
        graph = self.dataset[k]
        if graph is not None:
            graph.padding = torch.tensor([bool(padding)])
        return graph


class EvalBatchSampler:
    """The data module's evaluation batches, split over ranks with repeated (padding) batches marked."""

    def __init__(
        self,
        natoms: np.ndarray | None,
        nedges: np.ndarray | None,
        n: int,
        *,
        batch_size: int | None,
        max_atoms: int | None,
        max_edges: int | None,
    ) -> None:
        natoms = np.ones(n, dtype=np.int64) if natoms is None else np.asarray(natoms, dtype=np.int64)
        self.batches = pack_batches(
            np.arange(n), natoms, nedges, batch_size=batch_size, max_atoms=max_atoms, max_edges=max_edges
        )

    def _rank_batches(self) -> list[tuple[list[int], bool]]:
        world, rank = 1, 0
        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
        marked = [(b, False) for b in self.batches]
        if world > 1 and marked:
            pad = -len(marked) % world
            marked += [(self.batches[k % len(self.batches)], True) for k in range(pad)]
        return marked[rank::world]

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for batch, padding in self._rank_batches():
            yield [(k, padding) for k in batch]

    def __len__(self) -> int:
        return len(self._rank_batches())


class TrainingDataModule(TDNDataModule):
    """:class:`tdn.data.TDNDataModule` with exact (unrepeated) validation and test under DDP, and optional replay
    data mixed into every training epoch (:meth:`add_replay`)."""

    replay: ReplayOptions | None = None

    def add_replay(self, options: ReplayOptions) -> None:
        """Open the replay data (split ``"replay"``) with this module's cutoff, dtype and invalid-record policy."""
        self.setup()
        reader_options = {**options.reader_options, "skip_invalid": self.skip_invalid}
        paths = options.paths if len(options.paths) > 1 else options.paths[0]
        try:
            atoms = read(paths, format=options.format, **reader_options)
        except EmptyDatasetError as exc:
            raise ConfigError(f"finetune.replay.data: {exc}; give a file with structures in it") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"finetune.replay: {exc}") from None
        if len(atoms) == 0:
            raise ConfigError(f"finetune.replay.data: no structures in {options.paths}")
        self.datasets["replay"] = self._graphs(atoms)
        self.replay = options

    def train_dataloader(self) -> DataLoader:
        if self.replay is None:
            return super().train_dataloader()
        train, natoms_t, nedges_t = self.prepared("train")
        replay, natoms_r, nedges_r = self.prepared("replay")
        natoms = None if natoms_t is None else np.concatenate([natoms_t, natoms_r])
        nedges = None if nedges_t is None else np.concatenate([nedges_t, nedges_r])
        sampler = ReplayBatchSampler(
            natoms,
            nedges,
            len(train),
            len(replay),
            self.replay.count(len(train)),
            batch_size=self.batch_size,
            max_atoms=self.max_atoms,
            max_edges=self.max_edges,
            seed=self.seed,
        )
        return self._batch_loader(ConcatDataset([train, replay]), sampler)

    def eval_dataloader(self, name: str) -> DataLoader:
        """Every structure of split ``name`` once, in order, in evaluation batches (exact under DDP)."""
        dataset, natoms, nedges = self.prepared(name)
        sampler = EvalBatchSampler(
            natoms,
            nedges,
            len(dataset),
            batch_size=self.eval_batch_size,
            max_atoms=self.max_atoms,
            max_edges=self.max_edges,
        )
        return self._batch_loader(_MarkPadding(dataset), sampler)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def has_split(self, name: str) -> bool:
        self.setup()
        return name in self.datasets and len(self.datasets[name]) > 0

    def split_elements(self, name: str, limit: int = ELEMENT_SCAN_LIMIT) -> set[int] | None:
        """Atomic numbers present in a split (None when it is larger than ``limit`` and was not scanned)."""
        if not self.has_split(name):
            return set()
        dataset = self.datasets[name]
        if len(dataset) > limit:
            return None
        seen: set[int] = set()
        for k in range(len(dataset)):
            atoms = dataset.atoms_at(k)
            if atoms is not None:
                seen.update(int(z) for z in np.unique(atoms.numbers))
        return seen


def build_datamodule(data: Mapping[str, Any], stats_file: Path | None = None) -> TrainingDataModule:
    """The data module for the ``data`` group (paths checked first); statistics cached in ``stats_file``."""
    check_paths(data)
    kwargs = datamodule_kwargs(data)
    if kwargs.get("stats_file") is None and stats_file is not None:
        kwargs["stats_file"] = str(stats_file)
    try:
        datamodule = TrainingDataModule(**kwargs)
        datamodule.setup()  # opens the files and splits them (nothing is decoded yet)
    except EmptyDatasetError as exc:
        key = next((f"data.{k}" for k in PATH_KEYS if exc.path in _resolved(data.get(k))), "data")
        raise ConfigError(f"{key}: {exc}; give a file with structures in it") from None
    except InvalidRecordError:
        raise  # a bad record: reported with its file, key and the skip_invalid hint
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise ConfigError(f"data: {exc}") from None
    except (TypeError, ValueError) as exc:  # an unknown key in the data group, a bad value, splits that do not fit
        raise ConfigError(f"data: {exc}") from exc
    return datamodule


def _resolved(value: Any) -> set[str]:
    return {p for path in _paths(value) for p in (path, str(Path(path)), str(Path(path).resolve()))}


def check_elements(
    datamodule: TrainingDataModule,
    elements: Sequence[int],
    stats: Mapping[str, Any],
    init_from: str | None = None,
) -> None:
    """Every element of the training split, and of the val/test (and replay) splits when small enough to scan, is in
    the model: a ConfigError naming the elements and the split otherwise (with ``init_from``, the model of that file,
    with the elements fine-tuning added)."""
    from ase.data import chemical_symbols

    known = {int(z) for z in elements}
    splits: list[tuple[str, set[int] | None]] = [("training", {int(z) for z in stats["elements"]})]
    splits += [(name, datamodule.split_elements(name)) for name in ("val", "test", "replay")]
    for name, present in splits:
        if present is None:
            logger.info("%s split not scanned for elements (more than %d structures)", name, ELEMENT_SCAN_LIMIT)
            continue
        missing = sorted(present - known)
        if missing:
            names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in missing)
            if init_from:
                raise ConfigError(
                    f"element(s) {names} appear in the {name} data but the model of init_from={init_from} knows only "
                    f"{sorted(known)}: fine-tuning adds only elements of the training data (finetune.new_elements="
                    "true). Leave out the structures with these elements, or add training structures that have them"
                )
            raise ConfigError(
                f"element(s) {names} appear in the {name} data but not in the model's elements {sorted(known)}; "
                "add them to model.elements (or leave model.elements to the training data statistics)"
            )
