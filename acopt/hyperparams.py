"""Optimizer hyperparameters as live graph inputs (docs/usage.md, "Live hyperparameters").

While the step is traced, every float in every param group (``lr``,
``momentum``, ``betas``, ``eps``, ``weight_decay``, ... and whatever a
scheduler adds; ints are counts, such as Muon's ``ns_steps``, and stay
guarded values) is replaced by a :class:`Hyper`: a float whose value is a
*sentinel* unique to this trace, which records the Python arithmetic done on
it (``1 - beta1``, ``-lr``, ``lr * weight_decay``) as an expression over the
group values. A torch op that receives one records the sentinel as a literal
in the graph; :meth:`Book.lift` then replaces each sentinel literal by nodes
that compute the same expression from placeholders with the same Python
arithmetic eager runs, so the graph reads ``param_groups`` at every call and
computes bitwise the floats eager computes. Comparisons (``if weight_decay !=
0``) are evaluated on the real values and kept as guards.

A value that escapes this bookkeeping (``math.sqrt(lr)``, ``torch.tensor(lr)``,
a literal derived inside a kernel) would be baked into the graph. The tracer
therefore traces twice with different sentinels and refuses a step whose two
graphs hold different literals (:func:`literal_values`).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx

from acopt.errors import GuardFailure

#: Python arithmetic recorded on hyperparameters (the graph calls the same functions).
OPS: dict[str, Callable[..., Any]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "truediv": operator.truediv,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
    "pow": operator.pow,
    "neg": operator.neg,
    "pos": operator.pos,
    "abs": operator.abs,
}
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
}

# An expression is ("input", k) for the k-th live value, (op, *operands) for
# arithmetic, or a plain number (a constant operand).
Expr = Any


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_live(v: Any) -> bool:
    """Floats of a param group are live inputs. Ints stay guarded values: code
    uses them as counts (``range(ns_steps)``), which no float can stand in for."""
    return isinstance(v, float)


def live_value(v: Any) -> bool:
    return is_live(v) or (isinstance(v, tuple) and bool(v) and all(is_live(x) for x in v))


def evaluate(expr: Expr, values: Sequence[Any]) -> Any:
    if not isinstance(expr, tuple):
        return expr
    if expr[0] == "input":
        return values[expr[1]]
    return OPS[expr[0]](*(evaluate(a, values) for a in expr[1:]))


@dataclasses.dataclass(frozen=True, slots=True)
class InputKey:
    """Where a live value is read: ``optimizers[optimizer].param_groups[group][key]``
    (``[index]`` for tuples such as ``betas``)."""

    optimizer: int
    group: int
    key: str
    index: int | None = None

    def read(self, param_groups: Sequence[Sequence[dict]]) -> Any:
        v = param_groups[self.optimizer][self.group][self.key]
        return v if self.index is None else v[self.index]

    def __str__(self) -> str:
        tail = "" if self.index is None else f"[{self.index}]"
        head = f"optimizer {self.optimizer}: " if self.optimizer else ""
        return f"{head}param_groups[{self.group}][{self.key!r}]{tail}"


@dataclasses.dataclass(frozen=True, slots=True)
class Guard:
    """``compare(expr, other)`` evaluated to ``result`` at trace time."""

    compare: str
    expr: Expr
    other: Expr
    result: bool


class Hyper(float):
    """A hyperparameter (or a value computed from ones) while tracing; see the module doc."""

    def __new__(cls, sentinel: float, real: Any, expr: Expr, book: Book):
        obj = super().__new__(cls, sentinel)
        obj.actual, obj.expr, obj.book = real, expr, book
        book.register(obj)
        return obj

    def __hash__(self) -> int:
        return hash(self.actual)

    def __repr__(self) -> str:
        return repr(self.actual)

    __str__ = __repr__

    def __bool__(self) -> bool:
        return self._compare("ne", 0)


def _parts(x: Any) -> tuple[float, Any, Expr] | None:
    if isinstance(x, Hyper):
        return float(x), x.actual, x.expr
    if is_number(x):
        return x, x, x
    return None


def _is_symbolic(x: Any) -> bool:
    import torch

    return isinstance(x, (torch.SymFloat, torch.SymInt))


def _arith(name: str, swap: bool = False):
    fn = OPS[name]

    def method(self: Hyper, other: Any = None):
        if name in ("neg", "pos", "abs"):
            return Hyper(fn(float(self)), fn(self.actual), (name, self.expr), self.book)
        if _is_symbolic(other):  # a traced host number (the step count's .item()): the graph
            # computes this with the sentinel as a literal, which Book.lift makes live
            return fn(other, float(self)) if swap else fn(float(self), other)
        o = _parts(other)
        if o is None:
            return NotImplemented
        a, b = (o, _parts(self)) if swap else (_parts(self), o)
        real = fn(a[1], b[1])  # first: eager's own errors (ZeroDivisionError) come from real values
        return Hyper(fn(a[0], b[0]), real, (name, a[2], b[2]), self.book)

    return method


def _comparison(name: str):
    def method(self: Hyper, other: Any):
        return self._compare(name, other)

    return method


def _compare(self: Hyper, name: str, other: Any) -> bool:
    o = _parts(other)
    if o is None:
        return NotImplemented
    result = _COMPARE[name](self.actual, o[1])
    self.book.guards.append(Guard(name, self.expr, o[2], result))
    return result


Hyper._compare = _compare
for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow"):
    setattr(Hyper, f"__{_name}__", _arith(_name))
    setattr(Hyper, f"__r{_name}__", _arith(_name, swap=True))
for _name in ("neg", "pos", "abs"):
    setattr(Hyper, f"__{_name}__", _arith(_name))
for _name in _COMPARE:
    setattr(Hyper, f"__{_name}__", _comparison(_name))


class _RecordingGroup(dict):
    """A param group that notes which keys the optimizer reads while tracing."""

    def __init__(self, data, read: set[str]):
        super().__init__(data)
        self._read = read

    def __getitem__(self, key):
        self._read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self._read.add(key)
        return super().__contains__(key)


class Book:
    """The hyperparameters of one trace: their sentinels, expressions and guards."""

    def __init__(self, trace_id: int):
        self.trace_id = trace_id
        self.inputs: list[InputKey] = []
        self.by_sentinel: dict[float, Expr] = {}
        self.ambiguous: set[float] = set()
        self.guards: list[Guard] = []
        self.read_keys: list[set[str]] = []
        self._installed: list[tuple[dict, dict]] = []

    # ---- tracing ------------------------------------------------------------
    def register(self, h: Hyper) -> None:
        s = float(h)
        if not isinstance(h.expr, tuple):
            return
        if s == h.actual and h.expr[0] != "input":
            # The sentinel changed nothing here (absorbed by rounding, or a constant
            # like lr * 0): such a literal cannot be told apart, so guard its value.
            self.guards.append(Guard("eq", h.expr, h.actual, True))
            return
        known = self.by_sentinel.setdefault(s, h.expr)
        if known != h.expr:
            self.ambiguous.add(s)

    def _sentinel(self, k: int, real: Any) -> float:
        shift = (k + 1) * 2.0**-16 + (self.trace_id + 1) * 2.0**-9
        if real == 0:
            return shift
        # a value in (-1, 1) moves towards 0, others away from it: a beta stays below 1, so
        # host arithmetic such as math.sqrt(1 - beta2) sees a value of eager's sign
        return float(real) * (1.0 - shift if abs(real) < 1 else 1.0 + shift)

    def _hyper(self, key: InputKey, real: Any) -> Hyper:
        k = len(self.inputs)
        self.inputs.append(key)
        return Hyper(self._sentinel(k, real), real, ("input", k), self)

    def install(self, param_groups: Sequence[list[dict]]) -> None:
        """Replace every number of every group of every optimizer (``param_groups``:
        one list per optimizer) by a :class:`Hyper`; undone by :meth:`restore`.
        ``read_keys`` gets, per group in that order, the keys the step reads."""
        self.read_keys.clear()
        for o, groups in enumerate(param_groups):
            for g, group in enumerate(groups):
                read: set[str] = set()
                self.read_keys.append(read)
                replaced = {}
                for key, v in group.items():
                    if key == "params":
                        continue
                    if is_live(v):
                        replaced[key] = self._hyper(InputKey(o, g, key), v)
                    elif isinstance(v, tuple) and v and all(is_live(x) for x in v):
                        replaced[key] = tuple(self._hyper(InputKey(o, g, key, i), x) for i, x in enumerate(v))
                recording = _RecordingGroup({**group, **replaced}, read)
                self._installed.append((o, g, group, replaced))
                groups[g] = recording

    def restore(self, param_groups: Sequence[list[dict]]) -> list[str]:
        """Put the original groups back; returns what the step itself wrote to them."""
        changed = []
        for o, g, original, replaced in self._installed:
            recording = param_groups[o][g]
            where = f"optimizer {o} " if o else ""
            for key, v in replaced.items():
                if recording.get(key) is not v:
                    changed.append(f"{where}param_groups[{g}][{key!r}]")
            for key in recording.keys() - original.keys() - {"params"}:
                changed.append(f"{where}param_groups[{g}][{key!r}]")
            param_groups[o][g] = original
        self._installed.clear()
        return changed

    # ---- the graph ------------------------------------------------------------
    def lift(self, gm: fx.GraphModule, placeholder_name: Callable[[InputKey], str]) -> list[InputKey]:
        """Replace sentinel literals by nodes computing them from new placeholders
        (after the existing ones); unused inputs get none. Returns the inputs, in
        placeholder order."""
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        made: dict[Expr, fx.Node] = {}
        used: list[int] = []
        last_placeholder = placeholders[-1] if placeholders else None

        def emit(expr: Expr, before: fx.Node) -> Any:
            if not isinstance(expr, tuple):
                return expr
            if expr in made:
                return made[expr]
            if expr[0] == "input":
                anchor = last_placeholder
                ctx = graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(before)
                with ctx:
                    node = graph.placeholder(placeholder_name(self.inputs[expr[1]]))
                used.append(expr[1])
                _set_after(node, anchor)
            else:
                operands = tuple(emit(a, before) for a in expr[1:])
                with graph.inserting_before(before):
                    node = graph.call_function(OPS[expr[0]], operands)
                node.meta.update({k: v for k, v in before.meta.items() if k == "acopt_region"})
            made[expr] = node
            return node

        def literal(x: Any, user: fx.Node) -> Any:
            if type(x) is float and x in self.by_sentinel:
                if x in self.ambiguous:
                    raise _unsupported(f"two hyperparameter expressions share the literal {x!r} in {user.format_node()}")
                return emit(self.by_sentinel[x], user)
            if isinstance(x, (list, tuple)):
                return type(x)(literal(v, user) for v in x)
            if isinstance(x, dict):
                return {k: literal(v, user) for k, v in x.items()}
            return x

        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            node.args = literal(node.args, node)
            node.kwargs = literal(node.kwargs, node)
        # placeholders were inserted after the anchor one by one: put them in input order
        order = sorted(used)
        anchor = last_placeholder
        for k in order:
            node = made[("input", k)]
            if anchor is not None:
                anchor.append(node)
            anchor = node
        graph.lint()
        gm.recompile()
        return [self.inputs[k] for k in order]

    # ---- at each call ---------------------------------------------------------
    def guard_checker(self, inputs: Sequence[InputKey]) -> Callable[[Sequence[Sequence[dict]]], list[Any]]:
        """A function of the live ``param_groups`` (one list per optimizer) that checks
        the comparisons the trace made and returns the values of ``inputs``
        (raises :class:`GuardFailure`)."""
        all_keys = list(self.inputs)
        guards = list(dict.fromkeys(self.guards))
        index = {key: i for i, key in enumerate(all_keys)}
        wanted = [index[k] for k in inputs]

        def read(param_groups: Sequence[Sequence[dict]]) -> list[Any]:
            values = []
            for key in all_keys:
                try:
                    v = key.read(param_groups)
                except (KeyError, IndexError, TypeError):
                    raise GuardFailure(f"optimizer {key} is gone since tracing; trace again") from None
                if not is_number(v):
                    raise GuardFailure(
                        f"optimizer {key} is now a {type(v).__name__} (it was a number when traced); trace again"
                    )
                values.append(v)
            for gd in guards:
                a = evaluate(gd.expr, values)
                b = evaluate(gd.other, values)
                if _COMPARE[gd.compare](a, b) != gd.result:
                    raise GuardFailure(
                        f"the traced optimizer step assumed {_describe(gd, all_keys)}, which no longer "
                        f"holds (now {a!r} vs {b!r}): the step would take another branch; trace again"
                    )
            return [values[i] for i in wanted]

        return read


def _set_after(node: fx.Node, anchor: fx.Node | None) -> None:
    node.meta["acopt_region"] = anchor.meta.get("acopt_region") if anchor is not None else None


def _describe(guard: Guard, keys: Sequence[InputKey]) -> str:
    def show(e: Expr) -> str:
        if not isinstance(e, tuple):
            return repr(e)
        if e[0] == "input":
            return str(keys[e[1]])
        return f"{e[0]}({', '.join(show(a) for a in e[1:])})"

    symbol = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}[guard.compare]
    text = f"{show(guard.expr)} {symbol} {show(guard.other)}"
    return text if guard.result else f"not ({text})"


def _unsupported(msg: str) -> Exception:
    from acopt.errors import UnsupportedStep

    return UnsupportedStep(msg)


def literal_values(gm: fx.GraphModule) -> dict[str, str]:
    """Every float literal in the graph's arguments, and every tensor constant's
    content, keyed by value with the first node that holds it. Two traces of
    the same step with different hyperparameter sentinels must give the same
    keys; the graphs' structure may differ in ways that do not matter (which of
    two equal gradients a kernel's fake output aliases), so it is not compared."""
    import torch

    found: dict[str, str] = {}

    def visit(x: Any, node: fx.Node) -> None:
        if type(x) is float:
            found.setdefault(repr(x), node.format_node())
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v, node)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v, node)
        elif isinstance(x, torch.Tensor):
            found.setdefault(f"tensor {x.dtype} {tuple(x.shape)} {x.tolist()!r}", node.format_node())

    for n in gm.graph.nodes:
        if n.op == "call_function":
            visit((n.args, n.kwargs), n)
    return found
