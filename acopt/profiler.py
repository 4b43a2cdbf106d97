"""Profile a traced training step into a torch-free :class:`~acopt.records.Profile`.

An interpreter runs the step graph node by node on *copies* of the model's and
optimizer's tensors (the originals and the RNG are left as they were) and
records, per node: median run time, the storages its value refers to and the
ones it newly allocates, what it mutates, whether it is random, whether a
recompute block may replay it. Memory is counted per storage exactly as
docs/memory-model.md says: a value is dropped after its last use, a storage is
freed when no live value refers to it, placeholders and outputs live to the end.

With ``fake=True`` the inputs become fake tensors: memory is exact, no kernel
runs, and node times come from :func:`estimate_time` (stated, never passed off
as measured: ``Profile.meta.estimated_times``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from acopt.collectives import max_over_ranks, uses_collectives
from acopt.progress import bar as progress_bar
from acopt.records import (
    OUTPUT,
    PLACEHOLDER,
    ActivationRecord,
    NodeRecord,
    Profile,
    ProfileMeta,
    Region,
    Role,
    StorageRecord,
)
from acopt.schedule import InvalidPlan, MemoryModel
from acopt.tracer import TracedStep

#: Ops replayed without their in-place effect on running statistics.
BATCH_NORM_OPS = frozenset(
    {
        "aten.native_batch_norm.default",
        "aten._native_batch_norm_legit.default",
        "aten.cudnn_batch_norm.default",
        "aten.miopen_batch_norm.default",
    }
)
DROP_RUNNING_STATS = "drop_running_stats"

#: The fake-mode time estimator's default machine (documented in docs/usage.md).
ESTIMATOR_FLOPS = 1.0e11  # 100 GFLOP/s
ESTIMATOR_BYTES = 2.0e10  # 20 GB/s
ESTIMATOR_OVERHEAD_S = 2e-6


@dataclasses.dataclass(frozen=True, slots=True)
class Roofline:
    """The machine of the fake-mode time estimator: peak FLOP/s, memory bandwidth
    (bytes/s) and a fixed cost per node (launch overhead)."""

    flops_per_s: float = ESTIMATOR_FLOPS
    bytes_per_s: float = ESTIMATOR_BYTES
    overhead_s: float = ESTIMATOR_OVERHEAD_S

    def __post_init__(self) -> None:
        for name in ("flops_per_s", "bytes_per_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"Roofline.{name} must be a positive number, got {value!r}")
        if not (math.isfinite(self.overhead_s) and self.overhead_s >= 0):
            raise ValueError(f"Roofline.overhead_s must be >= 0, got {self.overhead_s!r}")

    def time(self, flops: float, bytes_moved: float) -> float:
        """max(compute, memory) + overhead, in seconds."""
        return max(flops / self.flops_per_s, bytes_moved / self.bytes_per_s) + self.overhead_s

    def describe(self) -> str:
        return (
            f"roofline: max(flops / {self.flops_per_s:.3g} FLOP/s, bytes / {self.bytes_per_s:.3g} B/s) "
            f"+ {self.overhead_s:.0e} s"
        )


def estimate_time(flops: float, bytes_moved: float, roofline: Roofline | None = None) -> float:
    """Roofline estimate of a node's time: max(compute, memory) + launch overhead."""
    return (roofline or Roofline()).time(flops, bytes_moved)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) or v is None for v in value):
        return [v for v in value if v is not None]
    flat, _ = tree_flatten(value)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _target_name(node: fx.Node) -> str:
    if node.op in (PLACEHOLDER, OUTPUT):
        return node.op
    t = node.target
    if t is operator.getitem:
        return "getitem"
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def mutated_args(node: fx.Node) -> list[fx.Node]:
    """The input nodes an op writes in place (from its schema)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return []
    if str(target) in BATCH_NORM_OPS:
        # The schema does not say so, but in training mode these write the
        # running statistics (arguments 3 and 4) in place.
        training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
        return [a for a in node.args[3:5] if isinstance(a, fx.Node)] if training else []
    out = []
    schema = target._schema
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        out.extend(x for x in tree_flatten(value)[0] if isinstance(x, fx.Node))
    return out


def is_random(node: fx.Node) -> bool:
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags


@dataclasses.dataclass(slots=True)
class _Run:
    """What one pass over the graph observed."""

    times: list[float]
    flops: list[float]
    node_storages: list[tuple[str, ...]]
    node_allocates: list[tuple[str, ...]]
    storage_bytes: dict[str, int]
    storage_node: dict[str, str]
    timeline: list[int]


class StepInterpreter:
    """Runs a step graph node by node with per-storage accounting.

    Not an ``fx.Interpreter`` subclass: the freeing order is part of the
    measurement, so it is written out here (rule 1 of the memory model).
    """

    def __init__(self, gm: fx.GraphModule, *, device: torch.device, count_flops: bool = False):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.device = device
        self.count_flops = count_flops
        index = {n: i for i, n in enumerate(self.nodes)}
        last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last_use[a] = i
        self.frees: list[list[fx.Node]] = [[] for _ in self.nodes]
        for n in self.nodes:
            if n.op in (PLACEHOLDER, OUTPUT):
                continue
            i = last_use.get(n, index[n])
            if self.nodes[i].op != OUTPUT:
                self.frees[i].append(n)

    def run(
        self, inputs: list[Any], *, record: bool = True, annotate: bool = False,
        on_node: Callable[[int], None] | None = None,
    ) -> tuple[Any, _Run]:  # fmt: skip
        """One pass over the graph. ``annotate`` wraps each node in a profiler
        range ``acopt::{index}`` (for :func:`measure_temp_bytes`) instead of timing it.
        ``on_node`` is called with the number of nodes done (progress)."""
        env: dict[fx.Node, Any] = {}
        storage_name = _storage_names(self.nodes)
        live: dict[int, list] = {}  # storage key -> [name, bytes, refs]
        node_keys: dict[fx.Node, list[int]] = {}
        run = _Run([], [], [], [], {}, {}, [])
        live_bytes = 0
        args_iter: Iterator[Any] = iter(inputs)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else None
        out_value = None
        for i, node in enumerate(self.nodes):
            if on_node is not None:
                on_node(i)
            flops = 0.0
            if node.op == PLACEHOLDER:
                value = next(args_iter)
                elapsed = 0.0
            elif node.op == OUTPUT:
                value = fx.node.map_arg(node.args[0], env.__getitem__)
                out_value = value
                elapsed = 0.0
            else:
                args = fx.node.map_arg(node.args, env.__getitem__)
                kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
                if self.count_flops:
                    from torch.utils.flop_counter import FlopCounterMode

                    with FlopCounterMode(display=False) as fc:
                        value = node.target(*args, **kwargs)
                    flops = float(fc.get_total_flops())
                    elapsed = 0.0
                elif annotate:
                    with torch.profiler.record_function(f"acopt::{i}"):
                        value = node.target(*args, **kwargs)
                    elapsed = 0.0
                else:
                    if sync:
                        sync()
                    t0 = time.perf_counter()
                    value = node.target(*args, **kwargs)
                    if sync:
                        sync()
                    elapsed = time.perf_counter() - t0
            env[node] = value
            if not record:
                for dead in self.frees[i]:
                    del env[dead]
                continue
            names, allocs = [], []
            keys = []
            for j, t in enumerate(_tensors(value) if node.op != OUTPUT else []):
                key = _storage_key(t)
                entry = live.get(key)
                if entry is None:
                    name = storage_name(node, j)
                    nbytes = t.untyped_storage().nbytes()
                    entry = live[key] = [name, nbytes, 0]
                    run.storage_bytes[name] = nbytes
                    run.storage_node[name] = node.name
                    allocs.append(name)
                    live_bytes += nbytes
                if key not in keys:
                    keys.append(key)
                    entry[2] += 1
                    names.append(entry[0])
            node_keys[node] = keys
            run.times.append(elapsed)
            run.flops.append(flops)
            run.node_storages.append(tuple(names))
            run.node_allocates.append(tuple(allocs))
            run.timeline.append(live_bytes)
            for dead in self.frees[i]:
                del env[dead]
                for key in node_keys.pop(dead, ()):
                    entry = live[key]
                    entry[2] -= 1
                    if entry[2] == 0:
                        live_bytes -= entry[1]
                        del live[key]
        return out_value, run


@contextlib.contextmanager
def _allocation_events():
    """torch.profiler recording CPU allocations, with Kineto's start/stop chatter
    on the C-level stderr silenced."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            os.dup2(saved, 2)  # the profiled code keeps its stderr
            yield prof
            os.dup2(devnull, 2)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def measure_temp_bytes(interp: StepInterpreter, inputs: list[Any]) -> list[int]:
    """Per node, the bytes an op allocates and frees inside itself (workspace).

    Read from the allocator: CUDA's peak counter around each node, or on CPU
    the allocation events of torch.profiler inside each node's range.
    """
    n = len(interp.nodes)
    if interp.device.type == "cuda":
        return _cuda_temp_bytes(interp, inputs)
    from torch._C._profiler import _EventType

    with _allocation_events() as prof:
        _, run = interp.run(inputs, annotate=True)
    temps = [0] * n

    def allocations(event, out):
        for c in event.children:
            if c.tag == _EventType.Allocation:
                out.append((c.start_time_ns, c.extra_fields.alloc_size))
            else:
                allocations(c, out)

    def visit(events):
        for e in events:
            if e.name.startswith("acopt::"):
                i = int(e.name.split("::", 1)[1])
                sizes: list[tuple[int, int]] = []
                allocations(e, sizes)
                current = peak = 0
                for _, size in sorted(sizes):
                    current += size
                    peak = max(peak, current)
                made = sum(run.storage_bytes[s] for s in run.node_allocates[i])
                temps[i] = max(0, peak - made)
            else:
                visit(e.children)

    visit(prof.profiler.kineto_results.experimental_event_tree())
    return temps


