"""Live hyperparameters inside compiled segments, as 0-d float64 tensors.

The traced step computes with Python floats where eager does: the
hyperparameter placeholders (``lr``, ``betas``... read from ``param_groups``
at each call, :mod:`acopt.hyperparams`), the Python arithmetic over them and
over the step count an optimizer reads with ``.item()``
(``aten._local_scalar_dense``: :mod:`acopt.optimizer_form`), such as ``lr /
(1 - beta1 ** step)``. A compiled graph must neither bake such a value as a
constant nor take a Python float as input (inductor specialises on it). So,
in each compiled segment (:func:`tensorify`), the scalar world becomes tensors:

* a float input is a 0-d float64 tensor, made from the live float at each call
  (:class:`Boundary`); a scalar the segment returns to an eager node is turned
  back into a Python float (``.item()``);
* ``_local_scalar_dense(step)`` becomes a float64 copy of the step tensor (the
  value ``.item()`` returns, exactly);
* the Python arithmetic becomes the same operation on float64 tensors (IEEE
  double, as Python computes it; ``pow`` is libm's in both);
* an aten op that received a Python float receives the 0-d tensor cast to the
  dtype eager computes that scalar in (a Python scalar is a "wrapped number":
  it never promotes a tensor, and is cast to the op's computation dtype),
  through the op's Tensor overload: ``mul_(p, s)`` keeps its overload,
  ``lerp_.Scalar(a, b, w)`` becomes ``lerp_.Tensor``, ``addcdiv_(p, a, b,
  value=s)`` becomes ``addcdiv_(p, a * s, b)`` (eager computes ``p + s * a /
  b``), ``add_(p, g, alpha=s)`` becomes ``add_(p, g * s)``; ``_foreach_*``
  ops are unrolled into their per-tensor ops first.

The numbers are eager's at float rounding (a fused kernel may contract a
multiply-add, or divide where eager multiplies by a reciprocal). Whatever this
module does not know how to convert (another op taking a Scalar, a tensor that
is not float32/float64 next to a scalar: inductor may round the scalar to
that dtype where eager computes in float32, an integer scalar, ``//`` and
``%``) is named by :func:`eager_nodes`: those nodes, and every scalar
computed from them, run eagerly, never compiled with a constant in place of a
live value. Degenerate hyperparameters differ in one way: where Python raises
(``ZeroDivisionError`` for ``lr / (1 - beta1 ** step)`` with ``beta1 = 1``),
the compiled step computes ``inf`` like any tensor division.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND, elementwise_dtypes

from acopt.errors import UnsupportedStep

__all__ = ["Boundary", "eager_nodes", "tensorify"]

aten = torch.ops.aten
F64 = torch.float64
#: Floating dtypes a converted op may read or write (and bool: see the module docstring).
_DTYPES = (torch.float32, torch.float64)
#: Meta key of a tensorified segment: (indices of float inputs, indices of scalar outputs).
BOUNDARY_KEY = "acopt_scalar_boundary"


# ---- the scalar world as float64 tensors --------------------------------------------
def _f64(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.scalar_tensor(x, dtype=F64)


def scalar_add(a: Any, b: Any) -> torch.Tensor:
    return torch.add(_f64(a), _f64(b))


def scalar_sub(a: Any, b: Any) -> torch.Tensor:
    return torch.sub(_f64(a), _f64(b))


def scalar_mul(a: Any, b: Any) -> torch.Tensor:
    return torch.mul(_f64(a), _f64(b))


def scalar_truediv(a: Any, b: Any) -> torch.Tensor:
    return torch.div(_f64(a), _f64(b))


def scalar_pow(a: Any, b: Any) -> torch.Tensor:
    return torch.pow(_f64(a), _f64(b))


def scalar_neg(a: torch.Tensor) -> torch.Tensor:
    return torch.neg(a)


def scalar_pos(a: torch.Tensor) -> torch.Tensor:
    return a


def scalar_abs(a: torch.Tensor) -> torch.Tensor:
    return torch.abs(a)


def scalar_sqrt(a: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(a)


def scalar_item(t: torch.Tensor) -> torch.Tensor:
    """``t.item()`` as a float64 0-d tensor (exact for every floating dtype)."""
    return t.detach().to(device="cpu", dtype=F64).reshape(())


#: Python arithmetic on floats -> the same on float64 tensors. (``//`` and ``%`` are
#: not here: Python's float floor division and modulo are not torch's.)
ARITHMETIC: dict[Any, Callable[..., torch.Tensor]] = {
    operator.add: scalar_add,
    operator.sub: scalar_sub,
    operator.mul: scalar_mul,
    operator.truediv: scalar_truediv,
    operator.pow: scalar_pow,
    operator.neg: scalar_neg,
    operator.pos: scalar_pos,
    operator.abs: scalar_abs,
    math.sqrt: scalar_sqrt,
}


def as_wrapped_number(s: torch.Tensor, *like: torch.Tensor) -> torch.Tensor:
    """``s`` in the dtype eager computes a Python scalar in, next to the tensors ``like``
    of an elementwise op (their computation dtype; the scalar never promotes them)."""
    dtype = elementwise_dtypes(*like, 1.0, type_promotion_kind=ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT)[0]
    return s.to(dtype)


# ---- ops whose Scalar argument receives a (cast) tensor -------------------------------
def add_alpha(self, other, alpha=1):
    return aten.add.Tensor(self, aten.mul.Tensor(other, alpha))


def add__alpha(self, other, alpha=1):
    return aten.add_.Tensor(self, aten.mul.Tensor(other, alpha))


def sub_alpha(self, other, alpha=1):
    return aten.sub.Tensor(self, aten.mul.Tensor(other, alpha))


def sub__alpha(self, other, alpha=1):
    return aten.sub_.Tensor(self, aten.mul.Tensor(other, alpha))


def rsub_alpha(self, other, alpha=1):  # other - alpha * self
    return aten.sub.Tensor(other, aten.mul.Tensor(self, alpha))


def lerp_weight(self, end, weight):
    return aten.lerp.Tensor(self, end, weight.to(self.dtype))


def lerp__weight(self, end, weight):
    return aten.lerp_.Tensor(self, end, weight.to(self.dtype))


def addcmul_value(self, tensor1, tensor2, *, value=1):  # eager: self + value * tensor1 * tensor2
    return aten.addcmul.default(self, aten.mul.Tensor(tensor1, value), tensor2)


def addcmul__value(self, tensor1, tensor2, *, value=1):
    return aten.addcmul_.default(self, aten.mul.Tensor(tensor1, value), tensor2)


def addcdiv_value(self, tensor1, tensor2, *, value=1):  # eager: self + value * tensor1 / tensor2
    return aten.addcdiv.default(self, aten.mul.Tensor(tensor1, value), tensor2)


def addcdiv__value(self, tensor1, tensor2, *, value=1):
    return aten.addcdiv_.default(self, aten.mul.Tensor(tensor1, value), tensor2)


def scalar_tensor(s, *, dtype=None, layout=None, device=None, pin_memory=None):
    return s.to(
        device=device if device is not None else "cpu",
        dtype=dtype if dtype is not None else torch.get_default_dtype(),
    )


#: Ops with a Scalar argument: the callable taking a (cast) 0-d tensor there instead.
SCALAR_SLOT: dict[Any, Callable] = {
    aten.add.Tensor: add_alpha,
    aten.add_.Tensor: add__alpha,
    aten.sub.Tensor: sub_alpha,
    aten.sub_.Tensor: sub__alpha,
    aten.add.Scalar: add_alpha,
    aten.add_.Scalar: add__alpha,
    aten.sub.Scalar: sub_alpha,
    aten.sub_.Scalar: sub__alpha,
    aten.rsub.Scalar: rsub_alpha,
    aten.rsub.Tensor: rsub_alpha,
    aten.mul.Scalar: aten.mul.Tensor,
    aten.mul_.Scalar: aten.mul_.Tensor,
    aten.div.Scalar: aten.div.Tensor,
    aten.div_.Scalar: aten.div_.Tensor,
    aten.lerp.Scalar: lerp_weight,
    aten.lerp_.Scalar: lerp__weight,
    aten.addcmul.default: addcmul_value,
    aten.addcmul_.default: addcmul__value,
    aten.addcdiv.default: addcdiv_value,
    aten.addcdiv_.default: addcdiv__value,
    aten.pow.Tensor_Scalar: aten.pow.Tensor_Tensor,
    aten.pow_.Scalar: aten.pow_.Tensor,
    aten.pow.Scalar: aten.pow.Tensor_Tensor,
    aten.eq.Scalar: aten.eq.Tensor,
    aten.ne.Scalar: aten.ne.Tensor,
    aten.lt.Scalar: aten.lt.Tensor,
    aten.le.Scalar: aten.le.Tensor,
    aten.gt.Scalar: aten.gt.Tensor,
    aten.ge.Scalar: aten.ge.Tensor,
    aten.fill_.Scalar: aten.fill_.Tensor,
    aten.scalar_tensor.default: scalar_tensor,
}
#: Ops whose Scalar argument is cast by their replacement itself (no neighbouring tensor to cast to).
_NO_CAST = {aten.scalar_tensor.default}

#: ``_foreach_<name>`` overload -> (per-tensor op, how each argument is taken per tensor:
#: "list" element i, "same" for all).
_FOREACH: dict[tuple[str, str], tuple[Any, tuple[str, ...]]] = {}
for _name in ("add", "sub", "mul", "div"):
    for _inplace in ("", "_"):
        _one = getattr(aten, _name + _inplace)
        _FOREACH[(f"_foreach_{_name}{_inplace}", "Scalar")] = (
            _one.Scalar,
            ("list", "same"),
        )
        _FOREACH[(f"_foreach_{_name}{_inplace}", "ScalarList")] = (
            _one.Scalar,
            ("list", "list"),
        )
        _FOREACH[(f"_foreach_{_name}{_inplace}", "List")] = (
            _one.Tensor,
            ("list", "list"),
        )
        _FOREACH[(f"_foreach_{_name}{_inplace}", "Tensor")] = (
            _one.Tensor,
            ("list", "same"),
        )
for _inplace in ("", "_"):
    _lerp = getattr(aten, "lerp" + _inplace)
    _FOREACH[(f"_foreach_lerp{_inplace}", "Scalar")] = (
        _lerp.Scalar,
        ("list", "list", "same"),
    )
    _FOREACH[(f"_foreach_lerp{_inplace}", "ScalarList")] = (
        _lerp.Scalar,
        ("list", "list", "list"),
    )
    _FOREACH[(f"_foreach_lerp{_inplace}", "List")] = (
        _lerp.Tensor,
        ("list", "list", "list"),
    )
    for _name in ("addcmul", "addcdiv"):
        _one = getattr(aten, _name + _inplace).default
        _FOREACH[(f"_foreach_{_name}{_inplace}", "Scalar")] = (
            _one,
            ("list", "list", "list", "same"),
        )
        _FOREACH[(f"_foreach_{_name}{_inplace}", "ScalarList")] = (
            _one,
            ("list", "list", "list", "list"),
        )
_FOREACH[("_foreach_pow", "ScalarAndTensor")] = (aten.pow.Scalar, ("same", "list"))
_FOREACH[("_foreach_pow", "Scalar")] = (aten.pow.Tensor_Scalar, ("list", "same"))
_FOREACH[("_foreach_pow", "List")] = (aten.pow.Tensor_Tensor, ("list", "list"))
_FOREACH[("_foreach_pow_", "Scalar")] = (aten.pow_.Scalar, ("list", "same"))


def _foreach_key(op: Any) -> tuple[str, str] | None:
    if isinstance(op, torch._ops.OpOverload) and op.__name__.startswith("_foreach_"):
        return op._schema.name.split("::")[-1], op._overloadname
    return None


# ---- which nodes stay eager -------------------------------------------------------
def _is_tensor(n: Any) -> bool:
    return isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)


def _float_scalar(n: fx.Node, scalars: set[str], floats: set[str]) -> bool | None:
    """Whether ``n`` computes a float scalar this module converts: True; a scalar it
    does not convert: False; not a scalar: None. ``scalars``: the scalars before ``n``,
    ``floats`` those of them converted."""
    val = n.meta.get("val")
    if n.op == "placeholder":
        return None if isinstance(val, torch.Tensor) else True  # live hyperparameters: floats
    if n.op != "call_function":
        return None
    if n.target is aten._local_scalar_dense.default:
        return isinstance(val, torch.SymFloat) and n.args[0].meta["val"].dtype.is_floating_point
    if isinstance(n.target, torch._ops.OpOverload):
        return None
    read = [a for a in n.all_input_nodes if a.name in scalars]
    if not read:
        return None
    operands = [*n.args, *n.kwargs.values()]
    return (
        n.target in ARITHMETIC
        and all(a.name in floats for a in read)
        and all(
            (isinstance(a, fx.Node) and a.name in floats) or (isinstance(a, (int, float)) and not isinstance(a, bool))
            for a in operands
        )
    )


def _bind(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
    """(schema argument, value) for each argument the node passes."""
    schema = op._schema.arguments
    out = [(schema[i], a) for i, a in enumerate(args)]
    by_name = {a.name: a for a in schema}
    out += [(by_name[k], v) for k, v in kwargs.items()]
    return out


def _tensor_dtypes_ok(values: Sequence[Any], out: Any) -> bool:
    metas = [v.meta.get("val") for v in values if isinstance(v, fx.Node)]
    metas += list(out) if isinstance(out, (list, tuple)) else [out]
    return all(m.dtype in _DTYPES or m.dtype == torch.bool for m in metas if isinstance(m, torch.Tensor))


def _single_ok(op: Any, args: tuple, kwargs: dict, scalar: Callable[[Any], bool], out: Any) -> bool:
    """Whether the aten op ``op`` reading scalars (``scalar(arg)``) can be converted."""
    if not isinstance(op, torch._ops.OpOverload):
        return False
    table = op in SCALAR_SLOT
    flat = []
    for arg, value in _bind(op, args, kwargs):
        if isinstance(value, (list, tuple)):
            if any(scalar(v) for v in value):
                return False  # a scalar in a list argument of a per-tensor op
            flat += list(value)
            continue
        flat.append(value)
        if not scalar(value):
            continue
        if isinstance(arg.type, torch.NumberType):
            if not table:
                return False
        elif isinstance(arg.type, torch.TensorType):
            if not (table or torch.Tag.pointwise in op.tags):
                return False
        else:
            return False
    return _tensor_dtypes_ok(flat, out)


def _per_tensor(op: Any, args: tuple, kwargs: dict) -> tuple[Any, list[tuple[tuple, dict]]] | None:
    """A ``_foreach_*`` node's per-tensor op and arguments, or None if not unrollable."""
    key = _foreach_key(op)
    if key not in _FOREACH:
        return None
    one, how = _FOREACH[key]
    if len(args) != len(how):
        return None
    n = next(len(a) for a, h in zip(args, how, strict=True) if h == "list")
    if any(h == "list" and (not isinstance(a, (list, tuple)) or len(a) != n) for a, h in zip(args, how, strict=True)):
        return None
    positional = sum(not a.kwarg_only for a in one._schema.arguments)
    keywords = [a.name for a in one._schema.arguments if a.kwarg_only]
    calls = []
    for i in range(n):
        each = [a[i] if h == "list" else a for a, h in zip(args, how, strict=True)]
        calls.append(
            (
                tuple(each[:positional]),
                {**dict(zip(keywords, each[positional:], strict=False)), **kwargs},
            )
        )
    return one, calls


