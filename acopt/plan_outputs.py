"""What a plan leaves on disk: the decisions CSV, timeline plots, budget sweeps.

* :func:`decisions_frame` / :func:`write_decisions_csv`: one row per
  activation (and the module that made it), ``CHECKPOINT`` (kept) or
  ``RECOMPUTE``, in ``ac_decisions_bs{N}_{model}_{solver}.csv``
  (N = ``profile.meta.batch_size``).
* :func:`plot_timelines`: live bytes per step for the no-recompute schedule and
  each plan, regions shaded, peaks marked, budgets drawn.
* :func:`sweep` / :func:`plot_sweep`: peak vs recompute time over budgets,
  with the Pareto front.

Torch-free; the plots need matplotlib (acopt.plots, the ``plots`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from acopt.planning import InfeasibleBudget, Plan, floor, plan, resolve_budget
from acopt.records import Profile, Region
from acopt.simulator import Simulation, memory_model, simulate
from acopt.units import format_bytes

DECISION_COLUMNS = [
    "activation_name",
    "module",
    "decision",
    "size_bytes",
    "recomp_time_s",
    "creation_rank",
    "first_bw_use_rank",
    "block_time_s",
]

_REGION_COLORS = {Region.FORWARD: "#e8f0fe", Region.BACKWARD: "#fde8e8", Region.OPTIMIZER: "#e8f5e9"}


def _activation_rows(profile: Profile) -> list[dict[str, Any]]:
    """The profile's activation records, or (hand-built profiles) the same facts from the memory model."""
    if profile.activations:
        return [
            dict(name=a.name, module=a.module, bytes=a.bytes, recomp_time_s=a.recomp_time_s,
                 creation_rank=a.creation_rank, first_bw_use_rank=a.first_bw_use_rank)
            for a in profile.activations
        ]  # fmt: skip
    model = memory_model(profile)
    index, users, candidates = profile.node_index, profile.users, set(model.candidates)
    rows = []
    for s in model.activation_storages:
        st = profile.storage_by_name[s]
        later = [
            index[u] for v in model.aliases[s] for u in users[v] if profile.node_by_name[u].region != Region.FORWARD
        ]
        alone = model.block(s, frozenset({s})).time_s if s in candidates else 0.0
        rows.append(dict(name=s, module="", bytes=st.bytes, recomp_time_s=alone, creation_rank=index[st.node],
                         first_bw_use_rank=min(later)))  # fmt: skip
    return rows


def decisions_frame(profile: Profile, plan: Plan | Iterable[str]) -> pd.DataFrame:
    """One row per activation: ``CHECKPOINT`` (kept) or ``RECOMPUTE``.

    ``recomp_time_s`` is the time to recompute the activation alone (every
    other activation kept), as in the profiler's activation CSV;
    ``block_time_s`` is what this plan spends in its block (0 when kept), and
    sums to the plan's recompute time.
    """
    sim = simulate(profile, plan)
    block_time = {b.activation: b.time_s for b in sim.schedule.blocks}
    rows = [
        {
            "activation_name": r["name"],
            "module": r["module"],
            "decision": "RECOMPUTE" if r["name"] in sim.recompute else "CHECKPOINT",
            "size_bytes": r["bytes"],
            "recomp_time_s": r["recomp_time_s"],
            "creation_rank": r["creation_rank"],
            "first_bw_use_rank": r["first_bw_use_rank"],
            "block_time_s": block_time.get(r["name"], 0.0),
        }
        for r in _activation_rows(profile)
    ]
    return pd.DataFrame(rows, columns=DECISION_COLUMNS)


def decisions_file_name(profile: Profile, plan: Plan | Iterable[str], label: str | None = None) -> str:
    """``ac_decisions_bs{N}_{label}_{solver}.csv``: the design's stem, then what tells plans apart
    (``label``, default the profile's model; then the plan's solver), so files do not overwrite
    each other."""
    label = profile.meta.model if label is None else label
    solver = plan.solver if isinstance(plan, Plan) else ""
    parts = [f"ac_decisions_bs{profile.meta.batch_size}", *(x for x in (label, solver) if x)]
    return "_".join(p.replace("/", "_").replace(":", "_") for p in parts) + ".csv"