def _cuda_temp_bytes(interp: StepInterpreter, inputs: list[Any]) -> list[int]:
    temps = []
    nodes = interp.nodes
    env: dict[fx.Node, Any] = {}
    it = iter(inputs)
    for i, node in enumerate(nodes):
        if node.op == PLACEHOLDER:
            env[node] = next(it)
            temps.append(0)
            continue
        if node.op == OUTPUT:
            temps.append(0)
            break
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        env[node] = node.target(*args, **kwargs)
        torch.cuda.synchronize()
        after = torch.cuda.memory_allocated()
        temps.append(max(0, torch.cuda.max_memory_allocated() - max(before, after)))
        for dead in interp.frees[i]:
            del env[dead]
    return temps


def added_peak_bytes(fn: Callable[[], Any]) -> int:
    """The most bytes the CPU allocator held above its level at the start while
    ``fn()`` ran: torch.profiler's allocation events (every thread), summed in
    time order. What was allocated before is not included."""
    from torch._C._profiler import _EventType

    with _allocation_events() as prof:
        fn()
    sizes: list[tuple[int, int]] = []

    def walk(events):
        for e in events:
            if e.tag == _EventType.Allocation:
                sizes.append((e.start_time_ns, e.extra_fields.alloc_size))
            walk(e.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    current = peak = 0
    for _, size in sorted(sizes):
        current += size
        peak = max(peak, current)
    return peak


def allocator_peak_bytes(traced: TracedStep, *batch: torch.Tensor) -> int:
    """Peak bytes the allocator holds while one step of ``traced`` runs on copies
    of its inputs (inputs included): CUDA's peak counter, or on CPU the sum of
    torch.profiler's allocation events. The cross-check for storage accounting."""
    inputs = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in traced.flat_inputs(*batch)]
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    interp = StepInterpreter(traced.graph_module, device=device)
    rng = _RngState.capture(device)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with torch.enable_grad():
                out, _ = interp.run(inputs, record=False)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        base = sum(t.untyped_storage().nbytes() for t in {_storage_key(t): t for t in _tensors(inputs)}.values())

        def run():
            with torch.enable_grad():
                out, _ = interp.run(inputs, record=False)
                del out

        return base + added_peak_bytes(run)
    finally:
        rng.restore()


