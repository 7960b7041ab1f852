"""LMDB handles that are safe across DataLoader workers.

An LMDB environment must not be shared across fork(): each process opens its own. ``LmdbFile``
opens lazily, remembers the pid that opened it, reopens in a new process, and drops the handle
when pickled (spawned workers).
"""

from __future__ import annotations

import os
from pathlib import Path

import lmdb


def find_shards(path, suffixes: tuple[str, ...] = (".lmdb",)) -> list[Path]:
    """The LMDB files of a dataset: ``path`` itself if it is a file, else its matching files, sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    shards = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes))
    if not shards:
        raise FileNotFoundError(f"{path}: no {'/'.join(suffixes)} files in this directory")
    return shards


# One environment per file per process: LMDB refuses to open the same file twice in a process,
# and several datasets (or splits) may read the same file. After fork() the child inherits the
# parent's handles (and py-lmdb's record that the file is open) but must not use them: the child
# closes its inherited copies (this unmaps them in the child only; with lock=False there are no
# locks to release) and opens its own. A file replaced on disk (new inode) is opened afresh.
_ENVIRONMENTS: dict[tuple[int, int], tuple[int, lmdb.Environment]] = {}


def _drop_inherited() -> None:
    pid = os.getpid()
    for key, (owner, env) in list(_ENVIRONMENTS.items()):
        if owner != pid:
            try:
                env.close()
            except lmdb.Error:  # pragma: no cover - already closed
                pass
            del _ENVIRONMENTS[key]


def open_environment(path) -> lmdb.Environment:
    """The read-only environment of an LMDB file (``subdir=False``) for this process."""
    _drop_inherited()
    stat = os.stat(path)
    key = (stat.st_dev, stat.st_ino)
    if key not in _ENVIRONMENTS:
        # lock=False: datasets are read-only and may live on read-only or network file systems.
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False,
                        max_readers=256)
        _ENVIRONMENTS[key] = (os.getpid(), env)
    return _ENVIRONMENTS[key][1]


class LmdbFile:
    """A read-only LMDB file (``subdir=False``), opened on first use in each process."""

    def __init__(self, path):
        self.path = Path(path)
        self._env = None
        self._pid = None

    @property
    def env(self) -> lmdb.Environment:
        if self._env is None or self._pid != os.getpid():
            self._env = open_environment(self.path)
            self._pid = os.getpid()
        return self._env

    def get(self, key: bytes) -> bytes | None:
        with self.env.begin(write=False, buffers=False) as txn:
            return txn.get(key)

    def keys(self):
        """All keys in file order (bytes)."""
        with self.env.begin(write=False) as txn:
            yield from txn.cursor().iternext(keys=True, values=False)

    def entries(self) -> int:
        return int(self.env.stat()["entries"])

    def __getstate__(self):
        return {"path": self.path, "_env": None, "_pid": None}

    def __setstate__(self, state):
        self.__dict__.update(state)


def write_lmdb(path, items, map_size: int = 1 << 32) -> None:
    """Write (key bytes, value bytes) pairs to a new single-file LMDB and compact it.

    Used by the sample generator, converters and tests. The lock file LMDB creates is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    for stale in (path, tmp, Path(str(tmp) + "-lock"), Path(str(path) + "-lock")):
        stale.unlink(missing_ok=True)
    # meminit=True zeroes unused page bytes so the same records always give the same file.
    env = lmdb.open(str(tmp), subdir=False, map_size=map_size, meminit=True)
    with env.begin(write=True) as txn:
        for key, value in items:
            txn.put(key, value)
    # A compact copy drops the free pages so committed files stay small.
    env.copy(str(path), compact=True)
    env.close()
    tmp.unlink(missing_ok=True)
    Path(str(tmp) + "-lock").unlink(missing_ok=True)
