"""Download PubChemQCR LMDB shards from Hugging Face (divelab/PubChemQCR), verifying each sha256.

    python scripts/download_pubchemqcr.py --out data/pubchemqcr             # all shards
    python scripts/download_pubchemqcr.py --out data/pubchemqcr --subset S  # PubChemQCR-S: one shard

The shard list and sha256 sums come from the Hugging Face API (LFS object ids). Shards are used as
they are: ``tdn.data.read(out, format="pubchemqcr")``. Without network this fails within --timeout s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tdn.data.download import DEFAULT_TIMEOUT, DownloadError, fetch, fetch_json, parse_hf_tree

REPO = "divelab/PubChemQCR"


def select_shards(files: dict[str, dict], subset: str | None) -> dict[str, dict]:
    """The .lmdb files of the listing (sorted by path); the first one only for PubChemQCR-S."""
    shards = {path: info for path, info in sorted(files.items()) if path.endswith(".lmdb")}
    if not shards:
        raise DownloadError(f"no .lmdb files in the {REPO} listing")
    if subset == "S":
        first = next(iter(shards))
        shards = {first: shards[first]}
    return shards


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--subset", choices=["S"], help="S: only the first shard (PubChemQCR-S)")
    parser.add_argument("--revision", default="main")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="network timeout (s)")
    parser.add_argument("--api", default="https://huggingface.co/api/datasets", help="Hugging Face API base URL")
    args = parser.parse_args(argv)
    try:
        listing = fetch_json(f"{args.api}/{REPO}/tree/{args.revision}?recursive=1", timeout=args.timeout)
        shards = select_shards(parse_hf_tree(listing, REPO, args.revision), args.subset)
        for path, info in shards.items():
            fetch(info["url"], args.out / Path(path).name, sha256=info["sha256"], timeout=args.timeout)
    except DownloadError as exc:
        print(f"download_pubchemqcr: {exc}", file=sys.stderr)
        return 2
    print(f"{len(shards)} shard(s) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