def _storage_names(nodes: list[fx.Node]) -> Callable[[fx.Node, int], str]:
    """Name a new storage after the node that makes it (or its getitem, for tuples)."""
    getitem_names: dict[tuple[str, int], str] = {}
    for n in nodes:
        if n.target is operator.getitem and isinstance(n.args[0], fx.Node) and isinstance(n.args[1], int):
            getitem_names.setdefault((n.args[0].name, n.args[1]), n.name)
    used: set[str] = set()

    def name(node: fx.Node, j: int) -> str:
        if j == 0 and node.name not in used and not _is_multi(node):
            candidate = node.name
        else:
            candidate = getitem_names.get((node.name, j), f"{node.name}.{j}")
        while candidate in used:
            candidate += "_"
        used.add(candidate)
        return candidate

    return name


def _is_multi(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, (tuple, list))


# ---------------------------------------------------------------------------
def profile(
    traced: TracedStep,
    *batch: torch.Tensor,
    warmup: int = 2,
    iterations: int = 3,
    fake: bool = False,
    model_name: str = "",
    progress: bool = False,
    roofline: Roofline | None = None,
) -> Profile:
    """Profile one step of ``traced`` on ``batch``; leaves model, optimizer and RNG as found.

    ``roofline``: the machine whose times ``fake=True`` estimates (default :class:`Roofline()`).
    """
    if roofline is not None and not fake:
        raise ValueError("roofline= sets the estimated times of a fake profile: pass fake=True too")
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    inputs = traced.flat_inputs(*batch)
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    interp = StepInterpreter(traced.graph_module, device=device, count_flops=fake)
    rng = _RngState.capture(device)
    try:
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode
            from torch.fx.experimental.symbolic_shapes import ShapeEnv

            # a shape environment for host reads (Adam's step.item(), acopt/optimizer_form.py):
            # they become unbacked symbols; shapes stay static, so byte counts stay exact
            mode = FakeTensorMode(allow_non_fake_inputs=False, shape_env=ShapeEnv(), static_shapes=True)
            detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in inputs]  # no autograd on fakes
            bar = progress_bar(len(interp.nodes), "profiling on fake tensors", progress)
            with mode, torch.enable_grad():
                fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in detached]
                _, run = interp.run(fake_inputs, on_node=bar)
            bar(len(interp.nodes))
            runs = [run]
            temps = [0] * len(interp.nodes)  # workspace is not visible without kernels
        else:
            copies = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in inputs]
            runs = []
            total = warmup + iterations
            bar = progress_bar(total, "profiling", progress)
            with torch.enable_grad():
                for it in range(total):
                    _, run = interp.run(copies, record=True)
                    if it >= warmup:
                        runs.append(run)
                    bar(it + 1)
                temps = measure_temp_bytes(interp, copies)
    finally:
        rng.restore()
    return _build_profile(
        traced, interp, runs, temps, fake=fake, device=device, model_name=model_name, iterations=iterations,
        roofline=roofline or Roofline(),
    )  # fmt: skip


