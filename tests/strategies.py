"""Hypothesis strategies for torch-free profiles and plans (STYLE point 12).

Every profile is built valid by construction (no ``.filter``): nodes are drawn
in execution order and only ever read earlier nodes, so the data edges form a
DAG; aliasing follows the profiler's conventions (records.py):

* placeholders (parameters, a buffer, optimizer state, the batch) come first,
  each allocating one storage, except a *tied* parameter that aliases another;
* a *compute* node allocates one new storage; a *view* refers to its input's
  storages and allocates nothing; an *in-place* op refers to the storage it
  writes (``mutates``) and is not recomputable; a *batch-norm-like* node
  writes a buffer in place but allocates a new output and is replayed in a
  mutation-free form (``replay="drop_running_stats"``); a *multi-output* node
  allocates two storages, read through two getitem-like alias nodes; a
  *scalar* node refers to no storage;
* forward nodes end with a small loss; backward nodes read forward values and
  earlier gradients; the optimizer updates parameters in place; the output
  node, last, reads the loss and some gradients.

``chain_profile`` builds a deterministic MLP-like chain (forward/backward
mirror) of any length, for examples and monotonicity tests.
"""

from __future__ import annotations

import dataclasses

from hypothesis import strategies as st

from acopt.records import NodeRecord, Profile, ProfileMeta, Region, Role, StorageRecord
from acopt.simulator import memory_model

F, B, O = Region.FORWARD, Region.BACKWARD, Region.OPTIMIZER


@dataclasses.dataclass
class _Builder:
    nodes: list[NodeRecord] = dataclasses.field(default_factory=list)
    storages: list[StorageRecord] = dataclasses.field(default_factory=list)

    def node(self, name, op, region, *, inputs=(), storages=(), allocates=(), time_s=0.0, **kw) -> NodeRecord:
        rec = NodeRecord(
            name=name, op=op, region=region, inputs=tuple(dict.fromkeys(inputs)),
            storages=tuple(storages), allocates=tuple(allocates), time_s=time_s, **kw,
        )  # fmt: skip
        self.nodes.append(rec)
        return rec

    def alloc(self, name: str, nbytes: int, node: str, role: Role = Role.OTHER) -> str:
        self.storages.append(StorageRecord(name=name, bytes=nbytes, node=node, role=role))
        return name

    def profile(self, batch_size: int = 1, model: str = "hypothesis", rng_state_bytes: int = 0) -> Profile:
        return Profile(
            nodes=tuple(self.nodes), storages=tuple(self.storages), rng_state_bytes=rng_state_bytes,
            meta=ProfileMeta(model=model, batch_size=batch_size),
        )  # fmt: skip


sizes = st.one_of(st.integers(0, 64), st.integers(1, 64).map(lambda k: k * 64))
times = st.integers(0, 50).map(lambda k: k * 1e-5)
temps = st.one_of(st.just(0), st.just(0), st.integers(0, 128))


def _pick(draw, pool, *, min_size=1, max_size=3):
    """A few distinct items of ``pool``, in pool order."""
    idx = draw(st.lists(st.integers(0, len(pool) - 1), min_size=min_size, max_size=max_size, unique=True))
    return [pool[i] for i in sorted(idx)]


