"""Replay random ops with the random numbers they drew in the forward pass.

The rewriter puts :func:`save` just before the forward run of a random node
that a recompute block replays, and replaces the replay by :func:`replay`:
the generator is set to the saved state for the op and then put back where
it was, so later random ops draw what they would have drawn.

The saved state is a graph value (a uint8 tensor: 5 056 bytes for the CPU
generator, 16 for a CUDA one, which lives in host memory): it is alive from
the forward run to the last replay that reads it, and the memory model
counts it there (docs/memory-model.md, rule 7). :func:`replay` holds the
generator's current state for the duration of the op: a temporary of the
same size, counted as that step's workspace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _get(device: str) -> torch.Tensor:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_rng_state(dev)
    return torch.get_rng_state()


def _set(device: str, state: torch.Tensor) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_rng_state(state, dev)
    else:
        torch.set_rng_state(state)


def state_bytes(device: str | torch.device) -> int:
    """Bytes of one saved generator state for ops on ``device`` (meta: as CPU)."""
    dev = torch.device(device)
    return _get("cuda" if dev.type == "cuda" else "cpu").nbytes


def save(device: str) -> torch.Tensor:
    """The generator state just before the forward run of a random node."""
    return _get(device)


def replay(saved: torch.Tensor, device: str, op: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` drawing from ``saved``; the generator is left where it was."""
    outer = _get(device)
    _set(device, saved)
    try:
        return op(*args, **kwargs)
    finally:
        _set(device, outer)