@dataclasses.dataclass(slots=True)
class _RngState:
    cpu: torch.Tensor
    cuda: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> _RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


def _build_profile(traced, interp, runs, temps, *, fake, device, model_name, iterations, roofline) -> Profile:
    nodes = interp.nodes
    last = runs[-1]
    for r in runs[:-1]:  # storage accounting must not change between iterations
        if r.node_allocates != last.node_allocates or r.timeline != last.timeline:
            raise RuntimeError("storage accounting differed between profiling iterations")
    if fake:
        times = [
            0.0 if n.op in (PLACEHOLDER, OUTPUT) else roofline.time(last.flops[i], _bytes_moved(n, last, i))
            for i, n in enumerate(nodes)
        ]
    else:
        times = [statistics.median(r.times[i] for r in runs) for i in range(len(nodes))]
    if uses_collectives(interp.gm.graph):  # rule 8: every rank plans with the same, slowest times
        times = max_over_ranks(times)
        temps = max_over_ranks(temps, integer=True)
    storage_of_node = {n.name: last.node_storages[i] for i, n in enumerate(nodes)}
    forward_mutated: set[str] = set()
    records = []
    from acopt.fingerprint import graph_fingerprint, node_facts  # imports this module

    for i, n in enumerate(nodes):
        facts = node_facts(n)  # what the graph alone says; the rewriter re-derives it
        mutates = tuple(dict.fromkeys(s for a in facts.mutated for s in storage_of_node[a.name]))
        if facts.region != Region.OPTIMIZER:
            forward_mutated.update(mutates)
        records.append(
            NodeRecord(
                name=n.name,
                op=facts.op,
                region=facts.region,
                inputs=facts.inputs,
                storages=last.node_storages[i],
                allocates=last.node_allocates[i],
                time_s=times[i],
                random=facts.random,
                mutates=mutates,
                recomputable=facts.recomputable,
                replay=facts.replay,
                temp_bytes=temps[i],
            )
        )
    roles = _placeholder_roles(traced, nodes, last)
    storages = tuple(
        StorageRecord(name=s, bytes=b, node=last.storage_node[s], role=roles.get(s, Role.OTHER))
        for s, b in last.storage_bytes.items()
    )
    meta = ProfileMeta(
        model=model_name,
        batch_size=traced.batch_size,
        device=str(device),
        torch_version=torch.__version__,
        estimated_times=fake,
        time_estimator=roofline.describe() if fake else "",
        iterations=0 if fake else iterations,
        graph_fingerprint=graph_fingerprint(traced.graph_module),
    )
    timeline = tuple(b + t for b, t in zip(last.timeline, temps))
    from acopt.rng import state_bytes

    bare = Profile(
        nodes=tuple(records), storages=storages, timeline=timeline, peak_bytes=max(timeline),
        rng_state_bytes=state_bytes(device), meta=meta,
    )  # fmt: skip
    from acopt.module_names import module_of

    return _with_activations(bare, modules={n.name: module_of(n) for n in nodes})