@st.composite
def profiles(draw, *, max_forward: int = 10, max_backward: int = 8) -> Profile:
    """A random valid profile: placeholders, forward, backward, optimizer, output."""
    b = _Builder()
    params: list[NodeRecord] = []
    for i in range(draw(st.integers(1, 3))):
        name = f"p{i}"
        params.append(b.node(name, "placeholder", F, storages=(name,), allocates=(name,)))
        b.alloc(name, draw(sizes), name, Role.PARAMETER)
    if draw(st.booleans()) and len(params) >= 1:  # a tied parameter: aliases p0
        params.append(b.node("p_tied", "placeholder", F, storages=params[0].storages))
    inputs = []
    for i in range(draw(st.integers(1, 2))):
        name = f"x{i}"
        inputs.append(b.node(name, "placeholder", F, storages=(name,), allocates=(name,)))
        b.alloc(name, draw(sizes), name, Role.INPUT)
    buffer = None
    if draw(st.booleans()):
        buffer = b.node("buf", "placeholder", F, storages=("buf",), allocates=("buf",))
        b.alloc("buf", draw(st.integers(0, 16)), "buf", Role.BUFFER)
    state = None
    if draw(st.booleans()):
        state = b.node("state", "placeholder", F, storages=("state",), allocates=("state",))
        b.alloc("state", draw(sizes), "state", Role.OPTIMIZER_STATE)

    # ---- forward -------------------------------------------------------------
    values = params + inputs  # nodes with storages that later nodes may read
    computed: list[NodeRecord] = []  # forward non-placeholder nodes with storages
    kinds = ["compute"] * 10 + ["view", "view", "view", "inplace", "multi", "multi", "bn", "scalar"]
    for i in range(draw(st.integers(2, max(2, max_forward)))):
        kind = draw(st.sampled_from(kinds))
        name = f"f{i}"
        if kind == "view":
            (x,) = _pick(draw, values, max_size=1)
            n = b.node(name, "view", F, inputs=(x.name,), storages=x.storages, time_s=draw(times) / 10)
        elif kind == "inplace" and computed:
            (x,) = _pick(draw, computed, max_size=1)
            extra = _pick(draw, values, min_size=0, max_size=1)
            n = b.node(
                name, "add_", F, inputs=[x.name] + [e.name for e in extra], storages=x.storages,
                time_s=draw(times), mutates=x.storages, recomputable=False, temp_bytes=draw(temps),
            )  # fmt: skip
        elif kind == "bn" and buffer is not None:
            (x,) = _pick(draw, values, max_size=1)
            n = b.node(
                name, "batch_norm", F, inputs=(x.name, buffer.name), storages=(name,), allocates=(name,),
                time_s=draw(times), mutates=buffer.storages, replay="drop_running_stats",
            )  # fmt: skip
            b.alloc(name, draw(sizes), name)
        elif kind == "multi":
            ins = [x.name for x in _pick(draw, values)]
            s0, s1 = f"{name}_g0", f"{name}_g1"
            m = b.node(name, "multi", F, inputs=ins, storages=(s0, s1), allocates=(s0, s1), time_s=draw(times))
            b.alloc(s0, draw(sizes), name)
            b.alloc(s1, draw(sizes), name)
            g0 = b.node(s0, "getitem", F, inputs=(m.name,), storages=(s0,))
            n = b.node(s1, "getitem", F, inputs=(m.name,), storages=(s1,))
            values += [m, g0]
            computed += [m, g0]
        elif kind == "scalar":
            ins = [x.name for x in _pick(draw, values)]
            b.node(name, "sym_size", F, inputs=ins, time_s=draw(times) / 10)
            continue
        else:
            ins = [x.name for x in _pick(draw, values)]
            n = b.node(
                name, "compute", F, inputs=ins, storages=(name,), allocates=(name,), time_s=draw(times),
                random=draw(st.booleans()), recomputable=draw(st.sampled_from([True] * 9 + [False])),
                temp_bytes=draw(temps),
            )  # fmt: skip
            b.alloc(name, draw(sizes), name)
        values.append(n)
        computed.append(n)
    (last,) = _pick(draw, values[len(params) + len(inputs) :] or values, max_size=1)
    loss = b.node("loss", "loss", F, inputs=(last.name,), storages=("loss",), allocates=("loss",), time_s=draw(times))
    b.alloc("loss", 4, "loss")
    forward = [v for v in values if v.region == F] + [loss]
    made_here = [v for v in computed if v.storages and set(v.storages).isdisjoint(p.name for p in params + inputs)]

    # ---- backward ------------------------------------------------------------
    grads: list[NodeRecord] = []
    bw_mutable: list[NodeRecord] = []
    for i in range(draw(st.integers(1, max_backward))):
        name = f"b{i}"
        kind = draw(st.sampled_from(["grad"] * 8 + ["view", "accumulate", "inplace_forward"]))
        if kind == "view" and grads:
            (x,) = _pick(draw, grads, max_size=1)
            n = b.node(name, "view", B, inputs=(x.name,), storages=x.storages)
        elif kind == "accumulate" and bw_mutable:
            (x,) = _pick(draw, bw_mutable, max_size=1)
            (y,) = _pick(draw, forward + grads, max_size=1)
            n = b.node(
                name, "add_", B, inputs=(x.name, y.name), storages=x.storages, mutates=x.storages,
                recomputable=False, time_s=draw(times),
            )  # fmt: skip
        elif kind == "inplace_forward" and made_here:
            # A backward op writing a forward storage in place (rare in traced
            # steps; it makes the storage non-recomputable, rule 4).
            (x,) = _pick(draw, made_here, max_size=1)
            n = b.node(
                name, "mul_", B, inputs=(x.name,), storages=x.storages, mutates=x.storages,
                recomputable=False, time_s=draw(times),
            )  # fmt: skip
        else:
            made = [v for v in forward if v.op != "placeholder"]
            fw = _pick(draw, made, max_size=2) if made and draw(st.integers(0, 3)) else _pick(draw, forward, max_size=2)
            bw = _pick(draw, grads, min_size=0, max_size=2) if grads else []
            n = b.node(
                name, "grad", B, inputs=[x.name for x in fw + bw], storages=(name,), allocates=(name,),
                time_s=draw(times), temp_bytes=draw(temps),
            )  # fmt: skip
            b.alloc(name, draw(sizes), name, Role.GRADIENT)
            bw_mutable.append(n)
        grads.append(n)

    # ---- optimizer -----------------------------------------------------------
    outputs = ["loss"]
    for p in params[: draw(st.integers(0, len(params)))]:
        (g,) = _pick(draw, grads, max_size=1)
        ins = [p.name, g.name] + ([state.name] if state is not None else [])
        if draw(st.booleans()):
            tmp = b.node(f"upd_{p.name}", "mul", O, inputs=(g.name,), storages=(f"upd_{p.name}",),
                         allocates=(f"upd_{p.name}",), time_s=draw(times))  # fmt: skip
            b.alloc(tmp.name, draw(sizes), tmp.name)
            ins.append(tmp.name)
        b.node(f"step_{p.name}", "add_", O, inputs=ins, storages=p.storages, mutates=p.storages, recomputable=False)
    outputs += [g.name for g in _pick(draw, grads, min_size=0, max_size=2)]
    b.node("output", "output", O, inputs=outputs, recomputable=False)
    return b.profile(batch_size=draw(st.integers(1, 8)), rng_state_bytes=draw(st.sampled_from([0, 16, 100])))


