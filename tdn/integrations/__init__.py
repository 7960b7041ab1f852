"""Glue between tdn models and other simulation engines (optional extras, thin layers over the model).

``tdn.integrations.lammps``: LAMMPS through ML-IAP (``pair_style mliap unified``, domain decomposition with ghost
feature exchange) and through ``fix external`` (a Python callback, one rank). Nothing is imported here, so that
``import tdn`` never needs an engine installed.
"""
