"""Trace one whole training step (forward, backward, optimizer) into one fx graph.

``acopt.trace(train_step, model, optimizer, *batch)`` runs the user's eager
``train_step`` once under ``make_fx`` with fake tensors. Parameters, buffers,
optimizer state and the batch become the graph's placeholders; the graph
returns the loss and the gradients left on the parameters after the step.
The forward/backward boundary is found without any marker from the user:
``torch.autograd.backward`` is wrapped while tracing, and the graph's length
when it starts and ends splits the nodes into regions.

Notes on faithfulness (docs/usage.md, "What acopt traces"):

* Optimizer state is created before tracing, as the optimizer would create it
  lazily at its first step (zeros, step 0), so the graph is the steady-state
  step. Adam and AdamW are traced in their ``capturable`` form (the step count
  is a tensor); the numbers equal eager ``capturable=True`` bitwise and eager
  default Adam to float rounding.
* A step starts from no gradients (``train_step`` must call ``zero_grad``);
  gradient accumulation across calls is refused, not silently changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.nn.utils import stateless
from torch.optim.optimizer import _get_scalar_dtype, register_optimizer_step_pre_hook

from acopt.records import Region, Role

REGION_KEY = "acopt_region"


class UnsupportedStep(RuntimeError):
    """The training step uses something acopt cannot trace faithfully."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class InputSpec:
    """What one graph placeholder is bound to at each call."""

    role: Role
    key: str  # parameter/buffer name, "param_name/state_key", or "batch[i]"


@dataclasses.dataclass(frozen=True, slots=True)
class _StateSlot:
    param_index: int
    key: str


_SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


class TracedStep:
    """A training step as one fx graph; calling it runs one step in place.

    ``TracedStep(*batch)`` reads the model's and optimizer's *current* tensors
    at every call (so ``load_state_dict`` between steps just works), runs the
    graph under ``torch.no_grad()``, writes the gradients back to ``.grad`` and
    returns the loss.
    """

    def __init__(
        self,
        *,
        graph_module: fx.GraphModule,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        params: Sequence[tuple[str, torch.nn.Parameter]],
        buffers: Sequence[tuple[str, torch.Tensor]],
        state_slots: Sequence[_StateSlot],
        batch_meta: Sequence[tuple[torch.Size, torch.dtype, torch.device]],
        grad_params: Sequence[int],
        provenance: dict[str, Any],
    ):
        self.graph_module = graph_module
        self.model = model
        self.optimizer = optimizer
        self._params = list(params)
        self._buffers = list(buffers)
        self._state_slots = list(state_slots)
        self._batch_meta = list(batch_meta)
        self._grad_params = list(grad_params)
        self.provenance = dict(provenance)
        names = [n for n, _ in self._params]
        self.input_specs: tuple[InputSpec, ...] = (
            *(InputSpec(role=Role.PARAMETER, key=n) for n in names),
            *(InputSpec(role=Role.BUFFER, key=n) for n, _ in self._buffers),
            *(
                InputSpec(role=Role.OPTIMIZER_STATE, key=f"{names[s.param_index]}/{s.key}")
                for s in self._state_slots
            ),
            *(InputSpec(role=Role.INPUT, key=f"batch[{i}]") for i in range(len(self._batch_meta))),
        )

    # ---- graph facts ------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def region(self, node: fx.Node) -> Region:
        return node.meta[REGION_KEY]

    @property
    def batch_size(self) -> int:
        shape = self._batch_meta[0][0] if self._batch_meta else ()
        return int(shape[0]) if len(shape) else 0

    def with_graph(self, graph_module: fx.GraphModule, **provenance: Any) -> TracedStep:
        """The same step bound to another graph over the same inputs (the rewriter's result)."""
        return TracedStep(
            graph_module=graph_module,
            model=self.model,
            optimizer=self.optimizer,
            params=self._params,
            buffers=self._buffers,
            state_slots=self._state_slots,
            batch_meta=self._batch_meta,
            grad_params=self._grad_params,
            provenance={**self.provenance, **provenance},
        )

    # ---- running --------------------------------------------------------------
    def flat_inputs(self, *batch: torch.Tensor) -> list[torch.Tensor]:
        """The graph's inputs for this call, read from the live model and optimizer."""
        self._check_batch(batch)
        params = [p for _, p in self._params]
        state = self.optimizer.state
        states = []
        for slot in self._state_slots:
            p = params[slot.param_index]
            try:
                states.append(state[p][slot.key])
            except KeyError:
                raise UnsupportedStep(
                    f"optimizer state {slot.key!r} of parameter "
                    f"{self._params[slot.param_index][0]!r} is missing: was the optimizer "
                    "replaced or its state cleared since tracing? Trace again."
                ) from None
        buffers = [self._current_buffer(name) for name, _ in self._buffers]
        return [*params, *buffers, *states, *batch]

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        inputs = self.flat_inputs(*batch)
        params = [p for _, p in self._params]
        for p in params:
            p.grad = None  # a step starts from no gradients (train_step zeroes them)
        with torch.no_grad():
            out = self.graph_module(*inputs)
        loss, grads = out[0], out[1:]
        for i, g in zip(self._grad_params, grads, strict=True):
            params[i].grad = g
        return loss

    def _current_buffer(self, name: str) -> torch.Tensor:
        return self.model.get_buffer(name)

    def _check_batch(self, batch: Sequence[torch.Tensor]) -> None:
        if len(batch) != len(self._batch_meta):
            raise ValueError(f"traced with {len(self._batch_meta)} batch tensors, got {len(batch)}")
        for i, (b, (shape, dtype, device)) in enumerate(zip(batch, self._batch_meta)):
            if not isinstance(b, torch.Tensor):
                raise TypeError(f"batch[{i}] must be a tensor, got {type(b).__name__}")
            if b.shape != shape or b.dtype != dtype or b.device != device:
                raise ValueError(
                    f"batch[{i}] is {tuple(b.shape)} {b.dtype} on {b.device}, but the step was "
                    f"traced for {tuple(shape)} {dtype} on {device}: trace again for a new shape"
                )

    def print_readable(self) -> str:
        return self.graph_module.print_readable(print_output=False)