def write_decisions_csv(
    profile: Profile, plan: Plan | Iterable[str], out_dir: str | Path, label: str | None = None
) -> Path:
    """Write the decisions CSV (:func:`decisions_file_name`) into ``out_dir`` (created if needed);
    return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / decisions_file_name(profile, plan, label)
    decisions_frame(profile, plan).to_csv(path, index=False)
    return path


def _positions(profile: Profile, sim: Simulation) -> list[float]:
    """x of each step on the original node axis: replays are spread evenly in
    the gap before the node their block runs before."""
    index = profile.node_index
    xs: list[float] = []
    pending: list[int] = []
    for t, (node, block) in enumerate(sim.step_nodes):
        if block is not None:
            pending.append(t)
            continue
        x = float(index[node])
        for j, _ in enumerate(pending):
            xs.append(x - 1 + (j + 1) / (len(pending) + 1))
        pending.clear()
        xs.append(x)
    xs.extend(float(len(profile.nodes)) for _ in pending)
    return xs


def plot_timelines(profile: Profile, plans: Mapping[str, Plan | Iterable[str]], path: str | Path) -> Path:
    """Plot live bytes vs step for the no-recompute schedule and each plan in ``plans``.

    The x axis is the original graph's node order; the steps of a recompute
    block sit just before the node they precede. Regions are shaded, each
    line's peak is marked, and each Plan's budget is a dashed line.
    """
    from acopt.plots import pyplot

    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    try:
        # Region shading on the node axis.
        start = 0
        nodes = profile.nodes
        for i in range(1, len(nodes) + 1):
            if i == len(nodes) or nodes[i].region != nodes[start].region:
                ax.axvspan(start - 0.5, i - 0.5, color=_REGION_COLORS[nodes[start].region], lw=0, zorder=0)
                ax.text((start + i - 1) / 2, 1.0, nodes[start].region.value, transform=ax.get_xaxis_transform(),
                        ha="center", va="bottom", fontsize=8, color="0.35")  # fmt: skip
                start = i
        scale, unit = _unit(max([simulate(profile, frozenset()).peak_bytes, 1]))
        series = [("no recomputation", frozenset())] + list(plans.items())
        for k, (label, chosen) in enumerate(series):
            sim = simulate(profile, chosen)
            color = f"C{k}"
            xs = _positions(profile, sim)
            ys = [b / scale for b in sim.timeline]
            modules = _top_modules(profile, sim.recompute)
            label = f"{label}: peak {format_bytes(sim.peak_bytes)}" + (f"; recomputes in {modules}" if modules else "")
            ax.step(xs, ys, where="mid", color=color, lw=1.2, label=label)
            px, py = xs[sim.peak_step], sim.peak_bytes / scale
            ax.plot([px], [py], "o", color=color, ms=5)
            ax.annotate(f"{sim.peak_node}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
            budget = getattr(chosen, "budget_bytes", None)
            if budget is not None:
                ax.axhline(budget / scale, color=color, ls="--", lw=0.8)
        floor_bytes = floor(profile)
        ax.axhline(floor_bytes / scale, color="black", ls=":", lw=0.8, label=f"floor {format_bytes(floor_bytes)}")
        ax.set_xlabel("node (graph order; recompute blocks just before the node they precede)")
        ax.set_ylabel(f"live memory ({unit})")
        ax.set_xlim(-0.5, max(len(nodes) - 0.5, 0.5))
        ax.set_ylim(bottom=0)
        title = profile.meta.model or "profile"
        ax.set_title(f"{title}, batch {profile.meta.batch_size}: live bytes per step", fontsize=10, pad=14)
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def recompute_by_module(profile: Profile, plan: Plan | Iterable[str]) -> pd.DataFrame:
    """The recomputed activations grouped by the module that made them (``ActivationRecord.module``;
    "" outside any submodule or in older profiles): count, bytes and block time, most bytes first."""
    frame = decisions_frame(profile, plan)
    frame = frame[frame["decision"] == "RECOMPUTE"]
    grouped = frame.groupby("module", sort=False).agg(
        recomputed=("activation_name", "size"), size_bytes=("size_bytes", "sum"), block_time_s=("block_time_s", "sum")
    )
    return grouped.sort_values("size_bytes", ascending=False, kind="stable").reset_index()


def _top_modules(profile: Profile, recompute, n: int = 3) -> str:
    """``"layers.0.attn (5), layers.1.attn (5), ..."``: the modules with the most recomputed bytes."""
    if not recompute or not any(a.module for a in profile.activations):
        return ""
    top = recompute_by_module(profile, recompute)
    names = [f"{m or '(no module)'} ({k})" for m, k in zip(top["module"][:n], top["recomputed"][:n])]
    return ", ".join(names) + (", ..." if len(top) > n else "")


def _unit(peak: int) -> tuple[float, str]:
    for scale, unit in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if peak >= scale:
            return float(scale), unit
    return 1.0, "bytes"


SWEEP_COLUMNS = [
    "budget_bytes",
    "solver",
    "status",
    "peak_bytes",
    "recompute_time_s",
    "recomputed",
    "solve_time_s",
    "bound",
    "pareto",
]


def sweep(profile: Profile, *, solver: str, budgets: Iterable[int | float | str], **options: Any) -> pd.DataFrame:
    """Plan at each budget; one row per budget: peak vs recompute time.

    A budget below the floor gives a row with status ``"below_floor"`` and no
    peak. ``pareto`` marks the plans that no other row beats on both peak and
    recompute time (equal rows are all marked).
    """
    rows = []
    for budget in budgets:
        budget_bytes = resolve_budget(profile, budget)
        try:
            p = plan(profile, budget=budget_bytes, solver=solver, **options)
        except InfeasibleBudget:
            rows.append(dict(budget_bytes=budget_bytes, solver=solver, status="below_floor", peak_bytes=math.nan,
                             recompute_time_s=math.nan, recomputed=0, solve_time_s=0.0, bound=math.nan))  # fmt: skip
            continue
        rows.append(
            dict(
                budget_bytes=budget_bytes, solver=solver, status=p.status.value, peak_bytes=p.predicted_peak_bytes,
                recompute_time_s=p.recompute_time_s, recomputed=len(p.recompute), solve_time_s=p.solve_time_s,
                bound=math.nan if p.bound is None else p.bound,
            )
        )  # fmt: skip
    frame = pd.DataFrame(rows, columns=SWEEP_COLUMNS[:-1])
    frame["pareto"] = _pareto(frame)
    return frame


def _pareto(frame: pd.DataFrame) -> list[bool]:
    points = list(zip(frame["peak_bytes"], frame["recompute_time_s"]))
    out = []
    for i, (p, t) in enumerate(points):
        if math.isnan(p):
            out.append(False)
            continue
        dominated = any(
            (q <= p and u <= t) and (q < p or u < t) for j, (q, u) in enumerate(points) if j != i and not math.isnan(q)
        )
        out.append(not dominated)
    return out


def plot_sweep(df: pd.DataFrame, path: str | Path) -> Path:
    """Plot a :func:`sweep` frame: recompute time vs peak, Pareto front joined."""
    from acopt.plots import pyplot

    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = df[df["peak_bytes"].notna()]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    try:
        scale, unit = _unit(int(max(ok["peak_bytes"].max() if len(ok) else 1, 1)))
        for solver, group in ok.groupby("solver", sort=True):
            ax.scatter(group["recompute_time_s"] * 1e3, group["peak_bytes"] / scale, s=18, label=f"{solver} plans")
            front = group[group["pareto"]].sort_values("recompute_time_s")
            ax.plot(front["recompute_time_s"] * 1e3, front["peak_bytes"] / scale, lw=1, label=f"{solver} Pareto front")
            ax.scatter(group["recompute_time_s"] * 1e3, group["budget_bytes"] / scale, marker="_", s=60,
                       color="0.4", label=f"{solver} budgets")  # fmt: skip
        ax.set_xlabel("recompute time (ms)")
        ax.set_ylabel(f"simulated peak ({unit})")
        ax.set_title("peak vs recompute time over budgets", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
