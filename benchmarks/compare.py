"""Solver comparison benchmark (issue 4, item 4) and the profile corpus it runs on.

    python -m benchmarks.compare corpus [--only NAME ...]     # regenerate benchmarks/profiles/
    python -m benchmarks.compare run [PROFILES...] --out DIR  # = acopt compare ...

See docs/solvers.md for what the comparison shows and benchmarks/profiles/README.md
for the corpus.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = ROOT / "benchmarks" / "profiles"


# ---------------------------------------------------------------------------
# The corpus
@dataclasses.dataclass(frozen=True)
class CorpusEntry:
    model: str
    batch_size: int
    seq_len: int | None = None
    fake: bool = False
    note: str = ""
    factory: str = ""  # an acopt.models spec "package.module:factory" (default: the built-in ``model``)

    @property
    def stem(self) -> str:
        s = f"{self.model}_bs{self.batch_size}"
        if self.seq_len is not None:
            s += f"_s{self.seq_len}"
        if self.fake:
            s += "_fake"
        return s

    def filename(self, gz: bool) -> str:
        return f"{self.stem}.profile.json" + (".gz" if gz else "")

    def command(self) -> str:
        return f"python -m benchmarks.compare corpus --only {self.stem}"


CORPUS: tuple[CorpusEntry, ...] = (
    CorpusEntry("mlp", 512, note="measured on CPU"),
    CorpusEntry("cnn", 16, note="measured on CPU"),
    CorpusEntry("transformer", 8, note="measured on CPU (seq 32, the model's default)"),
    CorpusEntry("gpt2", 2, 128, note="GPT-2 small, measured on CPU; the optimizer step holds the peak: floor = peak"),
    CorpusEntry("gpt2", 4, 256, note="GPT-2 small, measured on CPU"),
    CorpusEntry("resnet152", 4, note="224x224, measured on CPU"),
    CorpusEntry("bert-base", 8, 128, note="measured on CPU"),
    CorpusEntry("resnet152", 64, fake=True, note="fake tensors: exact memory, estimated times"),
    CorpusEntry("bert-base", 16, 512, fake=True, note="fake tensors: exact memory, estimated times"),
    CorpusEntry("gpt2", 8, 1024, fake=True, note="fake tensors: exact memory, estimated times"),
    *(
        CorpusEntry(f"hf-{arch}", 8, None if arch in ("vit", "convnext") else 64, factory=f"benchmarks.hf_models:{arch}",
                    note=f"transformers {kind}, tiny config (benchmarks/hf_models.py), measured on CPU")
        for arch, kind in (
            ("gpt2", "decoder"), ("llama", "decoder"), ("opt", "decoder"), ("bloom", "decoder"),
            ("mixtral", "MoE decoder"), ("bert", "encoder"), ("roberta", "encoder"), ("distilbert", "encoder"),
            ("electra", "encoder"), ("vit", "vision"), ("convnext", "vision"),
        )
    ),  # fmt: skip
)

GZIP_OVER_BYTES = 1_000_000


def build_profile(entry: CorpusEntry, *, warmup: int = 1, iterations: int = 3):
    """Trace and profile one corpus entry (as ``acopt profile`` does)."""
    import torch

    import acopt
    from acopt import models

    kw = {} if entry.seq_len is None or entry.factory else {"seq_len": entry.seq_len}
    if entry.factory:  # its own fixed shapes; the stem's seq_len only names them
        w = models.build(entry.factory, batch_size=entry.batch_size, device="cpu", seed=0)
    elif entry.fake:
        with torch.device("meta"):
            w = models.build(entry.model, batch_size=entry.batch_size, device="meta", seed=0, **kw)
    else:
        w = models.build(entry.model, batch_size=entry.batch_size, device="cpu", seed=0, **kw)
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    return acopt.profile(
        traced, *w.batch, warmup=warmup, iterations=iterations, fake=entry.fake, model_name=entry.model
    )


def write_corpus_entry(entry: CorpusEntry, out_dir: Path = PROFILES_DIR, **kw) -> Path:
    import json

    prof = build_profile(entry, **kw)
    size = len(json.dumps(prof.to_dict(), indent=1))
    path = out_dir / entry.filename(gz=size > GZIP_OVER_BYTES)
    for old in (out_dir / entry.filename(gz=False), out_dir / entry.filename(gz=True)):
        old.unlink(missing_ok=True)
    prof.to_json(path)
    return path


def cmd_corpus(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entries = [e for e in CORPUS if not args.only or e.stem in args.only]
    if args.only and len(entries) != len(args.only):
        known = ", ".join(e.stem for e in CORPUS)
        raise SystemExit(f"unknown corpus entry in {args.only}; known: {known}")
    for e in entries:
        t0 = time.perf_counter()
        path = write_corpus_entry(e, out, warmup=args.warmup, iterations=args.iterations)
        print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def corpus_files(directory: Path = PROFILES_DIR) -> list[Path]:
    return sorted(p for p in directory.glob("*.profile.json*") if p.name.endswith((".json", ".json.gz")))


# ---------------------------------------------------------------------------
# The comparison
ACOPT_SOLVERS = ("greedy", "mu-two", "ilp", "cpsat")  # greedy: the default; mu-two: the mu-TWO greedy it replaced
TORCH_SOLVERS = ("torch-greedy", "torch-dp", "torch-ilp")
SOLVERS = ACOPT_SOLVERS + TORCH_SOLVERS
EXACT = ("ilp", "cpsat")
DEFAULT_BUDGETS = ("0.25", "0.5", "0.75")
COLUMNS = (
    "model", "profile", "budget", "budget_bytes", "solver", "simulated_peak_bytes", "fits",
    "recompute_time_s", "optimum_s", "gap", "solve_time_s", "status",
    "recomputed", "candidates", "floor_bytes", "no_recompute_peak_bytes", "bound_s",
    "knapsack_peak_bytes", "knapsack_recompute_s", "knapsack_claim_s", "notes",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Knapsack:
    """acopt's candidates as a 0/1 knapsack (what PyTorch's solvers take).

    ``bytes[i]`` is candidate i's storage size; ``times[i]`` its recompute time
    alone, ``MemoryModel.block(a, {a}).time_s`` (memory model, rule 4 with
    R = {a}): the single-recomputation cost, as ``ActivationRecord.recomp_time_s``.
    """

    names: tuple[str, ...]
    bytes: tuple[int, ...]
    times: tuple[float, ...]

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes)

    def max_memory(self, peak: int, budget: int) -> float:
        """The budget in PyTorch's form: the saved (kept) candidates' bytes, as a
        fraction of all candidates' bytes, may be at most
        ``(sum(bytes) - (peak - budget)) / sum(bytes)``: the linear model
        "every recomputed byte comes off the peak"."""
        total = self.total_bytes
        return 0.0 if total <= 0 else max(0.0, (total - (peak - budget)) / total)

    def fractions(self) -> list[float]:
        total = self.total_bytes or 1
        return [b / total for b in self.bytes]


def knapsack_of(profile) -> Knapsack:
    from acopt.simulator import memory_model

    mm = memory_model(profile)
    names = tuple(mm.candidates)
    by = profile.storage_by_name
    return Knapsack(
        names=names,
        bytes=tuple(by[a].bytes for a in names),
        times=tuple(mm.block(a, frozenset({a})).time_s for a in names),
    )


def torch_plan(profile, budget_bytes: int, solver: str, ks: Knapsack | None = None) -> dict:
    """Run one of PyTorch's knapsack solvers on acopt's candidates.

    Returns the recompute set, the solve time (the knapsack call only) and what
    the knapsack believes: its linear peak ``P - sum(recomputed bytes)`` and
    its recompute time ``sum(times of recomputed)``.
    """
    from torch._functorch._activation_checkpointing import knapsack as tk

    from acopt.planning import no_recompute_peak

    fn = {"torch-greedy": tk.greedy_knapsack, "torch-dp": tk.dp_knapsack, "torch-ilp": tk.ilp_knapsack}[solver]
    ks = ks or knapsack_of(profile)
    peak = no_recompute_peak(profile)
    t0 = time.perf_counter()
    if ks.names and budget_bytes < peak:  # PyTorch too skips the knapsack at memory_budget == 1
        objective, _saved, recomputed = fn(ks.fractions(), list(ks.times), ks.max_memory(peak, budget_bytes))
    else:
        objective, recomputed = sum(ks.times), []
    took = time.perf_counter() - t0
    recompute = frozenset(ks.names[i] for i in recomputed)
    return {
        "recompute": recompute,
        "solve_time_s": took,
        "knapsack_peak_bytes": peak - sum(ks.bytes[i] for i in recomputed),
        "knapsack_recompute_s": sum(ks.times[i] for i in recomputed),
        # what the solver claims: all times minus the runtime it says it saved (differs from the
        # line above where torch's ilp_knapsack tests ``x == 1`` on floats, or dp's float32 sums)
        "knapsack_claim_s": max(0.0, sum(ks.times) - float(objective)),
        "status": {"torch-greedy": "heuristic", "torch-dp": "knapsack optimum (quantised)",
                   "torch-ilp": "knapsack optimum"}[solver],
    }  # fmt: skip


def resolve_budgets(profile, budgets) -> list[tuple[str, int]]:
    """Budget specs to (label, bytes). A number in [0, 1] is a fraction of the
    way from ``acopt.floor`` to the no-recompute peak (label ``"25%"``);
    anything else is an acopt budget (bytes, ``"6GiB"``, ``"70%"`` of the peak)."""
    from acopt.planning import floor, no_recompute_peak, resolve_budget

    lo, hi = floor(profile), no_recompute_peak(profile)
    out = []
    for spec in budgets:
        try:
            frac = float(spec)
        except (TypeError, ValueError):
            frac = None
        if frac is not None and 0.0 <= frac <= 1.0:
            out.append((f"{100 * frac:g}% floor->peak", int(lo + frac * (hi - lo))))
        else:
            b = resolve_budget(profile, spec if isinstance(spec, (int, float)) else str(spec))
            out.append((str(spec), b))
    return out


def compare_profile(profile, *, label: str = "", budgets=DEFAULT_BUDGETS, solvers=SOLVERS,
                    time_limit_s: float = 60.0, threads: int = 2, progress=None) -> list[dict]:  # fmt: skip
    """One row per (budget, solver): every plan evaluated by acopt's simulator.

    Each row has the :data:`COLUMNS` and ``plan``, the recompute set (absent
    when the solver failed). ``gap`` is (recompute time - optimum) / optimum
    for plans that fit, where ilp or cpsat proved an optimum at that budget.
    """
    import acopt
    from acopt.planning import floor, no_recompute_peak
    from acopt.schedule import InvalidPlan

    unknown = [s for s in solvers if s not in SOLVERS]
    if unknown:
        raise ValueError(f"unknown solver(s) {unknown}; choose from {', '.join(SOLVERS)}")
    lo, hi = floor(profile), no_recompute_peak(profile)
    ks = knapsack_of(profile)
    model = profile.meta.model or label
    rows: list[dict] = []
    for blabel, budget in resolve_budgets(profile, budgets):
        group: list[dict] = []
        for solver in solvers:
            row = dict.fromkeys(COLUMNS, "")
            row.update(model=model, profile=label, budget=blabel, budget_bytes=budget, solver=solver,
                       candidates=len(ks.names), floor_bytes=lo, no_recompute_peak_bytes=hi)  # fmt: skip
            try:
                if solver in ACOPT_SOLVERS:
                    opts = {"time_limit_s": float(time_limit_s), "threads": threads} if solver in EXACT else {}
                    p = acopt.plan(profile, budget=budget, solver=solver, **opts)
                    recompute, status, solve_time = p.recompute, p.status.value, p.solve_time_s
                    if solver in EXACT and p.bound is not None:
                        row["bound_s"] = p.bound
                else:
                    t = torch_plan(profile, budget, solver, ks)
                    recompute, status, solve_time = t["recompute"], t["status"], t["solve_time_s"]
                    row["knapsack_peak_bytes"] = t["knapsack_peak_bytes"]
                    row["knapsack_recompute_s"] = t["knapsack_recompute_s"]
                    row["knapsack_claim_s"] = t["knapsack_claim_s"]
                sim = acopt.simulate(profile, recompute)
            except InvalidPlan as e:
                row.update(status="invalid plan", notes=str(e)[:200])
            except Exception as e:  # noqa: BLE001 - one failing solver must not stop the benchmark
                row.update(status="error", notes=f"{type(e).__name__}: {e}"[:200])
            else:
                row.update(
                    simulated_peak_bytes=sim.peak_bytes, fits=sim.peak_bytes <= budget,
                    recompute_time_s=sim.recompute_time_s, solve_time_s=solve_time, status=status,
                    recomputed=len(recompute), plan=frozenset(recompute),
                )  # fmt: skip
            group.append(row)
            if progress:
                progress(row)
        proven = [r["recompute_time_s"] for r in group if r["solver"] in EXACT and r["status"] == "optimal"]
        if proven:
            opt = min(proven)
            for r in group:
                r["optimum_s"] = opt
                if r["fits"] is True:  # unclamped: a plan that beats a proven optimum would show up negative
                    rt = r["recompute_time_s"]
                    r["gap"] = (rt - opt) / opt if opt > 0 else (0.0 if rt <= 0 else float("inf"))
        rows.extend(group)
    return rows


# ---- outputs -----------------------------------------------------------------
def _mib(b) -> str:
    return "" if b == "" else f"{b / 2**20:,.1f}"


def _ms(s) -> str:
    return "" if s == "" else f"{s * 1e3:,.2f}"


def _pct(g: float) -> str:
    if g == float("inf"):
        return "inf"
    return f"{100 * (0.0 if abs(g) < 5e-7 else g):.1f}%"  # float noise is not a negative gap


def markdown_table(rows: list[dict]) -> str:
    head = ("model", "profile", "budget", "budget MiB", "solver", "sim. peak MiB", "fits",
            "recompute ms", "gap to optimum", "solve s", "status")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 or i == 4 or i == 10 else "---:" for i in range(len(head))) + "|"]
    for r in rows:
        gap = r["gap"]
        gap_s = "" if gap == "" else _pct(gap)
        fits = {True: "yes", False: "**no**", "": ""}[r["fits"]]
        status = r["status"]
        if r["solver"] in EXACT and status != "optimal" and r["bound_s"] != "":
            status += f" (bound {_ms(r['bound_s'])} ms)"
        solve = "" if r["solve_time_s"] == "" else f"{r['solve_time_s']:.2f}"
        lines.append("| " + " | ".join(str(x) for x in (
            r["model"], r["profile"], r["budget"].replace(" floor->peak", ""), _mib(r["budget_bytes"]), r["solver"],
            _mib(r["simulated_peak_bytes"]), fits, _ms(r["recompute_time_s"]), gap_s, solve, status,
        )) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def summary_table(rows: list[dict]) -> str:
    """Per solver: plans that fit, median and worst gap where an optimum is proven, total solve time."""
    import statistics

    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["solver"], []).append(r)
    lines = ["| solver | plans | fit when simulated | optimum proven (of plans) | median gap | worst gap | "
             "over budget by (median of misses) | total solve s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for solver, rs in by.items():
        fits = sum(r["fits"] is True for r in rs)
        gaps = [r["gap"] for r in rs if r["gap"] != ""]
        over = [(r["simulated_peak_bytes"] - r["budget_bytes"]) / r["budget_bytes"] for r in rs if r["fits"] is False]
        proven = sum(r["status"] == "optimal" for r in rs) if solver in EXACT else ""
        fmt = lambda g: "" if g is None else _pct(g)  # noqa: E731
        lines.append(
            f"| {solver} | {len(rs)} | {fits} | {proven} | {fmt(statistics.median(gaps) if gaps else None)} | "
            f"{fmt(max(gaps) if gaps else None)} | {fmt(statistics.median(over) if over else None)} | "
            f"{sum(r['solve_time_s'] or 0 for r in rs):.1f} |"
        )
    return "\n".join(lines) + "\n"


MARKERS = {"greedy": "o", "mu-two": "X", "ilp": "s", "cpsat": "D", "torch-greedy": "^", "torch-dp": "v", "torch-ilp": "P"}


def pareto_plot(rows: list[dict], path: Path, title: str) -> None:
    """Simulated peak vs recompute time: every solver's plan at every budget; dashed: budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    budgets = sorted({r["budget_bytes"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, b in enumerate(budgets):
        ax.axhline(b / 2**20, color=colors[i % len(colors)], ls="--", lw=0.8)
    for i, solver in enumerate(dict.fromkeys(r["solver"] for r in rows)):
        pts = [r for r in rows if r["solver"] == solver and r["simulated_peak_bytes"] != ""]
        for r in pts:
            c = colors[budgets.index(r["budget_bytes"]) % len(colors)]
            ax.scatter(r["recompute_time_s"] * 1e3, r["simulated_peak_bytes"] / 2**20, marker=MARKERS.get(solver, "x"),
                       s=45, facecolors=c if r["fits"] else "none", edgecolors=c, zorder=3)  # fmt: skip
        ax.scatter([], [], marker=MARKERS.get(solver, "x"), color="gray", label=solver)
    r0 = rows[0]
    ax.axhline(r0["no_recompute_peak_bytes"] / 2**20, color="black", lw=0.6)
    ax.axhline(r0["floor_bytes"] / 2**20, color="black", lw=0.6, ls=":")
    ax.set_xlabel("recompute time, simulated (ms)")
    ax.set_ylabel("peak, simulated (MiB)")
    ax.set_title(title + "\n(dashed: budgets, same colour as their plans; hollow: over budget; "
                 "solid black: no recompute; dotted: floor)", fontsize=8)  # fmt: skip
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> str:
    """One line: when, where and under what load the comparison ran."""
    import os
    import platform

    import torch

    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.python_implementation()} "
            f"{platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load}")  # fmt: skip


