"""Memory for large systems in eval mode: recompute instead of keeping.

Forces need the backward of every layer, so each layer's intermediates are kept until then. For large systems in
eval mode (MD, inference) a block can instead run in chunks along its first dimension that keep only their inputs
and are recomputed in the backward (``torch.utils.checkpoint``): one more forward of the block for memory bounded by
the chunk. Training differentiates the forces again and never does this.

The recomputed blocks draw no random numbers, so no RNG state is saved and replayed (``preserve_rng_state=False``):
on a GPU that would read the device's generator state back to the host for every chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def recompute_if_large(
    fn: Callable[..., torch.Tensor],
    tensors: tuple[torch.Tensor, ...],
    *,
    training: bool,
    above: int | None,
    chunk: int,
) -> torch.Tensor:
    """``fn(*tensors)``; with more than ``above`` rows (``None``: never), outside training and with gradients on,
    as checkpointed chunks of ``chunk`` rows of every tensor, concatenated."""
    rows = tensors[0].shape[0]
    if above is None or rows <= above or training or not torch.is_grad_enabled():
        return fn(*tensors)
    return torch.cat([
        checkpoint(fn, *(t[start : start + chunk] for t in tensors), use_reentrant=False, preserve_rng_state=False)
        for start in range(0, rows, chunk)
    ])  # fmt: skip
