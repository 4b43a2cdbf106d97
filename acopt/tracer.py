"""Trace one whole training step (forward, backward, optimizer) into one fx graph.

``acopt.trace(train_step, model, optimizer, *batch)`` runs the user's eager
``train_step`` under ``make_fx`` with fake tensors. Parameters, buffers,
optimizer state, the batch's tensors, the graph's tensor constants and the
floats of the optimizers' param groups become the graph's placeholders; the
graph returns what ``train_step`` returned, the gradients left on the
parameters after the step, and the buffers the step reassigns. The
forward/backward boundary is found without any marker from the user:
``torch.autograd.backward`` is wrapped while tracing, and the graph's length
when each call starts and ends splits the nodes into regions (several calls:
micro-batches of gradient accumulation).

What the graph assumed about the live program is either a graph input (read
at every call) or a guard (checked at every call, :mod:`acopt.guards`);
never a silent constant. Notes on faithfulness (docs/usage.md, "What acopt
traces"):

* Optimizer state is created before tracing by the optimizer's own first
  step on a copy (:func:`_init_optimizer_state`), so the graph is the
  steady-state step. Optimizers run their eager form, step-count reads
  included (:mod:`acopt.optimizer_form`); the capturable form only where the
  eager form cannot be traced faithfully (RAdam, ASGD, Rprop).
* Hyperparameters (``lr``, ``betas``, ...) are live inputs
  (:mod:`acopt.hyperparams`): the step is traced twice with different
  sentinel values, and a step whose graphs hold different literals is refused.
* User ``torch.utils.checkpoint`` regions are traced as plain code: acopt's
  own plan decides what to recompute, and their random ops run once, in the
  forward, drawing what eager draws.
* ``scheduler.step()`` inside the step runs on the host after the graph;
  ``GradScaler`` is traced as graph ops (the skipped step is a select).
* A step starts from no gradients (``train_step`` must call ``zero_grad``);
  gradient accumulation across calls is refused, not silently changed.
* Distributed: a ``DistributedDataParallel`` model is traced with DDP's
  bucketed gradient all-reduce in the graph (:mod:`acopt.data_parallel`),
  ``dist.*`` collectives as functional ones, and each wait as an alias that
  holds the collective's inputs (:mod:`acopt.collectives`).
"""

from __future__ import annotations

import contextlib
import copy as _copy
import dataclasses
import operator
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import (
    disable_proxy_modes_tracing,
    get_proxy_mode,
    make_fx,
)
from torch.nn.utils import stateless
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils import _pytree as pytree

from acopt import module_names, python_values
from acopt.collectives import hold_until_wait, is_collective
from acopt.errors import GuardFailure, UnsupportedStep
from acopt.guards import Guards, tensor_meta
from acopt.hyperparams import Book, InputKey, literal_values
from acopt.optimizer_form import NeedsCapturable, eager_form
from acopt.records import Region, Role

__all__ = ["GuardFailure", "TracedStep", "UnsupportedStep", "trace"]

REGION_KEY = "acopt_region"