def write_outputs(rows: list[dict], out: Path, header: str = "") -> dict[str, Path]:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "compare.csv", "md": out / "compare.md"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")  # "plan": the set, not written
        w.writeheader()
        w.writerows(rows)
    paths["md"].write_text(header + "## Summary\n\n" + summary_table(rows) + "\n## All plans\n\n" + markdown_table(rows))
    for label in dict.fromkeys(r["profile"] for r in rows):
        rs = [r for r in rows if r["profile"] == label]
        paths[f"png:{label}"] = out / f"pareto_{label}.png"
        pareto_plot(rs, paths[f"png:{label}"], f"{rs[0]['model']}: {label}")
    return paths


def profile_label(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".json").removesuffix(".profile")


def run_compare(profiles, *, budgets=DEFAULT_BUDGETS, solvers=SOLVERS, time_limit_s: float = 60.0,
                threads: int = 2, out: Path | str = "out/compare", verbose: bool = True) -> list[dict]:  # fmt: skip
    """Compare the solvers on saved profiles (paths; default: the corpus) and write CSV, markdown and plots."""
    import warnings

    from acopt.records import Profile

    warnings.simplefilter("ignore", DeprecationWarning)
    paths = [Path(p) for p in profiles] or corpus_files()
    if not paths:
        raise ValueError(f"no profiles given and none in {PROFILES_DIR}")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"no such profile file: {', '.join(missing)}")

    def show(r):
        if verbose:
            print(f"{r['profile']:<26} {r['budget']:<18} {r['solver']:<13} peak {_mib(r['simulated_peak_bytes']):>10} MiB "
                  f"(budget {_mib(r['budget_bytes'])}) fits={r['fits']!s:<5} recompute {_ms(r['recompute_time_s']):>9} ms "
                  f"solve {r['solve_time_s'] if r['solve_time_s'] == '' else round(r['solve_time_s'], 2)} s {r['status']}",
                  flush=True)  # fmt: skip

    started, t0 = environment(), time.perf_counter()
    rows = []
    for path in paths:
        prof = Profile.from_json(path)
        rows += compare_profile(prof, label=profile_label(path), budgets=budgets, solvers=solvers,
                                time_limit_s=time_limit_s, threads=threads, progress=show)  # fmt: skip
    header = (
        f"Solvers {' '.join(solvers)}; budgets {' '.join(map(str, budgets))}; exact solvers: time limit "
        f"{time_limit_s:g} s, {threads} thread(s).\n\nStarted {started}; finished after "
        f"{time.perf_counter() - t0:.0f} s, {environment().split(', ')[-1]}.\n\n"
    )
    written = write_outputs(rows, Path(out), header)
    if verbose:
        print(f"wrote {', '.join(str(p) for p in written.values())}")
    return rows


