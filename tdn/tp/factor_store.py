"""One store for fitted factor files: where they live, what they are called, how they are written and read.

Two families of factors use it, each through a :class:`FactorStore`: the two-body CP factors of the path tensor
``M`` (:mod:`tdn.tp.cp`) and the symmetric CP factors of the product basis (:mod:`tdn.contractions.factors`).

* Places, in lookup order: the package data folder of the family ("package"), then the user cache ("cache"),
  ``cache_root() / folder`` with ``cache_root()`` = ``$TDN_CACHE_DIR``, else ``$XDG_CACHE_HOME/tdn``, else
  ``~/.cache/tdn``.
* Names: ``{stem}_tol{t}.npz`` for a rank chosen by a tolerance, ``{stem}_rank{R}.npz`` for a fixed rank, with
  ``_seed{s}`` before the suffix unless the seed is 0. ``t`` is the shortest decimal that reads back as the same
  float (:func:`format_tol`): ``1e-04`` and ``1.5e-04`` never share a file.
* Files: ``.npz`` archives of ``.npy`` arrays (no pickles), stored uncompressed with fixed timestamps and
  permissions, so the same arrays give the same bytes; each holds ``format_version``. Written to a temporary file in
  the target folder and renamed into place, so a reader never sees half a file.
* Reading (:meth:`FactorStore.load`): a file that is not such an archive, or lacks an array, is a
  :class:`FactorFileError` that names it; a file of another ``format_version`` is a :class:`StaleFactorFile`
  (lookups skip it and fit again).
* Plans (:func:`factor_plan`): inside one, every lookup records the rank and error of the factor set it returns
  under its key ``"{folder}/{file stem}"`` (what a model's config keeps), and a lookup whose key the plan lists as a
  placeholder touches no file and fits nothing: it returns zero factors of the recorded rank, for a model whose
  factors are loaded from its model file right after.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")

ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip entry can carry: fixed, so the bytes depend on the content only


class FactorFileError(ValueError):
    """A factor file that cannot be read as one (truncated, not an archive, an array missing)."""


class StaleFactorFile(FactorFileError):
    """A readable factor file written for another format version or another tensor: fitted again."""


def cache_root() -> Path:
    """``$TDN_CACHE_DIR``, else ``$XDG_CACHE_HOME/tdn``, else ``~/.cache/tdn``."""
    if os.environ.get("TDN_CACHE_DIR"):
        return Path(os.environ["TDN_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "tdn"
    return Path.home() / ".cache" / "tdn"


def format_tol(tol: float) -> str:
    """The shortest scientific notation that reads back as ``tol``: ``1e-4`` -> ``"1e-04"``, ``1.5e-4`` ->
    ``"1.5e-04"``. File-name safe, and distinct for distinct floats."""
    text = np.format_float_scientific(float(tol), unique=True, exp_digits=2)  # e.g. "1.e-04", "1.5e-04"
    mantissa, exponent = text.split("e")
    return f"{mantissa.rstrip('.')}e{exponent}"


def write_npz(path: Path, arrays: Mapping[str, np.ndarray | float | int | str]) -> None:
    """Write ``arrays`` (in the given order) as an ``.npz`` whose bytes depend only on the content, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, value in arrays.items():
                buffer = io.BytesIO()
                array = np.ascontiguousarray(value) if np.ndim(value) else np.asarray(value)
                np.lib.format.write_array(buffer, array, allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE)
                info.external_attr = 0o644 << 16
                archive.writestr(info, buffer.getvalue())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file (no pickles); anything unreadable is a :class:`FactorFileError` naming it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise FactorFileError(f"{path} is not a factor file (an .npz archive); delete it to fit again")
            return {name: data[name] for name in data.files}
    except FactorFileError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise FactorFileError(
            f"cannot read the factor file {path} ({type(err).__name__}: {err}); it is truncated or corrupt: "
            "delete it to fit again"
        ) from err


@dataclass
class FactorPlan:
    """What the lookups inside :func:`factor_plan` do besides their usual work.

    ``recorded``: ``{key: {"rank": R, "error": e}}`` of every factor set looked up, ``key`` =
    :meth:`FactorStore.key`. ``placeholders``: such a record (a model file's): a set it lists is neither read, fitted
    nor cached; its lookup returns zero factors of the recorded rank, with the recorded error. ``origin``: where the
    placeholders' values come from (the model file), reported as the factors' file.
    """

    placeholders: Mapping[str, Mapping[str, float]] | None = None
    origin: str = ""
    recorded: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Placeholder:
    """A factor set to build as zeros: its recorded ``rank`` and ``error``, and the file its values come from."""

    rank: int
    error: float
    origin: str


_PLAN: ContextVar[FactorPlan | None] = ContextVar("tdn_factor_plan", default=None)


