"""Run a planned (rewritten) step with inductor's compiled kernels.

``acopt.compile(..., backend="inductor")`` compiles the rewritten step without
undoing its plan. The graph is cut, in node order, into *segments*:

* a new segment starts at every boundary between a forward region and a
  backward region (the tracer's regions), so the forward's compiled graph
  returns exactly what the backward reads (the plan's kept set, and nothing
  of a recomputed activation: the rewriter guarantees that) and the recompute
  blocks are compiled inside the backward graph, where no forward value
  exists that common-subexpression elimination could merge them into, and
  from where no scheduler can hoist them into the forward;
* nodes that draw from the eager generator (random ops such as dropout's
  ``bernoulli``, :func:`acopt.rng.save`, :func:`acopt.rng.replay`) do not cut
  the graph: :mod:`acopt.inductor_rng` replaces them in the compiled graph by
  custom operators that inductor calls as fallback kernels, which run the eager
  op on eager PyTorch's generator, chained by a token tensor (a data
  dependency) so they run in the graph's order, marked side-effectful and
  random so no pass removes or merges one, and given eager's strides. Masks are
  therefore eager PyTorch's own, the generator advances as in the eager step,
  and a replay draws the forward's mask exactly (inductor's RNG never runs). A
  random op that cannot be lowered (an argument that does not encode, an
  in-place op on a tensor something else reads) still runs eagerly as its own
  segment, as do all of them with ``segments_of(..., compile_random=False)``;
* with ``cut_blocks``, a recompute block also ends its segment: no compiled
  graph holds nodes of two blocks, nor a block and a node after it. Inside
  one backward graph inductor may fuse kernels across blocks: the replayed
  layer norms of four blocks that read the same input ran as one kernel at
  the first block, their four outputs alive at once; a block's final
  reduction (batch-norm statistics) was fused into a later kernel, keeping
  the block's replayed convolution alive past the block's end. A graph
  boundary at a block's end keeps the block's intermediates from outliving
  it, as in the eager model; but it also forgoes fusing a block into its
  consumers, which often saves more (docs/memory-model.md, "Compiled
  steps"). :func:`fit_compiled` compiles without the cut and compiles the
  plan again with it when the measured peak exceeds the eager model's;
* a new segment also starts where the optimizer's region begins: the
  optimizer step is its own compiled graph. In the backward's graph,
  AOTAutograd refuses it (the backward reads a weight through a view, a
  transpose, that the optimizer updates in place: "non-differentiable view
  input mutations"), and with that worked around (views taken again from the
  weight inside the graph) activation-sized buffers lived longer (inductor
  reused fewer of them in place: test MLP, AdamW, one activation recomputed,
  762 KB measured instead of 630 KB);
* live hyperparameters (Python floats computed from ``param_groups`` at each
  call, and the step count an optimizer reads with ``.item()``) are compiled
  as 0-d float64 tensor inputs, never as constants: :mod:`acopt.inductor_scalars`
  turns the Python arithmetic over them into tensor ops and every aten op
  that received one into its Tensor form, and converts the live floats at
  each call. A use it cannot convert (an op it does not know, a low-precision
  tensor next to the scalar) runs eagerly node by node, with what it reads.
  (Inductor's own float inputs, ``specialize_float=False``, did not survive
  AOTAutograd's ``tensorify_python_scalars`` pass on these graphs.)

Before cutting, :func:`without_shape_only_reads` gives a read of a tensor's
shape alone (``nll_loss_backward``'s log-softmax) a storage-free stand-in, so a
compiled graph does not hold that tensor to its end.

Each compiled segment goes through ``torch._inductor.compile_fx.compile_fx``
with no input requiring grad: AOTAutograd's inference path (functionalization,
input mutations written back) and inductor, with no joint graph, so no
partitioner and no second recomputation decision. Segments are compiled at
the first call with that call's tensors (one compilation per traced variant:
a new shape or a failed guard traces, plans and compiles again). A compiled
segment takes its inputs boxed (a list it empties), so a kept activation is
freed inside the backward graph after its last use, as in the eager step.
Inductor's reordering passes are off (:data:`CONFIG_PATCHES`): they hoisted
recompute blocks.

Under fusion the eager memory model is an upper bound to check, not an
equality (docs/memory-model.md, "Compiled steps"): :func:`fit_compiled` plans
with it, compiles, measures (:func:`measure_graph_peak`) and re-plans.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from acopt import inductor_rng, inductor_scalars, rng
from acopt.errors import UnsupportedStep
from acopt.rewriter import BLOCK_KEY
from acopt.tracer import REGION_KEY, TracedStep, is_random

__all__ = ["Fitted", "InductorStep", "compile_inductor", "fit_compiled", "measure_graph_peak", "segments_of"]


@dataclasses.dataclass(slots=True)
class Segment:
    """Consecutive nodes run as one compiled graph (``compiled``) or one by one."""

    compiled: bool
    nodes: list[fx.Node]
    inputs: list[str] = dataclasses.field(default_factory=list)  # values read from outside, in order
    outputs: list[str] = dataclasses.field(default_factory=list)  # values read after this segment
    frees: list[str] = dataclasses.field(default_factory=list)  # values dead after this segment
    graph_module: fx.GraphModule | None = None
    fn: Callable[[list], Any] | None = None


def _is_eager(node: fx.Node, scalars: set[str], *, compile_random: bool = True) -> bool:
    if any(a.name in scalars for a in node.all_input_nodes):
        return True
    if node.target in (rng.save, rng.replay) or is_random(node):  # eager's generator, in eager's order
        return not (compile_random and inductor_rng.lowerable(node))
    return False


def _scalar_values(gm: fx.GraphModule) -> set[str]:
    """The nodes that read or compute a live hyperparameter (a Python float) in a way
    :mod:`acopt.inductor_scalars` cannot compile: they run eagerly. (The others are
    compiled with the hyperparameters as 0-d tensor inputs, never as constants.)"""
    return inductor_scalars.eager_nodes(gm)


def segments_of(gm: fx.GraphModule, *, compile_random: bool = True, cut_blocks: bool = False) -> list[Segment]:
    """Cut ``gm``'s nodes (placeholders and output aside) into segments, in order.

    ``compile_random=False``: every random op, rng.save and rng.replay is an eager
    segment of its own (the behaviour before :mod:`acopt.inductor_rng`);
    ``cut_blocks``: a recompute block also ends its segment."""
    scalars = _scalar_values(gm)
    segments: list[Segment] = []
    where: dict[str, int] = {}
    phase = block = None
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        if n.name in scalars:  # a hyperparameter use that cannot be compiled: run by the eager interpreter
            eager = True
        elif n.target is operator.getitem and n.args[0].name in where:
            eager = not segments[where[n.args[0].name]].compiled
        else:
            eager = _is_eager(n, scalars, compile_random=compile_random)
        # Forward, backward and optimizer are never compiled together (module docstring).
        region = n.meta.get(REGION_KEY)
        block_ended = cut_blocks and block is not None and n.meta.get(BLOCK_KEY) != block  # no fusion past a block
        if eager or not segments or segments[-1].compiled is eager or phase != region or block_ended:
            if n.target is operator.getitem and segments and where.get(n.args[0].name) == len(segments) - 1:
                pass  # a getitem stays with the tuple it reads
            else:
                segments.append(Segment(compiled=not eager, nodes=[]))
        phase, block = region, n.meta.get(BLOCK_KEY)
        segments[-1].nodes.append(n)
        where[n.name] = len(segments) - 1
    for n in gm.graph.nodes:  # a saved state read by a compiled segment: a host uint8 tensor
        if n.target is rng.save and where.get(n.name) is not None and "val" not in n.meta:
            n.meta["val"] = torch.empty(rng.state_bytes(n.args[0]), dtype=torch.uint8)
    _wire(gm, segments, where)
    for seg in segments:  # the eager-generator draws of a compiled segment: custom operators, chained
        if seg.compiled and seg.graph_module is not None:
            inductor_rng.lower(seg.graph_module)
    return segments


def _wire(gm: fx.GraphModule, segments: list[Segment], where: dict[str, int]) -> None:
    """Each segment's inputs, outputs, and the values that die after it."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    last_use: dict[str, int] = {}
    for i, seg in enumerate(segments):
        seen: set[str] = set()
        for n in seg.nodes:
            for a in n.all_input_nodes:
                last_use[a.name] = i
                if where.get(a.name) != i and a.name not in seen:
                    seen.add(a.name)
                    seg.inputs.append(a.name)
    read_later: set[str] = {a.name for a in output.all_input_nodes}
    for i in range(len(segments) - 1, -1, -1):
        seg = segments[i]
        seg.outputs = [n.name for n in seg.nodes if n.name in read_later]
        read_later |= set(seg.inputs)
    keep = {n.name for n in gm.graph.nodes if n.op == "placeholder"} | {a.name for a in output.all_input_nodes}
    for name, i in last_use.items():
        if name not in keep:
            segments[i].frees.append(name)
    for seg in segments:
        if seg.compiled:
            seg.graph_module = _segment_module(gm, seg)


