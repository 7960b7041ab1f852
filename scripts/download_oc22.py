"""Download the OC22 S2EF-Total LMDBs and verify their MD5.

    python scripts/download_oc22.py --out data/oc22
    python scripts/download_oc22.py --archive s2ef_total_train_val_test_lmdbs.tar.gz --out data/oc22

The archive holds LMDBs in the fairchem-v1 layout with total energies; read them with
``tdn.data.read(dir, format="oc22-lmdb")``, adding ``linear_reference="oc22_linref.npz"`` to
train on referenced energies. Checksum: fairchem's OC22 dataset page. Without network this fails
within --timeout seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tdn.data.download import DEFAULT_TIMEOUT, DownloadError, fetch, unpack, verify

URL = "https://dl.fbaipublicfiles.com/opencatalystproject/data/oc22/s2ef_total_train_val_test_lmdbs.tar.gz"
MD5 = "ebea523c6f8d61248a37b4dd660b11e6"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--archive", type=Path, help="use this already-downloaded archive")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="network timeout (s)")
    parser.add_argument("--url", default=URL, help="override the download URL (mirrors)")
    args = parser.parse_args(argv)
    try:
        if args.archive is not None:
            verify(args.archive, md5=MD5)
            archive = args.archive
        else:
            archive = fetch(args.url, args.out / "archives" / Path(URL).name, md5=MD5, timeout=args.timeout)
        raw = unpack(archive, args.out)
    except DownloadError as exc:
        print(f"download_oc22: {exc}", file=sys.stderr)
        return 2
    lmdbs = sorted(raw.rglob("*.lmdb"))
    print(f"unpacked {len(lmdbs)} LMDB file(s) under {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
