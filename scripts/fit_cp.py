"""(Re)generate the CP factors shipped in tdn/tp/cp_factors (seeded ALS, see tdn.tp.cp_fit), or with --product the
symmetric CP factors of the product basis shipped in tdn/contractions/cp_factors (see tdn.contractions.factors).

    python scripts/fit_cp.py                       # the shipped set; files already there are kept
    python scripts/fit_cp.py --lmax 3 --paths so3 --force
    python scripts/fit_cp.py --list                # what is shipped: degrees, paths, rank, error, time, size
    python scripts/fit_cp.py --product             # the product basis's set (files that still fit are kept)

The shipped set: lmax_in = lmax_sh = lmax_out = L for L = 1..6, and (0, L, L), (1, L, L) for L = 1..3 (the
MACE-like model's convolutions), each for paths "o3" and "so3", at --tol (default 1e-4); and for comparison
the TDN paper's fixed rank 7 L^2 for the square ones (its error is whatever ALS reaches at that rank). BLAS runs on one
thread unless OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS are set: faster on a shared machine
and the same bytes every time (the same seed gives the same file on one machine and BLAS build).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy is imported

from pathlib import Path  # noqa: E402

from tdn.tp.cp import DEFAULT_TOL, PACKAGE_DIR, factor_name, fit_factors, save_factors, shipped_factors  # noqa: E402

PATH_SETS = ("o3", "so3")


def default_degrees(lmax: list[int], nonsquare: bool) -> list[tuple[int, int, int]]:
    """Square ``(L, L, L)`` for the given L, plus ``(0, L, L)``, ``(1, L, L)`` for L <= 3 (no duplicates)."""
    degrees = [(L, L, L) for L in lmax]
    if nonsquare:
        degrees += [(l_in, L, L) for L in (1, 2, 3) if L in lmax for l_in in (0, 1) if l_in != L]
    return sorted(set(degrees), key=lambda d: (max(d), d))


def print_table(rows: list[dict]) -> None:
    print(f"{'lmax_in':>7} {'lmax_sh':>7} {'lmax_out':>8} {'paths':>5} {'rank':>5} {'error':>9} "
          f"{'method':>12} {'sweeps':>7} {'seconds':>8} {'bytes':>9}")
    for r in rows:
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        print(f"{r['lmax_in']:>7} {r['lmax_sh']:>7} {r['lmax_out']:>8} {r['paths']:>5} {r['rank']:>5} "
              f"{r['rel_error']:>9.2e} {r['method']:>12} {r['sweeps']:>7} {seconds:>8} {r['bytes']:>9}", flush=True)


def jobs(args: argparse.Namespace) -> list[tuple[tuple[int, int, int], str, int | None]]:
    """``(degrees, paths, rank)`` to fit: rank None searches by ``--tol``; the paper's 7 L² for square degrees."""
    degrees = default_degrees(args.lmax, args.nonsquare)
    if args.rank is not None:
        return [(d, p, args.rank) for d in degrees for p in args.paths]
    out = [(d, p, None) for d in degrees for p in args.paths]
    if args.paper_ranks:
        out += [(d, p, 7 * d[0] ** 2) for d in degrees if d[0] == d[1] == d[2] for p in args.paths]
    return out


def _progress(start: float):
    return lambda line: print(f"    {line}  [{time.perf_counter() - start:.0f} s]", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lmax", type=int, nargs="+", default=list(range(1, 7)), help="square degrees L")
    parser.add_argument("--paths", nargs="+", choices=PATH_SETS, default=list(PATH_SETS))
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL, help="target relative error of M")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=None, help="fit this rank instead of searching by --tol")
    parser.add_argument("--no-paper-ranks", dest="paper_ranks", action="store_false",
                        help="skip the fixed rank 7 L^2 of the TDN paper (shipped for comparison)")
    parser.add_argument("--no-nonsquare", dest="nonsquare", action="store_false",
                        help="skip the (0, L, L), (1, L, L) combinations")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the package data)")
    parser.add_argument("--force", action="store_true", help="refit files that already exist")
    parser.add_argument("--verbose", action="store_true", help="print every ALS fit of the rank search")
    parser.add_argument("--list", action="store_true", help="print the factors in --out and exit")
    parser.add_argument("--product", action="store_true",
                        help="the product basis's symmetric CP factors (--out, --tol, --seed apply)")
    args = parser.parse_args(argv)

    if args.product:
        from tdn.contractions.factors import PACKAGE_DIR as PRODUCT_DIR
        from tdn.contractions.factors import ship

        ship(args.out or PRODUCT_DIR, tol=args.tol, seed=args.seed, progress=lambda line: print(line, flush=True))
        return 0
    args.out = args.out or PACKAGE_DIR

    if args.list:
        print_table(shipped_factors(args.out))
        return 0
    for (l_in, l_sh, l_out), paths, rank in jobs(args):
        file = args.out / factor_name(l_in, l_sh, l_out, paths, args.tol, rank, args.seed)
        if file.exists() and not args.force:
            print(f"keep {file.name}", flush=True)
            continue
        progress = _progress(time.perf_counter()) if args.verbose else None
        print(f"fit  {file.name} ...", flush=True)
        factors = fit_factors(l_in, l_sh, l_out, paths, args.tol, rank, args.seed, progress=progress)
        save_factors(file, factors)
        print_table([dict(lmax_in=l_in, lmax_sh=l_sh, lmax_out=l_out, paths=paths, rank=factors.rank,
                          rel_error=factors.rel_error, method=factors.method, sweeps=factors.sweeps,
                          seconds=factors.seconds, bytes=file.stat().st_size)])
    print()
    print_table(shipped_factors(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
