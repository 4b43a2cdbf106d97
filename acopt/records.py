"""The torch-free profile of one training step: nodes, storages, activations.

A :class:`Profile` is what every planner and the simulator consume. It knows
nothing about torch: node names, data edges, regions, bytes, seconds and
flags. The profiler builds one from a traced graph; tests build them by hand or
with hypothesis (``tests/strategies.py``).

Memory is counted per *storage* (docs/memory-model.md, rule 1): a node's value
refers to zero or more storages (``NodeRecord.storages``); the storages a node
creates are listed in ``NodeRecord.allocates``. A view or an in-place op
refers to storages it did not create.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import gzip
import json
import types
import typing
from collections.abc import Collection, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1


class Region(str, enum.Enum):
    """Which part of the training step a node belongs to."""

    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"


class Role(str, enum.Enum):
    """What a storage is, for reports and plots."""

    PARAMETER = "parameter"
    BUFFER = "buffer"
    GRADIENT = "gradient"
    OPTIMIZER_STATE = "optimizer_state"
    INPUT = "input"
    CONSTANT = "constant"  # a tensor constant of the graph (lifted get_attr), alive the whole step
    HYPERPARAMETER = "hyperparameter"  # a float optimizer hyperparameter, read live at each call
    ACTIVATION = "activation"
    OTHER = "other"


PLACEHOLDER = "placeholder"
OUTPUT = "output"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class NodeRecord:
    """One node of the step graph, in execution order.

    ``op`` is ``"placeholder"``, ``"output"`` or the target's name (e.g.
    ``"aten.relu.default"``). ``inputs`` are the names of the nodes whose
    values this node reads, once each, in order of first appearance.
    ``replay`` names how a recompute block replays the node when it is not a
    plain re-execution (``"drop_running_stats"`` for batch norm), else ``""``.
    ``temp_bytes`` is workspace the op allocates and frees inside itself: it
    counts only while the node runs (memory model, rule 1).
    """

    name: str
    op: str
    region: Region
    inputs: tuple[str, ...] = ()
    storages: tuple[str, ...] = ()
    allocates: tuple[str, ...] = ()
    time_s: float = 0.0
    random: bool = False
    mutates: tuple[str, ...] = ()
    recomputable: bool = True
    replay: str = ""
    temp_bytes: int = 0

    @property
    def is_placeholder(self) -> bool:
        return self.op == PLACEHOLDER

    @property
    def is_output(self) -> bool:
        return self.op == OUTPUT


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StorageRecord:
    """One storage: its size and the node that creates it."""

    name: str
    bytes: int
    node: str
    role: Role = Role.OTHER


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ActivationRecord:
    """A storage created in the forward region and read in the backward region.

    Ranks are node positions in the step graph. ``sources`` and
    ``recomp_time_s`` are for recomputing this activation alone, with every
    other activation kept (docs/memory-model.md, rule 4). ``module``: the
    dotted path of the submodule whose forward made it (acopt.module_names;
    "" outside any submodule, and in profiles written before it existed).
    """

    name: str
    node: str
    bytes: int
    creation_rank: int
    last_fw_use_rank: int
    first_bw_use_rank: int
    last_bw_use_rank: int
    inactive_time_s: float
    recomp_time_s: float
    sources: tuple[str, ...]
    recomputable: bool
    module: str = ""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProfileMeta:
    """Where a profile came from.

    ``graph_fingerprint`` is :func:`acopt.fingerprint.graph_fingerprint` of the
    traced graph profiled ("" for hand-built profiles and older files): the
    rewriter refuses a profile whose fingerprint is not its graph's.
    """

    model: str = ""
    batch_size: int = 0
    device: str = "cpu"
    torch_version: str = ""
    estimated_times: bool = False
    time_estimator: str = ""
    iterations: int = 0
    notes: str = ""
    graph_fingerprint: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)  # no slots: cached views need __dict__
class Profile:
    """The profile of one training step. Frozen and JSON-serialisable.

    ``timeline`` is the live bytes during each node (after it allocates, before
    the frees that follow it), as measured; ``peak_bytes`` is its maximum.
    For a hand-built profile both may be left at their defaults and are then
    computed from the memory model (:func:`acopt.simulate` of the empty plan).
    ``rng_state_bytes`` is the size of one saved generator state, which a plan
    that replays a random node keeps (docs/memory-model.md, rule 7).
    """

    nodes: tuple[NodeRecord, ...]
    storages: tuple[StorageRecord, ...]
    activations: tuple[ActivationRecord, ...] = ()
    timeline: tuple[int, ...] = ()
    peak_bytes: int = 0
    rng_state_bytes: int = 0
    meta: ProfileMeta = ProfileMeta()

    # ---- derived views -------------------------------------------------
    @cached_property
    def node_index(self) -> dict[str, int]:
        return {n.name: i for i, n in enumerate(self.nodes)}

    @cached_property
    def node_by_name(self) -> dict[str, NodeRecord]:
        return {n.name: n for n in self.nodes}

    @cached_property
    def storage_by_name(self) -> dict[str, StorageRecord]:
        return {s.name: s for s in self.storages}

    @cached_property
    def activation_by_name(self) -> dict[str, ActivationRecord]:
        return {a.name: a for a in self.activations}

    @cached_property
    def users(self) -> dict[str, tuple[str, ...]]:
        """Node name -> names of the nodes that read its value, in order."""
        out: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n.name)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def total_time_s(self) -> float:
        return sum(n.time_s for n in self.nodes)

    # ---- serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": "acopt.Profile", "version": FORMAT_VERSION, **_to_plain(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        """Read :meth:`to_dict`'s output, checking every field's type (:func:`from_plain`)."""
        if not isinstance(data, Mapping) or data.get("format") != "acopt.Profile":
            raise ValueError("not an acopt profile (missing 'format': 'acopt.Profile')")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported profile format version {data.get('version')!r}")
        body = {k: v for k, v in data.items() if k not in ("format", "version")}
        try:
            return from_plain(cls, body, optional={cls: {"rng_state_bytes"}})
        except ValueError as e:
            raise ValueError(f"corrupt acopt profile: {e}") from e

    def to_json(self, path: str | Path) -> None:
        """Write JSON; a path ending in ``.gz`` is gzip-compressed (deterministic: no mtime)."""
        text = json.dumps(self.to_dict(), indent=1)
        if str(path).endswith(".gz"):
            with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
                f.write(text.encode())
        else:
            Path(path).write_text(text)

    @classmethod
    def from_json(cls, path: str | Path) -> Profile:
        """Read JSON written by :meth:`to_json`; gzip is detected by its magic bytes, not the name."""
        try:
            raw = Path(path).read_bytes()
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            data = json.loads(raw)
        except (json.JSONDecodeError, gzip.BadGzipFile, EOFError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt acopt profile {path}: {e}") from e
        return cls.from_dict(data)


def _to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, enums -> values, tuples -> lists (cached views skipped)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [_to_plain(x) for x in obj]
    return obj


# ---- reading plain data back, checked against the dataclass field types ---------------
class FieldError(ValueError):
    """A field of a serialised artifact is missing, unknown or of the wrong type;
    the message starts with the field's path (``nodes[3].time_s: ...``)."""


