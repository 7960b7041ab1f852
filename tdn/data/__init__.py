"""Data for tdn: dataset readers, neighbour lists, graphs, statistics and the LightningDataModule.

Public API::

    ds = tdn.data.read(path, format=None, **options)   # lazy Sequence of labelled ase.Atoms
    g = tdn.data.atoms_to_graph(atoms, cutoff)          # torch_geometric Data (docs/CONTRACTS.md)
    i, j, S = tdn.data.neighbors.neighbor_list(positions, cell, pbc, cutoff)
    tdn.data.check_min_distance(positions, cell, pbc)  # CloseAtomsError: atoms closer than MIN_DISTANCE Å
    dm = tdn.data.TDNDataModule(train=..., cutoff=5.0, max_atoms=...)
    stats = dm.statistics()

This package depends on nothing of the model.
"""

from . import neighbors
from .atoms import MIN_DISTANCE, check_min_distance, find_close_pairs, make_atoms, validate_atoms
from .base import AtomsDataset, AtomsSubset, ConcatAtoms
from .errors import CloseAtomsError, InvalidRecordError, SkipLog, UnsafePickleError
from .formats import FORMATS, EmptyDatasetError, infer_format, read, sniff_format
from .graph import GRAPH_FIELDS, GraphDataset, atoms_to_graph, collate
from .neighbors import neighbor_list, neighbor_list_torch
from .sampler import BalancedBatchSampler, EpochSampler
from .splits import split_indices
from .statistics import compute_statistics, load_statistics, save_statistics


def __getattr__(name: str):
    # The DataModule pulls in Lightning; import it only when asked so that inference code
    # (the ASE calculator, MD) can use readers and graphs without that cost.
    if name == "TDNDataModule":
        from .datamodule import TDNDataModule

        return TDNDataModule
    raise AttributeError(f"module 'tdn.data' has no attribute {name!r}")


__all__ = [
    "FORMATS",
    "MIN_DISTANCE",
    "GRAPH_FIELDS",
    "AtomsDataset",
    "AtomsSubset",
    "BalancedBatchSampler",
    "CloseAtomsError",
    "EmptyDatasetError",
    "ConcatAtoms",
    "EpochSampler",
    "GraphDataset",
    "InvalidRecordError",
    "SkipLog",
    "TDNDataModule",
    "UnsafePickleError",
    "atoms_to_graph",
    "check_min_distance",
    "collate",
    "compute_statistics",
    "find_close_pairs",
    "infer_format",
    "load_statistics",
    "make_atoms",
    "neighbor_list",
    "neighbor_list_torch",
    "neighbors",
    "read",
    "save_statistics",
    "sniff_format",
    "split_indices",
    "validate_atoms",
]