# ---------------------------------------------------------------------------
# tracing
# ---------------------------------------------------------------------------
def trace(
    train_step: Callable[..., Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *batch: torch.Tensor,
) -> TracedStep:
    """Trace ``train_step(model, optimizer, *batch)`` into a :class:`TracedStep`.

    On any error the model and optimizer are left as they were.
    """
    start = time.perf_counter()
    _check_supported(model, optimizer, batch)
    params = list(model.named_parameters())  # tied weights appear once
    param_ids = {id(p): i for i, (_, p) in enumerate(params)}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in param_ids:
                raise UnsupportedStep("the optimizer holds a tensor that is not a parameter of the model")
    buffers = list(model.named_buffers())

    added_state = _init_optimizer_state(optimizer)
    try:
        traced = _trace(train_step, model, optimizer, batch, params, buffers)
    except BaseException:
        for p in added_state:
            optimizer.state.pop(p, None)
        raise
    gm, state_slots, grad_params, marks = traced
    _tag_regions(gm, marks)
    _drop_noise(gm)
    _functional_bernoulli(gm)
    _outplace_forward_mutations(gm)
    step = TracedStep(
        graph_module=gm,
        model=model,
        optimizer=optimizer,
        params=params,
        buffers=buffers,
        state_slots=state_slots,
        batch_meta=[(b.shape, b.dtype, b.device) for b in batch],
        grad_params=grad_params,
        provenance={
            "stage": "trace",
            "torch": torch.__version__,
            "optimizer": type(optimizer).__name__,
            "nodes": len(gm.graph.nodes),
            "trace_time_s": time.perf_counter() - start,
        },
    )
    _name_placeholders(gm, step.input_specs)
    return step


def _name_placeholders(gm: fx.GraphModule, specs: Sequence[InputSpec]) -> None:
    """Name placeholders after what they hold: ``param__0_weight``, ``batch_0``..."""
    prefix = {
        Role.PARAMETER: "param__",
        Role.BUFFER: "buffer__",
        Role.OPTIMIZER_STATE: "state__",
        Role.INPUT: "",
    }
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, specs, strict=True):
        key = spec.key.replace("[", "_").replace("]", "")
        node._rename(prefix[spec.role] + "".join(c if c.isalnum() else "_" for c in key))
        node.target = node.name
    gm.recompile()