def _bytes_moved(node: fx.Node, run: _Run, i: int) -> float:
    """Bytes a node reads and writes, for the estimator: its inputs' and outputs'
    storages; none for a view or a ``getitem`` (they run no kernel)."""
    if node.target is operator.getitem or _is_view(node):
        return 0.0
    names = set(run.node_allocates[i])
    for a in node.all_input_nodes:
        names.update(run.node_storages[_index_cache(node.graph)[a]])
    return float(sum(run.storage_bytes[s] for s in names))


def _is_view(node: fx.Node) -> bool:
    """An op whose every result aliases an input without writing it (``view``, ``t``, ``expand``...)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


_INDEX: dict[int, dict[fx.Node, int]] = {}


def _index_cache(graph: fx.Graph) -> dict[fx.Node, int]:
    key = id(graph)
    if key not in _INDEX or len(_INDEX[key]) != len(graph.nodes):
        _INDEX[key] = {n: i for i, n in enumerate(graph.nodes)}
    return _INDEX[key]


def _placeholder_roles(traced: TracedStep, nodes, run: _Run) -> dict[str, Role]:
    roles: dict[str, Role] = {}
    placeholders = [i for i, n in enumerate(nodes) if n.op == PLACEHOLDER]
    for i, spec in zip(placeholders, traced.input_specs):
        for s in run.node_allocates[i]:
            roles[s] = spec.role
    return roles


def _with_activations(profile: Profile, modules: dict[str, str] | None = None) -> Profile:
    """Add roles of computed storages and one ActivationRecord per activation
    (``modules``: node name -> the module path that made it, acopt.module_names)."""
    model = MemoryModel(profile)
    index = profile.node_index
    nodes = profile.nodes
    candidates = set(model.candidates)
    acts = []
    activation_set = set(model.activation_storages)
    for a in model.activation_storages:
        st = profile.storage_by_name[a]
        aliases = model.aliases[a]
        later = [
            index[u] for v in aliases for u in profile.users[v] if nodes[index[u]].region != Region.FORWARD
        ]
        forward_uses = [
            index[u] for v in aliases for u in profile.users[v] if nodes[index[u]].region == Region.FORWARD
        ]
        created = index[st.node]
        last_fw = max(forward_uses, default=created)
        first_bw, last_bw = min(later), max(later)
        try:
            block = model.block(a, frozenset({a}))
            recomp, sources = block.time_s, block.sources
        except InvalidPlan:
            recomp, sources = 0.0, ()
        acts.append(
            ActivationRecord(
                name=a,
                node=st.node,
                bytes=st.bytes,
                creation_rank=created,
                last_fw_use_rank=last_fw,
                first_bw_use_rank=first_bw,
                last_bw_use_rank=last_bw,
                inactive_time_s=sum(n.time_s for n in nodes[last_fw + 1 : first_bw]),
                recomp_time_s=recomp,
                sources=tuple(sources),
                recomputable=a in candidates,
                module=(modules or {}).get(st.node, ""),
            )
        )
    storages = []
    for s in profile.storages:
        role = s.role
        if role == Role.OTHER:
            if s.name in activation_set:
                role = Role.ACTIVATION
            elif nodes[index[s.node]].region == Region.BACKWARD and _read_after_backward(profile, model, s.name):
                role = Role.GRADIENT
        storages.append(dataclasses.replace(s, role=role))
    return dataclasses.replace(profile, storages=tuple(storages), activations=tuple(acts))


def _read_after_backward(profile: Profile, model: MemoryModel, storage: str) -> bool:
    for v in model.aliases[storage]:
        for u in profile.users[v]:
            if profile.node_by_name[u].region == Region.OPTIMIZER:
                return True
    return False
