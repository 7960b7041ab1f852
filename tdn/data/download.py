"""Fetch, verify, unpack and convert the official dataset archives (used by scripts/download_*.py).

Network access is optional: every fetch has a short timeout and fails with a message saying what
to download by hand; ``--archive`` in the scripts then takes the local file through the same
verification and conversion. Checksums come from the publishers: the MD5 sums fairchem lists for
OC20/OC22, figshare's API for rMD17, the Hugging Face API (LFS sha256) for PubChemQCR.
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable
from pathlib import Path

import ase.io
import numpy as np
from ase import units

from .atoms import make_atoms

logger = logging.getLogger("tdn.data")

DEFAULT_TIMEOUT = 10.0  # seconds: fail fast when there is no network


class DownloadError(RuntimeError):
    """A download that could not be done (no network, HTTP error, bad checksum)."""


# -- fetching and checking -----------------------------------------------------------------------


def file_hash(path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path, *, md5: str | None = None, sha256: str | None = None) -> None:
    """Raise DownloadError unless the file matches every checksum given (at least one is required)."""
    if md5 is None and sha256 is None:
        raise DownloadError(f"{path}: no checksum to verify against")
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        actual = file_hash(path, algorithm)
        if actual.lower() != expected.lower():
            raise DownloadError(f"{path}: {algorithm} is {actual}, expected {expected}; the file is corrupt or not "
                                "the official archive (delete it and download again)")


def _open_url(url: str, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "tdn-download"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"could not fetch {url} within {timeout:g} s ({reason}). There seems to be no network here: "
            "download the file by hand and pass it with --archive"
        ) from exc


def fetch_json(url: str, timeout: float = DEFAULT_TIMEOUT):
    """GET a JSON document (publisher APIs that list files and checksums)."""
    with _open_url(url, timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def fetch(url: str, dest, *, md5: str | None = None, sha256: str | None = None,
          timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Download ``url`` to ``dest`` (unless a verified copy is there) and verify it.

    The download goes to ``dest.part`` first so an interrupted one never looks complete.
    """
    dest = Path(dest)
    if dest.exists():
        verify(dest, md5=md5, sha256=sha256)
        logger.info("%s already present and verified", dest)
        return dest
    if md5 is None and sha256 is None:
        raise DownloadError(f"refusing to download {url} without a checksum to verify it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with _open_url(url, timeout) as response, open(part, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)
    verify(part, md5=md5, sha256=sha256)
    part.replace(dest)
    return dest


def unpack(archive, dest) -> Path:
    """Extract a tar (any compression) or zip archive into ``dest``, refusing paths that escape it."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if not (root / name).resolve().is_relative_to(root):
                    raise DownloadError(f"{archive}: member {name!r} would extract outside {dest}")
            zf.extractall(dest)
        return dest
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            if not (root / member.name).resolve().is_relative_to(root) or member.issym() or member.islnk():
                raise DownloadError(f"{archive}: member {member.name!r} is a link or would extract outside {dest}")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tf.extractall(dest, filter="data")
        else:  # pragma: no cover - members were checked above
            tf.extractall(dest)
    return dest


# -- publisher APIs ------------------------------------------------------------------------------


def parse_figshare_files(article: dict) -> dict[str, dict]:
    """figshare article JSON -> {file name: {"url", "md5", "size"}}."""
    out = {}
    for entry in article.get("files", []):
        md5 = entry.get("computed_md5") or entry.get("supplied_md5")
        out[entry["name"]] = {"url": entry["download_url"], "md5": md5, "size": entry.get("size")}
    return out


def parse_hf_tree(entries: Iterable[dict], repo: str, revision: str = "main") -> dict[str, dict]:
    """Hugging Face ``/api/datasets/<repo>/tree`` JSON -> {path: {"url", "sha256", "size"}} for LFS files."""
    out = {}
    for entry in entries:
        lfs = entry.get("lfs")
        if entry.get("type") != "file" or not lfs:
            continue  # only large (LFS) files carry a sha256 we can verify
        path = entry["path"]
        out[path] = {
            "url": f"https://huggingface.co/datasets/{repo}/resolve/{revision}/{path}",
            "sha256": lfs.get("oid") or lfs.get("sha256"),
            "size": lfs.get("size", entry.get("size")),
        }
    return out


# -- converters ----------------------------------------------------------------------------------


def _open_text(path: Path):
    return lzma.open(path, "rt") if path.suffix == ".xz" else open(path)


def _strip(name: str) -> str:
    for suffix in (".xz", ".extxyz", ".txt"):
        name = name.removesuffix(suffix)
    return name


def convert_oc20_s2ef(src, out, *, adsorption: bool = True) -> list[Path]:
    """OC20 S2EF ``*.extxyz(.xz)`` + ``*.txt(.xz)`` pairs -> one fairchem-layout LMDB per pair.

    Each txt line is ``random<sid>,frame<fid>,<reference energy eV>`` for the frame at the same
    position. With ``adsorption`` the stored energy is total - reference (what fairchem stores);
    the references are also written to ``out/ref_energies.json`` so that
    ``read(out, ref_energies=out / "ref_energies.json")`` gives total energies back.
    """
    from .oc import atoms_to_data_fields, sid_to_int, write_oc_lmdb

    src, out = Path(src), Path(out)
    frames_files = sorted(p for p in src.rglob("*") if p.is_file() and ".extxyz" in p.name)
    if not frames_files:
        raise DownloadError(f"{src}: no *.extxyz(.xz) files to convert")
    refs: dict[str, float] = {}
    written = []
    for frames_file in frames_files:
        stem = _strip(frames_file.name)
        meta_files = [p for p in frames_file.parent.iterdir() if _strip(p.name) == stem and ".txt" in p.name]
        if not meta_files:
            raise DownloadError(f"{frames_file}: no matching {stem}.txt(.xz) with system ids")
        with _open_text(meta_files[0]) as handle:
            meta = [line.strip().split(",") for line in handle if line.strip()]
        with _open_text(frames_file) as handle:
            frames = ase.io.read(handle, index=":", format="extxyz")
        if len(frames) != len(meta):
            raise DownloadError(f"{frames_file}: {len(frames)} frames but {len(meta)} lines in {meta_files[0].name}")
        records = []
        for atoms, (sid_text, fid_text, ref_text) in zip(frames, meta):
            sid, fid, ref = sid_to_int(sid_text), int(fid_text.removeprefix("frame")), float(ref_text)
            refs[f"random{sid}"] = ref
            total = atoms.get_potential_energy()
            records.append(atoms_to_data_fields(atoms, sid, fid, energy=total - ref if adsorption else total))
        target = out / f"{stem}.lmdb"
        write_oc_lmdb(target, records)
        written.append(target)
    (out / "ref_energies.json").write_text(json.dumps(refs, indent=0, sort_keys=True))
    return written


KCAL_MOL = units.kcal / units.mol  # eV per kcal/mol


def convert_rmd17(src, out, *, split: int = 1) -> list[Path]:
    """rMD17 ``npz_data/rmd17_<name>.npz`` + ``splits/index_{train,test}_0<split>.csv`` -> extxyz.

    Writes ``out/<name>/train_0<split>.xyz`` and ``test_0<split>.xyz``: molecules (pbc F), energy
    ``energy=`` in eV and ``forces`` in eV/Å (converted from kcal/mol and kcal/mol/Å).
    """
    src, out = Path(src), Path(out)
    npz_files = sorted(src.rglob("rmd17_*.npz"))
    if not npz_files:
        raise DownloadError(f"{src}: no rmd17_*.npz files to convert")
    split_dir = next((p.parent for p in src.rglob(f"index_train_0{split}.csv")), None)
    if split_dir is None:
        raise DownloadError(f"{src}: no splits/index_train_0{split}.csv")
    written = []
    for npz_file in npz_files:
        name = npz_file.stem.removeprefix("rmd17_")
        with np.load(npz_file) as data:
            numbers = data["nuclear_charges"].astype(int)
            coords, energies, forces = data["coords"], data["energies"], data["forces"]
        for part in ("train", "test"):
            index = np.loadtxt(split_dir / f"index_{part}_0{split}.csv", dtype=int).reshape(-1)
            frames = []
            for i in index:
                frames.append(make_atoms(numbers, coords[i], energy=float(energies[i]) * KCAL_MOL,
                                         forces=forces[i] * KCAL_MOL))
            target = out / name / f"{part}_0{split}.xyz"
            target.parent.mkdir(parents=True, exist_ok=True)
            ase.io.write(target, frames, format="extxyz")
            written.append(target)
    return written