#: Kernels whose outputs depend on grad mode: a step holding one runs with grad
#: mode on, as traced (the RNN kernels return their workspace only then).
GRAD_MODE_OPS = frozenset(
    {"aten.mkldnn_rnn_layer.default", "aten._cudnn_rnn.default", "aten.miopen_rnn.default"}
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class InputSpec:
    """What one graph placeholder is bound to at each call."""

    role: Role
    # parameter/buffer name, "param_name/state_key", "batch[i]", "constant[name]",
    # or "param_groups[g]['key']" for a hyperparameter
    key: str


@dataclasses.dataclass(frozen=True, slots=True)
class _StateSlot:
    optimizer: int
    param_index: int
    key: str


_CONSTANT_LEAVES = (int, float, bool, str, type(None), torch.dtype, torch.device)


@dataclasses.dataclass(frozen=True, slots=True)
class _BatchLayout:
    """The batch as users pass it: any nest of tuples, lists and dicts (a
    transformers batch ``{"input_ids": ..., "labels": ...}``). Tensor leaves are
    graph inputs; other leaves (ints, strings, None) were constants of the trace
    and are guarded by equality."""

    spec: pytree.TreeSpec
    constants: tuple[Any, ...]  # per leaf: the traced constant, or _TENSOR
    names: tuple[str, ...]  # per tensor leaf: "batch[0]['input_ids']"

    @classmethod
    def of(cls, batch: tuple) -> _BatchLayout:
        paths, spec = pytree.tree_flatten_with_path(batch)
        constants, names = [], []
        for path, leaf in paths:
            where = "batch" + pytree.keystr(path)
            if isinstance(leaf, torch.Tensor):
                constants.append(_TENSOR)
                names.append(where)
            elif isinstance(leaf, _CONSTANT_LEAVES):
                constants.append(leaf)
            else:
                raise UnsupportedStep(
                    f"{where} is a {type(leaf).__name__}; a batch holds tensors and plain constants "
                    "(int, float, bool, str, None) in tuples, lists and dicts"
                )
        return cls(spec, tuple(constants), tuple(names))

    def tensors(self, batch: tuple) -> list[torch.Tensor]:
        """The tensor leaves of ``batch``, after checking its structure and constants."""
        leaves, spec = pytree.tree_flatten(batch)
        if spec != self.spec:
            raise GuardFailure(f"the batch's structure changed since tracing ({spec} vs {self.spec}); trace again")
        out = []
        for leaf, const in zip(leaves, self.constants, strict=True):
            if const is _TENSOR:
                if not isinstance(leaf, torch.Tensor):
                    raise GuardFailure(f"a batch leaf that was a tensor is now a {type(leaf).__name__}")
                out.append(leaf)
            elif isinstance(leaf, torch.Tensor) or type(leaf) is not type(const) or leaf != const:
                raise GuardFailure(f"a constant of the batch is now {leaf!r} ({const!r} when traced); trace again")
        return out

    def rebuild(self, tensors: Sequence[Any]) -> tuple:
        it = iter(tensors)
        return pytree.tree_unflatten([next(it) if c is _TENSOR else c for c in self.constants], self.spec)


_TENSOR = object()


#: Optimizer wrappers of training frameworks and the attribute holding the real
#: optimizer (matched by class name along the MRO, so neither is imported).
OPTIMIZER_WRAPPERS = {"AcceleratedOptimizer": "optimizer", "LightningOptimizer": "_optimizer"}


def unwrap_optimizer(optimizer: Any) -> Any:
    """The real ``torch.optim.Optimizer`` inside accelerate's ``AcceleratedOptimizer``
    or Lightning's ``LightningOptimizer`` (nested wrappers too); anything else as given."""
    for _ in range(8):
        attr = next((OPTIMIZER_WRAPPERS[c.__name__] for c in type(optimizer).__mro__ if c.__name__ in OPTIMIZER_WRAPPERS), None)
        if attr is None:
            return optimizer
        inner = getattr(optimizer, attr, None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            raise UnsupportedStep(
                f"{type(optimizer).__name__}.{attr} is a {type(inner).__name__}, not a torch.optim.Optimizer"
            )
        optimizer = inner
    return optimizer


def _wrapper_flags(wrapper: Any) -> tuple:
    """What a wrapper's step() decides on besides the real optimizer: accelerate
    steps only when it syncs gradients (outside ``accumulate()``'s micro-batches)."""
    state = getattr(wrapper, "gradient_state", None)
    return (getattr(state, "sync_gradients", None),) if state is not None else ()


@dataclasses.dataclass(frozen=True, slots=True)
class OptimizerSet:
    """The optimizer argument of ``train_step``: one optimizer, or a list, tuple
    or dict of them (Muon for matrices and AdamW for the rest; one optimizer per
    group of a fine-tune). Framework wrappers (``AcceleratedOptimizer``,
    ``LightningOptimizer``) are unwrapped: ``live()`` gives the real optimizers,
    ``rebuild()`` the argument as passed. Held weakly, so that a re-created
    optimizer is noticed."""

    spec: pytree.TreeSpec
    refs: tuple[weakref.ref, ...]
    outer: tuple[weakref.ref, ...] = ()  # the leaves as passed (wrappers), where they differ
    flags: tuple = ()  # per leaf: _wrapper_flags when traced

    @classmethod
    def of(cls, optimizer: Any) -> OptimizerSet:
        leaves, spec = pytree.tree_flatten(optimizer)
        inner = [unwrap_optimizer(o) for o in leaves]
        if not leaves or not all(isinstance(o, torch.optim.Optimizer) for o in inner):
            raise UnsupportedStep(
                "the optimizer argument must be a torch.optim.Optimizer (or an accelerate/Lightning wrapper "
                f"of one), or a list, tuple or dict of them; got {type(optimizer).__name__}"
            )
        if len({id(o) for o in inner}) != len(inner):
            raise UnsupportedStep("the same optimizer appears twice in the optimizer argument")
        wrapped = any(o is not i for o, i in zip(leaves, inner))
        return cls(
            spec,
            tuple(weakref.ref(o) for o in inner),
            tuple(weakref.ref(o) for o in leaves) if wrapped else (),
            tuple(_wrapper_flags(o) for o in leaves) if wrapped else (),
        )

    def live(self) -> list[torch.optim.Optimizer]:
        out = [r() for r in self.refs]
        outer = [r() for r in self.outer]
        if any(o is None for o in out + outer):
            raise GuardFailure(
                "an optimizer this step was traced with no longer exists (acopt holds optimizers weakly so "
                "that a re-created optimizer is noticed): keep a reference to it, or trace again with the new one"
            )
        for o, flags in zip(outer, self.flags):
            if _wrapper_flags(o) != flags:
                raise GuardFailure(
                    f"{type(o).__name__}.gradient_state.sync_gradients is {_wrapper_flags(o)[0]}, "
                    f"{flags[0]} when traced: a traced step always steps the optimizer; call it only on "
                    "steps that sync gradients (gradient accumulation across calls: use acopt.wrap)"
                )
        return out

    def rebuild(self) -> Any:
        live = self.live()
        return pytree.tree_unflatten([r() for r in self.outer] if self.outer else live, self.spec)


@dataclasses.dataclass(slots=True, kw_only=True)
class _Binding:
    """How a step graph is bound to the live model and optimizer (shared by a
    traced step and its rewrites)."""

    model: torch.nn.Module
    optimizers: OptimizerSet
    params: list[tuple[str, torch.nn.Parameter]]
    buffers: list[tuple[str, torch.Tensor]]
    state_slots: list[_StateSlot]
    batch_meta: list[tuple]  # per tensor leaf of the batch: shape, dtype, device, strides, requires_grad
    batch: _BatchLayout
    out_spec: pytree.TreeSpec  # what train_step returned: its tensor leaves are the graph's first outputs
    n_out: int
    constants: list[tuple[str, torch.Tensor]]
    hyper_inputs: list[InputKey]
    read_hypers: Callable[[Sequence[dict]], list[Any]]
    grad_params: list[int]
    reassigned_buffers: list[int]  # indices into buffers, in output order
    after_step: list[tuple[Any, tuple, dict]]  # scheduler.step(*args, **kwargs) calls train_step made
    guards: Guards
    grad_mode: bool  # the graph holds a kernel whose outputs depend on grad mode (GRAD_MODE_OPS)
    # parameters that zero_grad(set_to_none=False) zeroes but the step computes no gradient for
    # (frozen, unused): their .grad must be None at every call (:func:`_check_no_kept_zero_grads`)
    zeroed_without_grad: list[int] = dataclasses.field(default_factory=list)
    # (module, training): the train()/eval() modes train_step sets, applied after each call
    set_modes: list[tuple[torch.nn.Module, bool]] = dataclasses.field(default_factory=list)
    # the parameters whose .grad train_step sets to None (None: all), and those it zeroes in
    # place (zero_grad(set_to_none=False)) without computing a gradient; others are left alone
    reset_grads: list[int] | None = None
    zeroed_grads: list[int] = dataclasses.field(default_factory=list)


class TracedStep:
    """A training step as one fx graph; calling it runs one step in place.

    ``TracedStep(*batch)`` checks the guards, reads the model's and optimizer's
    *current* tensors and hyperparameters (so ``load_state_dict`` and LR
    schedulers between steps just work), runs the graph, writes the gradients
    back to ``.grad`` and reassigned buffers back to their modules, and returns
    the loss. A failed guard raises :class:`GuardFailure` before anything is
    touched.
    """

    def __init__(self, *, graph_module: fx.GraphModule, binding: _Binding, provenance: dict[str, Any]):
        self.graph_module = graph_module
        self._b = binding
        self.provenance = dict(provenance)
        names = [n for n, _ in binding.params]
        self.input_specs: tuple[InputSpec, ...] = (
            *(InputSpec(role=Role.PARAMETER, key=n) for n in names),
            *(InputSpec(role=Role.BUFFER, key=n) for n, _ in binding.buffers),
            *(
                InputSpec(role=Role.OPTIMIZER_STATE, key=f"{names[s.param_index]}/{s.key}")
                for s in binding.state_slots
            ),
            *(InputSpec(role=Role.INPUT, key=name) for name in binding.batch.names),
            *(InputSpec(role=Role.CONSTANT, key=f"constant[{n}]") for n, _ in binding.constants),
            *(InputSpec(role=Role.HYPERPARAMETER, key=str(k)) for k in binding.hyper_inputs),
        )

    # ---- graph facts ------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    @property
    def model(self) -> torch.nn.Module:
        return self._b.model

    @property
    def optimizer(self) -> Any:
        """The optimizer argument as traced (one optimizer, or the list/tuple/dict of them)."""
        return self._b.optimizers.rebuild()

    @property
    def guards(self) -> Guards:
        return self._b.guards

    def example_batch(self) -> tuple:
        """A batch of the traced structure, shapes, dtypes, devices and strides
        (uninitialised tensors; under ``FakeTensorMode``, fake ones)."""
        tensors = [
            torch.empty_strided(shape, stride, dtype=dtype, device=device, requires_grad=rg)
            for shape, dtype, device, stride, rg in self._b.batch_meta
        ]
        return self._b.batch.rebuild(tensors)

    def region(self, node: fx.Node) -> Region:
        return node.meta[REGION_KEY]

    @property
    def batch_size(self) -> int:
        shape = self._b.batch_meta[0][0] if self._b.batch_meta else ()
        return int(shape[0]) if len(shape) else 0

    def with_graph(self, graph_module: fx.GraphModule, **provenance: Any) -> TracedStep:
        """The same step bound to another graph over the same inputs (the rewriter's result)."""
        return TracedStep(graph_module=graph_module, binding=self._b, provenance={**self.provenance, **provenance})

    # ---- running --------------------------------------------------------------
    def flat_inputs(self, *batch: torch.Tensor) -> list[Any]:
        """The graph's inputs for this call, read from the live model and optimizer,
        after every guard passed. Tensors that require grad are passed detached."""
        b = self._b
        optimizers = b.optimizers.live()
        batch_tensors = b.batch.tensors(batch)
        b.guards.check_program(optimizers)
        _check_no_kept_zero_grads(b.params, b.zeroed_without_grad)
        params = [p for _, p in b.params]
        states = []
        for slot in b.state_slots:
            p = params[slot.param_index]
            try:
                states.append(optimizers[slot.optimizer].state[p][slot.key])
            except KeyError:
                raise GuardFailure(
                    f"optimizer state {slot.key!r} of parameter {b.params[slot.param_index][0]!r} is missing: "
                    "was the optimizer's state cleared since tracing? Trace again."
                ) from None
        buffers = [_get_buffer(b.model, name) for name, _ in b.buffers]
        tensors = [*params, *buffers, *states, *batch_tensors, *(t for _, t in b.constants)]
        b.guards.check_inputs(tensors)
        hypers = b.read_hypers([o.param_groups for o in optimizers])
        if b.grad_mode:
            tensors = [t.detach() if t.requires_grad else t for t in tensors]
        return tensors + hypers

    def __call__(self, *batch: Any) -> Any:
        return self.run(self.flat_inputs(*batch))

    def run(self, inputs: list[Any]) -> Any:
        """One step on inputs from :meth:`flat_inputs` (which checked the guards)."""
        b = self._b
        params = [p for _, p in b.params]
        reset = range(len(params)) if b.reset_grads is None else b.reset_grads
        for i in reset:
            params[i].grad = None  # a step starts from no gradients (train_step zeroes them)
        for i in b.zeroed_grads:  # zero_grad(set_to_none=False), no gradient in the step: eager keeps zeros
            if params[i].grad is not None:
                params[i].grad.zero_()
        # Grad mode as traced where a kernel's outputs depend on it (the mkldnn RNN's
        # workspace; then no input requires grad, so autograd records nothing).
        with torch.enable_grad() if b.grad_mode else torch.no_grad():
            out = self._run_graph(inputs)
        result = pytree.tree_unflatten(list(out[: b.n_out]), b.out_spec)
        grads = out[b.n_out : b.n_out + len(b.grad_params)]
        new_buffers = out[b.n_out + len(b.grad_params) :]
        for i, g in zip(b.grad_params, grads, strict=True):
            params[i].grad = g
        for i, value in zip(b.reassigned_buffers, new_buffers, strict=True):
            owner, attr = _owner(b.model, b.buffers[i][0])
            owner._buffers[attr] = value
        for m, training in b.set_modes:
            m.training = training
        for opt in b.optimizers.live():
            opt._opt_called = True  # as eager's step does (LR schedulers check it)
        for scheduler, args, kwargs in b.after_step:  # host-side, as train_step called them
            scheduler.step(*args, **kwargs)
        return result

    def _run_graph(self, inputs: list[Any]) -> Any:
        """The graph's outputs for ``inputs`` (a compiled backend runs it otherwise)."""
        return self.graph_module(*inputs)

    def print_readable(self) -> str:
        return self.graph_module.print_readable(print_output=False)


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _get_buffer(model: torch.nn.Module, name: str) -> torch.Tensor:
    owner, attr = _owner(model, name)
    return owner._buffers[attr]


# ---------------------------------------------------------------------------
# tracing
# ---------------------------------------------------------------------------
def trace(
    train_step: Callable[..., Any],
    model: torch.nn.Module,
    optimizer: Any,
    *batch: Any,
) -> TracedStep:
    """Trace ``train_step(model, optimizer, *batch)`` into a :class:`TracedStep`.

    ``optimizer`` is one optimizer or a list, tuple or dict of them (each is
    stepped once by ``train_step``); ``batch`` is any nest of tuples, lists and
    dicts of tensors and constants. On any error the model and optimizers are
    left as they were.
    """
    start = time.perf_counter()
    model = _unwrap_compiled(model)
    assigned = python_values.assigned_outside(train_step)
    if assigned:
        raise UnsupportedStep(
            f"train_step assigns {', '.join(assigned)}: a traced step runs no Python, so the assignment would "
            "not happen at each call (and tracing would leave a traced value there); return the value from "
            "train_step, or keep counters and running values outside it"
        )
    reads = python_values.record(train_step, model)  # globals, closures, config objects the code reads
    model, train_step, distributed, wrapper_settings = _distributed_tracing(model, train_step)
    optimizer_set = OptimizerSet.of(optimizer)
    optimizers = optimizer_set.live()
    for opt in optimizers:
        _check_supported(model, opt)
    layout = _BatchLayout.of(batch)
    batch_tensors = layout.tensors(batch)
    for name, t in zip(layout.names, batch_tensors):
        if t.requires_grad:
            raise UnsupportedStep(
                f"{name} requires grad: a traced step does not write gradients to batch tensors "
                "(adversarial or input-gradient training); pass it detached, or keep that step eager"
            )
    params = list(model.named_parameters())  # tied weights appear once
    param_ids = {id(p) for _, p in params}
    seen: set[int] = set()
    for group in (g for o in optimizers for g in o.param_groups):
        for p in group["params"]:
            if id(p) not in param_ids:
                raise UnsupportedStep("an optimizer holds a tensor that is not a parameter of the model")
            if id(p) in seen:
                raise UnsupportedStep("a parameter is in two param groups or two optimizers: it would be updated twice")
            seen.add(id(p))
    buffers = list(model.named_buffers())

    added_state = []
    args = (train_step, model, optimizer, optimizers, layout, batch_tensors, params, buffers)
    try:
        for opt in optimizers:
            added_state.append((opt, _init_optimizer_state(opt)))
            _check_state(opt, params)
        host_rng = _HostRng.capture()
        capturable: set[int] = set()  # optimizers traced in their capturable form (acopt.optimizer_form)
        while True:
            try:
                with distributed():
                    first = _trace_twice(args, added_state, capturable, host_rng, reads)
                break
            except NeedsCapturable as e:
                if e.indices <= capturable:  # pragma: no cover - the capturable form raised it
                    raise
                capturable |= e.indices
        _check_no_kept_zero_grads(params, first.zeroed_without_grad)
        guards = Guards.record(
            model,
            optimizers,
            params=params,
            buffers=buffers,
            reassigned={buffers[i][0] for i in first.reassigned},
            read_keys=first.book.read_keys,
            inputs=[
                *params,
                *buffers,
                *(
                    (
                        f"optimizer state {params[s.param_index][0]}/{s.key}",
                        optimizers[s.optimizer].state[params[s.param_index][1]][s.key],
                    )
                    for s in first.state_slots
                ),
                *zip(layout.names, batch_tensors),
                *((f"constant {n}", t) for n, t in first.constants),
            ],
        )
        guards.settings.extend(wrapper_settings)  # e.g. DDP's no_sync() flag: checked at every call
        _check_python_values_unchanged(reads)
        guards.python_values = reads
    except BaseException:
        for opt, added in added_state:
            for p in added:
                opt.state.pop(p, None)
        raise
    gm = first.gm
    step = TracedStep(
        graph_module=gm,
        binding=_Binding(
            model=model,
            optimizers=optimizer_set,
            params=params,
            buffers=buffers,
            state_slots=first.state_slots,
            batch_meta=[tensor_meta(b) for b in batch_tensors],
            batch=layout,
            out_spec=first.out_spec,
            n_out=first.n_out,
            constants=first.constants,
            hyper_inputs=first.hyper_inputs,
            read_hypers=first.book.guard_checker(first.hyper_inputs),
            grad_params=first.grad_params,
            reassigned_buffers=first.reassigned,
            after_step=first.after_step,
            guards=guards,
            grad_mode=any(str(n.target) in GRAD_MODE_OPS for n in gm.graph.nodes),
            zeroed_without_grad=first.zeroed_without_grad,
            set_modes=first.set_modes,
            reset_grads=first.reset_grads,
            zeroed_grads=first.zeroed_grads,
        ),
        provenance={
            "stage": "trace",
            "torch": torch.__version__,
            "optimizer": ", ".join(type(o).__name__ for o in optimizers),
            "capturable_form": [type(optimizers[i]).__name__ for i in sorted(capturable)],
            "nodes": len(gm.graph.nodes),
            "trace_time_s": time.perf_counter() - start,
        },
    )
    _name_placeholders(gm, step.input_specs)
    return step


def _trace_twice(
    args: tuple, added_state: list, capturable: set[int], host_rng: _HostRng, reads: list = ()
) -> _Traced:
    """The step traced with two hyperparameter sentinels, literals compared
    (:func:`_same_literals`); returns the first. Optimizers with a capturable form run eager's own
    form unless in ``capturable``; a literal that differs there asks for that form."""
    params, optimizers = args[6], args[3]
    first = _trace(*args, trace_id=0, capturable=capturable)
    _check_python_values_unchanged(reads)  # before a second trace reads a value the first wrote
    # Eager creates state only for parameters that hold a gradient when their optimizer
    # steps: take back what was made for the others (unused branches) and trace again.
    # (Not the gradients left at the end: a zero_grad() after step() clears those.)
    with_grad = {id(params[i][1]) for i in first.grads_at_step}
    unused = [(opt, p) for opt, added in added_state for p in added if id(p) not in with_grad]
    if unused:
        for opt, p in unused:
            opt.state.pop(p, None)
        first = _trace(*args, trace_id=0, capturable=capturable)
    second = _trace(*args, trace_id=1, capturable=capturable)
    host_rng.check_unused()
    try:
        _same_literals(first, second)
    except UnsupportedStep as e:  # e.g. Rprop's eager form writes etaplus with index_put_: a tensor constant
        eager = set(range(len(optimizers))) - capturable
        if eager:
            raise NeedsCapturable(eager, e) from e
        raise
    return first


def _same_literals(a: _Traced, b: _Traced) -> None:
    """The two traces (different hyperparameter sentinels) must hold the same
    literals: one that differs came from a hyperparameter acopt could not keep live."""
    la, lb = literal_values(a.gm), literal_values(b.gm)
    for (name, x), (_, y) in zip(a.constants, b.constants):
        la.setdefault(f"constant {name} {_literal(x)}", f"constant {name}")
        lb.setdefault(f"constant {name} {_literal(y)}", f"constant {name}")
    if la.keys() != lb.keys():
        where = la[next(iter(la.keys() - lb.keys()))] if la.keys() - lb.keys() else lb[next(iter(lb.keys() - la.keys()))]
        raise UnsupportedStep(
            "an optimizer hyperparameter reaches the graph in a form acopt cannot keep live (e.g. "
            "math.sqrt(lr) or torch.tensor(lr) in the step): tracing with another value changed "
            f"a literal of {where}"
        )


def _literal(t: torch.Tensor) -> str:
    """A tensor constant's values as text (a meta tensor has none: its shape and dtype)."""
    return f"meta {tuple(t.shape)} {t.dtype}" if t.is_meta else repr(t.tolist())


@dataclasses.dataclass(slots=True)
class _HostRng:
    """Python's and NumPy's global generators: a step that draws from them (a
    random crop decided by ``random.random()``) would have its draw frozen
    into the graph, so it is refused, and the generators are put back."""

    python: Any
    numpy: Any

    @classmethod
    def capture(cls) -> _HostRng:
        import random

        try:
            import numpy
        except ImportError:  # pragma: no cover
            return cls(random.getstate(), None)
        return cls(random.getstate(), numpy.random.get_state())

    def check_unused(self) -> None:
        import random

        now = _HostRng.capture()
        used = []
        if now.python != self.python:
            used.append("random")
            random.setstate(self.python)
        if self.numpy is not None and not _same_numpy_state(now.numpy, self.numpy):
            import numpy

            used.append("numpy.random")
            numpy.random.set_state(self.numpy)
        if used:
            raise UnsupportedStep(
                f"train_step draws from Python's {' and '.join(used)} generator: a traced step would "
                "repeat the draw made while tracing at every step. Draw with torch's generator "
                "(torch.rand, torch.randint) inside the step, or outside it"
            )


def _same_numpy_state(a, b) -> bool:
    import numpy

    return a[0] == b[0] and numpy.array_equal(a[1], b[1]) and tuple(a[2:]) == tuple(b[2:])


def _check_python_values_unchanged(reads: list) -> None:
    """Refuse a step that writes a plain global, closure variable or config value it
    reads (a step counter): the graph runs no Python, so eager's write would be lost.
    Tracing ran the step, so the recorded values are put back first."""
    moved = python_values.changed(reads)
    if moved is not None:
        python_values.restore(reads)
        raise UnsupportedStep(
            f"train_step changes a Python value it reads ({python_values.describe(*moved)}); a traced step runs "
            "no Python, so that write would be lost: keep counters and settings outside train_step, or pass them "
            "as tensors. A step that steps the optimizer only every k calls cannot be one graph: accumulate the "
            "micro-batches inside one train_step, or use module mode (acopt.wrap) and keep the loop eager"
        )


def _distributed_tracing(model, train_step):
    """A DDP model is traced as its inner module with DDP's semantics in the graph
    (:mod:`acopt.data_parallel`; ``train_step`` still receives the DDP object), and
    in-place ``torch.distributed`` collectives become functional ones
    (:class:`acopt.collectives.remap_collectives`). Returns ``(model, train_step,
    context to trace in, guarded settings of the wrapper)``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return model, train_step, contextlib.nullcontext, []
    from acopt import collectives, data_parallel, sharding

    inner, ddp_context = data_parallel.unwrap(model)
    step = train_step
    settings = data_parallel.guarded_settings(model) if inner is not model else []
    if inner is not model:
        ddp = model

        def step(_inner, *args, **kwargs):
            return train_step(ddp, *args, **kwargs)

    @contextlib.contextmanager
    def context():
        with ddp_context(), collectives.remap_collectives(), sharding.refuse_whole_model_norms(inner):
            yield

    return inner, step, context, settings


def _unwrap_compiled(model: torch.nn.Module) -> torch.nn.Module:
    """A ``torch.compile``d model is traced through its original module."""
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, torch.nn.Module) and type(model).__name__ == "OptimizedModule":
        return _unwrap_compiled(orig)
    return model


def _check_supported(model, optimizer) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_not_distributed(model)
    if isinstance(optimizer, torch.optim.LBFGS):
        raise UnsupportedStep(
            "LBFGS re-evaluates the loss through a closure inside step(): one traced step cannot hold that; "
            "use an optimizer whose step() needs no closure"
        )
    for i, group in enumerate(optimizer.param_groups):
        for flag in ("differentiable",):
            if group.get(flag):
                raise UnsupportedStep(f"{type(optimizer).__name__}({flag}=True) in param group {i} is not supported")
        for key, value in group.items():
            if key != "params" and isinstance(value, torch.Tensor):
                raise UnsupportedStep(
                    f"a tensor hyperparameter (param_groups[{i}][{key!r}]) is not supported: use a float"
                )
        if isinstance(optimizer, torch.optim.SGD) and group.get("momentum") and group.get("dampening"):
            fresh = any(
                "momentum_buffer" not in optimizer.state.get(p, {}) for p in group["params"]
            )
            if fresh:
                raise UnsupportedStep(
                    "SGD with dampening != 0 treats its first step specially; take one eager "
                    "step before tracing, or use dampening=0"
                )
    if any(p.grad is not None and p.grad.is_sparse for p in model.parameters()):
        raise UnsupportedStep(_SPARSE)


_SPARSE = (
    "sparse gradients (nn.Embedding/EmbeddingBag(sparse=True)) are not supported: acopt's memory model "
    "counts dense storages; use sparse=False"
)


def _refuse_sparse(gm: fx.GraphModule) -> None:
    """A sparse tensor anywhere in the step (a sparse embedding gradient): refused."""
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.layout != torch.strided:
            raise UnsupportedStep(_SPARSE)


def _check_not_distributed(model: torch.nn.Module) -> None:
    """Distributed wrappers whose semantics a trace would silently drop are refused
    (their support is a separate design: docs/usage.md, "Distributed")."""
    for name, m in model.named_modules():
        kind = type(m).__name__
        where = f"submodule {name!r}" if name else "the model"
        if kind == "DistributedDataParallel":
            raise UnsupportedStep(
                f"{where} is wrapped in DistributedDataParallel, whose gradient all-reduce runs in "
                "autograd hooks that a traced step does not call: wrap the whole model in DDP (acopt "
                "traces a top-level DDP's all-reduce), or all-reduce the gradients in train_step"
            )
        if kind in ("FullyShardedDataParallel",) or kind.startswith("FSDP"):
            raise UnsupportedStep(
                f"{where} is sharded with FSDP ({kind}), which acopt does not trace: shard the plain model "
                "with acopt.shard(model) instead (parameters, gradients and optimizer state sharded inside "
                "acopt's graph; docs/usage.md, 'Distributed')"
            )
    for name, p in model.named_parameters():
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            raise UnsupportedStep(
                f"parameter {name!r} is a DTensor (FSDP2 fully_shard / tensor parallel), which acopt does not "
                "trace: shard the plain model with acopt.shard(model) instead (docs/usage.md, 'Distributed')"
            )


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Create missing optimizer state as the optimizer itself creates it lazily.

    For each parameter without state, the optimizer's own ``step()`` runs on a
    copy of it in a shadow optimizer whose state records the first value
    assigned to each key: the value it initialises, before any update. Any
    optimizer that follows the torch.optim contract works without a list of
    special cases. The step runs twice, with zero and with unit gradients: a
    first value that differs was computed from the gradient (the optimizer's
    first step is special), and is refused, except SGD's momentum buffer,
    which torch creates as ``clone(grad)`` and which a zero buffer reproduces
    exactly when ``dampening == 0`` (checked in :func:`_check_supported`).
    Returns the parameters whose state was created (to undo on failure).
    """
    added = []
    try:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if optimizer.state.get(p) or not p.requires_grad:  # eager: state only where a gradient comes
                    continue
                if isinstance(optimizer, torch.optim.SGD):
                    if not group["momentum"]:
                        continue
                    first = {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}
                else:
                    first = _first_state(optimizer, group, p, torch.zeros_like(p))
                    again = _first_state(optimizer, group, p, torch.ones_like(p))
                    for key, v in first.items():
                        w = again.get(key)
                        same = _same_value(v, w)
                        if not same:
                            raise UnsupportedStep(
                                f"{type(optimizer).__name__} computes its state {key!r} from the first gradient "
                                "(its first step is special): take one eager step before tracing"
                            )
                if first:
                    optimizer.state[p] = first
                    added.append(p)
    except BaseException:
        for q in added:
            optimizer.state.pop(q, None)
        raise
    return added


def _same_value(v: Any, w: Any) -> bool:
    """Equal values; meta tensors (no values: a model built on the meta device
    for fake profiling) are compared by shape and dtype only."""
    if isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor):
        if v.is_meta or w.is_meta:
            return v.is_meta and w.is_meta and v.shape == w.shape and v.dtype == w.dtype
        return torch.equal(v, w)
    return v == w


def _first_state(optimizer: torch.optim.Optimizer, group: dict, p: torch.Tensor, grad: torch.Tensor) -> dict:
    copy_ = p.detach().clone().requires_grad_(p.requires_grad)
    copy_.grad = grad
    shadow = _copy.copy(optimizer)
    shadow.param_groups = [{**group, "params": [copy_]}]
    shadow.state = defaultdict(_FirstValues)
    shadow._optimizer_step_pre_hooks = type(optimizer._optimizer_step_pre_hooks)()
    shadow._optimizer_step_post_hooks = type(optimizer._optimizer_step_post_hooks)()
    vars(shadow).pop("step", None)  # an LR scheduler's wrapper of the live optimizer's step
    try:
        with torch.no_grad():
            type(optimizer).step(shadow)
    except Exception as e:
        raise UnsupportedStep(
            f"could not create the state of {type(optimizer).__name__} as its first step would "
            f"(ran step() on a copy of a parameter): {type(e).__name__}: {e}"
        ) from e
    return dict(shadow.state[copy_].first) if copy_ in shadow.state else {}


class _FirstValues(dict):
    """A parameter's optimizer state that remembers the first value set for each key."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.first: dict[str, Any] = {}
        self.update(*args, **kwargs)

    def __setitem__(self, key, value):
        if key not in self.first:
            self.first[key] = value.clone() if isinstance(value, torch.Tensor) else _copy.deepcopy(value)
        super().__setitem__(key, value)

    def update(self, *args, **kwargs):
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]


def _check_state(optimizer: torch.optim.Optimizer, params: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Numbers in optimizer state would be baked into the graph: refused."""
    names = {id(p): n for n, p in params}
    for p, st in optimizer.state.items():
        for key, v in st.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                raise UnsupportedStep(
                    f"{type(optimizer).__name__} keeps its state {key!r} of {names.get(id(p), 'a parameter')!r} "
                    "as a Python number, which a traced step would freeze: acopt needs tensor state"
                )


class _Counters:
    def __init__(self):
        self.backward_marks: list[tuple[int, int]] = []  # graph length at each backward's start and end
        self.step_mark = -1
        self.steps = 0
        self.zero_grads = 0


def _graph() -> fx.Graph | None:
    mode = get_proxy_mode()
    return mode.tracer.graph if mode is not None else None


def _graph_len() -> int:
    graph = _graph()
    return len(graph.nodes) if graph is not None else -1


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any):
    had = name in vars(obj) if not isinstance(obj, type) else True
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def _compiling_flag():
    """Tell library code it is being traced (as torch.export's non-strict mode does)."""
    import torch.compiler

    old = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = True
    try:
        yield
    finally:
        torch.compiler._is_compiling_flag = old


