#!/usr/bin/env python
"""Accuracy of every tensor-product backend on real DFT data at one equal, documented budget (one table per call).

    python scripts/bench_accuracy.py rmd17                       # aspirin, ethanol, malonaldehyde, toluene x 4 backends
    python scripts/bench_accuracy.py rmd17 --molecules aspirin --backends cg cp cg-shared
    python scripts/bench_accuracy.py acac                        # also 3bpa, oxides
    python scripts/bench_accuracy.py rmd17 --quick --out /tmp/x  # smoke test: a tiny model, a few steps
    python scripts/bench_accuracy.py curves --datasets ethanol aspirin 3bpa --seeds 0 1 2 --jobs 2
                                                                 # learning curves: error vs steps and CPU seconds

Writes OUT/accuracy_<table>.{json,md,png} (default OUT: docs/benchmarks) after every run; a rerun reuses the runs
already in the JSON at the same budget. Data: ../shared/data next to the repository (--data-root). Training goes
through the Hydra config (conf/experiment/accuracy_cpu.yaml + overrides), as tdn-train does. Logic in
tdn/bench/accuracy.py.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread: on a shared machine two threads were ~7x slower

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from tdn.bench import accuracy, curves  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {  # this checkout's layout: the reference data beside it, the published tables and page inside it
    "data_root": REPO.parent / "shared" / "data",
    "out": REPO / "docs" / "benchmarks",
    "work_dir": REPO / "outputs" / "bench_accuracy",
    "doc": REPO / "docs" / "accuracy.md",
}

if __name__ == "__main__":
    if sys.argv[1:2] == ["curves"]:  # learning curves until they flatten (tdn/bench/curves.py)
        curves.main(sys.argv[2:], defaults=DEFAULTS)
    else:
        accuracy.main(defaults=DEFAULTS)
