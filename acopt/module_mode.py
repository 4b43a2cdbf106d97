"""Module mode: ``acopt.wrap(model, *example_args, budget=...)`` plans one module's
forward and backward and leaves the rest of the training loop eager.

The model's forward and its backward (``torch.autograd.grad`` of the outputs
with one *grad_output* placeholder per differentiable output) are traced as
one joint graph with the whole-step tracer's machinery (fake tensors, guards,
lifted constants, functional dropout masks). That graph is profiled, planned
and rewritten exactly as a whole step is (:func:`acopt.profile`,
:func:`acopt.plan`, :func:`acopt.rewrite`), then split at the forward/backward
boundary into two graphs run by one ``torch.autograd.Function`` over the real
parameters, buffers and input tensors:

* the forward graph returns the model's outputs and exactly the values the
  rewritten backward reads (the plan's kept activations and the generator
  states of replayed random ops); nothing else outlives it;
* the backward graph receives the grad_outputs autograd hands it (``None``
  for an unused output is a zero, as autograd's own materialisation), runs
  the recompute blocks and returns the gradients of the parameters (and of
  input tensors that require grad); autograd accumulates them into ``.grad``.

An output that got no gradient in a backward (the logits when only ``.loss``
is used) is left out of the next plan for the same inputs; one that gets a
gradient again makes that backward raise and the next call plan with it.

So the optimizer, LR scheduler, gradient accumulation, ``clip_grad_norm_``,
``GradScaler`` (a scaled loss gives scaled grad_outputs), DDP's reducer hooks
and ``no_sync`` are ordinary eager PyTorch around the wrapped module.

Memory (docs/usage.md, "Module mode"): the budget covers the peak of the
joint graph, i.e. the wrapped module's parameters, buffers, inputs,
grad_outputs, activations, temporaries and the gradients it returns, plus
``extra_bytes``: what the rest of the loop keeps alive meanwhile (optimizer
state, gradients held across accumulation), declared or read from the
``optimizer`` argument. It does not cover the loss computed outside the
module, nor the optimizer step's own temporaries.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import time
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.utils import stateless
from torch.utils import _pytree as pytree

from acopt import python_values
from acopt.errors import GuardFailure, UnsupportedStep
from acopt.guards import Guards, tensor_meta
from acopt.planning import Plan
from acopt.records import Profile, Region
from acopt.tracer import (
    GRAD_MODE_OPS,
    REGION_KEY,
    OptimizerSet,
    TracedStep,
    _BatchLayout,
    _Binding,
    _check_attributes,
    _check_not_distributed,
    _check_python_values_unchanged,
    _compiling_flag,
    _drop_noise,
    _dynamo_disabled,
    _explain,
    _functional_bernoulli,
    _graph_len,
    _HostRng,
    _lift_constants,
    _name_placeholders,
    _noop_module_conversions,
    _outplace_forward_mutations,
    _plain_checkpoints,
    _refuse_unfaithful_nodes,
    _snapshot_attributes,
    _tag_regions,
    _unwrap_compiled,
)
from acopt.units import format_bytes, parse_budget, parse_bytes

__all__ = ["ModuleReport", "WrappedModule", "wrap"]

logger = logging.getLogger("acopt")

_KEEP_PER_SIGNATURE = 4


# ---------------------------------------------------------------------------
# tracing the joint graph
# ---------------------------------------------------------------------------
@dataclasses.dataclass(slots=True)
class _Outputs:
    """What the model's forward returned: a pytree whose tensor leaves are graph
    outputs (the rest are constants), and which of them get a grad_output."""

    spec: pytree.TreeSpec
    constants: tuple[Any, ...]  # per leaf: the value, or _TENSOR_LEAF
    differentiable: tuple[int, ...]  # tensor leaves given a grad_output in the joint graph
    meta: tuple[tuple, ...]  # per tensor leaf: shape, dtype, device
    requires_grad: tuple[int, ...] = ()  # tensor leaves that require grad (a superset of differentiable)
    names: tuple[str, ...] = ()  # per tensor leaf: where it sits in the output ("['logits']")

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> Any:
        it = iter(tensors)
        return pytree.tree_unflatten([next(it) if c is _TENSOR_LEAF else c for c in self.constants], self.spec)


_TENSOR_LEAF = object()


def _outputs_of(result: Any, only: frozenset[int] | None = None) -> tuple[_Outputs, list[torch.Tensor]]:
    """The outputs' structure; ``only``: the tensor leaves to give a grad_output
    (default: every one that requires grad)."""
    paths, spec = pytree.tree_flatten_with_path(result)
    constants, tensors, requires_grad, names = [], [], [], []
    for path, leaf in paths:
        if isinstance(leaf, torch.Tensor):
            if leaf.requires_grad and (leaf.is_floating_point() or leaf.is_complex()):
                requires_grad.append(len(tensors))
            constants.append(_TENSOR_LEAF)
            tensors.append(leaf)
            names.append(pytree.keystr(path) or "output")
        elif isinstance(leaf, (int, float, bool, str, type(None))):
            constants.append(leaf)
        else:
            hint = (
                " (a transformers key/value cache: training needs none; set model.config.use_cache = False "
                "or pass use_cache=False)"
                if "Cache" in type(leaf).__name__
                else ""
            )
            raise UnsupportedStep(
                f"the model returned a {type(leaf).__name__} inside its output{hint}; module mode supports "
                "tensors and plain constants in tuples, lists, dicts and ModelOutputs"
            )
    if not tensors:
        raise UnsupportedStep("the model's forward returned no tensor")
    meta = tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
    differentiable = tuple(i for i in requires_grad if only is None or i in only)
    return _Outputs(spec, tuple(constants), differentiable, meta, tuple(requires_grad), tuple(names)), tensors


@contextlib.contextmanager
def _tracing_context(model: torch.nn.Module):
    attributes = _snapshot_attributes(model)
    try:
        with _compiling_flag(), _plain_checkpoints(), _noop_module_conversions(), _dynamo_disabled():
            yield
    except UnsupportedStep:
        raise
    except Exception as e:
        raise _explain(e) from e
    finally:
        _check_attributes(model, attributes)


@contextlib.contextmanager
def _no_autocast():
    """Eager runs the backward outside the user's autocast region."""
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


