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
import gzip
import json
from collections.abc import Mapping
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
    other activation kept (docs/memory-model.md, rule 4).
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


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProfileMeta:
    """Where a profile came from."""

    model: str = ""
    batch_size: int = 0
    device: str = "cpu"
    torch_version: str = ""
    estimated_times: bool = False
    time_estimator: str = ""
    iterations: int = 0
    notes: str = ""


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
        if data.get("format") != "acopt.Profile":
            raise ValueError("not an acopt profile (missing 'format': 'acopt.Profile')")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported profile format version {data.get('version')!r}")
        try:
            return cls(
                nodes=tuple(_node_from(d) for d in data["nodes"]),
                storages=tuple(
                    StorageRecord(**{**d, "role": Role(d["role"])}) for d in data["storages"]
                ),
                activations=tuple(
                    ActivationRecord(**{**d, "sources": tuple(d["sources"])})
                    for d in data["activations"]
                ),
                timeline=tuple(data["timeline"]),
                peak_bytes=data["peak_bytes"],
                rng_state_bytes=data.get("rng_state_bytes", 0),
                meta=ProfileMeta(**data["meta"]),
            )
        except (KeyError, TypeError, ValueError) as e:
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


def _node_from(d: Mapping[str, Any]) -> NodeRecord:
    d = dict(d)
    d["region"] = Region(d["region"])
    for k in ("inputs", "storages", "allocates", "mutates"):
        d[k] = tuple(d[k])
    return NodeRecord(**d)


def _to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, enums -> values, tuples -> lists (cached views skipped)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [_to_plain(x) for x in obj]
    return obj
