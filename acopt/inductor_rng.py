"""Eager-generator draws inside inductor's compiled graphs.

A random op (dropout's ``bernoulli``), :func:`acopt.rng.save` and
:func:`acopt.rng.replay` must draw from eager PyTorch's generator, in eager's
order, so that masks are eager's own and a replay draws the forward's mask.
:func:`lower` replaces each of them in a compiled segment's graph by a call of
one of three custom operators, which inductor runs as fallback kernels (the
eager op, called from the compiled graph):

* ``acopt::draw(after, tensors, op, spec)``: runs the random ``op`` eagerly;
* ``acopt::save(after, device)``: the generator state (:func:`acopt.rng.save`);
* ``acopt::replay(after, saved, tensors, device, op, spec)``:
  :func:`acopt.rng.replay`.

Each returns its results and a fresh empty *token* tensor, which the next of
these calls in the segment takes as ``after``: a data dependency, so the calls
run in the graph's order whatever inductor's scheduler does (checked with its
reordering passes on, tests/test_inductor.py; the first takes ``None``), and no
two are identical calls that a common-subexpression pass could merge (none runs
on this path: AOTAutograd's is in the min-cut partitioner, which inference
graphs skip). The operators are registered side-effectful
(``torch.fx.node.has_side_effect``): dead-code elimination under inductor
treats random ops as pure (``impure_random`` follows ``fallback_random``) and
removed an unused ``rand_like``, so the generator did not advance as eager's
does. They carry the ``nondeterministic_seeded`` tag (inductor's scheduler keeps
such fallback kernels) and ``needs_exact_strides``, so each tensor reaches the
op with the strides of the traced graph; ``spec`` records those strides and
the call refuses others, since the layout can decide which element gets which
number.

``op`` names the ATen overload ("aten::bernoulli.p") and ``spec`` encodes its
non-tensor arguments as JSON, so a compiled graph is self-contained (a cached
graph cannot call a different op than its text says). Lowered (:func:`lowerable`):
ops that return fresh tensors, and in-place ones (dropout on a non-contiguous
input: ``empty_like`` + ``bernoulli_``) whose written tensor nothing else reads
(made afresh as eager made it, or copied), all of whose arguments are tensors,
numbers, strings, dtypes, devices, layouts, memory formats or lists of them.
Others stay eager graph cuts (:func:`acopt.inductor.segments_of`).
"""

from __future__ import annotations

import functools
import json
import operator
from typing import Any

import torch
from torch import fx

from acopt import rng
from acopt.tracer import is_random

__all__ = ["lower", "lowerable"]

_TAGS = (torch.Tag.nondeterministic_seeded, torch.Tag.needs_exact_strides)


class _NotEncodable(Exception):
    pass


#: Ops that make an uninitialized tensor: an in-place random op filling one is run
#: on a tensor the custom operator makes the same way (no copy).
_EMPTY = {torch.ops.aten.empty_like.default, torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}


def _encode(x: Any, tensors: list[fx.Node]) -> Any:
    """JSON for an argument; tensors (graph nodes) become ``{"__t__": index}``."""
    if isinstance(x, fx.Node):
        if not isinstance(x.meta.get("val"), torch.Tensor):
            raise _NotEncodable(x.name)
        tensors.append(x)
        return {"__t__": len(tensors) - 1}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    for kind, key in (
        (torch.dtype, "__dtype__"),
        (torch.layout, "__layout__"),
        (torch.memory_format, "__memory_format__"),
    ):
        if isinstance(x, kind):
            return {key: str(x).removeprefix("torch.")}
    if isinstance(x, torch.device):
        return {"__device__": str(x)}
    if isinstance(x, (list, tuple)):
        return {"__seq__": [_encode(a, tensors) for a in x]}
    raise _NotEncodable(repr(x))


def _decode_hook(d: dict) -> Any:
    if len(d) == 1:
        ((key, v),) = d.items()
        if key in ("__dtype__", "__layout__", "__memory_format__"):
            return getattr(torch, v)
        if key == "__device__":
            return torch.device(v)
        if key == "__seq__":
            return v
    return d


