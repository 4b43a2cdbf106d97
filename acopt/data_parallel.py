"""``DistributedDataParallel`` traced as graph ops (docs/usage.md, "Distributed").

A DDP-wrapped model traces with no collective: its reducer's hooks sit on the
original parameters, which tracing replaces. :func:`unwrap` returns the inner
module and a context that, while tracing, runs DDP's forward as the inner
module's and puts DDP's semantics into the graph itself:

* Gradients are averaged as DDP averages them: each bucket is the flat
  concatenation of its gradients divided by the world size, all-reduced with
  SUM (a functional collective).
* Buckets fill in the order gradients become ready in the backward (DDP's
  order after its first iteration rebuilds its buckets), up to
  ``first_bucket_bytes_cap`` for the first and ``bucket_bytes_cap`` for the
  others; a full bucket's all-reduce is issued at once, so the rest of the
  backward overlaps it. Every bucket is waited for at the end of the backward,
  where DDP's reducer waits, and the parameters' ``.grad`` become views of the
  reduced buckets.
* ``broadcast_buffers=True``: every buffer is broadcast from rank 0 before the
  forward and copied into the buffer, as DDP does.

Refused (with the model and optimizer untouched): communication hooks,
``mixed_precision``, a step run inside ``no_sync()``, more than one forward or
backward per step, and a parameter that gets no gradient (DDP itself raises
for it unless ``find_unused_parameters=True``, whose zero-filled reduction
acopt does not reproduce).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from acopt.errors import UnsupportedStep

__all__ = ["unwrap"]

_WAIT = torch.ops._c10d_functional.wait_tensor.default


def _is_ddp(model: Any) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, Callable[[], contextlib.AbstractContextManager]]:
    """``(inner module, tracing context)`` for a DDP model; ``(model, nullcontext)`` otherwise."""
    if not _is_ddp(model):
        return model, contextlib.nullcontext
    from acopt.sharding import is_sharded

    if is_sharded(model.module):
        raise UnsupportedStep(
            "the model is sharded by acopt.shard and wrapped in DDP: its gradients would be reduced twice; "
            "pass the sharded model without DDP"
        )
    _check_options(model)
    return model.module, lambda: _traced_ddp(model)


#: DDP attributes the traced step assumed (``no_sync()`` clears the first): guarded at every call.
GUARDED = ("require_backward_grad_sync", "require_forward_param_sync", "broadcast_buffers", "bucket_bytes_cap")


def guarded_settings(ddp) -> list[tuple[str, Any, tuple[str, ...], tuple]]:
    """Guard entries (:class:`acopt.guards.Guards` settings) for the DDP object's flags."""
    keys = tuple(k for k in GUARDED if k in vars(ddp))
    return [("DistributedDataParallel", ddp, keys, tuple(vars(ddp)[k] for k in keys))]


def _check_options(ddp: torch.nn.parallel.DistributedDataParallel) -> None:
    if getattr(ddp, "_comm_hooks", None) or getattr(ddp, "_comm_hook", None):
        raise UnsupportedStep(
            "DistributedDataParallel has a communication hook, which acopt does not trace: remove it "
            "(acopt all-reduces the gradients in buckets as DDP's default does)"
        )
    if getattr(ddp, "mixed_precision", None) is not None:
        raise UnsupportedStep("DistributedDataParallel(mixed_precision=...) is not supported; use torch.autocast in train_step")
    if getattr(ddp, "_use_python_reducer", False):
        raise UnsupportedStep("DistributedDataParallel with the Python reducer is not supported")


def _caps(ddp) -> tuple[int, int]:
    config = getattr(ddp, "_bucket_config", None)
    cap = int(ddp.bucket_bytes_cap)
    first = int(getattr(config, "first_bucket_bytes_cap", dist._DEFAULT_FIRST_BUCKET_BYTES))
    if getattr(config, "has_custom_per_bucket_caps", False):
        raise UnsupportedStep("DistributedDataParallel with per-bucket caps (bucket_cap_mb_list) is not supported")
    return first, cap


