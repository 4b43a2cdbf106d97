"""Sharded data parallel (ZeRO-3 / FSDP-style) inside acopt's graph.

``acopt.shard(model)`` shards a model in place across the ranks of the default
process group; the optimizer is then made over ``model.parameters()`` (the
shards), and ``acopt.compile`` traces, plans and rewrites the step as usual::

    acopt.shard(model, units=(Block,))                  # every rank, same model
    optimizer = torch.optim.AdamW(model.parameters())   # this rank's shards
    step = acopt.compile(train_step, model, optimizer, *batch, budget="70%")

* A *unit* is a module of a type in ``units`` (a transformer block) with
  every parameter below it, or any other module that owns parameters
  directly (a Linear: its weight and bias). Its parameters are flattened into
  one vector, padded to a multiple of the world size, and each rank keeps its
  slice as the unit's only parameter (``_acopt_shard`` on the unit's module):
  parameters, gradients and optimizer state are 1/world per rank.
* In the forward, the first read of a unit's weight all-gathers the unit
  (``all_gather_into_tensor`` + wait) into its full flat vector; the module
  reads views of it. Its backward divides the full gradient by the world size
  and reduce-scatters it (SUM) into the shard's gradient: DDP's average,
  bitwise for two ranks.
* The gathered full weights are activations like any other: the planner keeps
  them from the forward (FSDP's ``reshard_after_forward=False``) or re-gathers
  them before their backward use (``True``), per unit, by the measured cost of
  the all-gather, alongside ordinary recomputation. The all-gather of a graph
  input in the forward is the one collective a recompute block may replay
  (memory model rule 8); every rank runs the same plan (:mod:`acopt.rank_plan`).

Eager calls work too (the same gathers run eagerly), so evaluation needs no
extra step; :func:`full_state_dict` gathers the full parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from acopt.errors import UnsupportedStep

__all__ = ["full_state_dict", "is_sharded", "shard"]

SHARD = "_acopt_shard"
_WAIT = torch.ops._c10d_functional.wait_tensor.default


@dataclasses.dataclass(slots=True, eq=False)
class _Unit:
    """One sharded unit: the module that owns its shard, and where each of its
    parameters (``names``, relative to the owner) sits in the flat vector."""

    owner: nn.Module
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    index: dict[tuple[int, str], int]  # (id(submodule), attribute) -> position in names
    numel: int  # unpadded
    world: int
    group_name: str
    gathered: torch.Tensor | None = None  # the full flat vector while the owner's forward runs
    active: int = 0

    def full(self) -> torch.Tensor:
        if self.gathered is not None:
            return self.gathered
        out = _Gather.apply(getattr(self.owner, SHARD), self.world, self.group_name)
        if self.active:
            self.gathered = out
        return out

    def view(self, module: nn.Module, attr: str) -> torch.Tensor:
        i = self.index[(id(module), attr)]
        n = math.prod(self.shapes[i])
        return self.full()[self.offsets[i] : self.offsets[i] + n].view(self.shapes[i])


class _Gather(torch.autograd.Function):
    """All-gather a unit's shards; backward: gradient / world, reduce-scattered (SUM)."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, world: int, group_name: str) -> torch.Tensor:
        ctx.world, ctx.group_name = world, group_name
        return _WAIT(torch.ops._c10d_functional.all_gather_into_tensor.default(shard, world, group_name))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scaled = grad.div(ctx.world).contiguous()
        out = torch.ops._c10d_functional.reduce_scatter_tensor.default(scaled, "sum", ctx.world, ctx.group_name)
        return _WAIT(out), None, None


def _sharded_class(cls: type, names: tuple[str, ...]) -> type:
    """A subclass of ``cls`` whose parameters ``names`` are views of the gathered unit."""

    def getter(name):
        return property(lambda self: self._acopt_unit.view(self, name))

    return type(f"Sharded{cls.__name__}", (cls,), {n: getter(n) for n in names} | {"_acopt_sharded_class": True})


def _enter(module, args):
    unit = module._acopt_owned
    unit.active += 1


def _leave(module, args, output):
    unit = module._acopt_owned
    unit.active -= 1
    if not unit.active:
        unit.gathered = None


def is_sharded(model: nn.Module) -> bool:
    return any(hasattr(m, "_acopt_owned") for m in model.modules())


@contextlib.contextmanager
def refuse_whole_model_norms(model: nn.Module) -> Iterator[None]:
    """While tracing a sharded model: gradient clipping by norm would see this
    rank's shards only (a silently different step), so it is refused."""
    if not is_sharded(model):
        yield
        return
    import torch.nn.utils as nn_utils
    from torch.nn.utils import clip_grad

    def refuse(*args, **kwargs):
        raise UnsupportedStep(
            "train_step clips gradients by norm on a model sharded by acopt.shard: the norm would be this "
            "rank's shard's only; train it with DDP instead, or clip by value"
        )

    names = [n for n in ("clip_grad_norm_", "clip_grad_norm", "get_total_norm") if hasattr(clip_grad, n)]
    saved = [(mod, n, getattr(mod, n)) for mod in (clip_grad, nn_utils) for n in names if hasattr(mod, n)]
    try:
        for mod, n, _ in saved:
            setattr(mod, n, refuse)
        yield
    finally:
        for mod, n, f in saved:
            setattr(mod, n, f)