def plans(profile: Profile) -> st.SearchStrategy[frozenset[str]]:
    """Random subsets of ``profile``'s recomputable activations."""
    candidates = memory_model(profile).candidates
    if not candidates:
        return st.just(frozenset())
    return st.frozensets(st.sampled_from(candidates))


@st.composite
def profiles_and_plans(draw, **kw) -> tuple[Profile, frozenset[str]]:
    profile = draw(profiles(**kw))
    return profile, draw(plans(profile))


def chain_profile(
    layers: int, *, act_bytes: int = 1000, param_bytes: int = 100, time_s: float = 1e-3, batch_size: int = 1
) -> Profile:
    """A deterministic MLP-like step: ``layers`` x (mm -> relu), loss, mirrored backward, SGD.

    Forward layer i: ``mm{i} = mm(h{i-1}, w{i})``, ``relu{i} = relu(mm{i})``.
    Backward layer i (reversed): ``grelu{i}`` reads relu{i} and the incoming
    gradient; ``gw{i}`` reads h{i-1} and grelu{i}; ``gx{i}`` reads w{i}.
    The optimizer updates every weight in place. Activations: every relu{i}
    (read by grelu{i} and gw{i+1}).
    """
    b = _Builder()
    b.node("x", "placeholder", F, storages=("x",), allocates=("x",))
    b.alloc("x", act_bytes, "x", Role.INPUT)
    for i in range(layers):
        b.node(f"w{i}", "placeholder", F, storages=(f"w{i}",), allocates=(f"w{i}",))
        b.alloc(f"w{i}", param_bytes, f"w{i}", Role.PARAMETER)
    h = "x"
    for i in range(layers):
        b.node(f"mm{i}", "mm", F, inputs=(h, f"w{i}"), storages=(f"mm{i}",), allocates=(f"mm{i}",), time_s=time_s)
        b.alloc(f"mm{i}", act_bytes, f"mm{i}")
        b.node(f"relu{i}", "relu", F, inputs=(f"mm{i}",), storages=(f"relu{i}",), allocates=(f"relu{i}",), time_s=time_s / 2)
        b.alloc(f"relu{i}", act_bytes, f"relu{i}")
        h = f"relu{i}"
    b.node("loss", "sum", F, inputs=(h,), storages=("loss",), allocates=("loss",), time_s=time_s / 4)
    b.alloc("loss", 4, "loss")
    g = "loss"
    for i in reversed(range(layers)):
        prev = "x" if i == 0 else f"relu{i - 1}"
        b.node(f"grelu{i}", "threshold_backward", B, inputs=(g, f"relu{i}"), storages=(f"grelu{i}",), allocates=(f"grelu{i}",), time_s=time_s / 2)
        b.alloc(f"grelu{i}", act_bytes, f"grelu{i}")
        b.node(f"gw{i}", "mm", B, inputs=(prev, f"grelu{i}"), storages=(f"gw{i}",), allocates=(f"gw{i}",), time_s=time_s)
        b.alloc(f"gw{i}", param_bytes, f"gw{i}", Role.GRADIENT)
        if i > 0:
            b.node(f"gx{i}", "mm", B, inputs=(f"grelu{i}", f"w{i}"), storages=(f"gx{i}",), allocates=(f"gx{i}",), time_s=time_s)
            b.alloc(f"gx{i}", act_bytes, f"gx{i}")
            g = f"gx{i}"
    for i in range(layers):
        b.node(f"step{i}", "add_", O, inputs=(f"w{i}", f"gw{i}"), storages=(f"w{i}",), mutates=(f"w{i}",), recomputable=False)
    b.node("output", "output", O, inputs=("loss",), recomputable=False)
    return b.profile(batch_size=batch_size, model=f"chain{layers}")