@contextmanager
def factor_plan(
    placeholders: Mapping[str, Mapping[str, float]] | None = None, origin: str = ""
) -> Iterator[FactorPlan]:
    """Record the factor sets looked up inside the block (``plan.recorded``); with ``placeholders``, build the sets
    they list as zeros of their recorded rank instead of looking them up (see :class:`FactorPlan`)."""
    token = _PLAN.set(FactorPlan(placeholders, origin))
    try:
        yield _PLAN.get()
    finally:
        _PLAN.reset(token)


@dataclass(frozen=True)
class FactorStore:
    """The files of one family of factors: ``package_dir`` (shipped), ``cache_root() / folder`` (fitted here).

    ``format_version`` is written into every file and checked on load, with the ``required`` arrays; ``logger``
    names the family's logger (warnings about stale files and unwritable caches go there).
    """

    folder: str
    package_dir: Path
    format_version: int
    required: tuple[str, ...]
    logger: str

    def cache_dir(self) -> Path:
        return cache_root() / self.folder

    def key(self, name: str) -> str:
        """``"{folder}/{name without .npz}"``, e.g. ``"cp_factors/cp_o3_1_2_2_tol1e-04"``: a factor set in a record."""
        return f"{self.folder}/{name.removesuffix('.npz')}"

    def placeholder(self, name: str) -> Placeholder | None:
        """The placeholder the active :func:`factor_plan` asks for in place of the file ``name``, else None."""
        plan = _PLAN.get()
        entry = None if plan is None or plan.placeholders is None else plan.placeholders.get(self.key(name))
        if entry is None:
            return None
        return Placeholder(int(entry["rank"]), float(entry["error"]), plan.origin)

    def record(self, name: str, rank: int, error: float) -> None:
        """Note the rank and relative error of the factor set ``name`` in the active :func:`factor_plan`, if any."""
        plan = _PLAN.get()
        if plan is not None:
            plan.recorded[self.key(name)] = {"rank": int(rank), "error": float(error)}

    def filename(self, stem: str, tol: float, rank: int | None = None, seed: int = 0) -> str:
        """``{stem}_tol{format_tol(tol)}[_seed{seed}].npz``, or ``{stem}_rank{rank}[...]`` for a fixed rank."""
        target = f"rank{rank}" if rank is not None else f"tol{format_tol(tol)}"
        suffix = f"_seed{seed}" if seed != 0 else ""
        return f"{stem}_{target}{suffix}.npz"

    def save(self, path: Path, arrays: Mapping[str, np.ndarray | float | int | str]) -> None:
        """Write ``arrays`` and ``format_version`` (last) deterministically and atomically."""
        write_npz(path, {**arrays, "format_version": np.int64(self.format_version)})

    def load(self, path: Path) -> dict[str, np.ndarray]:
        """The arrays of ``path``, checked: :class:`FactorFileError` if unreadable or incomplete,
        :class:`StaleFactorFile` if written for another format version."""
        arrays = read_npz(path)
        if "format_version" not in arrays:
            raise FactorFileError(f"{path} has no format_version: not a factor file of this package")
        version = int(arrays["format_version"])
        if version != self.format_version:
            raise StaleFactorFile(f"{path} has format version {version}, this package reads {self.format_version}")
        missing = [name for name in self.required if name not in arrays]
        if missing:
            raise FactorFileError(f"the factor file {path} lacks the arrays {missing}; delete it to fit again")
        return arrays

    def find(self, name: str, accept: Callable[[dict[str, np.ndarray]], T | None]) -> tuple[T, str, Path] | None:
        """The first file called ``name`` (package data, then cache) that ``accept`` turns into factors:
        ``(factors, "package" | "cache", path)``, or None. ``accept`` returns None for a file that does not describe
        the wanted tensor (stale): it is skipped with a warning, like a file of another format version."""
        log = logging.getLogger(self.logger)
        for source, folder in (("package", self.package_dir), ("cache", self.cache_dir())):
            path = folder / name
            if not path.is_file():
                continue
            try:
                found = accept(self.load(path))
            except StaleFactorFile as err:
                log.warning("ignoring stale factor file %s: %s", path, err)
                continue
            if found is None:
                log.warning("ignoring stale factor file %s (it does not reproduce the current tensor)", path)
                continue
            return found, source, path
        return None

    def cache(self, name: str, arrays: Mapping[str, np.ndarray | float | int | str]) -> Path:
        """Save ``arrays`` as ``name`` in the cache; a cache that cannot be written is a warning, not an error."""
        path = self.cache_dir() / name
        try:
            self.save(path, arrays)
        except OSError as err:
            logging.getLogger(self.logger).warning("could not write the factor cache %s: %s", path, err)
        return path