@contextlib.contextmanager
def _noop_module_conversions():
    """``module.to(dtype)`` inside the step (Switch Transformers' router casts its
    classifier at every call): a conversion to the dtype and device the module
    already has changes nothing in eager, but on the trace's fake parameters torch
    would swap tensors, which fails. Such a conversion is skipped while tracing;
    one that would change a tensor is refused."""
    real = torch.nn.Module._apply

    def _apply(self, fn, recurse=True):
        with torch.no_grad():
            if all(fn(t) is t for t in (*self.parameters(recurse=recurse), *self.buffers(recurse=recurse))):
                return self
        raise UnsupportedStep(
            f"train_step converts a module ({type(self).__name__}: .to(), .half(), .cuda()...) to another dtype "
            "or device, which a traced step would not repeat: convert the model before tracing"
        )

    torch.nn.Module._apply = _apply
    try:
        yield
    finally:
        torch.nn.Module._apply = real


@contextlib.contextmanager
def _plain_checkpoints():
    """Trace ``torch.utils.checkpoint`` regions as plain code (acopt plans the recomputation).

    Eager checkpointing replays the region in the backward with the forward's
    generator state, so running it once gives eager's numbers. Two eager
    behaviours are kept: a reentrant checkpoint whose inputs need no gradient
    passes none to the parameters inside, and ``preserve_rng_state=False``
    makes eager draw new random numbers in its replay, which one graph cannot
    do faithfully (refused when the region is random).
    """
    import torch.utils.checkpoint as cp

    def run(function, preserve, args, kwargs):
        start = _graph_len()
        out = function(*args, **kwargs)
        if not preserve:
            _refuse_random_since(start, "a torch.utils.checkpoint region with preserve_rng_state=False")
        return out

    class PlainCheckpointFunction:
        @staticmethod
        def apply(function, preserve, *args):
            if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                with torch.no_grad():  # eager: no gradient reaches the region's parameters
                    return run(function, preserve, args, {})
            return run(function, preserve, args, {})

    def plain_generator(function, preserve_rng_state=True, *rest, **kwargs):
        start = _graph_len()
        yield
        if not preserve_rng_state:
            _refuse_random_since(start, "a torch.utils.checkpoint region with preserve_rng_state=False")

    with _patched(cp, "CheckpointFunction", PlainCheckpointFunction), _patched(
        cp, "_checkpoint_without_reentrant_generator", plain_generator
    ):
        yield


