"""Glue between tdn models and other simulation engines (optional extras, thin layers over the model).

``tdn.integrations.lammps``: LAMMPS through ML-IAP (``pair_style mliap unified``, domain decomposition with ghost
feature exchange) and through ``fix external`` (a Python callback, one rank). ``tdn.integrations.torchsim``: a torch-sim
model (many systems in one graph), and ``tdn-relax``; ``tdn.integrations.batch``: the one-graph evaluation they and
``TDNCalculator.calculate_batch`` share. Nothing is imported here, so that
``import tdn`` never needs an engine installed.
"""