def add_compare_arguments(sp: argparse.ArgumentParser) -> None:
    """The options of ``acopt compare`` (and ``python -m benchmarks.compare run``)."""
    sp.add_argument("profiles", nargs="*", help="profile JSON(.gz) files (default: benchmarks/profiles/*)")
    sp.add_argument("--budgets", nargs="+", default=list(DEFAULT_BUDGETS),
                    help="a number in [0, 1]: that fraction of the way from the floor to the no-recompute peak "
                         "(default 0.25 0.5 0.75); else an acopt budget: bytes, 6GiB, 70%% (of the peak)")  # fmt: skip
    sp.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS, metavar="SOLVER",
                    help=f"any of {' '.join(SOLVERS)} (default: all)")  # fmt: skip
    sp.add_argument("--time-limit", type=float, default=60.0, help="seconds per exact solve (ilp, cpsat)")
    sp.add_argument("--threads", type=int, default=2, help="threads of the exact solvers")
    sp.add_argument("--out", default="out/compare")


def cmd_run(args) -> int:
    run_compare(args.profiles, budgets=args.budgets, solvers=args.solvers, time_limit_s=args.time_limit,
                threads=args.threads, out=args.out)  # fmt: skip
    return 0


# ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("corpus", help="(re)generate the profile corpus in benchmarks/profiles/")
    sp.add_argument("--only", nargs="*", default=[], metavar="STEM", help="e.g. resnet152_bs4 gpt2_bs8_s1024_fake")
    sp.add_argument("--out", default=str(PROFILES_DIR))
    sp.add_argument("--threads", type=int, default=1, help="torch CPU threads (the shared machine has 2 cores)")
    sp.add_argument("--warmup", type=int, default=1)
    sp.add_argument("--iterations", type=int, default=3)
    sp.set_defaults(fn=cmd_corpus)
    sp = sub.add_parser("run", help="compare the solvers (= acopt compare)")
    add_compare_arguments(sp)
    sp.set_defaults(fn=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
