"""torch.utils.checkpoint baselines for the benchmark harness (``acopt bench``).

``restore = apply_torch_checkpoint(workload, every=k)`` wraps the forward of
blocks 0, k, 2k, ... of ``workload.blocks`` in
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``; ``restore()``
puts the original forwards back. The eager ``workload.train_step`` then runs
with those blocks' activations dropped and recomputed in the backward.

Caveat: the recompute re-runs each block's forward as is, so a BatchNorm in a
checkpointed block (ResNet, the cnn) updates its running statistics twice per
step. Loss, gradients and parameters are unaffected; running stats differ.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch.utils.checkpoint

__all__ = ["apply_torch_checkpoint"]


def apply_torch_checkpoint(workload, every: int = 1) -> Callable[[], None]:
    """Checkpoint every ``every``-th block (starting with the first); return a restore function."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    if not workload.blocks:
        raise ValueError(f"workload {workload.name!r} names no blocks to checkpoint")
    wrapped = []
    for block in workload.blocks[::every]:
        if "forward" in vars(block):
            raise RuntimeError(f"a block of {workload.name!r} already has a patched forward (checkpointed twice?)")
        original = block.forward  # bound method of the class

        @functools.wraps(original)
        def forward(*args, _f=original, **kwargs):
            return torch.utils.checkpoint.checkpoint(_f, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        wrapped.append(block)

    def restore() -> None:
        for block in wrapped:
            vars(block).pop("forward", None)
        wrapped.clear()

    return restore