def _segment_module(gm: fx.GraphModule, seg: Segment) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    for name in seg.inputs:
        ph = graph.placeholder(name)
        ph.meta = dict(by_name[name].meta)
        if not isinstance(ph.meta.get("val"), (torch.Tensor, torch.SymFloat, type(None))):  # floats: tensorify
            raise UnsupportedStep(
                f"backend='inductor': the compiled segment starting at {seg.nodes[0].name!r} reads "
                f"{name!r}, which is not a tensor; run this step with backend='eager'"
            )
        env[name] = ph
    for n in seg.nodes:
        env[n.name] = graph.node_copy(n, lambda a: env[a.name])
    graph.output(tuple(env[name] for name in seg.outputs))
    return inductor_scalars.tensorify(fx.GraphModule(gm, graph))  # floats as 0-d float64 tensors


class _Runner:
    """Runs the segments in order; callable like the rewritten GraphModule."""

    def __init__(
        self, gm: fx.GraphModule, *, compile_segment: Callable[[fx.GraphModule, list], Callable], cut_blocks: bool = False
    ):
        self._gm = gm
        self.segments = segments_of(gm, cut_blocks=cut_blocks)
        self._placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self._output = next(n for n in gm.graph.nodes if n.op == "output")
        self._compile_segment = compile_segment

    def __call__(self, *inputs: Any) -> Any:
        env: dict[str, Any] = dict(zip(self._placeholders, inputs, strict=True))
        for seg in self.segments:
            self.run_segment(seg, env)
        return fx.node.map_arg(self._output.args[0], lambda a: env[a.name])

    def run_segment(self, seg: Segment, env: dict[str, Any]) -> None:
        """Run one segment on ``env`` (values by node name): add its outputs, drop what dies after it."""
        if seg.compiled:
            args = [_detached(env[name]) for name in seg.inputs]
            for name in seg.frees:
                env.pop(name, None)
            if seg.fn is None:
                seg.fn = self._compile_segment(seg.graph_module, args)
            outs = seg.fn(args)  # boxed: empties args, frees inputs after their last use
            env.update(zip(seg.outputs, outs, strict=True))
            del outs
        else:
            for n in seg.nodes:
                args = fx.node.map_arg(n.args, lambda a: env[a.name])
                kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a.name])
                env[n.name] = n.target(*args, **kwargs)
                del args, kwargs
            for name in seg.frees:
                env.pop(name, None)

    def summary(self) -> dict[str, int]:
        compiled = [s for s in self.segments if s.compiled]
        return {
            "compiled_segments": len(compiled),
            "compiled_nodes": sum(len(s.nodes) for s in compiled),
            "eager_nodes": sum(len(s.nodes) for s in self.segments if not s.compiled),
        }


