"""Convolution benchmark (gather - tensor product - scatter), fused and reference, against e3nn uvu + index_add,
with the DRAM floor of the factorised convolution. Logic and the floor formula in tdn/bench/conv.py.

    python scripts/bench_conv.py --device cuda          # L = 1..4 (C = 128) and L = 3, C = 64; E = 100,000
    python scripts/bench_conv.py --quick --device cpu   # writes docs/benchmarks/conv_cpu_quick.{json,md,png}
"""

from tdn.bench.conv import main

if __name__ == "__main__":
    main()