def eager_nodes(gm: fx.GraphModule) -> set[str]:
    """Nodes that read or compute a scalar which :func:`tensorify` cannot convert: they
    run eagerly, and so does every scalar computed from one of them."""
    scalars: set[str] = set()  # every Python scalar value
    floats: set[str] = set()  # those a compiled segment computes as tensors
    eager: set[str] = set()

    def scalar(v: Any) -> bool:
        return isinstance(v, fx.Node) and v.name in scalars

    for n in gm.graph.nodes:
        kind = _float_scalar(n, scalars, floats)
        if kind is not None:
            scalars.add(n.name)
            (floats if kind else eager).add(n.name)
            continue
        if n.op != "call_function" or not any(a.name in scalars for a in n.all_input_nodes):
            continue
        out = n.meta.get("val")
        unrolled = _per_tensor(n.target, n.args, n.kwargs)
        if any(a.name in scalars and a.name not in floats for a in n.all_input_nodes):
            ok = False
        elif unrolled is not None:
            one, calls = unrolled
            outs = out if isinstance(out, (list, tuple)) and len(out) == len(calls) else [out] * len(calls)
            ok = all(_single_ok(one, a, k, scalar, o) for (a, k), o in zip(calls, outs, strict=True))
            ok = ok and all(u.target is operator.getitem for u in n.users)
        else:
            ok = _single_ok(n.target, n.args, n.kwargs, scalar, out)
        if not ok:
            eager.add(n.name)
    return eager


