"""The LightningDataModule on the bundled sample: splits, capped batches, workers, statistics, DDP sharding."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

import tdn.data
from tdn.data import statistics as statistics_module

SAMPLE = Path(__file__).resolve().parents[1] / "datasets" / "sample"


def sample_module(tmp_path, **overrides) -> tdn.data.TDNDataModule:
    options = dict(train=str(SAMPLE / "oc20"), val_size=0.25, test_size=2, cutoff=5.0, batch_size=None,
                   max_atoms=60, max_edges=2000, seed=3, stats_file=str(tmp_path / "run" / "statistics.json"),
                   cache_dir=str(tmp_path / "cache"))
    options.update(overrides)
    return tdn.data.TDNDataModule(**options)


def split_sids(dm, name) -> set:
    dataset = dm.datasets[name]
    return {dataset.atoms_at(k).info["sid"] for k in range(len(dataset))}


def test_sample_splits_by_system_and_caps_batches(tmp_path):
    dm = sample_module(tmp_path)
    dm.setup("fit")
    sizes = {name: len(ds) for name, ds in dm.datasets.items()}
    assert sizes == {"train": 50, "val": 20, "test": 10}  # 16 systems x 5 frames: 10 / 4 / 2 systems
    train, val, test = (split_sids(dm, n) for n in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)  # no system leaks across splits
    loader = dm.train_dataloader()
    seen = 0
    for batch in loader:
        assert batch.natoms.sum() <= 60 and batch.edge_index.shape[1] <= 2000
        seen += batch.num_graphs
    assert seen == 50 and len(loader) >= 50 * 13 // 60
    first_epoch = [b for b in loader.batch_sampler]
    from lightning.fabric.utilities.data import _set_sampler_epoch

    _set_sampler_epoch(loader, 1)  # what Lightning does at the start of each epoch
    second_epoch = [b for b in loader.batch_sampler]
    assert second_epoch != first_epoch and len(second_epoch) == len(first_epoch)  # reshuffled, same count
    assert sum(b.num_graphs for b in dm.val_dataloader()) == 20


def test_statistics_cached_next_to_the_run(tmp_path, monkeypatch):
    dm = sample_module(tmp_path)
    stats = dm.statistics()
    assert set(stats["elements"]) == {1, 6, 8, 29, 78} and set(stats["e0"]) == set(stats["elements"])
    assert stats["num_structures"] == 50 and stats["avg_num_neighbors"] > 5 and stats["force_rms"] > 0
    assert (tmp_path / "run" / "statistics.json").exists()

    def fail(*args, **kwargs):
        raise AssertionError("statistics should have come from the cache")

    monkeypatch.setattr("tdn.data.datamodule.compute_statistics", fail)
    cached = sample_module(tmp_path).statistics()
    assert cached["e0"] == stats["e0"] and cached["avg_num_neighbors"] == pytest.approx(stats["avg_num_neighbors"])
    monkeypatch.setattr("tdn.data.datamodule.compute_statistics", statistics_module.compute_statistics)
    changed = sample_module(tmp_path, cutoff=4.0).statistics()  # a different cutoff invalidates the cache
    assert changed["cutoff"] == 4.0 and changed["avg_num_neighbors"] < stats["avg_num_neighbors"]


def test_extxyz_paths_workers_and_skipped_records(tmp_path):
    bad = tmp_path / "molecules_bad.xyz"
    shutil.copy(SAMPLE / "molecules.xyz", bad)
    with open(bad, "a") as handle:
        handle.write('1\nProperties=species:S:1:pos:R:3 energy=-1.0 pbc="F F F"\nH 0 0 0\n')  # no forces
        handle.write('1\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0\nXx 0 0 0 0 0 0\n')
    dm = tdn.data.TDNDataModule(train=str(bad), val=str(SAMPLE / "molecules.xyz"), val_size=0, batch_size=16,
                                cutoff=4.0, skip_invalid=True, num_workers=1, dtype="float64")
    loader = dm.train_dataloader()
    assert dm.skipped["train"] == {"missing_forces": 1, "unknown_element": 1}
    batches = list(loader)
    assert sum(b.num_graphs for b in batches) == 80 and batches[0].pos.dtype.is_floating_point
    assert str(batches[0].pos.dtype) == "torch.float64"
    with pytest.raises(tdn.data.InvalidRecordError, match="missing_forces"):
        strict = tdn.data.TDNDataModule(train=str(bad), val_size=0.1, batch_size=16, cutoff=4.0, max_atoms=100)
        strict.train_dataloader()


def test_lightning_injects_distributed_sampler(tmp_path):
    pytest.importorskip("lightning")
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader

    dm = sample_module(tmp_path, stats_file=None)
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()  # as Lightning calls the hook
    per_rank = []
    for rank in range(2):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=False)
        new = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
        assert isinstance(new.batch_sampler, tdn.data.BalancedBatchSampler)
        per_rank.append([list(b) for b in new.batch_sampler])
    assert len(per_rank[0]) == len(per_rank[1])
    assert {i for batches in per_rank for b in batches for i in b} == set(range(50))
    global_batches = len(loader.batch_sampler._epoch_batches(0))
    if global_batches % 2 == 0:  # otherwise one batch is repeated to even out the ranks
        assert not {tuple(b) for b in per_rank[0]} & {tuple(b) for b in per_rank[1]}


def test_train_size_subset_and_rmd17_style_counts(tmp_path):
    def make():
        dm = tdn.data.TDNDataModule(train=str(SAMPLE / "molecules.xyz"), train_size=40, val_size=10, batch_size=8,
                                    cutoff=4.0, seed=1)
        dm.setup()
        return dm

    dm = make()
    assert len(dm.datasets["train"]) == 40 and len(dm.datasets["val"]) == 10
    assert not set(dm.datasets["train"].indices) & set(dm.datasets["val"].indices)
    assert np.array_equal(dm.datasets["val"].indices, make().datasets["val"].indices)  # fixed seed, same split


def test_fairchem_metadata_gives_sizes_without_a_pass(tmp_path, monkeypatch):
    data = tmp_path / "oc20"
    shutil.copytree(SAMPLE / "oc20", data)
    natoms = np.array([len(a) for a in tdn.data.read(data)])
    np.savez(data / "metadata.npz", natoms=natoms)

    def fail(*args, **kwargs):
        raise AssertionError("no record should be decoded")

    monkeypatch.setattr(tdn.data.GraphDataset, "atoms_at", fail)
    monkeypatch.setattr("tdn.data.oc.OCLmdbDataset.groups", fail)  # val is given: no split, no sid pass
    dm = tdn.data.TDNDataModule(train=str(data), val=str(data), batch_size=None, max_atoms=40)
    _, sizes, _ = dm.prepared("train")
    assert np.array_equal(sizes, natoms)
    assert all(sum(natoms[b]) <= 40 for b in dm.train_dataloader().batch_sampler)


def test_lightning_fit_sees_every_structure_each_epoch(tmp_path):
    import lightning as L
    import torch

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.epochs: dict[int, list] = {}

        def training_step(self, batch, index):
            self.epochs.setdefault(self.current_epoch, []).append(batch.natoms.tolist())
            return ((batch.energy / batch.natoms - self.weight) ** 2).mean()

        def validation_step(self, batch, index):
            self.validated = getattr(self, "validated", 0) + batch.num_graphs

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    dm = sample_module(tmp_path, stats_file=None, num_workers=1)
    probe = Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(probe, datamodule=dm)
    assert [sum(len(b) for b in probe.epochs[e]) for e in (0, 1)] == [50, 50]
    assert probe.epochs[0] != probe.epochs[1]  # a new order in the second epoch
    assert probe.validated == 2 * 20


def test_bundled_sample_is_what_make_sample_writes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_sample", SAMPLE.parents[1] / "scripts" / "make_sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out", str(tmp_path)])
    for name in ("oc20", "molecules.xyz"):
        committed, fresh = tdn.data.read(SAMPLE / name), tdn.data.read(tmp_path / name)
        assert len(committed) == len(fresh) == 80
        for a, b in zip(committed, fresh):
            assert np.array_equal(a.numbers, b.numbers) and np.allclose(a.positions, b.positions, atol=1e-6)
            assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-6)
            assert np.allclose(a.calc.results["forces"], b.calc.results["forces"], atol=1e-5)
            assert np.array_equal(a.get_tags(), b.get_tags()) and a.info.get("sid") == b.info.get("sid")
    assert max(len(a) for a in tdn.data.read(SAMPLE / "oc20")) <= 40


def test_graphs_cached_once_built_and_handed_out_as_copies(tmp_path, monkeypatch):
    import tdn.data.graph as graph_module

    built: list[int] = []
    real_build = graph_module.atoms_to_graph

    def counting_build(atoms, *args, **kwargs):
        built.append(len(atoms))
        return real_build(atoms, *args, **kwargs)

    monkeypatch.setattr(graph_module, "atoms_to_graph", counting_build)
    options = dict(train=str(SAMPLE / "molecules.xyz"), val_size=10, batch_size=8, cutoff=4.0, seed=1)
    dm = tdn.data.TDNDataModule(**options)  # cache_graphs="auto": a small split without workers
    dm.setup()
    train = dm.datasets["train"]
    assert train.cache is not None
    first = train[3]
    first.pos += 1.0  # what a caller does to its copy stays there
    first.padding = True
    again = train[3]
    assert len(built) == 1 and "padding" not in again
    fresh = tdn.data.TDNDataModule(**options, cache_graphs=False)
    fresh.setup()
    assert fresh.datasets["train"].cache is None
    reference = fresh.datasets["train"][3]
    assert len(built) == 2  # uncached: built on every access
    for key in graph_module.GRAPH_FIELDS:
        assert torch.equal(again[key], reference[key]), key
    # a subset shares its parent's cache
    assert train.subset([3, 4])[0] is not None and len(built) == 2
    # one epoch builds every graph once, a second epoch none
    for _ in range(2):
        for _ in dm.train_dataloader():
            pass
    assert len(built) == 2 + len(train) - 1
    with_workers = tdn.data.TDNDataModule(**options, num_workers=1)
    with_workers.setup()
    assert with_workers.datasets["train"].cache is None  # auto: each worker would hold its own copy
    with pytest.raises(ValueError, match="cache_graphs"):
        tdn.data.TDNDataModule(**options, cache_graphs="yes")
