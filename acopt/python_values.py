"""Plain Python values the user's code reads from globals, closures and config
objects: recorded when a step is traced, checked at every call.

A traced graph runs no Python, so every number, flag or string that
``train_step`` (or a user-defined model's methods) read from outside its
arguments is baked into the graph: ``loss * ALPHA`` with a module global
``ALPHA``, ``label_smoothing=cfg.smooth`` with a global config object,
``if use_aux:`` with a closure variable. Eager PyTorch reads them again at each
step; so does acopt, as a guard (docs/usage.md, "Guards"): :func:`record` walks
the code objects of ``train_step`` and of the user's functions it reaches
(globals and closure cells that are Python functions, the methods of
user-defined module classes), and keeps a :class:`Read` for each plain value
(bool, int, float, str, None, tuples of them; and, by identity, a tensor:
the graph holds the tensor it traced, so a global rebound to a new tensor
must trace again) found as

* a global the code names (``LOAD_GLOBAL``),
* a closure cell (``nonlocal`` or captured variable),
* an attribute the code names of a global or captured plain object
  (``SimpleNamespace``, ``argparse.Namespace``, a dataclass instance),
* a string-keyed item the code names of a global or captured ``dict``.

Library code (site-packages, the standard library, torch and acopt) is not
walked: its globals are not a training loop's settings. :func:`changed`
names the first value that differs from the recorded one; :func:`restore`
puts recorded values back (a step that writes one, e.g. a global step
counter, is refused after tracing, which ran it, and the counter is restored).
"""

from __future__ import annotations

import dataclasses
import dis
import functools
import sysconfig
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["Read", "assigned_outside", "changed", "describe", "record", "restore"]

_MISSING = object()
_PLAIN = (bool, int, float, str, type(None))
_LIBRARY_PREFIXES = ("torch", "acopt", "transformers", "accelerate", "lightning", "pytorch_lightning", "numpy")
_BUILD_ONLY = frozenset({"__init__", "__repr__", "extra_repr", "reset_parameters", "_init_weights"})
_LIBRARY_DIRS = tuple(
    str(Path(p).resolve()) for p in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]} if p
)


@dataclasses.dataclass(frozen=True, slots=True)
class Read:
    """One plain value the user's code read: where, how to read and write it again."""

    where: str  # e.g. "global ALPHA of train_step", "cfg.smooth (global of train_step)"
    get: Callable[[], Any]
    set: Callable[[Any], None]
    value: Any


def _plain(v: Any) -> bool:
    if isinstance(v, tuple):
        return all(_plain(x) for x in v)
    return isinstance(v, _PLAIN)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, torch.Tensor):  # a tensor: the same object only
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _library(fn: types.FunctionType) -> bool:
    module = getattr(fn, "__module__", None) or ""
    if module.split(".")[0] in _LIBRARY_PREFIXES:
        return True
    path = fn.__code__.co_filename
    if path.startswith("<"):  # exec'd or interactive code: the user's
        return False
    resolved = str(Path(path).resolve())
    return any(resolved.startswith(d) for d in _LIBRARY_DIRS) or "site-packages" in resolved


def _codes(code: types.CodeType) -> Iterable[types.CodeType]:
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _codes(c)


def _names(fn: types.FunctionType) -> tuple[set[str], set[str], set[str]]:
    """Globals loaded, attribute names and string constants of ``fn``'s code (nested code included)."""
    globals_, attrs, strings = set(), set(), set()
    for code in _codes(fn.__code__):
        for ins in dis.get_instructions(code):
            if ins.opname == "LOAD_GLOBAL":
                globals_.add(ins.argval)
            elif ins.opname in ("LOAD_ATTR", "LOAD_METHOD", "STORE_ATTR"):
                attrs.add(ins.argval)
        strings.update(c for c in code.co_consts if isinstance(c, str))
    return globals_, attrs, strings