# ---- the rewrite -------------------------------------------------------------------
def tensorify(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite a compiled segment (its nodes passed :func:`eager_nodes`) so every float
    scalar is a 0-d float64 tensor; records the :class:`Boundary` in ``gm.meta``."""
    graph = gm.graph
    scalars: set[fx.Node] = set()
    inputs: list[int] = []
    for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder"):
        if not isinstance(n.meta.get("val"), torch.Tensor):
            scalars.add(n)
            inputs.append(i)
            n.meta.pop("val", None)
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n.target is aten._local_scalar_dense.default:
            _retarget(n, scalar_item)
            scalars.add(n)
            continue
        if not any(a in scalars for a in n.all_input_nodes):
            continue
        if n.target in ARITHMETIC:
            _retarget(n, ARITHMETIC[n.target])
            scalars.add(n)
        elif _per_tensor(n.target, n.args, n.kwargs) is not None:
            _unroll(graph, n, scalars)
        elif isinstance(n.target, torch._ops.OpOverload):
            _lower(graph, n, scalars)
        else:
            raise UnsupportedStep(f"backend='inductor': cannot compile {n.format_node()}, which reads a live hyperparameter")
    output = next(n for n in graph.nodes if n.op == "output")
    outs = output.args[0]
    gm.meta[BOUNDARY_KEY] = (
        tuple(inputs),
        tuple(i for i, a in enumerate(outs) if a in scalars),
    )
    graph.lint()
    gm.recompile()
    return gm


def _retarget(n: fx.Node, target: Callable) -> None:
    n.target = target
    n.meta.pop("val", None)
    n.meta.pop("tensor_meta", None)


def _lower(graph: fx.Graph, n: fx.Node, scalars: set[fx.Node]) -> None:
    """An aten op reading scalars: each scalar cast to its wrapped-number dtype, and
    the op replaced by its Tensor form where the scalar sat in a Scalar argument."""
    op = n.target
    if not _single_ok(op, n.args, n.kwargs, lambda v: v in scalars, None):
        raise UnsupportedStep(f"backend='inductor': cannot compile {n.format_node()}, which reads a live hyperparameter")
    like = tuple(v for _, v in _bind(op, n.args, n.kwargs) if isinstance(v, fx.Node) and v not in scalars and not _is_list(v))
    cast: dict[fx.Node, fx.Node] = {}

    def to_wrapped(v: Any) -> Any:
        if not (isinstance(v, fx.Node) and v in scalars) or op in _NO_CAST:
            return v
        if v not in cast:
            with graph.inserting_before(n):
                cast[v] = graph.call_function(as_wrapped_number, (v, *like))
        return cast[v]

    n.args = tuple(to_wrapped(a) for a in n.args)
    n.kwargs = {k: to_wrapped(v) for k, v in n.kwargs.items()}
    if any(isinstance(arg.type, torch.NumberType) and isinstance(v, fx.Node) for arg, v in _bind(op, n.args, n.kwargs)):
        n.target = SCALAR_SLOT[op]
    n.meta.pop("val", None)
    n.meta.pop("tensor_meta", None)


def _is_list(v: fx.Node) -> bool:
    return isinstance(v.meta.get("val"), (list, tuple))


def _unroll(graph: fx.Graph, n: fx.Node, scalars: set[fx.Node]) -> None:
    """A ``_foreach_*`` op reading scalars as its per-tensor ops, each then lowered."""
    one, calls = _per_tensor(n.target, n.args, n.kwargs)
    made = []
    for args, kwargs in calls:
        with graph.inserting_before(n):
            m = graph.call_function(one, args, kwargs)
        m.meta = {k: v for k, v in n.meta.items() if k not in ("val", "tensor_meta")}
        if any(a in scalars for a in m.all_input_nodes):
            _lower(graph, m, scalars)
        made.append(m)
    for user in list(n.users):
        if user.target is not operator.getitem:
            raise UnsupportedStep(f"backend='inductor': cannot unroll {n.format_node()}")
        user.replace_all_uses_with(made[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(n)


class Boundary:
    """Floats in and out of a tensorified segment: a float input becomes a 0-d float64
    tensor at each call, a scalar output a Python float again."""

    def __init__(self, gm: fx.GraphModule):
        self.inputs, self.outputs = gm.meta.get(BOUNDARY_KEY, ((), ()))

    def __bool__(self) -> bool:
        return bool(self.inputs or self.outputs)

    def convert_inputs(self, args: list) -> list:
        """A new list with each float input as a tensor; ``args`` is emptied (boxed call)."""
        out = list(args)
        args.clear()
        for i in self.inputs:
            out[i] = torch.scalar_tensor(out[i], dtype=F64)
        return out

    def convert_outputs(self, outs: Any) -> Any:
        if not self.outputs:
            return outs
        outs = list(outs)
        for i in self.outputs:
            outs[i] = outs[i].item()
        return outs
