#!/usr/bin/env python
"""Equivariance / expressivity report of the tensor-product backends and the CP rank-vs-error curve.

    python scripts/bench_expressivity.py --doc docs/accuracy.md # L = 1..6 -> docs/benchmarks/expressivity.{json,md,png}
                                                                #   and its section of docs/accuracy.md
    python scripts/bench_expressivity.py --quick --out /tmp/x   # L = 1, 2, short fits (seconds; tests)
    python scripts/bench_expressivity.py --no-curve --lmax 1 2 3

CP fits are cached in OUT/expressivity_cp_fits.json: a rerun only fits ranks it has not seen. BLAS and torch run on
one thread (fastest on a shared machine, and the fits are then bit-reproducible). Logic in tdn/bench/expressivity.py.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy is imported

from tdn.bench.expressivity import main  # noqa: E402

if __name__ == "__main__":
    main()