def _fills(x: Any, tensors: list[torch.Tensor]) -> Any:
    """The argument that ``_encode`` gave ``x`` for, with ``tensors`` in place."""
    if isinstance(x, list):
        return [_fills(a, tensors) for a in x]
    if isinstance(x, dict) and len(x) == 1:
        ((key, v),) = x.items()
        if key == "__t__":
            return tensors[v]
        if key == "__fresh__":  # an uninitialized tensor, made as eager made it
            return _op(v["op"])(*_fills(v["args"], tensors), **{k: _fills(a, tensors) for k, a in v["kwargs"].items()})
        if key == "__copy__":  # a tensor an in-place op writes: a copy with the same strides
            t = _fills(v, tensors)
            return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device).copy_(t)
    return x


@functools.cache
def _op(name: str) -> torch._ops.OpOverload:
    ns, rest = name.split("::")
    base, _, overload = rest.partition(".")
    return getattr(getattr(getattr(torch.ops, ns), base), overload or "default")


@functools.cache
def _spec(spec: str) -> tuple[list, dict, list[list[int]]]:
    d = json.loads(spec, object_hook=_decode_hook)
    return d["args"], d["kwargs"], d["strides"]


def _kind(op: torch._ops.OpOverload) -> str | None:
    """ "fresh": returns new tensors and writes no argument; "inplace": writes its
    first argument only and returns it; None: neither (not lowered)."""
    schema = op._schema
    if not schema.returns or not all(isinstance(r.type, torch.TensorType) for r in schema.returns):
        return None
    if not schema.is_mutable:
        return "fresh" if all(r.alias_info is None for r in schema.returns) else None
    writes = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    ret = schema.returns[0].alias_info
    if writes == [0] and len(schema.returns) == 1 and ret is not None and ret.is_write:
        return "inplace"
    return None


def _call(op: str, spec: str, tensors: list[torch.Tensor], *, check: bool) -> list[torch.Tensor]:
    args, kwargs, strides = _spec(spec)
    if check:
        for i, (t, s) in enumerate(zip(tensors, strides, strict=True)):
            if list(t.stride()) != s:
                raise RuntimeError(
                    f"acopt: {op}'s tensor argument {i} reached the compiled graph with strides "
                    f"{tuple(t.stride())}, not eager's {tuple(s)}: its draws would differ from eager PyTorch's"
                )
    out = _op(op)(*_fills(args, tensors), **{k: _fills(v, tensors) for k, v in kwargs.items()})
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _token() -> torch.Tensor:
    return torch.empty(0)


# Defined with torch.library.Library, not torch.library.custom_op: a call costs ~4 us
# against ~16 us (CPU, measured), and a step makes one per draw and replay.
_LIB = torch.library.Library("acopt", "DEF")
_LIB.define("draw(Tensor? after, Tensor[] tensors, str op, str spec) -> Tensor[]", tags=_TAGS)
_LIB.define("save(Tensor? after, str device) -> Tensor[]", tags=_TAGS)
_LIB.define(
    "replay(Tensor? after, Tensor saved, Tensor[] tensors, str device, str op, str spec) -> Tensor[]", tags=_TAGS
)


def _draw(after: torch.Tensor | None, tensors: list[torch.Tensor], op: str, spec: str) -> list[torch.Tensor]:
    return [*_call(op, spec, tensors, check=True), _token()]


def _draw_fake(after, tensors, op, spec):
    return [*_call(op, spec, tensors, check=False), _token()]


def _save(after: torch.Tensor | None, device: str) -> list[torch.Tensor]:
    return [rng.save(device), _token()]


def _save_fake(after, device):
    return [torch.empty(rng.state_bytes(device), dtype=torch.uint8), _token()]


def _replay(
    after: torch.Tensor | None, saved: torch.Tensor, tensors: list[torch.Tensor], device: str, op: str, spec: str
) -> list[torch.Tensor]:
    return [*rng.replay(saved, device, _call, op, spec, tensors, check=True), _token()]


def _replay_fake(after, saved, tensors, device, op, spec):
    return [*_call(op, spec, tensors, check=False), _token()]


for _name, _real, _fake in (
    ("draw", _draw, _draw_fake),
    ("save", _save, _save_fake),
    ("replay", _replay, _replay_fake),
):
    _LIB.impl(_name, _real, "CompositeExplicitAutograd")
    torch.library.register_fake(f"acopt::{_name}", _fake, lib=_LIB)


# Dead-code elimination under inductor treats random ops as pure (``impure_random``
# follows ``fallback_random``, False): an unused draw would vanish, and the generator
# would not advance as eager's does. Side-effectful functions are never removed.
for _f in (torch.ops.acopt.draw.default, torch.ops.acopt.save.default, torch.ops.acopt.replay.default):
    fx.node.has_side_effect(_f)