def _check_supported(model, optimizer, batch) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if type(optimizer) not in _SUPPORTED_OPTIMIZERS:
        names = ", ".join(c.__name__ for c in _SUPPORTED_OPTIMIZERS)
        raise UnsupportedStep(
            f"optimizer {type(optimizer).__name__} is not supported (supported: {names})"
        )
    for i, group in enumerate(optimizer.param_groups):
        for flag in ("fused", "differentiable"):
            if group.get(flag):
                raise UnsupportedStep(f"{type(optimizer).__name__}({flag}=True) in param group {i} is not supported")
        if isinstance(group.get("lr"), torch.Tensor):
            raise UnsupportedStep(f"a tensor learning rate (param group {i}) is not supported")
        if type(optimizer) is torch.optim.SGD and group["momentum"] and group["dampening"]:
            fresh = any(
                "momentum_buffer" not in optimizer.state.get(p, {}) for p in group["params"]
            )
            if fresh:
                raise UnsupportedStep(
                    "SGD with dampening != 0 treats its first step specially; take one eager "
                    "step before tracing, or use dampening=0"
                )
    for i, b in enumerate(batch):
        if not isinstance(b, torch.Tensor):
            raise UnsupportedStep(f"batch[{i}] is a {type(b).__name__}; the batch must be tensors")
    if any(p.grad is not None and p.grad.is_sparse for p in model.parameters()):
        raise UnsupportedStep("sparse gradients are not supported")


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Create missing optimizer state as the optimizer would at its first step.

    Returns the parameters whose state was created (to undo on failure).
    """
    added = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            if isinstance(optimizer, torch.optim.SGD):
                if not group["momentum"]:
                    optimizer.state.pop(p)
                    continue
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:  # Adam, AdamW
                device = p.device if group["capturable"] else "cpu"
                state["step"] = torch.zeros((), dtype=_get_scalar_dtype(), device=device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            added.append(p)
    return added


class _Counters:
    def __init__(self):
        self.backward_marks: list[int] = []
        self.steps = 0
        self.zero_grads = 0


def _graph_len() -> int:
    mode = get_proxy_mode()
    return len(mode.tracer.graph.nodes) if mode is not None else -1


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


def _trace(train_step, model, optimizer, batch, params, buffers):
    counters = _Counters()
    state_slots: list[_StateSlot] = []
    for i, (_, p) in enumerate(params):
        for key, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                state_slots.append(_StateSlot(i, key))
            # non-tensor state (none for the supported optimizers) stays baked in
    param_tensors = [p for _, p in params]
    group_param_index = [[next(i for i, q in enumerate(param_tensors) if q is p) for p in g["params"]] for g in optimizer.param_groups]
    n_p, n_b, n_s = len(params), len(buffers), len(state_slots)
    grad_params: list[int] = []

    real_backward = torch.autograd.backward

    def backward(*args, **kwargs):
        counters.backward_marks.append(_graph_len())
        if len(counters.backward_marks) > 1:
            raise UnsupportedStep("train_step calls backward more than once; acopt traces one backward per step")
        real_backward(*args, **kwargs)
        counters.backward_marks.append(_graph_len())

    real_step = optimizer.step
    real_zero_grad = optimizer.zero_grad
    real_model_zero_grad = model.zero_grad

    def step(*args, **kwargs):
        counters.steps += 1
        if counters.steps > 1:
            raise UnsupportedStep("train_step calls optimizer.step() more than once")
        return real_step(*args, **kwargs)

    def zero_grad(*args, **kwargs):
        counters.zero_grads += 1
        return real_zero_grad(*args, **kwargs)

    def model_zero_grad(*args, **kwargs):
        counters.zero_grads += 1
        return real_model_zero_grad(*args, **kwargs)

    def other_optimizer_hook(opt, args, kwargs):
        if opt is not optimizer:
            raise UnsupportedStep(
                f"train_step steps a second optimizer ({type(opt).__name__}); acopt traces one optimizer"
            )

    def flat_step(*flat):
        f_params = list(flat[:n_p])
        f_buffers = flat[n_p : n_p + n_b]
        f_states = flat[n_p + n_b : n_p + n_b + n_s]
        f_batch = flat[n_p + n_b + n_s :]
        mapping = {name: t for (name, _), t in zip(params, f_params)}
        mapping.update({name: t for (name, _), t in zip(buffers, f_buffers)})
        fake_state: dict[torch.Tensor, dict[str, Any]] = {}
        for i, p in enumerate(param_tensors):
            st = optimizer.state.get(p)
            if st is not None:
                fake_state[f_params[i]] = {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
        for slot, t in zip(state_slots, f_states):
            fake_state[f_params[slot.param_index]][slot.key] = t
        saved_groups = [(g["params"], g.get("capturable")) for g in optimizer.param_groups]
        saved_state = optimizer.state
        from collections import defaultdict

        optimizer.state = defaultdict(dict, fake_state)
        for g, idx in zip(optimizer.param_groups, group_param_index):
            g["params"] = [f_params[i] for i in idx]
            if "capturable" in g:
                g["capturable"] = True
        try:
            with stateless._reparametrize_module(model, mapping, tie_weights=True):
                loss = train_step(model, optimizer, *f_batch)
        finally:
            optimizer.state = saved_state
            for g, (ps, cap) in zip(optimizer.param_groups, saved_groups):
                g["params"] = ps
                if cap is not None:
                    g["capturable"] = cap
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise UnsupportedStep("train_step must return the loss as a one-element tensor")
        grads = []
        for i, t in enumerate(f_params):
            if t.grad is not None:
                grad_params.append(i)
                grads.append(t.grad)
        return (loss, *grads)

    flat = [p.detach().requires_grad_(p.requires_grad) for p in param_tensors]
    flat += [b for _, b in buffers]
    flat += [optimizer.state[param_tensors[s.param_index]][s.key] for s in state_slots]
    flat += list(batch)
    hook = register_optimizer_step_pre_hook(other_optimizer_hook)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(torch.autograd, "backward", backward))
            stack.enter_context(_patched(optimizer, "step", step))
            stack.enter_context(_patched(optimizer, "zero_grad", zero_grad))
            stack.enter_context(_patched(model, "zero_grad", model_zero_grad))
            stack.enter_context(_compiling_flag())
            gm = make_fx(flat_step, tracing_mode="fake", _allow_non_fake_inputs=True)(*flat)
    except UnsupportedStep:
        raise
    except Exception as e:  # name the construct where we can
        raise _explain(e) from e
    finally:
        hook.remove()
    if len(counters.backward_marks) != 2:
        raise UnsupportedStep("train_step never calls loss.backward()")
    if counters.steps != 1:
        raise UnsupportedStep("train_step never calls optimizer.step()")
    if counters.zero_grads == 0:
        raise UnsupportedStep(
            "train_step never calls optimizer.zero_grad() (or model.zero_grad()): gradient "
            "accumulation across steps is not supported"
        )
    return gm, state_slots, grad_params, counters.backward_marks


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


def _tag_regions(gm: fx.GraphModule, marks: list[int]) -> None:
    bw_start, bw_end = marks
    for i, node in enumerate(gm.graph.nodes):
        if node.op == "placeholder":
            region = Region.FORWARD
        elif node.op == "output" or i >= bw_end:
            region = Region.OPTIMIZER
        elif i >= bw_start:
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