def from_plain(cls: type, data: Any, *, optional: Mapping[type, Collection[str]] | None = None) -> Any:
    """Build dataclass ``cls`` from JSON-like ``data``, checked against its field types.

    The inverse of :func:`_to_plain`, driven by ``typing.get_type_hints``: a
    dataclass is an object with exactly its fields; ``tuple[X, ...]`` and
    ``frozenset[X]`` are lists (a ``tuple[tuple[K, V], ...]`` may also be an
    object: its items); enums are their values; ``int`` is an integer and
    ``float`` a number, never a bool; ``X | None`` may be null. A field with a
    default may be missing, unless its class is in ``optional`` and the field
    is not named there. Values are kept as given (no int -> float), so a JSON
    round trip is exact. Raises :class:`FieldError` naming the field.
    """
    return _parse(data, cls, "", optional or {})


def _parse(value: Any, hint: Any, path: str, optional: Mapping[type, Collection[str]]) -> Any:
    scalar = _SCALARS.get(hint) if isinstance(hint, type) else None
    if scalar is not None:  # the common case first
        if isinstance(value, scalar) and (hint is bool or not isinstance(value, bool)):
            return value
        raise _wrong(path, _expected(hint), value)
    if hint is Any:
        return value
    if hint is None or hint is type(None):
        if value is None:
            return None
        raise _wrong(path, "null", value)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:  # X | None: X's own error says more
            return _parse(value, rest[0], path, optional)
        for a in rest:
            try:
                return _parse(value, a, path, optional)
            except FieldError:
                continue
        raise _wrong(path, " or ".join(_expected(a) for a in args), value)
    if origin is tuple:
        args = typing.get_args(hint)
        if (
            isinstance(value, Mapping)
            and len(args) == 2 and args[1] is Ellipsis
            and typing.get_origin(args[0]) is tuple and len(typing.get_args(args[0])) == 2
        ):  # fmt: skip
            key_t, val_t = typing.get_args(args[0])
            return tuple(
                (_parse(k, key_t, f"{path}[{k!r}]", optional), _parse(v, val_t, f"{path}[{k!r}]", optional))
                for k, v in value.items()
            )
        if not isinstance(value, (list, tuple)):
            raise _wrong(path, "a list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse(x, args[0], f"{path}[{i}]", optional) for i, x in enumerate(value))
        if len(value) != len(args):
            raise FieldError(f"{path or 'value'}: expected a list of {len(args)} items, got {len(value)}")
        return tuple(_parse(x, a, f"{path}[{i}]", optional) for i, (x, a) in enumerate(zip(value, args)))
    if origin is frozenset:
        if not isinstance(value, (list, tuple, set, frozenset)):
            raise _wrong(path, "a list", value)
        (item,) = typing.get_args(hint) or (Any,)
        return frozenset(_parse(x, item, f"{path}[{i}]", optional) for i, x in enumerate(value))
    if origin is not None:
        raise TypeError(f"from_plain cannot read type {hint!r} (at {path or 'top level'})")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        try:
            return hint(value)
        except (ValueError, TypeError):
            raise _wrong(path, _expected(hint), value) from None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _parse_dataclass(value, hint, path, optional)
    raise TypeError(f"from_plain cannot read type {hint!r} (at {path or 'top level'})")


_SCALARS: dict[type, type | tuple[type, ...]] = {str: str, bool: bool, int: int, float: (int, float)}


def _parse_dataclass(value: Any, cls: type, path: str, optional: Mapping[type, Collection[str]]) -> Any:
    if not isinstance(value, Mapping):
        raise _wrong(path, _expected(cls), value)
    fields, hints = _fields_and_hints(cls)
    unknown = [k for k in value if k not in fields]
    if unknown:
        where = f"{path}: " if path else ""
        raise FieldError(
            f"{where}unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"for {cls.__name__} (fields: {', '.join(fields)})"
        )
    may_miss = optional.get(cls)
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name not in value:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if not has_default or (may_miss is not None and name not in may_miss):
                raise FieldError(f"{sub}: missing")
            continue
        kwargs[name] = _parse(value[name], hints[name], sub, optional)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise FieldError(f"{path or cls.__name__}: {e}") from e


@functools.cache
def _fields_and_hints(cls: type) -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}, typing.get_type_hints(cls)


def _expected(hint: Any) -> str:
    if hint is None or hint is type(None):
        return "null"
    if hint is bool:
        return "a boolean"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return f"an object ({hint.__name__})"
    if typing.get_origin(hint) in (tuple, frozenset):
        return "a list"
    return str(hint).replace("typing.", "")


def _wrong(path: str, expected: str, value: Any) -> FieldError:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    got = "null" if value is None else f"{type(value).__name__} {text}"
    return FieldError(f"{path or 'value'}: expected {expected}, got {got}")
