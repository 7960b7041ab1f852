#!/usr/bin/env python
"""Neighbour lists on the CPU: ms per build against the number of atoms (Cu fcc, 5 Å cutoff) for tdn's torch cell
list, tdn's vesin path, vesin-torch and torch-sim's neighbour-list functions, and exact agreement with ASE's
neighbor_list on periodic, skewed, small-cell, slab and molecular systems.

    python scripts/bench_neighbors.py --quick --out /tmp/bench                 # < 30 s
    OMP_NUM_THREADS=1 python scripts/bench_neighbors.py --threads 1 --out docs/benchmarks    # 108 ... 108000 atoms

Writes NAME.json, NAME.md and NAME.png (default NAME: neighbors_cpu[_quick]). Logic in tdn/bench/neighbors.py.
"""

from tdn.bench.neighbors import main

if __name__ == "__main__":
    main()