def _detached(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) and v.requires_grad else v


#: Inductor settings for every segment. ``reorder_for_locality`` moves a node next to
#: its first consumer's neighbours: it hoisted recompute blocks (MLP: the
#: replayed matmul ran before the backward matmul that precedes it in the plan,
#: so four activation-sized buffers were alive where the plan has three).
CONFIG_PATCHES: dict[str, Any] = {"reorder_for_locality": False, "reorder_for_peak_memory": False}


def _inductor_segment(gm: fx.GraphModule, example: list, config_patches: dict | None = None) -> Callable[[list], Any]:
    """``compile_fx`` of one segment, called boxed (the list is emptied)."""
    config_patches = {**CONFIG_PATCHES, **(config_patches or {})}
    from torch._dynamo.utils import GmWrapper
    from torch._inductor.compile_fx import compile_fx

    boundary = inductor_scalars.Boundary(gm)  # live floats in and out, as 0-d tensors inside
    example = boundary.convert_inputs(list(example))
    with torch.no_grad():
        compiled = compile_fx(GmWrapper(gm, lambda flat: flat), example, config_patches=config_patches)

    def run(args: list) -> Any:
        with torch.no_grad():
            return boundary.convert_outputs(compiled(boundary.convert_inputs(args)))

    return run


class InductorStep(TracedStep):
    """A rewritten step whose graph runs as compiled segments (:func:`segments_of`)."""

    runner: _Runner

    def _run_graph(self, inputs: list[Any]) -> Any:
        return self.runner(*inputs)


