#!/usr/bin/env python
"""MD step benchmark: ms per energy+forces call and peak GPU memory vs atoms (Cu fcc), every tdn backend at
MACE-medium widths and, in the same run, mace-torch's MACECalculator (e3nn, cuEquivariance) at the same widths.

    python scripts/bench_md.py --quick --out /tmp/bench                        # < 1 min on a CPU
    python scripts/bench_md.py --device cuda --out docs/benchmarks \\
        --mace-pythonpath /opt/mace_ref                                          # 864 ... 108000 atoms
    python scripts/bench_md.py --device cpu --sizes 32 108 256 --out docs/benchmarks

mace-torch pins e3nn 0.4.4 (tdn needs >= 0.5): install it apart, e.g.
``pip install --target /opt/mace_ref --no-deps mace-torch==0.3.16 e3nn==0.4.4 ...``, and pass --mace-pythonpath.
Writes NAME.json, NAME.md and NAME.png (default NAME: md_<device>[_quick]). Logic in tdn/bench/md.py.
"""

from tdn.bench.md import main

if __name__ == "__main__":
    main()