@contextlib.contextmanager
def _deferred_schedulers(actions: list, counters: _Counters):
    """``scheduler.step()`` inside ``train_step`` is recorded, not run: it is Python
    arithmetic on the scheduler's counters, so the traced step calls it for real
    after the graph, where train_step called it (after ``optimizer.step()``), and
    the next call reads the hyperparameters it wrote."""
    from torch.optim.lr_scheduler import LRScheduler

    def subclasses(cls):
        yield cls
        for c in cls.__subclasses__():
            yield from subclasses(c)

    def record(self, *args, **kwargs):
        if counters.steps == 0:
            raise UnsupportedStep(
                f"train_step calls {type(self).__name__}.step() before optimizer.step(); call it after "
                "(as PyTorch asks), or outside the step"
            )
        if any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves((args, kwargs))):
            raise UnsupportedStep(
                f"train_step calls {type(self).__name__}.step() with a tensor (a metric): its value is "
                "not known while tracing; call the scheduler outside the step"
            )
        actions.append((self, args, kwargs))

    with contextlib.ExitStack() as stack:
        for cls in set(subclasses(LRScheduler)):
            if "step" in vars(cls):
                stack.enter_context(_patched(cls, "step", record))
        yield


@contextlib.contextmanager
def _graph_grad_scalers():
    """``torch.amp.GradScaler`` traced as graph ops with no host sync.

    Its scale and growth tracker are real tensors (created for real if the
    scaler is fresh, as its first eager call would): graph constants, read
    and updated in place at every call. The inf check and unscaling are
    torch's own ops. The skipped step becomes a select: the optimizer steps,
    then every parameter and state tensor it owns takes back its old value
    where ``found_inf`` says so, which is eager's result (skipped or not). The
    copies this needs live in the optimizer region and the memory model counts
    them. ``update()`` must run inside the step (it resets the scaler's
    per-step Python state).
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.amp.grad_scaler import GradScaler

    real_scale = GradScaler.scale

    def scale(self, outputs):
        if self._enabled and self._scale is None:
            device = next(iter(pytree.tree_leaves(outputs))).device
            with unset_fake_temporarily(), disable_proxy_modes_tracing():  # real tensors, not graph nodes
                self._lazy_init_scale_growth_tracker(device)
        return real_scale(self, outputs)

    def maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
        found = sum(v.to(self._scale.device) for v in optimizer_state["found_inf_per_device"].values())
        params = [p for g in optimizer.param_groups for p in g["params"]]
        owned = params + [
            v for p in params for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)
        ]
        with torch.no_grad():  # as the optimizer's own step
            saved = [t.clone() for t in owned]
        out = optimizer.step(*args, **kwargs)
        with torch.no_grad():
            skip = found > 0
            for t, old in zip(owned, saved):
                t.copy_(torch.where(skip, old, t))
        return out

    used: dict[int, GradScaler] = {}
    real_unscale = GradScaler.unscale_

    def unscale_(self, optimizer):
        used[id(self)] = self
        return real_unscale(self, optimizer)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(GradScaler, "scale", scale))
        stack.enter_context(_patched(GradScaler, "unscale_", unscale_))
        stack.enter_context(_patched(GradScaler, "_maybe_opt_step", maybe_opt_step))
        try:
            yield
        finally:
            stale = [sc for sc in used.values() if sc._per_optimizer_states]
            for sc in stale:  # the traced step's found_inf tensors must not outlive the trace
                sc._per_optimizer_states.clear()
    if stale:
        raise UnsupportedStep(
            "train_step steps a GradScaler but never calls scaler.update(): call it inside the step, "
            "after scaler.step(optimizer)"
        )


def _refuse_random_since(start: int, what: str) -> None:
    graph = _graph()
    if graph is None:
        return
    for n in list(graph.nodes)[start:]:
        if is_random(n):
            raise UnsupportedStep(
                f"{what} draws random numbers ({n.format_node()}): eager draws them again in the "
                "backward, which one traced step cannot reproduce; use preserve_rng_state=True"
            )


def is_random(node: fx.Node) -> bool:
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags


@dataclasses.dataclass(slots=True)
class _Traced:
    gm: fx.GraphModule
    state_slots: list[_StateSlot]
    grad_params: list[int]
    reassigned: list[int]
    constants: list[tuple[str, torch.Tensor]]
    hyper_inputs: list[InputKey]
    book: Book
    out_spec: pytree.TreeSpec
    n_out: int
    after_step: list[tuple[Any, tuple, dict]]
    zeroed_without_grad: list[int] = dataclasses.field(default_factory=list)
    set_modes: list[tuple[torch.nn.Module, bool]] = dataclasses.field(default_factory=list)
    reset_grads: list[int] | None = None
    grads_at_step: list[int] = dataclasses.field(default_factory=list)
    zeroed_grads: list[int] = dataclasses.field(default_factory=list)


def _snapshot_attributes(model: torch.nn.Module) -> dict[tuple[int, str], tuple[torch.nn.Module, str, Any]]:
    """Plain attributes of every module whose change a trace would not repeat."""
    out = {}
    for name, m in model.named_modules():
        for k, v in vars(m).items():
            if k.startswith("_") and k in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(v, (torch.Tensor, int, float)) and not isinstance(v, bool):
                out[(id(m), k)] = (m, f"{name}.{k}" if name else k, v)
    return out


def _check_attributes(model: torch.nn.Module, before: dict) -> None:
    """Refuse a step that sets plain module attributes (a counter, a cached tensor):
    eager would do it at every step, the graph never; undo what tracing wrote."""
    changed = []
    for name, m in model.named_modules():
        for k, v in list(vars(m).items()):
            if k in ("_parameters", "_buffers", "_modules"):
                continue
            old = before.get((id(m), k))
            if old is None:
                if isinstance(v, torch.Tensor) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
                    changed.append(f"{name}.{k}" if name else k)
                    delattr(m, k)
            elif old[2] is not v:
                changed.append(old[1])
                setattr(m, k, old[2])
    if changed:
        hooks = {type(h).__name__ for m in model.modules() for h in m._forward_pre_hooks.values()}
        old_style = sorted(hooks & {"WeightNorm", "SpectralNorm"})
        hint = (
            f" ({' and '.join(old_style)}: the hooks of torch.nn.utils.weight_norm/spectral_norm set the weight "
            "as a plain attribute at every call; use torch.nn.utils.parametrizations' versions, which acopt traces)"
            if old_style
            else ""
        )
        raise UnsupportedStep(
            f"train_step sets module attributes that are not buffers ({', '.join(changed[:5])}): eager "
            "changes them at every step, a traced step would not; register them as buffers "
            f"(register_buffer) or keep them out of the step{hint}"
        )


def _trace(
    train_step, model, optimizer_arg, optimizers, layout, batch, params, buffers, *, trace_id: int, capturable: set[int]
) -> _Traced:
    counters = _Counters()
    state_slots: list[_StateSlot] = []
    for i, (_, p) in enumerate(params):
        for o, opt in enumerate(optimizers):
            for key, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    state_slots.append(_StateSlot(o, i, key))
                # non-tensor state (none for the supported optimizers) stays baked in
    param_tensors = [p for _, p in params]
    index_of = {id(p): i for i, p in enumerate(param_tensors)}
    group_param_index = [[[index_of[id(p)] for p in g["params"]] for g in opt.param_groups] for opt in optimizers]
    n_p, n_b, n_s = len(params), len(buffers), len(state_slots)
    stepped_params = {i for groups in group_param_index for idx in groups for i in idx}  # in some optimizer
    grad_params: list[int] = []
    reassigned: list[int] = []
    outputs: list[pytree.TreeSpec] = []
    after_step: list[tuple[Any, tuple, dict]] = []
    book = Book(trace_id)

    real_backward = torch.autograd.backward

    def backward(*args, **kwargs):
        start = _graph_len()
        real_backward(*args, **kwargs)  # several calls: gradient accumulation inside one step
        counters.backward_marks.append((start, _graph_len()))

    stepped: set[int] = set()
    grads_at_step: set[int] = set()  # parameters holding a gradient when their optimizer steps

    def make_step(opt):
        real_step = opt.step
        index = optimizers.index(opt)
        # eager's own form (acopt.optimizer_form), unless it branched on its step count
        eager = index not in capturable  # as eager runs it: not "compiling" (Adagrad's lr_decay reads .item())

        def step(*args, **kwargs):
            if id(opt) in stepped:
                raise UnsupportedStep(f"train_step calls {type(opt).__name__}.step() more than once")
            stepped.add(id(opt))
            counters.steps += 1
            counters.step_mark = _graph_len()
            for idx, group in zip(group_param_index[index], opt.param_groups, strict=True):
                grads_at_step.update(i for i, p in zip(idx, group["params"], strict=True) if p.grad is not None)
            with eager_form(index) if eager else contextlib.nullcontext():
                return real_step(*args, **kwargs)

        return step

    cleared: set[int] = set()  # parameters whose .grad the step resets
    zeroed: set[int] = set()  # ... of which zero_grad(set_to_none=False) keeps .grad as zeros

    def make_zero_grad(real, params_index):
        def zero_grad(*args, **kwargs):
            counters.zero_grads += 1
            cleared.update(params_index)
            if not kwargs.get("set_to_none", args[0] if args else True):
                zeroed.update(params_index)
            return real(*args, **kwargs)

        return zero_grad

    traced_ids = {id(o) for o in optimizers}

    def other_optimizer_hook(opt, args, kwargs):
        if id(opt) not in traced_ids:
            raise UnsupportedStep(
                f"train_step steps an optimizer ({type(opt).__name__}) that is not in the optimizer argument: "
                "pass every optimizer the step uses (a list, tuple or dict of them)"
            )

    def flat_step(*flat):
        f_params = list(flat[:n_p])
        f_buffers = flat[n_p : n_p + n_b]
        f_states = flat[n_p + n_b : n_p + n_b + n_s]
        f_batch = flat[n_p + n_b + n_s :]
        mapping = {name: t for (name, _), t in zip(params, f_params)}
        mapping.update({name: t for (name, _), t in zip(buffers, f_buffers)})
        fake_states: list[dict[torch.Tensor, dict[str, Any]]] = []
        for opt in optimizers:
            fake_state: dict[torch.Tensor, dict[str, Any]] = {}
            for i, p in enumerate(param_tensors):
                st = opt.state.get(p)
                if st is not None:
                    fake_state[f_params[i]] = {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
            fake_states.append(fake_state)
        for slot, t in zip(state_slots, f_states):
            fake_states[slot.optimizer][f_params[slot.param_index]][slot.key] = t
        saved = [(list(opt.param_groups), opt.state) for opt in optimizers]
        for o, (opt, fake_state, groups_index) in enumerate(zip(optimizers, fake_states, group_param_index)):
            opt.state = defaultdict(dict, fake_state)
            for g, idx in enumerate(groups_index):
                group = dict(opt.param_groups[g])
                group["params"] = [f_params[i] for i in idx]
                if "capturable" in group and o in capturable:
                    group["capturable"] = True
                opt.param_groups[g] = group
        book.install([opt.param_groups for opt in optimizers])
        written: list[str] = []
        try:
            with stateless._reparametrize_module(model, mapping, tie_weights=True):
                result = train_step(model, optimizer_arg, *layout.rebuild(f_batch))
                for i, (name, _) in enumerate(buffers):
                    if _get_buffer(model, name) is not mapping[name]:
                        reassigned.append(i)
                new_buffers = [_get_buffer(model, buffers[i][0]) for i in reassigned]
        finally:
            written = book.restore([opt.param_groups for opt in optimizers])
            for opt, (groups, state) in zip(optimizers, saved):
                opt.state = state
                opt.param_groups[:] = groups
        if written:
            raise UnsupportedStep(
                f"train_step changes optimizer hyperparameters ({', '.join(written)}) other than through "
                "an LR scheduler's step(): acopt reads them at every call; change them outside the step"
            )
        leaves, out_spec = pytree.tree_flatten(result)
        if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
            raise UnsupportedStep(
                "train_step must return tensors: the loss, or a tuple/dict of the loss and other "
                f"tensors (logits, metrics); it returned {type(result).__name__}"
            )
        outputs.append(out_spec)
        grads = []
        for i, t in enumerate(f_params):
            if t.grad is not None:
                grad_params.append(i)
                grads.append(t.grad)
        return (*leaves, *grads, *new_buffers)

    flat = [p.detach().requires_grad_(p.requires_grad) for p in param_tensors]
    flat += [b for _, b in buffers]
    flat += [optimizers[s.optimizer].state[param_tensors[s.param_index]][s.key] for s in state_slots]
    flat += list(batch)
    hook = register_optimizer_step_pre_hook(other_optimizer_hook)
    attributes = _snapshot_attributes(model)
    # train()/eval() inside train_step: the trace starts from the modes a call starts
    # with (which the guards check) and leaves them; each call sets what the step set
    modes = [(m, m.training) for m in model.modules()]
    set_modes: list[tuple[torch.nn.Module, bool]] = []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(torch.autograd, "backward", backward))
            for opt in optimizers:
                stack.enter_context(_patched(opt, "step", make_step(opt)))
                owned = [i for groups in group_param_index[optimizers.index(opt)] for i in groups]
                stack.enter_context(_patched(opt, "zero_grad", make_zero_grad(opt.zero_grad, owned)))
            stack.enter_context(_patched(model, "zero_grad", make_zero_grad(model.zero_grad, range(len(params)))))
            stack.enter_context(_compiling_flag())
            stack.enter_context(_plain_checkpoints())
            stack.enter_context(_noop_module_conversions())
            stack.enter_context(_deferred_schedulers(after_step, counters))
            stack.enter_context(_graph_grad_scalers())
            stack.enter_context(_dynamo_disabled())
            stack.enter_context(module_names.recording(model))
            gm = make_fx(flat_step, tracing_mode="fake", _allow_non_fake_inputs=True)(*flat)
    except UnsupportedStep:
        raise
    except Exception as e:  # name the construct where we can
        raise _explain(e) from e
    finally:
        hook.remove()
        set_modes = [(m, m.training) for m, was in modes if m.training != was]
        for m, was in modes:
            m.training = was
        _check_attributes(model, attributes)
    if not counters.backward_marks:
        raise UnsupportedStep("train_step never calls loss.backward()")
    if counters.steps and counters.backward_marks[-1][1] > counters.step_mark:
        raise UnsupportedStep("train_step calls backward() after optimizer.step(); acopt traces one step ending in the optimizer")
    if counters.steps != len(optimizers):
        missing = [type(o).__name__ for o in optimizers if id(o) not in stepped]
        raise UnsupportedStep(
            f"train_step never calls optimizer.step() (of {', '.join(missing)}) in one of the calls acopt traces "
            "(it runs train_step two or three times): a step that steps the optimizer only every k calls "
            "(gradient accumulation across calls, a counter or flag outside the step) cannot be one graph. "
            "Accumulate the k micro-batches inside one train_step, or use module mode (acopt.wrap) and keep "
            "the loop eager"
        )
    if counters.zero_grads == 0:
        raise UnsupportedStep(
            "train_step never calls optimizer.zero_grad() (or model.zero_grad()): gradient "
            "accumulation across steps is not supported"
        )
    kept = [params[i][0] for i in grad_params if i not in cleared]
    if kept:
        raise UnsupportedStep(
            f"parameter(s) {', '.join(kept[:5])} get a gradient that train_step never resets (they are in no "
            "optimizer whose zero_grad() it calls): eager would add up their .grad across steps. Add them "
            "to the optimizer, call model.zero_grad(), or set requires_grad=False"
        )
    _tag_regions(gm, counters.backward_marks)
    _refuse_sparse(gm)
    _refuse_unfaithful_nodes(gm)
    _drop_noise(gm)
    hold_until_wait(gm)
    _functional_bernoulli(gm)
    _outplace_forward_mutations(gm)
    constants = _lift_constants(gm)
    hyper_inputs = book.lift(gm, _hyper_placeholder_name)
    out_spec = outputs[0]
    return _Traced(
        gm, state_slots, grad_params, reassigned, constants, hyper_inputs, book, out_spec, out_spec.num_leaves, after_step,
        zeroed_without_grad=sorted((zeroed - set(grad_params)) & stepped_params), set_modes=set_modes,
        reset_grads=sorted(cleared - zeroed), zeroed_grads=sorted(zeroed - set(grad_params)),
        grads_at_step=sorted(grads_at_step),
    )  # fmt: skip


def _check_no_kept_zero_grads(params: Sequence[tuple[str, torch.Tensor]], zeroed_without_grad: Sequence[int]) -> None:
    """Refuse a parameter that gets no gradient in the step but holds a ``.grad``
    that ``zero_grad(set_to_none=False)`` keeps: eager's optimizer then steps it
    with that (zero) gradient (weight decay, momentum, Adam's moments and step),
    which the traced step, made for no gradient, would not do."""
    held = [params[i][0] for i in zeroed_without_grad if params[i][1].grad is not None]
    if held:
        raise UnsupportedStep(
            f"parameter(s) {', '.join(held[:5])} get no gradient in train_step (frozen or unused) but hold a "
            ".grad, which zero_grad(set_to_none=False) keeps as zeros and the optimizer then steps (weight "
            "decay, momentum, Adam's moments): acopt traces steps without it. Set their .grad to None when "
            "freezing them (p.grad = None), or call zero_grad() with set_to_none=True (the default)"
        )


def _hyper_placeholder_name(key: InputKey) -> str:
    tail = "" if key.index is None else f"_{key.index}"
    head = f"o{key.optimizer}" if key.optimizer else ""
    return f"hyper__{head}g{key.group}_{key.key}{tail}"


@contextlib.contextmanager
def _dynamo_disabled():
    """``torch.compile``d submodules run their original code while tracing."""
    try:
        import torch._dynamo.config as dynamo_config
    except ImportError:  # pragma: no cover
        yield
        return
    with dynamo_config.patch(disable=True):
        yield


def _refuse_unfaithful_nodes(gm: fx.GraphModule) -> None:
    """Constructs that a traced step would run differently from eager."""
    for n in gm.graph.nodes:
        region = n.meta.get(REGION_KEY)
        if is_random(n) and region == Region.BACKWARD:
            raise UnsupportedStep(
                f"a random op runs in the backward pass ({n.format_node()}): acopt replays random ops "
                "only from the forward; move it to the forward or make it deterministic"
            )
        t = n.target
        if isinstance(t, torch._ops.OpOverload) and t.namespace == "c10d":
            raise UnsupportedStep(
                f"train_step calls an in-place torch.distributed collective ({t}): its work is not waited "
                "on in a traced step; use torch.distributed._functional_collectives (e.g. "
                "funcol.all_reduce(grad, 'sum', group)) and copy the result back"
            )
    for n in gm.graph.nodes:
        if n.op == "get_attr" and not isinstance(getattr(gm, n.target), torch.Tensor):
            raise UnsupportedStep(
                f"the traced step holds a {type(getattr(gm, n.target)).__name__} object ({n.target}), "
                "e.g. a process group: not supported"
            )


def _lift_constants(gm: fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """Tensor constants (``get_attr``: ``torch.tensor([...])`` in model code) become
    placeholders after the existing ones: like every input they live for the
    whole step (memory model rule 7), and every stage handles them as inputs."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1]
    constants = []
    lifted: dict[str, fx.Node] = {}
    for n in list(graph.nodes):
        if n.op != "get_attr":
            continue
        target = str(n.target)
        ph = lifted.get(target)
        if ph is None:
            value = getattr(gm, target)
            with graph.inserting_after(anchor):
                ph = graph.placeholder(f"const__{target}")
            ph.meta = dict(n.meta)
            ph.meta[REGION_KEY] = Region.FORWARD
            anchor = lifted[target] = ph
            constants.append((target, value))
        n.replace_all_uses_with(ph)
        graph.erase_node(n)
    for target in lifted:
        delattr(gm, target)
    if constants:
        graph.lint()
        gm.recompile()
    return constants


def _name_placeholders(gm: fx.GraphModule, specs: Sequence[InputSpec]) -> None:
    """Name placeholders after what they hold: ``param__0_weight``, ``batch_0``...
    (constants and hyperparameters are named when they are lifted)."""
    prefix = {
        Role.PARAMETER: "param__",
        Role.BUFFER: "buffer__",
        Role.OPTIMIZER_STATE: "state__",
        Role.INPUT: "",
    }
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, specs, strict=True):
        if spec.role not in prefix:
            continue
        key = spec.key.replace("[", "_").replace("]", "")
        node._rename(prefix[spec.role] + "".join(c if c.isalnum() else "_" for c in key))
        node.target = node.name
    gm.recompile()


