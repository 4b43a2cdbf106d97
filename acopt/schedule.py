"""The memory model's schedule: which nodes run, in which order, reading what.

This module is the one place where docs/memory-model.md rules 2-4 are turned
into code. The simulator measures a :class:`Schedule`; the rewriter emits it
node for node; the profiler uses it to find each activation's sources and
recompute time. Torch-free.

A *value instance* is ``(node_name, block)``: ``block`` is ``None`` for the
node as it runs in the original graph, or the name of the recomputed
activation whose recompute block replays the node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from functools import cached_property

from acopt.records import PLACEHOLDER, Profile, Region

ValueRef = tuple[str, str | None]


class InvalidPlan(ValueError):
    """A plan names something that cannot be recomputed in this profile."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Block:
    """The recompute block of one activation (memory model, rule 4).

    Runs just before original node ``position`` (the activation's first use
    after the forward region). ``nodes`` are replayed in graph order;
    ``outputs`` are the replayed values that later nodes read instead of the
    forward ones; ``sources`` are the original values the block reads.
    """

    activation: str
    position: int
    nodes: tuple[str, ...]
    outputs: tuple[str, ...]
    sources: tuple[str, ...]
    time_s: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One node execution: an original node (``block is None``) or a replay."""

    node: str
    block: str | None
    reads: tuple[ValueRef, ...]

    @property
    def value(self) -> ValueRef:
        return (self.node, self.block)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """The nodes a plan runs, in order, with the value instance each one reads."""

    steps: tuple[Step, ...]
    blocks: tuple[Block, ...]

    @property
    def recompute_time_s(self) -> float:
        return sum(b.time_s for b in self.blocks)


class MemoryModel:
    """Facts about a profile that the memory model needs, computed once.

    >>> model = MemoryModel(profile)          # doctest: +SKIP
    >>> model.schedule(frozenset({"relu"}))   # doctest: +SKIP
    """

    def __init__(self, profile: Profile):
        self.profile = profile
        self._index = profile.node_index
        self._nodes = profile.node_by_name

    # ---- storages and aliases -------------------------------------------
    @cached_property
    def aliases(self) -> dict[str, tuple[str, ...]]:
        """Storage name -> names of the nodes whose values refer to it."""
        out: dict[str, list[str]] = {s.name: [] for s in self.profile.storages}
        for n in self.profile.nodes:
            for s in n.storages:
                out[s].append(n.name)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def placeholder_storages(self) -> frozenset[str]:
        return frozenset(
            s.name for s in self.profile.storages if self._nodes[s.node].op == PLACEHOLDER
        )

    @cached_property
    def output_storages(self) -> frozenset[str]:
        """Storages that the graph's output refers to: they live to the end."""
        out: set[str] = set()
        for n in self.profile.nodes:
            if n.is_output:
                for i in n.inputs:
                    out.update(self._nodes[i].storages)
        return frozenset(out)

    @cached_property
    def mutations(self) -> dict[str, tuple[int, ...]]:
        """Storage -> positions of the nodes that write it in place, before the
        optimizer region (optimizer writes come after every recompute block)."""
        out: dict[str, list[int]] = {}
        for i, n in enumerate(self.profile.nodes):
            if n.region != Region.OPTIMIZER:
                for s in n.mutates:
                    out.setdefault(s, []).append(i)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def mutated(self) -> frozenset[str]:
        """Storages written in place before the optimizer region."""
        return frozenset(self.mutations)

    @cached_property
    def later_users(self) -> dict[str, tuple[str, ...]]:
        """Forward node -> its users outside the forward region, in order."""
        users = self.profile.users
        return {
            n.name: tuple(u for u in users[n.name] if self._nodes[u].region != Region.FORWARD)
            for n in self.profile.nodes
            if n.region == Region.FORWARD
        }

    @cached_property
    def activation_storages(self) -> tuple[str, ...]:
        """Storages made by a forward node and read after the forward region
        (memory model, rule 2), in creation order."""
        out = []
        for s in self.profile.storages:
            creator = self._nodes[s.node]
            if creator.region != Region.FORWARD or creator.is_placeholder:
                continue
            if any(self.later_users.get(v) for v in self.aliases[s.name]):
                out.append(s.name)
        out.sort(key=lambda s: (self._index[self.profile.storage_by_name[s].node], s))
        return tuple(out)

    # ---- what can be replayed ---------------------------------------------
    def replayable(self, node: str) -> bool:
        """Whether a recompute block may replay ``node`` (rule 4, and the
        rewriter's no-repeated-side-effect rule)."""
        n = self._nodes[node]
        if n.is_placeholder or n.is_output or not n.recomputable:
            return False
        if n.mutates and not n.replay:
            return False
        if self.mutated.intersection(n.storages):
            return False  # its value changes after it is made: a replay would differ
        # An input written in place after this node read it would be read
        # changed by a replay. A mutation-free replay form drops the inputs
        # the node itself writes.
        here = self._index[node]
        dropped = set(n.mutates) if n.replay else set()
        for i in n.inputs:
            for s in self._nodes[i].storages:
                if s in dropped:
                    continue
                if any(m > here for m in self.mutations.get(s, ())):
                    return False
        return True

    def _replayable_cached(self, node: str) -> bool:
        known = self.__dict__.setdefault("_replayable_memo", {})
        if node not in known:
            known[node] = self.replayable(node)
        return known[node]

    def check_replayable(self, activation: str, nodes: Iterable[str]) -> None:
        """Raise :class:`InvalidPlan` if the block rebuilding ``activation`` would
        replay a node that cannot be replayed (a chain can reach nodes that no
        single candidate's block replays)."""
        for v in nodes:
            if not self._replayable_cached(v):
                raise InvalidPlan(
                    f"plan cannot rebuild {activation!r}: its recompute block would replay {v!r}, "
                    "which cannot be replayed (a side effect, or a value changed in place later)"
                )

    @cached_property
    def candidates(self) -> tuple[str, ...]:
        """Activations a plan may recompute, in creation order."""
        out = []
        for s in self.activation_storages:
            if s in self.output_storages or s in self.mutated:
                continue
            if self.profile.storage_by_name[s].bytes <= 0:
                continue
            try:
                block = self.block(s, frozenset({s}))
            except InvalidPlan:
                continue
            if all(self._replayable_cached(v) for v in block.nodes):
                out.append(s)
        return tuple(out)

    # ---- blocks -------------------------------------------------------------
    def available(self, node: str, recompute: frozenset[str]) -> bool:
        """Whether ``node``'s forward value is alive after the forward region:
        every storage it refers to is a placeholder's or a kept activation."""
        n = self._nodes[node]
        if n.is_placeholder:
            return True
        activations = self.activation_set
        return all(
            s in self.placeholder_storages or (s in activations and s not in recompute)
            for s in n.storages
        )

    @cached_property
    def activation_set(self) -> frozenset[str]:
        return frozenset(self.activation_storages)

    def block(self, activation: str, recompute: frozenset[str]) -> Block:
        """The recompute block that rebuilds ``activation`` under plan ``recompute``."""
        outputs = sorted(
            (v for v in self.aliases[activation] if self.later_users.get(v)),
            key=self._index.__getitem__,
        )
        if not outputs:
            raise InvalidPlan(f"{activation!r} is not read after the forward region")
        position = min(self._index[u] for v in outputs for u in self.later_users[v])
        members: set[str] = set()
        sources: set[str] = set()
        stack = list(outputs)
        while stack:
            v = stack.pop()
            if v in members:
                continue
            node = self._nodes[v]
            if node.region != Region.FORWARD or node.is_placeholder:
                raise InvalidPlan(f"cannot rebuild {activation!r}: would replay {v!r}")
            members.add(v)
            for i in node.inputs:
                if self.available(i, recompute) and i not in members:
                    sources.add(i)
                else:
                    stack.append(i)
        nodes = tuple(sorted(members, key=self._index.__getitem__))
        return Block(
            activation=activation,
            position=position,
            nodes=nodes,
            outputs=tuple(outputs),
            sources=tuple(sorted(sources - members, key=self._index.__getitem__)),
            time_s=sum(self._nodes[v].time_s for v in nodes),
        )

    def check_plan(self, recompute: Iterable[str]) -> frozenset[str]:
        recompute = frozenset(recompute)
        bad = sorted(recompute - set(self.candidates))
        if bad:
            shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise InvalidPlan(
                f"plan recomputes {len(bad)} name(s) that are not recomputable "
                f"activations of this profile: {shown}"
            )
        return recompute

    def schedule(self, recompute: Iterable[str]) -> Schedule:
        """The node order and reads that a plan runs (rules 3-4)."""
        recompute = self.check_plan(recompute)
        blocks = sorted(
            (self.block(a, recompute) for a in recompute),
            key=lambda b: (b.position, self._index[self.profile.storage_by_name[b.activation].node], b.activation),
        )
        # Rule 4 and the rewriter's side-effect rule hold for every block of the
        # plan, not only for each candidate's own: a chain can reach nodes that
        # no single candidate's block replays.
        for b in blocks:
            self.check_replayable(b.activation, b.nodes)
        # Which block rebuilds each forward value that later nodes read instead.
        rebuilt: dict[str, str] = {}
        for b in blocks:
            for v in self.aliases[b.activation]:
                if self._nodes[v].region == Region.FORWARD:
                    rebuilt[v] = b.activation
        steps: list[Step] = []
        bi = 0
        for i, n in enumerate(self.profile.nodes):
            while bi < len(blocks) and blocks[bi].position == i:
                b = blocks[bi]
                members = set(b.nodes)
                for v in b.nodes:
                    reads = tuple(
                        (x, b.activation if x in members else None) for x in self._nodes[v].inputs
                    )
                    steps.append(Step(node=v, block=b.activation, reads=reads))
                bi += 1
            if n.region == Region.FORWARD:
                reads = tuple((x, None) for x in n.inputs)
            else:
                reads = tuple((x, rebuilt.get(x)) for x in n.inputs)
            steps.append(Step(node=n.name, block=None, reads=reads))
        return Schedule(steps=tuple(steps), blocks=tuple(blocks))