def _config_object(v: Any) -> bool:
    """A plain object whose attributes are settings (not a module, tensor, class, model...)."""
    if isinstance(v, (types.ModuleType, type, types.FunctionType, types.MethodType, torch.Tensor, torch.nn.Module)):
        return False
    if isinstance(v, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
        return False
    return isinstance(getattr(v, "__dict__", None), dict) and not callable(v)


class _Walk:
    def __init__(self) -> None:
        self.reads: list[Read] = []
        self._seen_fns: set[int] = set()
        self._seen_values: set[tuple] = set()

    def _add(self, key: tuple, where: str, get: Callable, set_: Callable) -> None:
        if key in self._seen_values:
            return
        value = get()
        if value is not _MISSING and (_plain(value) or isinstance(value, torch.Tensor)):
            self._seen_values.add(key)
            self.reads.append(Read(where, get, set_, value))

    def _container(self, obj: Any, label: str, reader: str, attrs: set[str], strings: set[str]) -> None:
        if isinstance(obj, dict):
            for k in strings & {k for k in obj if isinstance(k, str)}:
                self._add(
                    ("item", id(obj), k),
                    f"{label}[{k!r}] ({reader})",
                    lambda d=obj, k=k: d.get(k, _MISSING),
                    lambda v, d=obj, k=k: d.__setitem__(k, v),
                )
        elif _config_object(obj):
            d = vars(obj)
            for a in attrs & set(d):
                self._add(
                    ("attr", id(obj), a),
                    f"{label}.{a} ({reader})",
                    lambda d=d, a=a: d.get(a, _MISSING),
                    lambda v, d=d, a=a: d.__setitem__(a, v),
                )

    def function(self, fn: Any, depth: int = 0) -> None:
        if isinstance(fn, functools.partial):
            self.function(fn.func, depth)
            return
        owner = None
        if isinstance(fn, types.MethodType):  # a bound method: its object's settings too
            owner, fn = fn.__self__, fn.__func__
        elif not isinstance(fn, (types.FunctionType, type, torch.nn.Module)) and callable(fn):
            call = getattr(type(fn), "__call__", None)  # noqa: B004 - the function itself: train_step = Step(0.5)
            if isinstance(call, types.FunctionType):
                owner, fn = fn, call
        if owner is not None and isinstance(fn, types.FunctionType) and not _library(fn):
            attrs = set()  # what any method of the object's class reads from it (self.method() calls self.__call__)
            for klass in type(owner).__mro__:
                for f in vars(klass).values():
                    f = getattr(f, "__func__", f)
                    if isinstance(f, types.FunctionType) and not _library(f):
                        attrs |= _names(f)[1]
                        self.function(f, depth + 1)
            d = getattr(owner, "__dict__", None)
            if isinstance(d, dict) and not isinstance(owner, torch.nn.Module):  # a module's are guarded already
                for a in attrs & set(d):
                    self._add(
                        ("attr", id(owner), a),
                        f"self.{a} (read by {fn.__qualname__})",
                        lambda d=d, a=a: d.get(a, _MISSING),
                        lambda v, d=d, a=a: d.__setitem__(a, v),
                    )
        if not isinstance(fn, types.FunctionType) or id(fn) in self._seen_fns or _library(fn) or depth > 8:
            return
        self._seen_fns.add(id(fn))
        name = fn.__qualname__
        globals_, attrs, strings = _names(fn)
        g = fn.__globals__
        for n in sorted(globals_):
            v = g.get(n, _MISSING)
            if v is _MISSING:
                continue  # a builtin
            label = f"global {n} (read by {name})"
            self._add(
                ("global", id(g), n),
                label,
                lambda g=g, n=n: g.get(n, _MISSING),
                lambda v, g=g, n=n: g.__setitem__(n, v),
            )
            self._container(v, f"global {n}", f"read by {name}", attrs, strings)
            self.function(v, depth + 1)
        for n, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
            try:
                v = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            label = f"closure variable {n} of {name}"
            self._add(
                ("cell", id(cell)), label, lambda c=cell: _cell(c), lambda v, c=cell: setattr(c, "cell_contents", v)
            )
            self._container(v, f"closure variable {n}", f"of {name}", attrs, strings)
            self.function(v, depth + 1)

    def model(self, model: torch.nn.Module) -> None:
        for cls in {type(m) for m in model.modules()}:
            for klass in cls.__mro__:
                for name, v in vars(klass).items():
                    if name not in _BUILD_ONLY:  # run when the model is built, not in a step
                        self.function(getattr(v, "__func__", v))


def _cell(c: Any) -> Any:
    try:
        return c.cell_contents
    except ValueError:
        return _MISSING


def record(train_step: Callable | None, model: torch.nn.Module | None) -> list[Read]:
    """The plain values ``train_step`` and ``model``'s user-defined methods read now."""
    walk = _Walk()
    if train_step is not None:
        walk.function(train_step)
    if model is not None:
        walk.model(model)
    return walk.reads


def assigned_outside(train_step: Callable) -> list[str]:
    """Names outside ``train_step`` its code assigns: ``global x; x = ...`` and
    ``nonlocal x; x = ...`` (a traced step runs no Python, so these would not
    happen at each call; a step-local closure's own ``nonlocal`` is fine)."""
    fn = train_step.func if isinstance(train_step, functools.partial) else train_step
    fn = getattr(fn, "__func__", fn)
    if not isinstance(fn, types.FunctionType) or _library(fn):
        return []
    outer = set(fn.__code__.co_freevars)
    out = []
    for code in _codes(fn.__code__):
        for ins in dis.get_instructions(code):
            if ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
                out.append(f"global {ins.argval}")
            elif ins.opname in ("STORE_DEREF", "DELETE_DEREF") and ins.argval in outer and ins.argval in code.co_freevars:
                out.append(f"nonlocal {ins.argval}")
    return sorted(set(out))


def changed(reads: Iterable[Read]) -> tuple[Read, Any] | None:
    """The first recorded value that differs now, with its live value; None if none does."""
    for r in reads:
        now = r.get()
        if not _same(now, r.value):
            return r, now
    return None


def restore(reads: Iterable[Read]) -> None:
    """Put every recorded value back."""
    for r in reads:
        if r.value is not _MISSING and not _same(r.get(), r.value):
            r.set(r.value)


def describe(read: Read, now: Any) -> str:
    if isinstance(read.value, torch.Tensor):
        return f"{read.where} is another object than the tensor it was when traced"
    shown = "<deleted>" if now is _MISSING else repr(now)
    return f"{read.where} is {shown}, {read.value!r} when traced"