def _explain(e: Exception) -> Exception:
    text = f"{type(e).__name__}: {e}"
    data_dependent = (
        "DataDependent" in type(e).__name__
        or "data-dependent" in text.lower()
        or "data dependent" in text.lower()
        or "item()" in text
    )
    if data_dependent:
        return UnsupportedStep(
            "train_step has data-dependent control flow or reads a tensor's value in Python "
            f"(e.g. `if loss > 0`, `.item()`), which one static graph cannot hold: {text.splitlines()[0]}"
        )
    return UnsupportedStep(f"could not trace the training step: {text.splitlines()[0]}")


def _tag_regions(gm: fx.GraphModule, marks: list[tuple[int, int]]) -> None:
    """Nodes made inside a ``backward()`` call are backward; after the last one,
    optimizer; the rest forward. Several backward calls (micro-batches) give
    forward and backward regions in turn (docs/memory-model.md, "Terms")."""
    end = marks[-1][1]
    for i, node in enumerate(gm.graph.nodes):
        if node.op == "placeholder":
            region = Region.FORWARD
        elif node.op == "output" or i >= end:
            region = Region.OPTIMIZER
        elif any(a <= i < b for a, b in marks):
            region = Region.BACKWARD
        else:
            region = Region.FORWARD
        node.meta[REGION_KEY] = region


