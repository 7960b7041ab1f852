"""Download revised MD17 (figshare 12672038), verify its MD5 and convert it to extxyz in eV and eV/Å.

    python scripts/download_rmd17.py --out data/rmd17 [--split 1]
    python scripts/download_rmd17.py --archive rmd17.tar.bz2 --md5 <md5> --out data/rmd17

Writes ``out/<molecule>/train_0<split>.xyz`` and ``test_0<split>.xyz`` (the standard 1000-frame
splits). The MD5 comes from figshare's API; with --archive give it with --md5 (or --sha256).
Without network this fails within --timeout seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tdn.data.download import (
    DEFAULT_TIMEOUT,
    DownloadError,
    convert_rmd17,
    fetch,
    fetch_json,
    parse_figshare_files,
    unpack,
    verify,
)

ARTICLE = "https://api.figshare.com/v2/articles/12672038"
FILE_NAME = "rmd17.tar.bz2"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--split", type=int, default=1, choices=range(1, 6), help="which standard split (1-5)")
    parser.add_argument("--archive", type=Path, help="use this already-downloaded rmd17.tar.bz2")
    parser.add_argument("--md5", help="expected MD5 of --archive")
    parser.add_argument("--sha256", help="expected sha256 of --archive")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="network timeout (s)")
    args = parser.parse_args(argv)
    try:
        if args.archive is not None:
            verify(args.archive, md5=args.md5, sha256=args.sha256)
            archive = args.archive
        else:
            files = parse_figshare_files(fetch_json(ARTICLE, timeout=args.timeout))
            if FILE_NAME not in files:
                raise DownloadError(f"{FILE_NAME} not listed in {ARTICLE}")
            info = files[FILE_NAME]
            archive = fetch(info["url"], args.out / "archives" / FILE_NAME, md5=info["md5"], timeout=args.timeout)
        raw = unpack(archive, args.out / "raw")
        written = convert_rmd17(raw, args.out, split=args.split)
    except DownloadError as exc:
        print(f"download_rmd17: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} extxyz file(s) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