def _trace_forward_outputs(model, params, buffers, layout, batch_tensors, only) -> _Outputs:
    """Trace the forward alone (fake tensors) to learn the outputs' structure."""
    found: list[_Outputs] = []
    n_p, n_b = len(params), len(buffers)

    def forward(*flat):
        mapping = {n: t for (n, _), t in zip(params, flat[:n_p])}
        mapping.update({n: t for (n, _), t in zip(buffers, flat[n_p : n_p + n_b])})
        args, kwargs = layout.rebuild(flat[n_p + n_b :])
        with stateless._reparametrize_module(model, mapping, tie_weights=True):
            out = model(*args, **kwargs)
        outputs, tensors = _outputs_of(out, only)
        found.append(outputs)
        return tuple(tensors)

    flat = _flat_inputs(params, buffers, batch_tensors)
    with _tracing_context(model):
        make_fx(forward, tracing_mode="fake", _allow_non_fake_inputs=True)(*flat)
    return found[0]


def _flat_inputs(params, buffers, batch_tensors) -> list[torch.Tensor]:
    flat = [p.detach().requires_grad_(p.requires_grad) for _, p in params]
    flat += [b for _, b in buffers]
    flat += [t.detach().requires_grad_(t.requires_grad) for t in batch_tensors]
    return flat


@dataclasses.dataclass(slots=True)
class _Joint:
    gm: fx.GraphModule
    outputs: _Outputs
    grad_inputs: list[int]  # indices into params + batch tensors whose gradient the graph returns
    reassigned: list[int]
    constants: list[tuple[str, torch.Tensor]]


def _trace_joint(model, params, buffers, layout, batch_tensors, outputs: _Outputs) -> _Joint:
    n_p, n_b, n_x = len(params), len(buffers), len(batch_tensors)
    targets = [i for i, (_, p) in enumerate(params) if p.requires_grad]
    targets += [n_p + j for j, t in enumerate(batch_tensors) if t.requires_grad]
    grad_inputs: list[int] = []
    reassigned: list[int] = []
    marks: list[tuple[int, int]] = []

    def joint(*flat):
        f_params = flat[:n_p]
        f_buffers = flat[n_p : n_p + n_b]
        f_batch = flat[n_p + n_b : n_p + n_b + n_x]
        tangents = flat[n_p + n_b + n_x :]
        mapping = {n: t for (n, _), t in zip(params, f_params)}
        mapping.update({n: t for (n, _), t in zip(buffers, f_buffers)})
        args, kwargs = layout.rebuild(f_batch)
        with stateless._reparametrize_module(model, mapping, tie_weights=True):
            out = model(*args, **kwargs)
            for i, (name, _) in enumerate(buffers):
                if _get_buffer(model, name) is not mapping[name]:
                    reassigned.append(i)
            new_buffers = [_get_buffer(model, buffers[i][0]) for i in reassigned]
        now, tensors = _outputs_of(out, frozenset(outputs.differentiable))
        if (now.spec, now.differentiable, now.meta) != (outputs.spec, outputs.differentiable, outputs.meta):
            raise UnsupportedStep("the model's outputs differ between two traces of the same forward")
        diff = [tensors[i] for i in outputs.differentiable]
        wrt = [(list(f_params) + list(f_batch))[i] for i in targets]
        start = _graph_len()
        with _no_autocast():
            grads = torch.autograd.grad(diff, wrt, tangents, allow_unused=True) if wrt else ()
        marks.append((start, _graph_len()))
        kept = []
        for i, g in zip(targets, grads):
            if g is not None:
                grad_inputs.append(i)
                kept.append(g)
        return (*tensors, *kept, *new_buffers)

    flat = _flat_inputs(params, buffers, batch_tensors)
    flat += [torch.empty(outputs.meta[i][0], dtype=outputs.meta[i][1], device=outputs.meta[i][2])
             for i in outputs.differentiable]  # fmt: skip
    with _tracing_context(model):
        gm = make_fx(joint, tracing_mode="fake", _allow_non_fake_inputs=True)(*flat)
    _tag_regions(gm, marks)
    _refuse_unfaithful_nodes(gm)
    _drop_noise(gm)
    _functional_bernoulli(gm)
    _outplace_forward_mutations(gm)
    constants = _lift_constants(gm)
    return _Joint(gm, outputs, grad_inputs, reassigned, constants)


