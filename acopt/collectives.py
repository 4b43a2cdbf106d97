"""Collectives in a traced step: memory model rule 8 (docs/memory-model.md).

Functional collectives (``torch.distributed._functional_collectives``) trace
into the step graph as an *issue* node (``all_reduce``, ``all_gather_into_tensor``,
``reduce_scatter_tensor``, ...) returning the output buffer, and a
``wait_tensor`` node. This module gives them the memory model's meaning:

* :func:`wait_tensor` replaces ``_c10d_functional.wait_tensor`` in the graph.
  It waits and returns its first argument itself, so its value is an alias of
  the issue's output (real and fake profiles alike; the fake kernel of
  ``wait_tensor`` would count a fresh buffer). Its further arguments are the
  issue's inputs that the backend reads after the issue returns (all-gather,
  reduce-scatter, all-to-all): reading them there keeps them alive from issue
  to wait, in the graph's own data flow, so profiler, simulator and rewriter
  all see the same lifetimes.
* :func:`remap_collectives` is a ``TorchFunctionMode`` that, while tracing,
  turns ``dist.all_reduce(t)`` and the other in-place ``torch.distributed``
  collectives into functional ones written back into ``t`` (as ``torch.export``
  does, with torch's own ``traceable_collective_remaps``).
* :func:`max_over_ranks` makes measured times the maximum over ranks: a rank's
  time of a collective includes waiting for its peers.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Sequence

import torch
from torch import fx
from torch.overrides import TorchFunctionMode

__all__ = ["is_collective", "is_replayable_gather", "max_over_ranks", "remap_collectives", "uses_collectives", "wait_tensor"]

_NAMESPACES = frozenset({"c10d", "_c10d_functional", "c10d_functional", "_dtensor", "_c10d_functional_autograd"})

#: Issue ops whose C++ kernel copies its input before the (asynchronous) collective runs:
#: the input may be freed after the issue. Every other issue op's inputs live until the wait.
_COPIES_INPUT = frozenset({"all_reduce", "all_reduce_coalesced", "broadcast"})
#: In-place issue ops: the input is the output, which the wait reads anyway.
_IN_PLACE = frozenset({"all_reduce_", "all_reduce_coalesced_", "broadcast_"})


def wait_tensor(tensor: torch.Tensor, *held: torch.Tensor) -> torch.Tensor:
    """Wait for the collective that writes ``tensor``; return ``tensor`` itself (an alias).
    ``held``: the collective's inputs, read here so that they live until the wait."""
    torch.ops._c10d_functional.wait_tensor.default(tensor)
    return tensor



def is_collective(node: fx.Node) -> bool:
    """A torch.distributed collective or its wait (rule 8: never dropped; never
    replayed except by a planned re-gather of sharded weights)."""
    t = node.target
    if t is wait_tensor:
        return True
    return isinstance(t, torch._ops.OpOverload) and t.namespace in _NAMESPACES


def is_replayable_gather(node: fx.Node) -> bool:
    """An all-gather of a graph input (a sharded parameter, :mod:`acopt.sharding`)
    in the forward region, or its wait: the one collective a recompute block may
    replay (the planned re-gather of weights; every rank runs the same plan)."""
    from acopt.records import Region
    from acopt.tracer import REGION_KEY

    if node.target is wait_tensor:
        issue = node.args[0]
        return isinstance(issue, fx.Node) and is_replayable_gather(issue)
    if node.target is not torch.ops._c10d_functional.all_gather_into_tensor.default:
        return False
    source = node.args[0]
    return isinstance(source, fx.Node) and source.op == "placeholder" and node.meta.get(REGION_KEY) == Region.FORWARD


def uses_collectives(graph: fx.Graph) -> bool:
    return any(is_collective(n) for n in graph.nodes)


def hold_until_wait(gm: fx.GraphModule) -> None:
    """Replace each ``wait_tensor`` with :func:`wait_tensor` (an alias that holds
    the issue's asynchronously read inputs). In place; recompiles if changed."""
    waits = [n for n in gm.graph.nodes if n.target is torch.ops._c10d_functional.wait_tensor.default]
    for n in waits:
        issue = n.args[0]
        if isinstance(issue, fx.Node) and issue.target is operator.getitem:
            issue = issue.args[0]
        held: list[fx.Node] = []
        t = getattr(issue, "target", None)
        if isinstance(t, torch._ops.OpOverload) and t._schema.name.split("::")[-1] not in _COPIES_INPUT | _IN_PLACE:
            held = list(dict.fromkeys(issue.all_input_nodes))
        n.target = wait_tensor
        n.args = (n.args[0], *held)
    if waits:
        gm.graph.lint()
        gm.recompile()


class remap_collectives(TorchFunctionMode):
    """While tracing: in-place ``torch.distributed`` collectives (``dist.all_reduce(t)``,
    ``dist.all_gather_into_tensor``, ``dist.reduce_scatter_tensor``, ...) become
    functional collectives whose waited result is copied back into their output
    (torch's ``traceable_collective_remaps``). ``async_op=True`` is refused: its
    work handle cannot be part of a graph."""

    def __init__(self):
        super().__init__()
        from torch.distributed._functional_collectives import (
            REDUCE_OP_TO_STR,
            traceable_collective_remaps,
        )

        self._remaps = traceable_collective_remaps
        self._ops = REDUCE_OP_TO_STR

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        mapped = self._remaps.get(func)
        if mapped is None:
            return func(*args, **kwargs)
        import torch.distributed as dist

        from acopt.errors import UnsupportedStep

        bound = dict(inspect.signature(func).bind(*args, **kwargs).arguments)
        if bound.pop("async_op", False):
            raise UnsupportedStep(
                f"train_step calls torch.distributed.{func.__name__}(..., async_op=True): its work handle "
                "cannot be part of a traced step; call it with async_op=False (acopt overlaps the collective itself)"
            )
        if "op" in bound:
            if func not in (dist.all_reduce, dist.reduce_scatter_tensor, dist._reduce_scatter_base):
                raise UnsupportedStep(f"torch.distributed.{func.__name__} with op= is not supported in a traced step")
            bound["op"] = self._ops[bound["op"]]
        mapped(**bound)
        return None


def max_over_ranks(values: Sequence[float], *, integer: bool = False) -> list:
    """The elementwise maximum of ``values`` over all ranks of the default group
    (unchanged when torch.distributed is not initialised or has one rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.int64 if integer else torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
