"""Download OC20 S2EF data, verify its MD5 and convert it to LMDBs that ``tdn.data.read`` reads.

    python scripts/download_oc20.py --split 200k --out data/oc20
    python scripts/download_oc20.py --split val_id --archive s2ef_val_id.tar --out data/oc20

The train/val archives hold extxyz + txt files (system id, frame id, reference energy per frame);
they are converted to one LMDB per file in the fairchem-v1 layout, storing adsorption energies as
fairchem does, plus ref_energies.json to get total energies back:
``read(out, ref_energies=out / "ref_energies.json")``. The test archive already holds LMDBs.
Checksums: fairchem's DATASET.md. Without network this fails within --timeout seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tdn.data.download import DEFAULT_TIMEOUT, DownloadError, convert_oc20_s2ef, fetch, unpack, verify

BASE = "https://dl.fbaipublicfiles.com/opencatalystproject/data/"
ARCHIVES = {  # split: (file name, md5)
    "200k": ("s2ef_train_200K.tar", "f8d0909c2623a393148435dede7d3a46"),
    "2M": ("s2ef_train_2M.tar", "863bc983245ffc0285305a1850e19cf7"),
    "20M": ("s2ef_train_20M.tar", "953474cb93f0b08cdc523399f03f7c36"),
    "all": ("s2ef_train_all.tar", "12a7087bfd189a06ccbec9bc7add2bcd"),
    "val_id": ("s2ef_val_id.tar", "f57f7f5c1302637940f2cc858e789410"),
    "val_ood_ads": ("s2ef_val_ood_ads.tar", "431ab0d7557a4639605ba8b67793f053"),
    "val_ood_cat": ("s2ef_val_ood_cat.tar", "532d6cd1fe541a0ddb0aa0f99962b7db"),
    "val_ood_both": ("s2ef_val_ood_both.tar", "5731862978d80502bbf7017d68c2c729"),
    "test": ("s2ef_test_lmdbs.tar.gz", "bcada432482f6e87b24e14b6b744992a"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=sorted(ARCHIVES), default="200k")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--archive", type=Path, help="use this already-downloaded archive")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="network timeout (s)")
    parser.add_argument("--url", help="override the download URL (mirrors)")
    parser.add_argument("--total-energy", action="store_true", help="store total instead of adsorption energies")
    args = parser.parse_args(argv)

    name, md5 = ARCHIVES[args.split]
    try:
        if args.archive is not None:
            verify(args.archive, md5=md5)
            archive = args.archive
        else:
            archive = fetch(args.url or BASE + name, args.out / "archives" / name, md5=md5, timeout=args.timeout)
        raw = unpack(archive, args.out / "raw" / args.split)
        if args.split == "test":
            print(f"test LMDBs unpacked under {raw}")
            return 0
        written = convert_oc20_s2ef(raw, args.out / args.split, adsorption=not args.total_energy)
    except DownloadError as exc:
        print(f"download_oc20: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} LMDB file(s) to {args.out / args.split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