def _get_buffer(model: torch.nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model)._buffers[attr]


def _set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    (model.get_submodule(path) if path else model)._buffers[attr] = value


def trace_module(
    model: torch.nn.Module, args: tuple, kwargs: dict, *, grad_outputs: frozenset[int] | None = None
) -> tuple[TracedStep, _Joint]:
    """The joint forward + backward graph of ``model(*args, **kwargs)`` as a
    :class:`TracedStep` over ``(args, kwargs, grad_outputs)`` (what the profiler,
    planners and rewriter take), and how its outputs map back. ``grad_outputs``:
    the output tensor leaves the backward receives a gradient for (default: all
    that require grad)."""
    start = time.perf_counter()
    model = _unwrap_compiled(model)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_not_distributed(model)
    layout = _BatchLayout.of((args, kwargs))
    batch_tensors = layout.tensors((args, kwargs))
    params = list(model.named_parameters())
    buffers = list(model.named_buffers())
    reads = python_values.record(None, model)  # globals and config values the model's own code reads
    host_rng = _HostRng.capture()  # a forward drawing from Python's or NumPy's generator is refused
    outputs = _trace_forward_outputs(model, params, buffers, layout, batch_tensors, grad_outputs)
    if not outputs.differentiable:
        raise UnsupportedStep(
            "no output of the model requires grad (frozen model, or called for inference): nothing to plan"
        )
    joint = _trace_joint(model, params, buffers, layout, batch_tensors, outputs)
    host_rng.check_unused()
    tangents = tuple(
        torch.empty(outputs.meta[i][0], dtype=outputs.meta[i][1], device=outputs.meta[i][2])
        for i in outputs.differentiable
    )
    full_layout = _BatchLayout.of((args, kwargs, tangents))
    full_batch = full_layout.tensors((args, kwargs, tangents))
    guards = Guards.record(
        model,
        [],
        params=params,
        buffers=buffers,
        reassigned={buffers[i][0] for i in joint.reassigned},
        read_keys=[],
        inputs=[*params, *buffers, *zip(full_layout.names, full_batch), *((f"constant {n}", t) for n, t in joint.constants)],
    )
    _check_python_values_unchanged(reads)
    guards.python_values = reads
    gm = joint.gm
    n_out = len(outputs.meta)
    step = TracedStep(
        graph_module=gm,
        binding=_Binding(
            model=model,
            optimizers=OptimizerSet(pytree.tree_flatten([])[1], ()),
            params=params,
            buffers=buffers,
            state_slots=[],
            batch_meta=[tensor_meta(t) for t in full_batch],
            batch=full_layout,
            out_spec=pytree.tree_flatten(tuple(range(n_out)))[1],
            n_out=n_out,
            constants=joint.constants,
            hyper_inputs=[],
            read_hypers=lambda groups: [],
            grad_params=[i for i in joint.grad_inputs if i < len(params)],
            reassigned_buffers=joint.reassigned,
            after_step=[],
            guards=guards,
            grad_mode=any(str(n.target) in GRAD_MODE_OPS for n in gm.graph.nodes),
        ),
        provenance={
            "stage": "trace",
            "mode": "module",
            "torch": torch.__version__,
            "nodes": len(gm.graph.nodes),
            "trace_time_s": time.perf_counter() - start,
        },
    )
    _name_placeholders(gm, step.input_specs)
    return step, joint


# ---------------------------------------------------------------------------
# splitting a rewritten joint graph at the forward/backward boundary
# ---------------------------------------------------------------------------
@dataclasses.dataclass(slots=True)
class SplitGraphs:
    """The two halves of a rewritten joint graph.

    ``forward(list)`` takes the non-grad_output placeholders in order and
    returns ``(*model outputs, *reassigned buffers, *saved)``; ``backward(list)``
    takes ``(*saved, *its placeholders)`` and returns the gradients. Both use
    fx's boxed calling convention, so every input is freed at its last use.
    """

    forward: fx.GraphModule
    backward: fx.GraphModule
    saved: list[str]  # forward node names the backward reads (the kept set)
    forward_inputs: list[int]  # placeholder indices the forward takes
    backward_inputs: list[int]  # placeholder indices the backward takes after the saved values
    # per gradient: which grad_outputs (0-based, in order) it depends on; a gradient whose
    # grad_outputs are all None (unused outputs) is None, as eager leaves it
    grad_sources: list[frozenset[int]]


