#!/usr/bin/env python
"""Batched evaluation: structure-steps per second of a tdn model through torch-sim (S systems, one model call per
step) against a loop of TDNCalculator calls, for 1, 8, 64 systems of 32 ... 500 atoms (Cu fcc). The MD engines
(torch-sim against tdn.dynamics.TorchDynamics) are compared by scripts/bench_engines.py.

    python scripts/bench_batch.py --quick --out /tmp/bench                          # < 1 min
    OMP_NUM_THREADS=1 python scripts/bench_batch.py --threads 1 --out docs/benchmarks  # < 5 min on a CPU
    python scripts/bench_batch.py --large --out docs/benchmarks                      # + 256 systems per batch
    python scripts/bench_batch.py --device cuda --large --out docs/benchmarks        # batch_cuda.*

Needs torch-sim (pip install 'tdn[torchsim]'). Writes NAME.json, NAME.md and NAME.png (default NAME:
batch_<device>[_quick]). Logic in tdn/bench/batch.py.
"""

from tdn.bench.batch import main

if __name__ == "__main__":
    main()
