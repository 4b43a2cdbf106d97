"""Fingerprints of traced graphs, and the per-node facts a profile must agree with.

A :class:`~acopt.records.Profile` and a :class:`~acopt.planning.Plan` are files
that can outlive the step they were made from, or be edited. The rewriter
checks them against the graph it rewrites rather than trusting them:

* :func:`graph_fingerprint` digests the graph itself: per node its name, kind
  and target, region, input edges, the shapes and dtypes of its value
  (``node.meta["val"]``), whether it is random, and which inputs it writes in
  place. The profiler stores it in ``ProfileMeta.graph_fingerprint``; a
  profile (or plan) of another step, e.g. at another batch size, carries
  another one.
* :func:`node_facts` is what the profiler records per node that the graph alone
  determines (op, region, inputs, random, what it mutates, replay,
  recomputable); :func:`check_profile_facts` refuses a profile whose node
  records disagree with it, fingerprint or not.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from acopt.records import Profile, Region
from acopt.schedule import InvalidPlan


class ArtifactMismatch(InvalidPlan):
    """A profile or plan does not belong to the traced step it is applied to."""


@dataclasses.dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the graph alone says about one node (the profiler records these)."""

    op: str
    region: Region
    inputs: tuple[str, ...]
    random: bool
    mutated: tuple[fx.Node, ...]  # the input nodes it writes in place
    replay: str
    recomputable: bool


def node_facts(node: fx.Node) -> NodeFacts:
    """The profiler's per-node facts that need no run: from the node and its schema."""
    from acopt.collectives import is_collective, is_replayable_gather
    from acopt.profiler import BATCH_NORM_OPS, DROP_RUNNING_STATS, _target_name, is_random, mutated_args
    from acopt.tracer import REGION_KEY

    op = _target_name(node)
    mutated = tuple(dict.fromkeys(mutated_args(node)))
    replay = DROP_RUNNING_STATS if (op in BATCH_NORM_OPS and mutated) else ""
    return NodeFacts(
        op=op,
        region=node.meta[REGION_KEY],
        inputs=tuple(dict.fromkeys(a.name for a in node.all_input_nodes)),
        random=is_random(node),
        mutated=mutated,
        replay=replay,
        # memory model rule 8: a collective is never replayed (every rank issues the same ones),
        # except the planned re-gather of sharded weights
        recomputable=node.op == "call_function"
        and (not mutated or bool(replay))
        and (not is_collective(node) or is_replayable_gather(node)),
    )


def _graph_of(graph) -> fx.Graph:
    if isinstance(graph, fx.Graph):
        return graph
    if isinstance(graph, fx.GraphModule):
        return graph.graph
    found = getattr(graph, "graph", None)  # a TracedStep
    if isinstance(found, fx.Graph):
        return found
    raise TypeError(f"expected an fx Graph, GraphModule or TracedStep, not {type(graph).__name__}")


def _value_facts(val) -> tuple:
    """Shapes and dtypes of a node's value; other leaves by type only (a float
    hyperparameter's value changes between steps, its graph does not)."""
    out = []
    for leaf in tree_flatten(val)[0]:
        if isinstance(leaf, torch.Tensor):
            out.append((tuple(str(d) for d in leaf.shape), str(leaf.dtype)))
        else:
            out.append(type(leaf).__name__)
    return tuple(out)


def graph_fingerprint(graph) -> str:
    """A 16-hex-digit digest of a traced graph (an ``fx.Graph``, ``GraphModule`` or
    ``TracedStep``): node names, kinds, targets, regions, input edges, value
    shapes and dtypes, random and in-place facts. Equal graphs traced at equal
    shapes share it; another batch size, dtype or model gives another one."""
    rows = []
    for n in _graph_of(graph).nodes:
        facts = node_facts(n)
        rows.append(
            (
                n.name, n.op, facts.op, facts.region.value, facts.inputs,
                _value_facts(n.meta.get("val")), facts.random, tuple(a.name for a in facts.mutated),
            )
        )  # fmt: skip
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


def check_profile_facts(graph, profile: Profile) -> None:
    """Refuse (:class:`ArtifactMismatch`) a profile whose node records disagree
    with ``graph``: names and order, op, region, inputs, random, mutated storages,
    replay and recomputable flags, each re-derived from the graph."""
    nodes = list(_graph_of(graph).nodes)
    if [n.name for n in nodes] != [r.name for r in profile.nodes]:
        raise ArtifactMismatch(
            "the profile was not made from this traced step (node names differ); profile the step you rewrite"
        )
    records = profile.node_by_name
    for n, record in zip(nodes, profile.nodes):
        facts = node_facts(n)
        mutates = tuple(dict.fromkeys(s for a in facts.mutated for s in records[a.name].storages))
        expected = {
            "op": facts.op,
            "region": facts.region,
            "inputs": facts.inputs,
            "random": facts.random,
            "mutates": mutates,
            "replay": facts.replay,
            "recomputable": facts.recomputable,
        }
        for field, want in expected.items():
            have = getattr(record, field)
            if have != want:
                raise ArtifactMismatch(
                    f"the profile's record of node {record.name!r} says {field}={_show(have)}, "
                    f"but the traced graph says {field}={_show(want)}: the profile was edited or "
                    "made from another step; profile this step again"
                )


def _show(value) -> str:
    if isinstance(value, Region):
        return repr(value.value)
    return repr(value)