def residual_profile(
    blocks: int, *, act_bytes: int = 4096, param_bytes: int = 512, time_s: float = 1e-4, batch_size: int = 1
) -> Profile:
    """A deterministic ResNet-like step: ``blocks`` residual blocks, mirrored backward, SGD.

    Block i (input h): conv1 -> bn1 -> relu1 -> conv2 -> bn2 -> add(bn2, h) ->
    relu, then a view of it is the next block's input. The backward mirrors
    it (threshold, batch-norm and convolution backward, the residual gradient
    add), so each block has four activations, all candidates: conv1, relu1,
    conv2 and relu (read through its view). Convolutions cost 4x a pointwise
    op and make 2x ``act_bytes``, so ratios differ. 21 nodes per block.
    """
    b = _Builder()
    b.node("x", "placeholder", F, storages=("x",), allocates=("x",))
    b.alloc("x", act_bytes, "x", Role.INPUT)
    for i in range(blocks):
        for w in (f"w1_{i}", f"w2_{i}"):
            b.node(w, "placeholder", F, storages=(w,), allocates=(w,))
            b.alloc(w, param_bytes, w, Role.PARAMETER)

    def op(name, kind, region, inputs, nbytes, t):
        b.node(name, kind, region, inputs=inputs, storages=(name,), allocates=(name,), time_s=t)
        b.alloc(name, nbytes, name, Role.GRADIENT if name.startswith("gw") else Role.OTHER)

    h = "x"
    ins = []
    for i in range(blocks):
        ins.append(h)
        op(f"conv1_{i}", "convolution", F, (h, f"w1_{i}"), 2 * act_bytes, 4 * time_s)
        op(f"bn1_{i}", "batch_norm", F, (f"conv1_{i}",), 3 * act_bytes // 2, time_s)
        op(f"relu1_{i}", "relu", F, (f"bn1_{i}",), act_bytes, time_s)
        op(f"conv2_{i}", "convolution", F, (f"relu1_{i}", f"w2_{i}"), 2 * act_bytes, 4 * time_s)
        op(f"bn2_{i}", "batch_norm", F, (f"conv2_{i}",), 3 * act_bytes // 2, time_s)
        op(f"add_{i}", "add", F, (f"bn2_{i}", h), act_bytes, time_s)
        op(f"relu_{i}", "relu", F, (f"add_{i}",), act_bytes, time_s)
        b.node(f"view_{i}", "view", F, inputs=(f"relu_{i}",), storages=(f"relu_{i}",))
        h = f"view_{i}"
    b.node("loss", "sum", F, inputs=(h,), storages=("loss",), allocates=("loss",), time_s=time_s)
    b.alloc("loss", 4, "loss")
    g = "loss"
    for i in reversed(range(blocks)):
        op(f"grelu_{i}", "threshold_backward", B, (g, f"relu_{i}"), act_bytes, time_s)
        op(f"gbn2_{i}", "batch_norm_backward", B, (f"grelu_{i}", f"conv2_{i}"), 2 * act_bytes, 2 * time_s)
        op(f"gw2_{i}", "convolution_backward", B, (f"gbn2_{i}", f"relu1_{i}"), param_bytes, 4 * time_s)
        op(f"gr1_{i}", "convolution_backward", B, (f"gbn2_{i}", f"w2_{i}"), act_bytes, 4 * time_s)
        op(f"grelu1_{i}", "threshold_backward", B, (f"gr1_{i}", f"relu1_{i}"), act_bytes, time_s)
        op(f"gbn1_{i}", "batch_norm_backward", B, (f"grelu1_{i}", f"conv1_{i}"), 2 * act_bytes, 2 * time_s)
        op(f"gw1_{i}", "convolution_backward", B, (f"gbn1_{i}", ins[i]), param_bytes, 4 * time_s)
        op(f"gh_{i}", "convolution_backward", B, (f"gbn1_{i}", f"w1_{i}"), act_bytes, 4 * time_s)
        op(f"gsum_{i}", "add", B, (f"gh_{i}", f"grelu_{i}"), act_bytes, time_s)
        g = f"gsum_{i}"
    for i in range(blocks):
        for w in (f"w1_{i}", f"w2_{i}"):
            b.node(f"step_{w}", "add_", O, inputs=(w, f"g{w}"), storages=(w,), mutates=(w,), recomputable=False)
    b.node("output", "output", O, inputs=("loss",), recomputable=False)
    return b.profile(batch_size=batch_size, model=f"residual{blocks}")


def unreplayable_chain_profile() -> Profile:
    """A chain may reach a node that no block may replay (solvers/model.py Note 11).

    a = f(x) 100 B, 1 s; i = a view of a that cannot be replayed (forward only);
    b = f(i) 100 B, 2 s; loss = f(b). Backward: g1 200 B, g2 10 B, gb reads b,
    ga reads a. Empty plan: 410 at g2. {a}: 310 (a's block replays a alone);
    {b}: 310 (b's block reads i, which a keeps alive). {a, b} would be 210, but
    b's block would then have to replay i: not a valid plan (the schedule
    refuses it). Optimum: budget 310..409 -> {a}, 1 s; below 310 nothing fits.
    """
    x = NodeRecord(name="x", op="placeholder", region=F, storages=("x",), allocates=("x",))
    nodes = [x]
    storages = [StorageRecord(name="x", bytes=0, node="x")]
    for name, region, inputs, nbytes, t in (
        ("a", F, ("x",), 100, 1.0), ("i", F, ("a",), None, 0.0), ("b", F, ("i",), 100, 2.0),
        ("loss", F, ("b",), 0, 0.0), ("g1", B, ("loss",), 200, 0.0), ("g2", B, ("g1",), 10, 0.0),
        ("gb", B, ("g2", "b"), 10, 0.0), ("ga", B, ("gb", "a"), 10, 0.0),
    ):  # fmt: skip
        if nbytes is None:  # the view: refers to a's storage, allocates nothing
            nodes.append(
                NodeRecord(name=name, op="op", region=region, inputs=inputs, storages=("a",), recomputable=False)
            )
            continue
        nodes.append(
            NodeRecord(name=name, op="op", region=region, inputs=inputs, storages=(name,), allocates=(name,), time_s=t)
        )
        storages.append(StorageRecord(name=name, bytes=nbytes, node=name))
    nodes.append(NodeRecord(name="output", op="output", region=O, inputs=("loss", "ga"), recomputable=False))
    return Profile(nodes=tuple(nodes), storages=tuple(storages), meta=ProfileMeta(model="contract"))


def worked_example_profile() -> Profile:
    """docs/memory-model.md, "A worked example": x (100 B) and w (10 B);
    a = mm(x, w) 400 B, 2 ms; b = relu(a) 400 B, 1 ms; loss = sum(b) 4 B;
    gb = relu_bw(loss, b), ga = mm_bw(gb, a) 100 B each; gw = mm_bw(ga, x) 10 B;
    step = w.add_(gw). Candidates: a and b."""
    b = _Builder()
    for name, nbytes in (("x", 100), ("w", 10)):
        b.node(name, "placeholder", F, storages=(name,), allocates=(name,))
        b.alloc(name, nbytes, name)

    def op(name, region, inputs, nbytes, time_s=0.0):
        b.node(name, name, region, inputs=inputs, storages=(name,), allocates=(name,), time_s=time_s)
        b.alloc(name, nbytes, name)

    op("a", F, ("x", "w"), 400, 2e-3)
    op("b", F, ("a",), 400, 1e-3)
    op("loss", F, ("b",), 4)
    op("gb", B, ("loss", "b"), 100)
    op("ga", B, ("gb", "a"), 100)
    op("gw", B, ("ga", "x"), 10)
    b.node("step", "add_", O, inputs=("w", "gw"), storages=("w",), mutates=("w",), recomputable=False)
    b.node("output", "output", O, inputs=("loss",))
    return b.profile()