def _is_pure(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function":
        return False
    if target is operator.getitem:
        return True
    if is_collective(node):  # memory model rule 8: never removed as dead code
        return False
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        if schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
            return False
        return not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    return False


def _returns_alias(node: fx.Node) -> bool:
    """Whether ``node``'s value may share storage with one of its inputs."""
    t = node.target
    if t is operator.getitem:  # an element of a tuple: fresh if the op's outputs are
        src = node.args[0]
        return not isinstance(src, fx.Node) or _returns_alias(src)
    if not isinstance(t, torch._ops.OpOverload):
        return True
    return any(r.alias_info is not None for r in t._schema.returns)


def _functional_variant(target: torch._ops.OpOverload):
    packet = target._schema.name.split("::")[1]
    if not packet.endswith("_") or packet.startswith("_"):
        return None
    functional = getattr(torch.ops.aten, packet[:-1], None)
    overload = target._overloadname
    return getattr(functional, overload, None) if functional is not None else None


def _functional_bernoulli(gm: fx.GraphModule) -> None:
    """``bernoulli_(empty_like(x), p)`` (dropout's mask on CPU) -> ``bernoulli(x, p)``.

    ATen implements ``bernoulli.p`` as exactly that pair for a contiguous
    ``x``: the same numbers from the same generator draws. The mask becomes a
    random op's fresh value, which a recompute block can replay (with the
    generator state restored) instead of keeping.
    """
    aten = torch.ops.aten
    changed = False
    for n in list(gm.graph.nodes):
        if n.target is not aten.bernoulli_.float or n.meta.get(REGION_KEY) != Region.FORWARD:
            continue
        e = n.args[0]
        if not isinstance(e, fx.Node) or e.target is not aten.empty_like.default or len(e.users) != 1:
            continue
        x = e.args[0]
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not isinstance(val, torch.Tensor) or not val.is_contiguous():
            continue
        if any(v is not None for k, v in e.kwargs.items() if k != "memory_format") or e.kwargs.get(
            "memory_format"
        ) not in (None, torch.preserve_format, torch.contiguous_format):
            continue
        if n.kwargs.get("generator") is not None:
            continue
        p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
        n.target = aten.bernoulli.p
        n.args = (x, p)
        n.kwargs = {}
        gm.graph.erase_node(e)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _outplace_forward_mutations(gm: fx.GraphModule) -> None:
    """Turn forward in-place ops on fresh forward temporaries into their
    out-of-place forms (``hidden += residual`` -> ``add``), where nothing reads
    the old value afterwards. Same numbers; the result becomes a value of its
    own, so the memory model can recompute what depends on it. Random
    in-place ops are left alone (their generator use must not change).
    """
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    changed = False
    for n in nodes:
        if n.op != "call_function" or n.meta.get(REGION_KEY) != Region.FORWARD:
            continue
        t = n.target
        if not isinstance(t, torch._ops.OpOverload) or torch.Tag.nondeterministic_seeded in t.tags:
            continue
        schema = t._schema
        if not schema.arguments or schema.arguments[0].alias_info is None or not schema.arguments[0].alias_info.is_write:
            continue
        if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments[1:]):
            continue
        x = n.args[0] if n.args else None
        if not isinstance(x, fx.Node) or x.op != "call_function" or x.meta.get(REGION_KEY) != Region.FORWARD:
            continue
        if _returns_alias(x):
            continue
        functional = _functional_variant(t)
        if functional is None:
            continue
        # Everything that aliases x must be done with it by the time n runs.
        aliases, stack = set(), [x]
        while stack:
            a = stack.pop()
            if a in aliases:
                continue
            aliases.add(a)
            stack.extend(u for u in a.users if u is not n and _returns_alias(u) and u.args and u.args[0] is a)
            if a.target is operator.getitem:  # the tuple holds the storage too
                stack.append(a.args[0])
        if any(index[u] > index[n] for a in aliases for u in a.users if u is not n):
            continue
        n.target = functional
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _drop_noise(gm: fx.GraphModule) -> None:
    """Remove profiler markers and pure nodes nobody reads."""
    graph = gm.graph
    for node in reversed(list(graph.nodes)):
        name = str(node.target)
        if "_record_function" in name:
            if not node.users:
                graph.erase_node(node)
            continue
        if not node.users and _is_pure(node):
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
