"""Replay random ops with the random numbers they drew in the forward pass.

The rewriter puts :func:`save` just before a random node that a recompute
block replays, and :func:`replay_begin` / :func:`replay_end` around the
replay: the generator is set to the saved state for the replay and then put
back where it was, so later random ops draw what they would have drawn.

States live in a plain dict keyed by ``(graph id, node name)``, outside the
graph's values, so they never count as graph memory (a CPU generator state
is 5 KiB; a CUDA one is 16 bytes).
"""

from __future__ import annotations

import torch

_saved: dict[tuple[int, str], torch.Tensor] = {}
_outer: dict[tuple[int, str], torch.Tensor] = {}


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


def save(graph_id: int, name: str, device: str) -> None:
    """Remember the generator state just before the forward run of ``name``."""
    _saved[(graph_id, name)] = _get(device)


def replay_begin(graph_id: int, name: str, device: str) -> None:
    key = (graph_id, name)
    if key not in _saved:
        raise RuntimeError(f"no saved generator state for random node {name!r}: the forward did not run")
    _outer[key] = _get(device)
    _set(device, _saved[key])


def replay_end(graph_id: int, name: str, device: str) -> None:
    _set(device, _outer.pop((graph_id, name)))


def forget(graph_id: int) -> None:
    """Drop the saved states of one graph (called at the end of each step)."""
    for key in [k for k in _saved if k[0] == graph_id]:
        del _saved[key]
