#!/usr/bin/env python
"""Neighbour lists: ms per build against the number of atoms (Cu fcc, 5 Å cutoff) for tdn's list (vesin
plus a sort into tdn's edge order; its host path and its device path), raw vesin and vesin-torch, and torch-sim's
neighbour-list functions, and exact agreement with ASE's neighbor_list on periodic, skewed, small-cell, slab and
molecular systems. tdn's list takes vesin's threads from OMP_NUM_THREADS.

    python scripts/bench_neighbors.py --quick --out /tmp/bench                 # < 30 s
    OMP_NUM_THREADS=1 python scripts/bench_neighbors.py --threads 1 --out docs/benchmarks    # 108 ... 108000 atoms
    python scripts/bench_neighbors.py --device cuda --out docs/benchmarks   # tensor implementations on the GPU

Writes NAME.json, NAME.md and NAME.png (default NAME: neighbors_<device>[_quick]). Logic in tdn/bench/neighbors.py.
"""

from tdn.bench.neighbors import main

if __name__ == "__main__":
    main()
