"""Rewrite a traced step so that it runs a plan: an fx pass.

``acopt.rewrite(traced, plan)`` emits :meth:`MemoryModel.schedule` node for
node (docs/memory-model.md, rule 4): the forward graph unchanged, a labelled
recompute block just before each recomputed activation's first backward use,
and every later use rewired to the rebuilt value, so the forward value dies
after its last forward use. The simulator measures the same schedule, which
is why the rewritten step's measured peak equals the simulated one.

Rules the pass keeps (checked after it runs):

1. No side effect is repeated: batch norm replays without its running
   statistics (a training-mode batch norm does not read them); any other
   op that writes in place is never replayed (the memory model refuses it).
2. Random ops draw the same numbers: the generator state is saved just before
   the forward run (a graph value, alive until the last replay reads it) and
   the replay draws from it, leaving the generator where it was
   (:mod:`acopt.rng`).
3. No node outside the forward region reads a forward value of a recomputed
   activation.
"""

from __future__ import annotations

import time

import torch
import torch.fx as fx

from acopt import rng
from acopt.fingerprint import ArtifactMismatch, check_profile_facts, graph_fingerprint
from acopt.records import Profile, Region
from acopt.schedule import InvalidPlan, MemoryModel, Schedule
from acopt.simulator import as_recompute
from acopt.tracer import REGION_KEY, TracedStep

BLOCK_KEY = "acopt_block"


class RewriteError(RuntimeError):
    """The rewrite could not keep the step's meaning; names the offending node."""