def _random_target(node: fx.Node) -> tuple[Any, tuple, dict] | None:
    """(op, args, kwargs) of the random op that ``node`` runs, or None."""
    if node.op != "call_function":
        return None
    if node.target is rng.replay:
        return node.args[2], node.args[3:], dict(node.kwargs)
    if is_random(node) and node.target.namespace != "acopt":  # not one of ours, already lowered
        return node.target, node.args, dict(node.kwargs)
    return None


def _encoded(
    op: Any, args: tuple, kwargs: dict, *, graph: fx.Graph | None = None
) -> tuple[str, str, list[fx.Node]] | None:
    """(op name, spec, tensor arguments) of a random op call, or None if it is not lowerable.

    An in-place op's written tensor must be read by nothing else: it is made afresh
    (``__fresh__``: its producer is an empty-like op in ``graph``, which then dies)
    or copied (``__copy__``) in the custom operator, whose result replaces the op's."""
    if not isinstance(op, torch._ops.OpOverload) or (kind := _kind(op)) is None:
        return None
    tensors: list[fx.Node] = []
    try:
        first = args[0] if args else None
        if kind == "inplace":
            if not isinstance(first, fx.Node) or len(first.users) != 1:
                return None
            if graph is not None and first.graph is graph and first.op == "call_function" and first.target in _EMPTY:
                fresh = {"op": first.target.name(), "args": [_encode(a, tensors) for a in first.args],
                         "kwargs": {k: _encode(v, tensors) for k, v in first.kwargs.items()}}  # fmt: skip
                enc_first = {"__fresh__": fresh}
            else:
                enc_first = {"__copy__": _encode(first, tensors)}
        else:
            enc_first = _encode(first, tensors)
        enc_args = [enc_first, *(_encode(a, tensors) for a in args[1:])] if args else []
        enc_kwargs = {k: _encode(v, tensors) for k, v in kwargs.items()}
    except _NotEncodable:
        return None
    strides = [list(t.meta["val"].stride()) for t in tensors]
    spec = json.dumps({"args": enc_args, "kwargs": enc_kwargs, "strides": strides}, sort_keys=True)
    return op.name(), spec, tensors


def lowerable(node: fx.Node) -> bool:
    """Whether ``node`` (a random op, rng.save or rng.replay) can run inside a compiled graph."""
    if node.op == "call_function" and node.target is rng.save:
        return not node.kwargs and len(node.args) == 1 and isinstance(node.args[0], str)
    target = _random_target(node)
    if target is None:
        return False
    if node.target is rng.replay and not (isinstance(node.args[0], fx.Node) and isinstance(node.args[1], str)):
        return False
    return _encoded(*target) is not None


def lower(gm: fx.GraphModule) -> int:
    """Replace, in place, the random ops, rng.save and rng.replay of ``gm`` (one compiled
    segment, every such node :func:`lowerable`) by the custom operators, chained by
    their tokens in graph order; the number replaced."""
    graph = gm.graph
    after: fx.Node | None = None
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not (node.target is rng.save or _random_target(node) is not None):
            continue
        with graph.inserting_before(node):
            if node.target is rng.save:
                call = graph.call_function(torch.ops.acopt.save.default, (after, node.args[0]))
                n_out = 1
            else:
                enc = _encoded(*_random_target(node), graph=graph)
                if enc is None:  # pragma: no cover - the segmenter keeps these eager
                    raise RuntimeError(f"acopt: a random op that cannot be compiled: {node.format_node()}")
                op, spec, tensors = enc
                if node.target is rng.replay:
                    args = (after, node.args[0], tensors, node.args[1], op, spec)
                    call = graph.call_function(torch.ops.acopt.replay.default, args)
                else:
                    call = graph.call_function(torch.ops.acopt.draw.default, (after, tensors, op, spec))
                n_out = len(_op(op)._schema.returns)
            after = graph.call_function(operator.getitem, (call, n_out))
            if n_out == 1:
                result = graph.call_function(operator.getitem, (call, 0))
            else:  # users index the tuple; the list has the same indices, the token after them
                result = call
        result.meta = dict(node.meta)
        node.replace_all_uses_with(result)
        written = node.args[3 if node.target is rng.replay else 0] if node.target is not rng.save else None
        graph.erase_node(node)
        if isinstance(written, fx.Node) and written.target in _EMPTY and not written.users:
            graph.erase_node(written)  # made afresh by the custom operator
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count
