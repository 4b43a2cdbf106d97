"""One plan for all ranks (memory model rule 8, docs/usage.md "Distributed").

Two ranks that rewrite a step with different plans issue different collective
sequences: gloo aborts, NCCL hangs or mixes tensors. So when a traced step
holds collectives and ``torch.distributed`` runs more than one rank,
:func:`acopt.compile` (via :class:`RankSync`):

1. all-gathers each rank's graph fingerprint and collective sequence and
   refuses clearly if they differ (:func:`check_same_graph`);
2. plans on rank 0 only and broadcasts the plan (or the planner's error) to
   every rank (:func:`plan_on_rank0`); profiles are made equal beforehand
   (the profiler takes each node's time and workspace as the maximum over
   ranks), so every rank's rewrite checks the plan against its own profile;
3. all-gathers the fingerprint of each rank's rewritten graph before the
   first run and raises :class:`RankMismatch` on every rank if they differ
   (:func:`check_same_rewrite`), instead of running into a collective hang.

Every exchange is one ``all_gather_object``/``broadcast_object_list`` on the
default group, bounded by the group's timeout (``init_process_group(timeout=...)``);
with gloo a ``monitored_barrier`` first names a rank that never arrives.
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import fx

from acopt.collectives import is_collective, uses_collectives
from acopt.fingerprint import graph_fingerprint

__all__ = ["RankMismatch", "active", "check_same_graph", "check_same_rewrite", "collective_sequence", "plan_on_rank0"]

#: How long a rank waits at :func:`_arrive` for the others before naming the missing rank (gloo).
ARRIVAL_TIMEOUT = datetime.timedelta(seconds=60)


class RankMismatch(RuntimeError):
    """Ranks traced or rewrote different steps: they would issue different collectives."""


def active(graph) -> bool:
    """Whether ``graph`` (an fx Graph, GraphModule or TracedStep) must be planned
    as one for all ranks: it holds collectives and more than one rank runs."""
    g = getattr(graph, "graph", graph)
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and uses_collectives(g)


def collective_sequence(graph) -> list[str]:
    """The collectives ``graph`` issues, in order: op, input shapes and dtypes."""
    g: fx.Graph = getattr(graph, "graph", graph)
    out = []
    for n in g.nodes:
        if not is_collective(n):
            continue
        shapes = [
            f"{tuple(a.meta['val'].shape)}:{a.meta['val'].dtype}"
            for a in n.all_input_nodes
            if isinstance(a.meta.get("val"), torch.Tensor)
        ]
        out.append(f"{getattr(n.target, '__name__', n.target)}({', '.join(shapes)})")
    return out


def _arrive(what: str) -> None:
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=ARRIVAL_TIMEOUT)
        except RuntimeError as e:
            raise RankMismatch(f"a rank did not reach {what} ({e}); every rank must compile the same step") from e


def _gather(value: Any, what: str) -> list[Any]:
    _arrive(what)
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def check_same_graph(traced) -> None:
    """Refuse (:class:`RankMismatch`, on every rank) unless all ranks traced the
    same graph with the same collective sequence."""
    sequence = collective_sequence(traced)
    mine = (graph_fingerprint(traced), hashlib.sha256(repr(sequence).encode()).hexdigest()[:16], sequence)
    gathered = _gather(mine, "the graph check")
    if all(g[:2] == mine[:2] for g in gathered):
        return
    lines = [f"rank {r}: graph {g[0]}, collectives {g[1]} ({len(g[2])})" for r, g in enumerate(gathered)]
    first = _first_difference([g[2] for g in gathered])
    raise RankMismatch(
        "ranks traced different training steps (different graphs or collective sequences), so they "
        "cannot run one plan: " + "; ".join(lines) + (f". First differing collective: {first}" if first else "")
    )


def _first_difference(sequences: list[list[str]]) -> str:
    for i, ops in enumerate(zip(*sequences)):
        if len(set(ops)) > 1:
            return f"#{i}: " + " vs ".join(ops)
    lengths = {len(s) for s in sequences}
    return f"sequence lengths {sorted(lengths)}" if len(lengths) > 1 else ""


def plan_on_rank0(make_plan, *args: Any, **kwargs: Any):
    """``make_plan(*args, **kwargs)`` on rank 0, its result (or its exception)
    broadcast to every rank and returned (raised) there."""
    _arrive("the plan broadcast")
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = make_plan(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- every rank raises it, none waits for a plan that never comes
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def check_same_rewrite(step) -> None:
    """Raise :class:`RankMismatch` on every rank unless all ranks' rewritten
    graphs are equal (the same plan): checked before the first run."""
    mine = (graph_fingerprint(step), collective_sequence(step))
    gathered = _gather(mine, "the rewrite check")
    if all(g[0] == mine[0] for g in gathered):
        return
    first = _first_difference([g[1] for g in gathered])
    raise RankMismatch(
        "ranks rewrote the step with different plans ("
        + ", ".join(f"rank {r}: {g[0]}" for r, g in enumerate(gathered))
        + "): their collectives would not match"
        + (f" (first differing collective {first})" if first else "")
        + "; plan once and use the same plan on every rank (acopt.compile does)"
    )
