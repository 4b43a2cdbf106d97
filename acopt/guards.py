"""Guards: what a traced step assumed about the live program, checked at every call.

A traced graph bakes in more than its inputs: which modules were in training
mode, which parameters required gradients, which tensors the model and the
optimizer held, the optimizer's groups and their non-numeric options, grad
mode and autocast, and the strides of every input. :class:`Guards` records
these facts at trace time and :meth:`Guards.check` compares them with the
live program before a step touches anything (docs/usage.md, "Guards"). The
numbers in the optimizer's groups are not guarded but read as graph inputs
(:mod:`acopt.hyperparams`). A failed check is a :class:`GuardFailure` that
names what changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from acopt import python_values
from acopt.errors import GuardFailure


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def autocast_state() -> tuple:
    out = []
    for device in ("cpu", "cuda"):
        enabled = torch.is_autocast_enabled(device)
        out.append((device, enabled, torch.get_autocast_dtype(device) if enabled else None))
    return tuple(out)


def tensor_meta(t: torch.Tensor) -> tuple:
    return (t.shape, t.dtype, t.device, t.stride(), t.requires_grad)


_SETTINGS = (bool, int, float, str, type(None))


def _hooks(m: torch.nn.Module) -> int:
    return (
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        + len(m._backward_pre_hooks) + len(getattr(m, "_state_dict_hooks", ()))
    )  # fmt: skip


@dataclasses.dataclass(slots=True)
class Guards:
    grad_enabled: bool
    autocast: tuple
    # (name, module, training, #params, #buffers, #children, #hooks)
    modules: list[tuple[str, torch.nn.Module, bool, int, int, int, int]]
    # (name, module, attribute names, their values): plain Python settings model
    # code may read in forward (Dropout.p, a temperature, eps), baked into the graph
    settings: list[tuple[str, torch.nn.Module, tuple[str, ...], tuple]]
    # (parent, attribute, child) for every submodule edge
    children: list[tuple[torch.nn.Module, str, torch.nn.Module, str]]
    # (name, owner, attribute, tensor, requires_grad)
    params: list[tuple[str, torch.nn.Module, str, torch.Tensor, bool]]
    # (name, owner, attribute, tensor or None when the step reassigns it)
    buffers: list[tuple[str, torch.nn.Module, str, torch.Tensor | None]]
    # per group: its parameters and the values of the non-numeric keys the step read
    groups: list[tuple[list[torch.Tensor], dict[str, Any]]]
    optimizer_hooks: int
    # shape, dtype, device, strides, requires_grad of every tensor input
    input_meta: list[tuple]
    input_names: list[str]
    # plain values the user's code read from globals, closures and config objects (acopt.python_values)
    python_values: list = dataclasses.field(default_factory=list)

    @classmethod
    def record(
        cls,
        model: torch.nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        params: Sequence[tuple[str, torch.Tensor]],
        buffers: Sequence[tuple[str, torch.Tensor]],
        reassigned: set[str],
        read_keys: Sequence[set[str]],
        inputs: Sequence[tuple[str, torch.Tensor]],
    ) -> Guards:
        modules = []
        children = []
        settings = []
        for name, m in model.named_modules(remove_duplicate=False):
            keys = tuple(k for k, v in vars(m).items() if k != "training" and isinstance(v, _SETTINGS))
            if keys:
                settings.append((name or "model", m, keys, tuple(vars(m)[k] for k in keys)))
            modules.append(
                (name or "model", m, m.training, len(m._parameters), len(m._buffers), len(m._modules), _hooks(m))
            )
            for attr, child in m._modules.items():
                if child is not None:
                    children.append((m, attr, child, f"{name}.{attr}" if name else attr))
        groups = []
        for g, group in enumerate(g for o in optimizers for g in o.param_groups):
            keys = read_keys[g] if g < len(read_keys) else set(group)
            options = {
                k: group[k]
                for k in keys
                if k in group and k != "params" and not _numeric(group[k])
            }
            groups.append((list(group["params"]), options))
        return cls(
            grad_enabled=True,
            autocast=autocast_state(),
            modules=modules,
            settings=settings,
            children=children,
            params=[(n, *_owner(model, n), p, p.requires_grad) for n, p in params],
            buffers=[(n, *_owner(model, n), None if n in reassigned else b) for n, b in buffers],
            groups=groups,
            optimizer_hooks=_optimizer_hooks(optimizers),
            input_meta=[tensor_meta(t) for _, t in inputs],
            input_names=[n for n, _ in inputs],
        )

    def check_program(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Everything but the input tensors' metadata (see :meth:`check_inputs`)."""
        if torch.is_grad_enabled() != self.grad_enabled:
            raise GuardFailure(
                "the step is called under torch.no_grad(), but train_step's backward needs grad mode "
                "(it was traced with grad mode on)"
            )
        if autocast_state() != self.autocast:
            raise GuardFailure(
                f"autocast changed since tracing (traced with {self.autocast}, now {autocast_state()}); trace again"
            )
        moved = python_values.changed(self.python_values)
        if moved is not None:
            raise GuardFailure(
                f"{python_values.describe(*moved)} (the traced step holds the value it had; a value that changes "
                "every step is better passed to train_step as a tensor); trace again"
            )
        for name, m, training, n_p, n_b, n_c, hooks in self.modules:
            if m.training != training:
                mode = "train()" if m.training else "eval()"
                raise GuardFailure(f"module {name!r} was put in {mode} mode since tracing; trace again")
            if (len(m._parameters), len(m._buffers), len(m._modules), _hooks(m)) != (n_p, n_b, n_c, hooks):
                raise GuardFailure(
                    f"module {name!r} gained or lost a parameter, buffer, submodule or hook since tracing; trace again"
                )
        for name, m, keys, values in self.settings:
            d = vars(m)
            now = tuple(map(d.get, keys))
            if now != values:
                key, old, new = next((k, a, b) for k, a, b in zip(keys, values, now) if a != b)
                raise GuardFailure(
                    f"module {name!r} attribute {key!r} is {new!r}, {old!r} when traced (model code may "
                    "read it in forward, and the traced step holds the old value); trace again"
                )
        for parent, attr, child, name in self.children:
            if parent._modules.get(attr) is not child:
                raise GuardFailure(f"submodule {name!r} was replaced since tracing; trace again")
        for name, owner, attr, p, requires_grad in self.params:
            if owner._parameters.get(attr) is not p:
                raise GuardFailure(f"parameter {name!r} was replaced since tracing; trace again")
            if p.requires_grad != requires_grad:
                now = "frozen (requires_grad=False)" if requires_grad else "unfrozen (requires_grad=True)"
                raise GuardFailure(f"parameter {name!r} was {now} since tracing; trace again")
        for name, owner, attr, b in self.buffers:
            if b is not None and owner._buffers.get(attr) is not b:
                raise GuardFailure(f"buffer {name!r} was replaced since tracing; trace again")
        groups = [g for o in optimizers for g in o.param_groups]
        if len(groups) != len(self.groups):
            raise GuardFailure(
                f"the optimizers have {len(groups)} param groups, {len(self.groups)} when traced "
                "(add_param_group?); trace again"
            )
        for g, (group, (params, options)) in enumerate(zip(groups, self.groups)):
            live = group["params"]
            if len(live) != len(params) or any(a is not b for a, b in zip(live, params)):
                raise GuardFailure(f"the parameters of optimizer param group {g} changed since tracing; trace again")
            for key, value in options.items():
                if key not in group or not _same(group[key], value):
                    raise GuardFailure(
                        f"optimizer param_groups[{g}][{key!r}] is {group.get(key, '<missing>')!r}, "
                        f"{value!r} when traced; trace again"
                    )
        if _optimizer_hooks(optimizers) != self.optimizer_hooks:
            raise GuardFailure("optimizer step hooks were added or removed since tracing; trace again")

    def check_inputs(self, tensors: Sequence[torch.Tensor]) -> None:
        for name, t, meta in zip(self.input_names, tensors, self.input_meta):
            now = tensor_meta(t)
            if now != meta:
                fields = ("shape", "dtype", "device", "strides", "requires_grad")
                diff = [f"{f} {a} (traced: {b})" for f, a, b in zip(fields, now, meta) if a != b]
                hint = " (a new batch shape is traced anew by acopt.compile)" if name.startswith("batch") else ""
                raise GuardFailure(f"{name} has {', '.join(diff)}; trace again{hint}")


def _optimizer_hooks(optimizers: Sequence[torch.optim.Optimizer]) -> int:
    return sum(len(o._optimizer_step_pre_hooks) + len(o._optimizer_step_post_hooks) for o in optimizers)


def _numeric(v: Any) -> bool:
    from acopt.hyperparams import live_value

    return live_value(v)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # e.g. tensors: identity only
        return False