def split_joint(gm: fx.GraphModule, *, n_outputs: int, n_grads: int, tangent_placeholders: set[int]) -> SplitGraphs:
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = nodes[-1]
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    forward = [n for n in body if n.meta.get(REGION_KEY) == Region.FORWARD]
    backward_set = {n for n in body if n.meta.get(REGION_KEY) != Region.FORWARD}
    if forward and backward_set:
        index = {n: i for i, n in enumerate(nodes)}
        last_fw = max(index[n] for n in forward)
        first_bw = min(index[n] for n in backward_set)
        if last_fw > first_bw:
            raise RuntimeError("acopt internal error: a forward node runs after the backward started")
    results = list(output.args[0])
    outs, grads, new_buffers = results[:n_outputs], results[n_outputs : n_outputs + n_grads], results[n_outputs + n_grads :]
    for v in (*outs, *new_buffers):
        if isinstance(v, fx.Node) and v in backward_set:
            raise RuntimeError("acopt internal error: a model output is computed in the backward")
    tangents = {placeholders[i] for i in tangent_placeholders}
    saved: list[fx.Node] = []
    for n in forward:
        if any(u in backward_set for u in n.users) or n in grads:
            saved.append(n)
    for n in forward:
        for a in n.all_input_nodes:
            if a in tangents:
                raise RuntimeError("acopt internal error: the forward reads a grad_output")

    fw_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    forward_inputs = []
    for i, p in enumerate(placeholders):
        if p in tangents:
            continue
        forward_inputs.append(i)
        env[p] = fw_graph.node_copy(p, env.__getitem__)
    for n in forward:
        env[n] = fw_graph.node_copy(n, env.__getitem__)
    fw_graph.output(tuple(env[v] if isinstance(v, fx.Node) else v for v in (*outs, *new_buffers, *saved)))
    fw_graph.set_codegen(fx.graph._BoxedCodeGen())
    fw_graph.lint()

    bw_graph = fx.Graph()
    env = {}
    for n in saved:
        env[n] = bw_graph.placeholder(n.name)
        env[n].meta = dict(n.meta)
    used = {a for n in backward_set for a in n.all_input_nodes} | {g for g in grads if isinstance(g, fx.Node)}
    backward_inputs = []
    for i, p in enumerate(placeholders):
        if p in used:
            backward_inputs.append(i)
            env[p] = bw_graph.node_copy(p, env.__getitem__)
    for n in nodes:
        if n in backward_set:
            env[n] = bw_graph.node_copy(n, env.__getitem__)
    bw_graph.output(tuple(env[g] if isinstance(g, fx.Node) else g for g in grads))
    bw_graph.set_codegen(fx.graph._BoxedCodeGen())
    bw_graph.lint()
    order = sorted(tangent_placeholders)
    sources: dict[fx.Node, frozenset[int]] = {placeholders[i]: frozenset({k}) for k, i in enumerate(order)}
    for n in nodes:
        if n not in sources:
            sources[n] = frozenset().union(*(sources.get(a, frozenset()) for a in n.all_input_nodes))
    return SplitGraphs(
        forward=fx.GraphModule(gm, fw_graph, class_name="AcoptForward"),
        backward=fx.GraphModule(gm, bw_graph, class_name="AcoptBackward"),
        saved=[n.name for n in saved],
        forward_inputs=forward_inputs,
        backward_inputs=backward_inputs,
        grad_sources=[sources.get(g, frozenset()) if isinstance(g, fx.Node) else frozenset() for g in grads],
    )


# ---------------------------------------------------------------------------
# one planned variant and the autograd.Function that runs it
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModuleReport:
    """What wrapping one input signature did, and what it predicts. Peaks are
    of the wrapped module's forward + backward (the joint graph);
    ``extra_bytes`` is what the loop keeps alive besides (counted in the budget)."""

    input_shapes: tuple[tuple[int, ...], ...]
    peak_before_bytes: int
    peak_after_bytes: int
    floor_bytes: int
    budget_bytes: int
    extra_bytes: int
    step_time_s: float
    recompute_time_s: float
    recomputed: int
    activations: int
    saved_values: int
    solver: str
    status: str
    compile_time_s: float
    plan_source: str  # "planned", "plan argument", "cache"

    @property
    def overhead(self) -> float:
        """Predicted forward+backward time overhead of recomputation."""
        return self.recompute_time_s / self.step_time_s if self.step_time_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "overhead": self.overhead}

    def __str__(self) -> str:
        return (
            f"acopt (module): forward+backward peak {format_bytes(self.peak_before_bytes)} -> "
            f"{format_bytes(self.peak_after_bytes)} (floor {format_bytes(self.floor_bytes)}), plus "
            f"{format_bytes(self.extra_bytes)} kept by the loop = {format_bytes(self.peak_after_bytes + self.extra_bytes)} "
            f"(budget {format_bytes(self.budget_bytes + self.extra_bytes)}); recomputing "
            f"{self.recomputed}/{self.activations} activations, predicted overhead {self.overhead:.1%} "
            f"({self.recompute_time_s * 1e3:.2f} ms of {self.step_time_s * 1e3:.2f} ms), solver {self.solver} "
            f"({self.status}, {self.plan_source}), compiled in {self.compile_time_s:.1f} s"
        )


