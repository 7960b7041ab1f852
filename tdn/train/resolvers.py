"""OmegaConf resolvers used by conf/.

- ``${training_data_stats:NAME}``: a statistic of the training split (``avg_num_neighbors``, ``atomic_energies``,
  ``elements``, ``forces_rms``, ``mean_interaction_energy``, ...), computed by the data module when first asked for.
  Only resolvable inside :func:`training_data_stats`; this is how dataset statistics reach the model, never typed.
- ``${tdn.precision:DTYPE}`` / ``${tdn.model_dtype:DTYPE}``: the Lightning precision and the model's weight dtype for
  the run's ``dtype`` (float32 | float64 | bf16-mixed).
- ``${tdn.sample:}``: the bundled sample data, shipped inside the package (``tdn/sample``, in the repository a link
  to ``datasets/sample``).
- ``${tdn.run_id:}``: a short id, fixed for the process, that makes default run directories unique (see
  :func:`run_id`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# Shipped inside the package, so that a wheel (not only an editable checkout) finds them; in the repository
# tdn/conf and tdn/sample are links to the top-level conf/ and datasets/sample/.
CONF_DIR = PACKAGE_DIR / "conf"
SAMPLE_DIR = PACKAGE_DIR / "sample"

PRECISIONS = {"float32": "32-true", "float64": "64-true", "bf16-mixed": "bf16-mixed"}
MODEL_DTYPES = {"float32": "float32", "float64": "float64", "bf16-mixed": "float32"}

_stats_provider: Callable[[str], Any] | None = None


def _lookup(table: dict[str, str], what: str) -> Callable[[str], str]:
    def resolve(dtype: str) -> str:
        if dtype not in table:
            raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
        return table[dtype]

    resolve.__name__ = what
    return resolve


def _training_data_stats(name: str) -> Any:
    if _stats_provider is None:
        raise RuntimeError(
            f"${{training_data_stats:{name}}} can only be resolved while tdn-train builds the model from the data"
        )
    return _stats_provider(name)


def run_id() -> str:
    """A short id for a run: ``TDN_RUN_ID`` when set, else the launcher's job id when the processes of one run are
    started by SLURM or torchrun (they must share one directory), else 6 random hex digits (runs started in the same
    second differ). Registered with a cache, as Hydra's ``now``: one config resolves it once."""
    for name in ("TDN_RUN_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(name, "")
        if value and value != "none":
            return value
    return secrets.token_hex(3)


def register() -> None:
    """Register the resolvers (idempotent)."""
    resolvers = {
        "training_data_stats": _training_data_stats,
        "tdn.precision": _lookup(PRECISIONS, "precision"),
        "tdn.model_dtype": _lookup(MODEL_DTYPES, "model_dtype"),
        "tdn.sample": lambda: str(SAMPLE_DIR),
        "tdn.run_id": run_id,
    }
    for name, fn in resolvers.items():
        OmegaConf.register_new_resolver(name, fn, replace=True, use_cache=name == "tdn.run_id")


@contextlib.contextmanager
def training_data_stats(provider: Callable[[str], Any]) -> Iterator[None]:
    """Within the block, ``${training_data_stats:NAME}`` resolves to ``provider(NAME)``."""
    global _stats_provider
    previous, _stats_provider = _stats_provider, provider
    try:
        yield
    finally:
        _stats_provider = previous


register()