def compile_inductor(step: TracedStep, *, compile_segment: Callable | None = None, cut_blocks: bool = False) -> InductorStep:
    """``step`` (a traced or rewritten step) run by inductor; segments compile at the first call.
    ``cut_blocks``: each recompute block ends its compiled graph (:func:`segments_of`)."""
    if step._b.grad_mode:
        raise UnsupportedStep(
            "backend='inductor' does not run steps whose kernels depend on grad mode "
            "(the mkldnn RNN); use backend='eager'"
        )
    out = InductorStep(graph_module=step.graph_module, binding=step._b, provenance={**step.provenance, "backend": "inductor"})
    gm = without_shape_only_reads(step.graph_module)
    out.runner = _Runner(gm, compile_segment=compile_segment or _inductor_segment, cut_blocks=cut_blocks)
    return out


#: (op, argument index) where the op reads only the argument's shape, dtype and
#: device, never its values: ``nll_loss_backward``'s ``self`` (the log-softmax).
SHAPE_ONLY_ARGUMENTS: dict[Any, int] = {
    torch.ops.aten.nll_loss_backward.default: 1,
    torch.ops.aten.nll_loss2d_backward.default: 1,
}


def without_shape_only_reads(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` in which each :data:`SHAPE_ONLY_ARGUMENTS` argument is a zero
    scalar expanded to its shape (no storage), so the tensor it named is no longer
    held for that read. In a compiled graph that read kept it alive to the graph's
    end (inductor's decomposition never reads it, and frees an input only after a
    read): the logits-sized log-softmax through the whole first backward graph,
    where the eager step frees it after ``_log_softmax_backward_data``. ``gm``
    itself is not changed; if there is no such read it is returned."""
    if not any(n.target in SHAPE_ONLY_ARGUMENTS for n in gm.graph.nodes):
        return gm
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    for n in list(graph.nodes):
        index = SHAPE_ONLY_ARGUMENTS.get(n.target)
        if index is None or not isinstance(n.args[index], fx.Node):
            continue
        val = n.args[index].meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        with graph.inserting_before(n):
            zero = graph.call_function(
                torch.ops.aten.scalar_tensor.default, (0.0,), {"dtype": val.dtype, "device": val.device}
            )
            zero.meta = {**n.meta, "val": val.new_zeros(())}  # the reader's region and block
            shaped = graph.call_function(torch.ops.aten.expand.default, (zero, list(val.shape)))
            shaped.meta = {**n.meta, "val": val.new_zeros(()).expand(val.shape)}
        n.update_arg(index, shaped)
    return fx.GraphModule(gm, graph)


def measure_graph_peak(step: TracedStep, *batch: Any) -> int:
    """Measured peak bytes of one run of ``step``'s graph (compiled or not) on ``batch``,
    leaving the model, optimizer and generator as they were.

    The graph runs on the live tensors (parameters, buffers, optimizer state),
    which are copied before and restored after; no gradient is written back and
    no scheduler steps. The peak is :func:`acopt.measure.measure_peak`'s: what
    was alive (the graph's tensor inputs) plus the allocator's peak during the
    run (CPU: profiler allocation events; CUDA: ``max_memory_allocated``).
    The first run (which compiles) is not measured.
    """
    from acopt.measure import measure_peak

    inputs = step.flat_inputs(*batch)
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    with torch.no_grad():
        saved = [t.detach().clone() for t in tensors]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def once() -> Any:
        with torch.no_grad():
            return step._run_graph(list(inputs))

    try:
        once()
        return measure_peak(once, device=device, alive=lambda: tensors).peak_bytes
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved, strict=True):
                t.copy_(s)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


@dataclasses.dataclass(frozen=True, slots=True)
class Fitted:
    """A compiled plan checked against its budget by measurement."""

    step: InductorStep
    plan: Any  # acopt.planning.Plan (its budget_bytes is the planning budget)
    budget_bytes: int  # the budget asked for
    simulated_peak_bytes: int  # the eager memory model's peak of the plan
    measured_peak_bytes: int  # the compiled step's measured peak
    planning_budget_bytes: int  # the budget the plan was made for
    attempts: int  # plans compiled and measured


def fit_compiled(
    traced: TracedStep, prof: Any, batch: tuple, *, budget: int | str, solver: str, options: dict, attempts: int = 6
) -> Fitted:
    """The compiled plan with the fewest recomputations whose MEASURED peak is within
    ``budget`` (docs/memory-model.md, "Compiled steps"), among at most ``attempts``.

    Plan with the eager memory model for the budget (for the floor, if the budget
    is below the eager floor: fusion may still fit it), compile, measure (a plan
    measuring above the eager model is compiled again with ``cut_blocks``, and
    the lower of the two kept: docs/memory-model.md, "Compiled steps"). Over the
    budget: plan again for the budget minus the excess (a margin), down to the
    floor. Within it by a slack of more than 1%: plan again for that much more
    (fewer recomputations) while the result still fits. If even the floor's plan
    measures over (compiled, more recomputation is not always less memory),
    try plans for budgets spread above the floor, fewest recomputations first.
    Raises :class:`acopt.InfeasibleBudget` when no plan tried fits.
    """
    from acopt.planning import (
        InfeasibleBudget,
        floor,
        no_recompute_peak,
        plan,
        resolve_budget,
    )
    from acopt.rewriter import rewrite
    from acopt.simulator import simulate

    target = resolve_budget(prof, budget)
    lowest = floor(prof)
    peak = no_recompute_peak(prof)
    tried: dict[frozenset, Fitted] = {}

    def attempt(planning: int) -> Fitted:
        chosen = plan(prof, budget=max(planning, lowest), solver=solver, **options)
        key = frozenset(chosen.recompute)
        if key not in tried:
            rewritten = rewrite(traced, chosen, profile=prof)
            step = compile_inductor(rewritten)
            measured = measure_graph_peak(step, *batch)
            sim = simulate(prof, chosen).peak_bytes
            if measured > sim and chosen.recompute:  # fusion across blocks? Cut at each block's end, keep the lower
                cut = compile_inductor(rewritten, cut_blocks=True)
                cut_measured = measure_graph_peak(cut, *batch)
                if cut_measured < measured:
                    step, measured = cut, cut_measured
            tried[key] = Fitted(step, chosen, target, sim, measured, chosen.budget_bytes, len(tried) + 1)
        return tried[key]

    planning = max(target, lowest)
    first = attempt(planning)
    best = first if first.measured_peak_bytes <= target else None
    last = first
    while len(tried) < attempts:
        if best is None:  # over the budget: a margin, down to the floor
            if last.planning_budget_bytes <= lowest:
                break
            excess = last.measured_peak_bytes - target
            nxt = attempt(max(lowest, last.planning_budget_bytes - max(excess, target // 100)))
            if nxt is last:
                break
            last = nxt
            if nxt.measured_peak_bytes <= target:
                best = nxt
                break  # the first plan that fits, coming from above
        else:  # within the budget: spend the slack on fewer recomputations
            slack = target - last.measured_peak_bytes
            if slack <= target // 100 or not last.plan.recompute:
                break
            nxt = attempt(last.planning_budget_bytes + slack)
            if nxt is last or nxt.measured_peak_bytes > target:
                break
            best = last = nxt
    if best is None:  # not monotone: probe above the floor, fewest recomputations first
        for fraction in (0.75, 0.5, 0.25):
            if len(tried) >= attempts:
                break
            probe = attempt(lowest + int(fraction * (peak - lowest)))
            if probe.measured_peak_bytes <= target:
                best = probe
                break
    if best is None:
        least = min(tried.values(), key=lambda f: f.measured_peak_bytes)
        raise InfeasibleBudget(
            f"backend='inductor': the compiled step does not fit {target} bytes: the least measured peak of "
            f"{len(tried)} plans tried is {least.measured_peak_bytes} bytes (planned for "
            f"{least.planning_budget_bytes} bytes; eager floor {lowest} bytes)",
            floor_bytes=lowest,
            budget_bytes=target,
        )
    return dataclasses.replace(best, attempts=len(tried))