def shard(model: nn.Module, *, units: tuple[type, ...] = (), group=None) -> nn.Module:
    """Shard ``model``'s parameters in place across the ranks of ``group`` (default:
    the world). A unit is every module of a type in ``units`` (e.g. the
    transformer block class: one all-gather per block) with all parameters
    below it, and every other module that owns parameters directly. Rank 0's
    parameters and buffers are broadcast first (as DDP does), so every rank
    starts from the same model. Returns ``model``; build the optimizer after
    this call, over ``model.parameters()``."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("acopt.shard needs torch.distributed initialised (init_process_group)")
    if is_sharded(model):
        raise ValueError("the model is already sharded")
    group = group or dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    _check_shardable(model)
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src, group=group)
    for name, owner in _unit_owners(model, tuple(units)):
        below = owner.named_modules() if units and isinstance(owner, units) else [("", owner)]
        members = [(sub_name, sub, attr, p) for sub_name, sub in below for attr, p in sub._parameters.items() if p is not None]
        flat = torch.cat([p.detach().reshape(-1) for *_, p in members])
        numel = flat.numel()
        per_rank = -(-numel // world)
        flat = torch.cat([flat, flat.new_zeros(per_rank * world - numel)])
        offsets, total = [], 0
        for *_, p in members:
            offsets.append(total)
            total += p.numel()
        unit = _Unit(
            owner=owner,
            names=tuple(f"{sub_name}.{attr}" if sub_name else attr for sub_name, _, attr, _ in members),
            shapes=tuple(p.shape for *_, p in members),
            offsets=tuple(offsets),
            index={(id(sub), attr): i for i, (_, sub, attr, _) in enumerate(members)},
            numel=numel,
            world=world,
            group_name=group.group_name,
        )
        by_module: dict[int, tuple[nn.Module, list[str]]] = {}
        for _, sub, attr, _ in members:
            del sub._parameters[attr]
            by_module.setdefault(id(sub), (sub, []))[1].append(attr)
        for sub, attrs in by_module.values():
            sub._acopt_unit = unit
            sub.__class__ = _sharded_class(type(sub), tuple(attrs))
        owner.register_parameter(SHARD, nn.Parameter(flat[rank * per_rank : (rank + 1) * per_rank].clone()))
        owner._acopt_owned = unit
        owner.register_forward_pre_hook(_enter)
        owner.register_forward_hook(_leave, always_call=True)
    return model


def _unit_owners(model: nn.Module, units: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """Modules of a ``units`` type (outermost first), then every other module owning parameters directly."""
    owners: list[tuple[str, nn.Module]] = []
    covered: list[str] = []

    def inside(name: str) -> bool:
        return any(name == c or name.startswith(c + ".") for c in covered)

    if units:
        for name, m in model.named_modules():
            if not inside(name) and isinstance(m, units) and any(True for _ in m.parameters()):
                owners.append((name, m))
                covered.append(name)
    for name, m in model.named_modules():
        if not inside(name) and any(p is not None for p in m._parameters.values()):
            owners.append((name, m))
    return owners


def _check_shardable(model: nn.Module) -> None:
    """Refuse what a sharded unit cannot hold, before anything is changed."""
    seen: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            if p is None:
                continue
            where = f"{name}.{attr}" if name else attr
            if id(p) in seen and seen[id(p)] != where:
                raise UnsupportedStep(
                    f"parameter {where} is shared with {seen[id(p)]} (tied weights): acopt.shard does not shard "
                    "tied parameters yet"
                )
            seen[id(p)] = where
            if not p.requires_grad:
                raise UnsupportedStep(f"parameter {where} is frozen: acopt.shard shards trainable parameters only")
    if len({p.dtype for p in model.parameters()}) > 1:
        raise UnsupportedStep("the model holds parameters of several dtypes: not supported by acopt.shard yet")


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded parameters (every rank gathers them, in module order) and the
    buffers, by their original names."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            unit = getattr(module, "_acopt_owned", None)
            if unit is not None:
                full = unit.full()
                for n, shape, off in zip(unit.names, unit.shapes, unit.offsets):
                    out[prefix + n] = full[off : off + math.prod(shape)].view(shape).clone()
            for n, p in module._parameters.items():
                if p is not None and n != SHARD:
                    out[prefix + n] = p.detach().clone()
            for n, b in module._buffers.items():
                if b is not None:
                    out[prefix + n] = b.detach().clone()
    return out