@dataclasses.dataclass(slots=True, kw_only=True)
class _Variant:
    """One traced, planned and split forward + backward."""

    traced: TracedStep  # the joint graph as traced
    step: TracedStep  # the rewritten joint graph
    profile: Profile
    plan: Plan
    graphs: SplitGraphs
    outputs: _Outputs
    layout: _BatchLayout  # (args, kwargs)
    guards: Guards  # without the grad_outputs' entries
    params: list[tuple[str, torch.nn.Parameter]]
    buffers: list[tuple[str, torch.Tensor]]
    constants: list[tuple[str, torch.Tensor]]
    grad_inputs: list[int]  # into params + batch tensors
    reassigned: list[int]
    report: ModuleReport
    on_backward: Any = None  # called with the output leaves that got a gradient

    def inputs(self, args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(params + buffers + batch tensors + constants, batch tensors), after every guard passed."""
        batch = self.layout.tensors((args, kwargs))
        self.guards.check_program([])
        model = self.traced.model
        tensors = [  # buffers read from their modules: a reassigned one is the new value
            *(p for _, p in self.params),
            *(_get_buffer(model, n) for n, _ in self.buffers),
            *batch,
            *(t for _, t in self.constants),
        ]
        self.guards.check_inputs(tensors)
        return tensors, batch


class _RunVariant(torch.autograd.Function):
    """Forward: the forward graph, keeping what the backward reads. Backward: the
    backward graph with the planned recomputation; gradients to autograd."""

    @staticmethod
    def forward(ctx, variant: _Variant, *inputs):
        g = variant.graphs
        placeholders = _placeholder_values(list(inputs), variant)
        with _no_autocast():
            results = list(g.forward([placeholders[i] for i in g.forward_inputs]))
        n_out, n_buf = len(variant.outputs.meta), len(variant.reassigned)
        outs = results[:n_out]
        new_buffers = results[n_out : n_out + n_buf]
        saved = results[n_out + n_buf :]
        del results
        for i, value in zip(variant.reassigned, new_buffers):
            _set_buffer(variant.traced.model, variant.buffers[i][0], value)
        # Saved values that share storage with an output go through save_for_backward
        # (a reference cycle otherwise); the rest sit on ctx and die at their last use.
        out_storages = {t.untyped_storage()._cdata for t in outs}
        on_ctx, via_autograd, where = [], [], []
        for t in saved:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata in out_storages:
                where.append((True, len(via_autograd)))
                via_autograd.append(t)
            else:
                where.append((False, len(on_ctx)))
                on_ctx.append(t)
        del saved
        ctx.save_for_backward(*via_autograd)
        ctx.acopt_saved = on_ctx
        ctx.acopt_where = where
        ctx.acopt_variant = variant
        # the backward's other inputs (None where a grad_output goes)
        ctx.acopt_inputs = [placeholders[i] for i in g.backward_inputs]
        ctx.acopt_versions = [  # views of parameters share their version counter
            (t, t._version) for t in (*ctx.acopt_inputs, *on_ctx) if isinstance(t, torch.Tensor)
        ]
        non_diff = [t for i, t in enumerate(outs) if i not in variant.outputs.requires_grad]
        ctx.mark_non_differentiable(*non_diff)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (see backward)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        variant: _Variant = ctx.acopt_variant
        if ctx.acopt_saved is None:
            raise RuntimeError(
                "acopt module mode: backward through the same forward twice (retain_graph=True) is not "
                "supported; run the forward again"
            )
        _check_versions(ctx.acopt_versions)
        ctx.acopt_versions = None
        g = variant.graphs
        via_autograd = ctx.saved_tensors
        args = [ctx.acopt_saved[i] if not auto else via_autograd[i] for auto, i in ctx.acopt_where]
        ctx.acopt_saved = None
        del via_autograd
        used = frozenset(i for i in variant.outputs.requires_grad if grad_outputs[i] is not None)
        if variant.on_backward is not None:
            variant.on_backward(used)
        unplanned = sorted(used - set(variant.outputs.differentiable))
        if unplanned:
            names = ", ".join(variant.outputs.names[i] for i in unplanned)
            raise RuntimeError(
                f"acopt module mode: output(s) {names} got a gradient, but this call ran the plan made "
                "when earlier backward passes gave them none (their grad_outputs were left out to save "
                "memory). The next call plans with them; to keep them always, pass "
                "acopt.wrap(..., learn_unused_outputs=False)"
            )
        given = {k for k, i in enumerate(variant.outputs.differentiable) if grad_outputs[i] is not None}
        tangents = iter(_tangents(variant, grad_outputs))
        start = _tangent_start(variant)
        n_t = len(variant.outputs.differentiable)
        for i, value in zip(g.backward_inputs, ctx.acopt_inputs):
            args.append(next(tangents) if start <= i < start + n_t else value)
        ctx.acopt_inputs = None
        del tangents
        with _no_autocast():
            grads = list(g.backward(args))
        n_p, n_b = len(variant.params), len(variant.buffers)
        n_x = len(variant.layout.names)
        result: list[torch.Tensor | None] = [None] * (n_p + n_b + n_x + len(variant.constants))
        for i, gr, src in zip(variant.grad_inputs, grads, g.grad_sources):  # i: params + batch tensors
            if src & given:  # else only unused outputs reach it: eager gives it no gradient
                result[i if i < n_p else i + n_b] = gr
        return (None, *result)


def _check_versions(pairs: list[tuple[torch.Tensor, int]]) -> None:
    if any(t._version != v for t, v in pairs):
        raise RuntimeError(
            "acopt module mode: a parameter, buffer or input the backward reads was modified in "
            "place between forward and backward (eager autograd refuses this too)"
        )


def _tangents(variant: _Variant, grad_outputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """The grad_outputs the backward graph was traced with, from autograd's."""
    out = []
    for i in variant.outputs.differentiable:
        go = grad_outputs[i]
        shape, dtype, device = variant.outputs.meta[i]
        if go is None:  # an unused output: zero, as autograd materialises it
            go = torch.zeros(shape, dtype=dtype, device=device)
        elif go.dtype != dtype or tuple(go.shape) != shape:
            raise RuntimeError(
                f"acopt module mode: the gradient of output {i} has shape {tuple(go.shape)} and dtype "
                f"{go.dtype}; traced with {shape} and {dtype}"
            )
        elif not go.is_contiguous():
            go = go.contiguous()  # traced with contiguous grad_outputs; same values
        out.append(go)
    return out


def _tangent_start(variant: _Variant) -> int:
    """Placeholder index of the first grad_output: after params, buffers and batch tensors."""
    return len(variant.params) + len(variant.buffers) + len(variant.layout.names)


def _placeholder_values(inputs: list[torch.Tensor], variant: _Variant) -> list[Any]:
    """The joint graph's placeholders in order: params, buffers, batch tensors,
    grad_outputs (not known in the forward: None), constants."""
    start = _tangent_start(variant)
    return [*inputs[:start], *([None] * len(variant.outputs.differentiable)), *inputs[start:]]


# ---------------------------------------------------------------------------
# the wrapped module
# ---------------------------------------------------------------------------
def _signature(args: tuple, kwargs: dict) -> tuple:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return (str(spec),) + tuple(
        (tuple(t.shape), t.dtype, str(t.device), t.stride(), t.requires_grad) if isinstance(t, torch.Tensor) else repr(t)
        for t in leaves
    )


class WrappedModule(torch.nn.Module):
    """``model`` whose training forward and backward run a memory plan.

    Calls with grad mode on run the planned forward (one
    ``torch.autograd.Function``); calls under ``torch.no_grad()`` or
    ``torch.inference_mode()``, and calls where nothing requires grad, run
    ``model`` itself, eagerly. ``state_dict``/``load_state_dict`` are the
    model's (no prefix); other attributes (``config``...) are read from it.
    """

    def __init__(self, model: torch.nn.Module, *, budget, solver: str, options: dict[str, Any], extra_bytes: int,
                 plan: Plan | str | Path | None, cache_dir: str | Path | None, warmup: int, iterations: int,
                 learn_unused_outputs: bool = True):  # fmt: skip
        super().__init__()
        self.module = model
        self.budget = budget
        self.solver = solver
        self.options = dict(options)
        self.extra_bytes = extra_bytes
        object.__setattr__(self, "_plan_arg", plan)
        object.__setattr__(self, "_cache_dir", cache_dir)
        object.__setattr__(self, "_warmup", warmup)
        object.__setattr__(self, "_iterations", iterations)
        object.__setattr__(self, "_variants", {})
        object.__setattr__(self, "_last", None)
        object.__setattr__(self, "_warned", set())
        # per input signature: the output leaves that got a gradient in the last backward
        object.__setattr__(self, "_used", {})
        object.__setattr__(self, "_learn", learn_unused_outputs and plan is None)

    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)

    def __deepcopy__(self, memo):
        """A copy wraps a copy of the model; its variants are planned again when
        first called (theirs would be bound to the original's tensors)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        fresh = {"_variants": {}, "_last": None, "_warned": set(), "_used": {}}
        for key, value in vars(self).items():
            new.__dict__[key] = fresh[key] if key in fresh else copy.deepcopy(value, memo)
        return new

    # ---- nn.Module plumbing ------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.module.load_state_dict(*args, **kwargs)

    # ---- running -----------------------------------------------------------
    def _forward(self, *args, **kwargs):
        model = self.module
        if getattr(self, "_is_replica", False):
            raise UnsupportedStep(
                "acopt.wrap under nn.DataParallel is not supported (its replicas would share the "
                "original's plans); use DistributedDataParallel, one process per device"
            )
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled() or not _needs_grad(model, args, kwargs):
            return model(*args, **kwargs)
        failure = None
        signature = _signature(args, kwargs)
        wanted = self._used.get(signature)  # None: every output that requires grad
        for variant in reversed(self._variants.get(signature, [])):
            planned = variant.outputs.differentiable
            if planned != (variant.outputs.requires_grad if wanted is None else tuple(sorted(wanted))):
                continue
            try:
                inputs, _ = variant.inputs(args, kwargs)
            except GuardFailure as e:
                failure = e
                continue
            object.__setattr__(self, "_last", variant)
            return _apply(variant, inputs)
        if failure is not None:
            reason = str(failure)
            if reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(f"acopt: tracing and planning the module again: {reason}", stacklevel=3)
        variant = self._compile(args, kwargs, grad_outputs=wanted)
        object.__setattr__(self, "_last", variant)
        inputs, _ = variant.inputs(args, kwargs)
        return _apply(variant, inputs)

    def compile_for(self, *args, **kwargs) -> WrappedModule:
        """Trace and plan for these inputs now (without running anything)."""
        if not self._variants.get(_signature(args, kwargs)):
            object.__setattr__(self, "_last", self._compile(args, kwargs))
        return self

    def _learner(self, signature: tuple, outputs: _Outputs):
        """What a variant's backward reports: which outputs got a gradient. Outputs
        that got none are left out of the next plan for these inputs (their zero
        grad_outputs cost memory); one that gets a gradient again is put back."""
        if not self._learn:
            return None
        ref = weakref.ref(self)

        def learn(used: frozenset[int]) -> None:
            wrapped = ref()
            if wrapped is None or not used:
                return
            full = frozenset(outputs.requires_grad)
            known = wrapped._used.get(signature)
            if known is None:
                if used == full:
                    return
                now = used
            elif used <= known:
                return
            else:
                now = known | used
            if now == full:
                wrapped._used.pop(signature, None)
                return
            logger.info(
                "acopt: planning %s without grad_outputs for %s (no gradient reached them)",
                type(wrapped.module).__name__,
                ", ".join(outputs.names[i] for i in sorted(full - now)),
            )
            wrapped._used[signature] = now

        return learn

    def _compile(self, args: tuple, kwargs: dict, grad_outputs: frozenset[int] | None = None) -> _Variant:
        from acopt.plan_cache import obtain_plan
        from acopt.planning import floor
        from acopt.rewriter import rewrite
        from acopt.simulator import simulate

        start = time.perf_counter()
        with torch.enable_grad():
            traced, joint = trace_module(self.module, args, kwargs, grad_outputs=grad_outputs)
            tangents = tuple(
                torch.ones(joint.outputs.meta[i][0], dtype=joint.outputs.meta[i][1], device=joint.outputs.meta[i][2])
                for i in joint.outputs.differentiable
            )
            budget = self.budget
            if budget is not None and parse_budget(budget).of == "bytes":  # shares are of the module's own peak
                budget = parse_budget(budget).bytes - self.extra_bytes
                if budget <= 0:
                    raise ValueError(
                        f"the budget ({format_bytes(parse_budget(self.budget).bytes)}) does not exceed what the "
                        f"loop keeps alive besides the module (extra_bytes = {format_bytes(self.extra_bytes)})"
                    )
            prof, chosen, source = obtain_plan(
                traced, (args, kwargs, tangents), budget=budget, solver=self.solver, options=self.options,
                plan=self._plan_arg, cache_dir=self._cache_dir, warmup=self._warmup, iterations=self._iterations,
                strict=not self._variants,
            )  # fmt: skip
            step = rewrite(traced, chosen, profile=prof)
            sim = simulate(prof, chosen.recompute)
        layout = _BatchLayout.of((args, kwargs))
        n_p, n_b, n_x = len(traced._b.params), len(traced._b.buffers), len(layout.names)
        n_t = len(joint.outputs.differentiable)
        tangent_ph = set(range(n_p + n_b + n_x, n_p + n_b + n_x + n_t))
        grads_total = len(joint.grad_inputs)
        graphs = split_joint(
            step.graph_module, n_outputs=len(joint.outputs.meta), n_grads=grads_total, tangent_placeholders=tangent_ph
        )
        g = traced.guards
        keep = [i for i in range(len(g.input_names)) if not (n_p + n_b + n_x <= i < n_p + n_b + n_x + n_t)]
        guards = dataclasses.replace(
            g, input_meta=[g.input_meta[i] for i in keep], input_names=[g.input_names[i] for i in keep]
        )
        report = ModuleReport(
            input_shapes=tuple(tuple(t.shape) for t in layout.tensors((args, kwargs))),
            peak_before_bytes=prof.peak_bytes,
            peak_after_bytes=sim.peak_bytes,
            floor_bytes=floor(prof),
            budget_bytes=chosen.budget_bytes,
            extra_bytes=self.extra_bytes,
            step_time_s=prof.total_time_s,
            recompute_time_s=sim.recompute_time_s,
            recomputed=len(chosen.recompute),
            activations=len(prof.activations),
            saved_values=len(graphs.saved),
            solver=chosen.solver,
            status=chosen.status.value,
            compile_time_s=time.perf_counter() - start,
            plan_source=source,
        )
        variant = _Variant(
            traced=traced, step=step, profile=prof, plan=chosen, graphs=graphs, outputs=joint.outputs,
            layout=layout, guards=guards, params=traced._b.params, buffers=traced._b.buffers,
            constants=joint.constants, grad_inputs=joint.grad_inputs, reassigned=joint.reassigned, report=report,
        )  # fmt: skip
        variant.on_backward = self._learner(_signature(args, kwargs), joint.outputs)
        entries = self._variants.setdefault(_signature(args, kwargs), [])
        entries.append(variant)
        del entries[:-_KEEP_PER_SIGNATURE]
        return variant

    # ---- what it did -------------------------------------------------------
    def _current(self) -> _Variant:
        if self._last is None:
            raise RuntimeError("nothing planned yet: call the wrapped module once (or compile_for)")
        return self._last

    def report(self) -> ModuleReport:
        return self._current().report

    @property
    def plan(self) -> Plan:
        return self._current().plan

    @property
    def profile(self) -> Profile:
        return self._current().profile

    @property
    def traced(self) -> TracedStep:
        """The rewritten joint graph (its ``print_readable()`` shows the blocks)."""
        return self._current().step

    @property
    def graphs(self) -> SplitGraphs:
        return self._current().graphs


@functools.cache
def _wrapper_class(model_cls: type) -> type[WrappedModule]:
    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)

    try:
        forward.__signature__ = inspect.signature(model_cls.forward)
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        pass
    forward.__doc__ = getattr(model_cls.forward, "__doc__", None)
    return type(f"Wrapped{model_cls.__name__}", (WrappedModule,), {"forward": forward, "__module__": __name__})


def _needs_grad(model: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    if any(p.requires_grad for p in model.parameters()):
        return True
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in pytree.tree_leaves((args, kwargs)))


def _apply(variant: _Variant, inputs: list[torch.Tensor]) -> Any:
    # a parameter the traced forward never reached (an unused branch) is not connected
    # to the autograd graph, as in eager (DDP's find_unused_parameters sees it so)
    graded, n_p = set(variant.grad_inputs), len(variant.params)
    inputs = [t.detach() if i < n_p and i not in graded and t.requires_grad else t for i, t in enumerate(inputs)]
    outs = _RunVariant.apply(variant, *inputs)
    return variant.outputs.rebuild(list(outs))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of ``optimizer``'s state once every parameter it owns that requires
    grad has state: existing state is measured, missing state is created on a
    copy as the optimizer's own first step would (nothing live is changed)."""
    from acopt.tracer import _first_state

    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state and p.requires_grad:
                if isinstance(optimizer, torch.optim.SGD):
                    state = {"momentum_buffer": p} if group.get("momentum") else {}
                else:
                    state = _first_state(optimizer, group, p, torch.zeros_like(p))
            total += sum(v.untyped_storage().nbytes() for v in (state or {}).values() if isinstance(v, torch.Tensor))
    return total


