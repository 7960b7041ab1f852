"""The code behind the benchmark scripts: :mod:`tdn.bench.tp` (tensor-product microbenchmark) and the shared
helpers in :mod:`tdn.bench.common` (timing, peak memory, metadata, JSON / markdown / PNG writers).

Submodules are imported explicitly (``from tdn.bench import tp``) so that importing tdn never pulls in matplotlib.
"""
