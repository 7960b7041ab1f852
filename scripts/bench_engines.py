#!/usr/bin/env python
"""MD engines: ms per NVE and Langevin MD step of torch-sim's integrators running a tdn model against
tdn.dynamics.TorchDynamics (same model, same Cu fcc system, same device), for 108 and 500 atoms, float32 and
float64 (cp backend, tiny preset by default).

    python scripts/bench_engines.py --quick --out /tmp/bench                                # < 1 min
    OMP_NUM_THREADS=1 python scripts/bench_engines.py --threads 1 --out docs/benchmarks     # engines_cpu.*
    python scripts/bench_engines.py --device cuda --out docs/benchmarks                      # engines_cuda.*

Needs torch-sim (pip install 'tdn[torchsim]'). Writes NAME.json, NAME.md and NAME.png (default NAME:
engines_<device>[_quick]). Logic in tdn/bench/engines.py.
"""

from tdn.bench.engines import main

if __name__ == "__main__":
    main()