def wrap(
    model: torch.nn.Module,
    *example_args: Any,
    budget: float | str | None = None,
    solver: str = "greedy",
    plan: Plan | str | Path | None = None,
    extra_bytes: int | str = 0,
    optimizer: torch.optim.Optimizer | None = None,
    cache_dir: str | Path | None = None,
    warmup: int = 1,
    iterations: int = 3,
    options: dict[str, Any] | None = None,
    learn_unused_outputs: bool = True,
    **example_kwargs: Any,
) -> WrappedModule:
    """``model`` with its forward + backward planned for ``budget``.

    ``example_args``/``example_kwargs`` are one training call's inputs (a batch
    of the shape to plan for; other shapes are planned when first seen).
    ``budget`` is bytes or a size (``"6GiB"``) for the module's forward +
    backward peak plus what the loop keeps alive besides: ``extra_bytes``,
    plus, given ``optimizer``, its state and the gradients of its parameters.
    ``"70%"`` (or ``0.7``) is of the module's own no-recompute peak and
    ``"floor+50%"`` of the way from its floor to that peak (extra not scaled).
    ``plan`` reuses a plan (its graph fingerprint must match:
    :class:`acopt.ArtifactMismatch` otherwise); ``cache_dir`` (default
    ``$ACOPT_CACHE_DIR``) keeps plans and profiles keyed by the graph, budget
    and solver. ``options`` go to the planner. ``learn_unused_outputs``: an
    output whose gradient is None in a backward (the logits when only
    ``.loss`` is used) is left out of the next plan for the same inputs (its
    zero grad_output would cost its size); if it gets a gradient later, that
    backward raises and the next call plans with it again.
    """
    if budget is None and plan is None:
        raise TypeError("acopt.wrap needs a budget (or a plan to reuse)")
    if budget is not None:
        parse_budget(budget)  # a malformed budget fails here, before any tracing
    if not model.training:
        warnings.warn(
            "acopt.wrap: the model is in eval mode, so the plan is for eval-mode calls; call model.train() "
            "before wrapping (a transformers from_pretrained model starts in eval mode), or the first "
            "training call is traced and planned again",
            stacklevel=2,
        )
    extra = parse_bytes(extra_bytes)
    if optimizer is not None:
        inner = unwrap_optimizer(optimizer)
        extra += optimizer_state_bytes(inner)
        extra += sum(p.untyped_storage().nbytes() for g in inner.param_groups for p in g["params"] if p.requires_grad)
    # a subclass per model class, whose forward shows the model's signature (Trainer reads it)
    cls = _wrapper_class(type(_unwrap_compiled(model)))
    wrapped = cls(
        model, budget=budget, solver=solver, options=options or {}, extra_bytes=extra, plan=plan,
        cache_dir=cache_dir, warmup=warmup, iterations=iterations, learn_unused_outputs=learn_unused_outputs,
    )  # fmt: skip
    return wrapped.compile_for(*example_args, **example_kwargs)


def unwrap_optimizer(optimizer: Any) -> Any:
    from acopt.tracer import unwrap_optimizer as _unwrap

    return _unwrap(optimizer)
