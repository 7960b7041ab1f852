#!/usr/bin/env python
"""Training-step benchmark: optimiser steps per second with forces in the loss (batch of 10 molecules), every tdn
backend against mace-torch's own model in the same loop, at the accuracy_cpu size and MACE-medium widths.

    python scripts/bench_train.py --quick --out /tmp/bench                      # smoke run on a CPU
    python scripts/bench_train.py --threads 1 --out docs/benchmarks --mace-pythonpath /opt/mace_ref

mace-torch pins e3nn 0.4.4 (tdn needs >= 0.5): install it apart (see scripts/bench_md.py) and pass
--mace-pythonpath. Writes NAME.json, NAME.md and NAME.png. Logic in tdn/bench/train_step.py.
"""

from tdn.bench.train_step import main

if __name__ == "__main__":
    main()
