"""Profile one MD step (energy + forces through TDNCalculator): phases, forward by block, top operators.

    python scripts/profile_step.py --backends cp cg --natoms 108 --device cpu
    python scripts/profile_step.py --backends cp cg --natoms 4000 --device cuda

Writes docs/benchmarks/profile_<device>.{json,md,png}. Logic in tdn/bench/profile.py.
"""

from tdn.bench.profile import main

if __name__ == "__main__":
    main()
