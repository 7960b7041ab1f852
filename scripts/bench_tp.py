#!/usr/bin/env python
"""Tensor-product microbenchmark: every registered tdn backend vs e3nn (and cuEquivariance) in one run.

    python scripts/bench_tp.py --quick --out /tmp/bench                 # < 1 min on a CPU
    python scripts/bench_tp.py --device cuda --out docs/benchmarks      # E = 100,000, the pairs of BENCHMARKS.md
    python scripts/bench_tp.py --lmax 1 2 3 4 --channels 32 --edges 2000 --out out/

Writes NAME.json, NAME.md and NAME.png (default NAME: tp_<device>[_quick]). Logic in tdn/bench/tp.py.
"""

from tdn.bench.tp import main

if __name__ == "__main__":
    main()