class _Reducer:
    """DDP's gradient reduction for one traced step, as functional collectives."""

    def __init__(self, ddp, params: list[tuple[str, torch.Tensor]]):
        self.group_name = ddp.process_group.group_name
        self.world = dist.get_world_size(ddp.process_group)
        self.first_cap, self.cap = _caps(ddp)
        self.names = {id(p): n for n, p in params}
        self.expected = [p for _, p in params]
        self.ready: set[int] = set()
        self.open: dict[tuple, list[torch.Tensor]] = {}  # (dtype, device) -> params in the filling bucket
        self.pending: list[tuple[torch.Tensor, list[torch.Tensor]]] = []  # issued: (output, params)
        self.issued = 0
        self.queued = False
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in self.expected]

    def _ready(self, p: torch.Tensor) -> None:
        if id(p) in self.ready:
            raise UnsupportedStep(
                f"parameter {self.names[id(p)]!r} gets its gradient twice in one backward (a parameter used "
                "twice is fine; a second backward through DDP is not supported)"
            )
        self.ready.add(id(p))
        key = (p.grad.dtype, p.grad.device)
        bucket = self.open.setdefault(key, [])
        bucket.append(p)
        cap = self.first_cap if self.issued == 0 else self.cap
        if sum(q.grad.numel() * q.grad.element_size() for q in bucket) >= cap:
            self._issue(self.open.pop(key))
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _issue(self, bucket: list[torch.Tensor]) -> None:
        flat = torch.cat([q.grad.reshape(-1) for q in bucket]).div_(self.world)
        # in place on the fresh bucket, as DDP's reducer (the out-of-place op would copy it first)
        out = torch.ops._c10d_functional.all_reduce_.default(flat, "sum", self.group_name)
        self.pending.append((out, bucket))
        self.issued += 1

    def _finish(self) -> None:
        missing = [self.names[id(p)] for p in self.expected if id(p) not in self.ready]
        if missing:
            raise UnsupportedStep(
                f"parameter(s) {', '.join(missing[:5])} get no gradient in this step: DDP would raise (or, "
                "with find_unused_parameters=True, reduce zeros for them), which acopt does not reproduce; "
                "set requires_grad=False on them or use them in the step"
            )
        for bucket in list(self.open.values()):
            self._issue(bucket)
        self.open.clear()
        for out, bucket in self.pending:
            reduced = _WAIT(out)  # acopt.collectives.hold_until_wait makes it an alias
            offset = 0
            for q in bucket:
                n = q.grad.numel()
                q.grad = reduced[offset : offset + n].view_as(q)
                offset += n
        self.pending.clear()
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def _traced_ddp(ddp) -> Iterator[None]:
    """While tracing: DDP's forward runs the inner module, and its gradient
    all-reduce (and buffer broadcast) become graph ops."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    cls = type(ddp)
    real_forward = cls.forward
    seen: set[int] = set()  # the graphs (one per trace) whose step called the DDP model

    def forward(self, *args, **kwargs):
        if self is not ddp:
            return real_forward(self, *args, **kwargs)
        if not self.require_backward_grad_sync:
            raise UnsupportedStep("train_step runs DDP inside no_sync() (gradient accumulation across steps): not supported")
        mode = get_proxy_mode()
        graph = id(mode.tracer.graph) if mode is not None else 0
        if graph in seen:
            raise UnsupportedStep("train_step calls the DDP model more than once per step: not supported yet")
        seen.add(graph)
        module = self.module
        ignored = getattr(self, "parameters_to_ignore", set())
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad and n not in ignored]
        _Reducer(self, params)
        if self.broadcast_buffers:
            _broadcast_buffers(self, [(n, b) for n, b in module.named_buffers() if n not in ignored])
        return module(*args, **kwargs)

    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = real_forward


def _broadcast_buffers(ddp, buffers: list[tuple[str, torch.Tensor]]) -> None:
    name = ddp.process_group.group_name
    src = dist.get_global_rank(ddp.process_group, 0) if ddp.process_group is not dist.group.WORLD else 0
    with torch.no_grad():
        for _, b in buffers:
            out = torch.ops._c10d_functional.broadcast.default(b, src, name)
            b.copy_(_WAIT(out))