def rewrite(traced: TracedStep, plan, *, profile: Profile | None = None) -> TracedStep:
    """A new :class:`TracedStep` that recomputes ``plan``'s activations.

    ``plan`` is a :class:`~acopt.planning.Plan` or an iterable of activation
    names. ``profile`` is the profile the plan was made from; without it, a
    fake-tensor profile of ``traced`` gives the graph's storages (exact, cheap).

    Artifacts are checked, not trusted (:mod:`acopt.fingerprint`): a profile
    whose graph fingerprint is not ``traced``'s (another step, batch size or
    dtype), or whose node records disagree with the graph (random, in-place,
    recomputable, ...), and a Plan made for another profile or graph raise
    :class:`~acopt.fingerprint.ArtifactMismatch` (an ``InvalidPlan``); names that
    are not recomputable activations of the profile raise ``InvalidPlan``.
    """
    start = time.perf_counter()
    recompute = frozenset(as_recompute(plan))
    fingerprint = graph_fingerprint(traced.graph_module)
    _check_plan_graph(plan, fingerprint, traced)
    if profile is None:
        profile = structure_profile(traced)
        if not getattr(plan, "graph_fingerprint", ""):  # else checked above: the graph is the plan's
            _check_plan_profile(plan, profile)
    else:
        _check_matches(traced, profile, fingerprint)
        _check_plan_profile(plan, profile)
    model = MemoryModel(profile)
    unknown = sorted(recompute - set(model.activation_storages))
    if unknown:
        shown = ", ".join(map(repr, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
        raise InvalidPlan(
            f"plan names {len(unknown)} name(s) that are not activations of this profile "
            f"(so not recomputable): {shown}"
        )
    try:
        schedule = model.schedule(recompute)
    except InvalidPlan as e:
        raise InvalidPlan(f"plan does not fit this traced step: {e}") from e
    gm = _emit(traced.graph_module, profile, schedule)
    _check_rewired(gm, schedule, model)
    return traced.with_graph(
        gm,
        stage="rewrite",
        recompute=sorted(recompute),
        blocks=len(schedule.blocks),
        replayed_nodes=sum(len(b.nodes) for b in schedule.blocks),
        rewrite_time_s=time.perf_counter() - start,
    )


def structure_profile(traced: TracedStep) -> Profile:
    """A fake-tensor profile of ``traced``: exact storages, estimated times."""
    from acopt.profiler import profile as _profile

    with torch._subclasses.fake_tensor.FakeTensorMode():
        batch = traced.example_batch()
    return _profile(traced, *batch, fake=True)


def _check_matches(traced: TracedStep, profile: Profile, fingerprint: str) -> None:
    """The profile is this step's: same node names, same graph fingerprint (when
    it has one), node records that agree with the graph."""
    names = [n.name for n in traced.graph.nodes]
    if names != [n.name for n in profile.nodes]:
        raise ArtifactMismatch(
            "the profile was not made from this traced step (node names differ); "
            "profile the step you rewrite"
        )
    theirs = profile.meta.graph_fingerprint
    if theirs and theirs != fingerprint:
        raise ArtifactMismatch(
            f"the profile was not made from this traced step: its graph fingerprint {theirs!r} is not "
            f"this step's {fingerprint!r} (shapes, dtypes or ops differ{_batch_note(profile.meta.batch_size, traced)}); "
            "profile this step again"
        )
    check_profile_facts(traced.graph, profile)


def _check_plan_graph(plan, fingerprint: str, traced: TracedStep) -> None:
    theirs = getattr(plan, "graph_fingerprint", "")
    if theirs and theirs != fingerprint:
        raise ArtifactMismatch(
            f"the plan was made for another traced step: its graph fingerprint {theirs!r} is not "
            f"this step's {fingerprint!r}{_batch_note(getattr(plan, 'batch_size', 0), traced, lead='; ')}; "
            "profile and plan this step again"
        )


def _check_plan_profile(plan, profile: Profile) -> None:
    theirs = getattr(plan, "profile_id", "")
    if not theirs:
        return  # plain names, or a plan of unknown origin: only its names are checked
    from acopt.planning import profile_fingerprint

    ours = profile_fingerprint(profile)
    if theirs != ours:
        raise ArtifactMismatch(
            f"the plan was made for another profile (profile_id {theirs!r}, this profile's is {ours!r}"
            f"{_batch_note(getattr(plan, 'batch_size', 0), profile.meta.batch_size, lead=', ')}); "
            "plan again for this profile, or pass the profile the plan was made from (profile=...)"
        )


def _batch_note(theirs: int, ours, *, lead: str = ": ") -> str:
    ours = ours if isinstance(ours, int) else ours.batch_size
    if theirs and ours and theirs != ours:
        return f"{lead}it was made at batch size {theirs}, this one is at batch size {ours}"
    return ""


def _emit(src: fx.GraphModule, profile: Profile, schedule: Schedule) -> fx.GraphModule:
    nodes = {n.name: n for n in src.graph.nodes}
    graph = fx.Graph()
    env: dict[tuple[str, str | None], fx.Node] = {}
    replayed_random = {v for b in schedule.blocks for v in b.nodes if profile.node_by_name[v].random}
    saved: dict[str, fx.Node] = {}  # random node -> its saved generator state (a graph value)
    records = profile.node_by_name
    output = None

    for step in schedule.steps:
        old = nodes[step.node]
        reads = dict(step.reads)
        record = records[step.node]

        def arg(x: fx.Node) -> fx.Node:
            try:
                return env[(x.name, reads[x.name])]
            except KeyError as e:
                raise RewriteError(f"no value for {x.name!r} when emitting {old.format_node()}") from e

        if step.block is None:
            if step.node in replayed_random:
                state = graph.create_node("call_function", rng.save, (_device_of(old),), name=f"rng_state__{step.node}")
                state.meta[REGION_KEY] = old.meta[REGION_KEY]
                saved[step.node] = state
            new = graph.node_copy(old, arg)
            if new.name != old.name:  # pragma: no cover - names are reserved by order
                raise RewriteError(f"node {old.name!r} was renamed {new.name!r}")
            if old.op == "output":
                output = new
        else:
            args = fx.node.map_arg(old.args, arg)
            if record.replay == "drop_running_stats":
                args = (*args[:3], None, None, *args[5:])
            target = old.target
            if record.random:  # rng.replay(state, device, op, *args): the forward's draws
                args = (saved[step.node], _device_of(old), target, *args)
                target = rng.replay
            new = graph.create_node(
                old.op,
                target,
                args,
                fx.node.map_arg(old.kwargs, arg),
                name=f"rc_{step.node}__for__{step.block}",
                type_expr=old.type,
            )
            new.meta = {**old.meta, REGION_KEY: Region.BACKWARD, BLOCK_KEY: step.block}
        env[step.value] = new
    if output is None:  # pragma: no cover - every traced graph has an output
        raise RewriteError("the traced graph has no output node")
    graph.lint()
    return fx.GraphModule(src, graph)


def _device_of(node: fx.Node) -> str:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    for v in vals:
        if isinstance(v, torch.Tensor):
            return str(v.device)
    for a in node.all_input_nodes:
        v = a.meta.get("val")
        if isinstance(v, torch.Tensor):
            return str(v.device)
    return "cpu"


def _check_rewired(gm: fx.GraphModule, schedule: Schedule, model: MemoryModel) -> None:
    """Postcondition: nothing after the forward reads a dropped forward value."""
    regions = model.profile.node_by_name
    dropped = {
        v
        for b in schedule.blocks
        for v in model.aliases[b.activation]
        if regions[v].region == Region.FORWARD
    }
    for n in gm.graph.nodes:
        if n.meta.get(REGION_KEY) == Region.FORWARD or BLOCK_KEY in n.meta:
            continue
        for a in n.all_input_nodes:
            if a.name in dropped and BLOCK_KEY not in a.meta:
                raise RewriteError(
                    f"{n.format_node()} reads the forward value {a.name!r} of a recomputed activation"
                )


def recompute_blocks(traced: TracedStep) -> dict[str, list[str]]:
    """Activation -> names of the replayed nodes in its block, from a rewritten step."""
    out: dict[str, list[str]] = {}
    for n in traced.graph.nodes:
        if BLOCK_KEY in n.meta:
            out.setdefault(n.meta[BLOCK_KEY], []).append(n.name)
    return out
