"""How far the default greedy is from the proven optimum, and how long it takes (issue 14).

    python -m benchmarks.greedy_gap                      # all three parts (about 10 minutes on 2 cores)
    python -m benchmarks.greedy_gap --parts time         # only the timings
    python -m benchmarks.greedy_gap --parts hypothesis --examples 500 --max-forward 40 --max-backward 30

Prints numbers, checks nothing (this is not a test). Three parts:

* ``corpus``: every profile of benchmarks/profiles/ at budgets 25%, 50% and
  75% of the way from ``acopt.floor`` to the no-recompute peak (as ``acopt
  compare``, whose ``compare_profile`` does the work): the recompute time of
  the plans of ``greedy`` (the default) and ``mu-two`` (the mu-TWO greedy it
  replaced) against the optimum that ``cpsat`` proves, every plan simulated.
* ``hypothesis``: the same on profiles drawn by tests/strategies.py's
  ``profiles()`` (derandomized: the same sample every run), at the same three
  budgets, wherever the floor is below the peak and CP-SAT proves the optimum.
* ``time``: the greedy called directly on a cold profile (a fresh object: no
  memory model, fast path or simulation cached; the floor not computed),
  including its final simulation, best of ``--repeat`` runs, wall and CPU
  seconds: on the ResNet-152 profiles at the three budgets, and on the
  3 000-layer synthetic chain (tests/strategies.py ``chain_profile``) at 80%
  and 50% of its peak, as benchmarks/greedy_scaling.py times them.

The gap is (recompute time - optimum) / optimum; a plan that costs 0 where the
optimum is 0 has gap 0. The goals of issue 14 are printed beside the numbers:
median gap <= 1%, worst <= 5%, every plan fitting, <= 0.5 s on ResNet-152,
<= 1 s on the chain.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGETS = ("0.25", "0.5", "0.75")
GOALS = {"median": 0.01, "worst": 0.05, "resnet_s": 0.5, "chain_s": 1.0}


def _gap(cost: float, optimum: float) -> float:
    if optimum > 0:
        return (cost - optimum) / optimum
    return 0.0 if cost <= 1e-15 else float("inf")


def _pct(x: float) -> str:
    return "inf" if x == float("inf") else f"{100 * (0.0 if abs(x) < 5e-7 else x):.2f}%"


def _summary(label: str, rows: list[dict]) -> dict:
    """Median and worst gap per greedy; prints one line each."""
    out = {}
    for solver in ("greedy", "mu-two"):
        gaps = [r[solver] for r in rows]
        fits = sum(r[f"{solver}_fits"] for r in rows)
        if not gaps:
            continue
        worst = max(range(len(rows)), key=lambda k: gaps[k])
        out[solver] = {"median": statistics.median(gaps), "worst": gaps[worst], "where": rows[worst]["case"], "fits": fits}
        print(f"{label:11s} {solver:7s} plans {len(gaps):4d}, fit {fits:4d}, median gap {_pct(statistics.median(gaps)):>8s}, "
              f"mean {_pct(statistics.fmean(gaps)) if all(g != float('inf') for g in gaps) else 'inf':>8s}, "
              f"worst {_pct(gaps[worst]):>9s} ({rows[worst]['case']})")  # fmt: skip
    return out


# ---- the corpus ---------------------------------------------------------------------------
def corpus(time_limit_s: float, threads: int) -> dict:
    from acopt.records import Profile
    from acopt.compare import compare_profile, corpus_files, profile_label

    print("\n## Corpus (benchmarks/profiles/), budgets 25/50/75% from the floor to the peak\n")
    print(f"{'profile':28s} {'budget':>7s} {'optimum ms':>12s} {'greedy':>8s} {'mu-two':>8s} {'greedy s':>8s}")
    rows = []
    for path in corpus_files():
        label = profile_label(path)
        table = compare_profile(
            Profile.from_json(path), label=label, budgets=[f"floor+{100 * float(b):g}%" for b in BUDGETS],
            solvers=("greedy", "mu-two", "cpsat"),
            time_limit_s=time_limit_s, threads=threads,
        )  # fmt: skip
        for budget in dict.fromkeys(r["budget"] for r in table):
            by = {r["solver"]: r for r in table if r["budget"] == budget}
            if by["cpsat"]["status"] != "optimal" or by["greedy"]["status"] == "error":
                print(f"{label:28s} {budget.split('%')[0] + '%':>7s}   no proven optimum ({by['cpsat']['status']})")
                continue
            optimum = by["cpsat"]["recompute_time_s"]
            row = {"case": f"{label} at {budget.split('%')[0]}%"}
            for solver in ("greedy", "mu-two"):
                row[solver] = _gap(by[solver]["recompute_time_s"], optimum)
                row[f"{solver}_fits"] = by[solver]["fits"] is True
            rows.append(row)
            print(f"{label:28s} {budget.split('%')[0] + '%':>7s} {optimum * 1e3:12.3f} {_pct(row['greedy']):>8s} "
                  f"{_pct(row['mu-two']):>8s} {by['greedy']['solve_time_s']:8.2f}", flush=True)  # fmt: skip
    print()
    return _summary("corpus", rows)


# ---- hypothesis profiles --------------------------------------------------------------------
def draw_profiles(examples: int, max_forward: int, max_backward: int) -> list:
    """The hypothesis sample: derandomized, and drawn before anything else runs
    (what a process imported and ran before changes hypothesis' draws)."""
    from hypothesis import HealthCheck, Phase, given, settings

    from tests.strategies import profiles

    drawn = []

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(profiles(max_forward=max_forward, max_backward=max_backward))
    def draw(profile):
        drawn.append(profile)

    draw()
    return drawn


def hypothesis_profiles(drawn: list, max_forward: int, max_backward: int, time_limit_s: float, save: str = "") -> dict:
    import hashlib

    import acopt
    from acopt.planning import floor, no_recompute_peak

    digest = hashlib.sha256(repr([(p.nodes, p.storages) for p in drawn]).encode()).hexdigest()[:12]
    print(f"\n## Hypothesis profiles: {len(drawn)} drawn by profiles(max_forward={max_forward}, "
          f"max_backward={max_backward}), derandomized (sample {digest}); budgets 25/50/75% from the floor to the peak\n")  # fmt: skip
    rows, skipped = [], 0
    for n, profile in enumerate(drawn):
        lo, hi = floor(profile), no_recompute_peak(profile)
        for frac in sorted({float(b) for b in BUDGETS}):
            budget = int(lo + frac * (hi - lo))
            if budget >= hi:
                continue  # nothing to plan: floor = peak
            exact = acopt.plan(profile, budget=budget, solver="cpsat", time_limit_s=time_limit_s, threads=1)
            if exact.status.value != "optimal":
                skipped += 1
                continue
            multi = sum(len(v.allocates) > 1 for v in profile.nodes)
            row = {"case": f"example {n} at {100 * frac:g}% (floor {lo}, peak {hi}, {multi} multi-output nodes)",
                   "profile": profile, "budget": budget}  # fmt: skip
            for solver in ("greedy", "mu-two"):
                p = acopt.plan(profile, budget=budget, solver=solver)
                row[solver] = _gap(p.recompute_time_s, exact.recompute_time_s)
                row[f"{solver}_fits"] = p.fits
            rows.append(row)
    if skipped:
        print(f"({skipped} budgets without a proven optimum left out)")
    out = _summary("hypothesis", rows)
    for k, r in enumerate(sorted(rows, key=lambda r: -r["greedy"])[:5]):
        if r["greedy"] > 0.01:
            print(f"{'':11s} greedy {_pct(r['greedy']):>9s}, mu-two {_pct(r['mu-two']):>9s}: {r['case']}")
            if save:
                Path(save).mkdir(parents=True, exist_ok=True)
                r["profile"].to_json(Path(save) / f"worst{k}_budget{r['budget']}.profile.json")
    worse = [r for r in rows if r["greedy"] > r["mu-two"] + 1e-9]
    print(f"{'':11s} greedy over 1%: {sum(r['greedy'] > 0.01 for r in rows)}, over 5%: "
          f"{sum(r['greedy'] > 0.05 for r in rows)}; greedy costlier than mu-two: {len(worse)}")  # fmt: skip
    return out


# ---- timings --------------------------------------------------------------------------------
def _time(profile, budget: int, repeat: int) -> tuple[float, float, object]:
    from acopt.greedy import GreedyOptions, greedy
    from acopt.records import Profile

    wall = cpu = float("inf")
    result = None
    data = profile.to_dict()
    for _ in range(repeat):
        fresh = Profile.from_dict(data)  # cold: nothing cached
        w, c = time.perf_counter(), time.process_time()
        result = greedy(profile=fresh, budget_bytes=budget, options=GreedyOptions())
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu, result


def timings(repeat: int) -> dict:
    from acopt.planning import floor, no_recompute_peak, resolve_budget
    from acopt.records import Profile
    from tests.strategies import chain_profile

    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"\n## Time: the greedy called directly on a cold profile, with its final simulation; "
          f"best of {repeat} (load average {load}, {os.cpu_count()} CPUs)\n")  # fmt: skip
    print(f"{'profile':28s} {'budget':>7s} {'picks':>6s} {'wall s':>7s} {'cpu s':>7s}  notes")
    out = {"resnet": [], "chain": []}
    cases = []
    for name in ("resnet152_bs4.profile.json.gz", "resnet152_bs64_fake.profile.json.gz"):
        path = ROOT / "benchmarks" / "profiles" / name
        if not path.exists():
            continue
        profile = Profile.from_json(path)
        lo, hi = floor(profile), no_recompute_peak(profile)
        cases += [("resnet", name.split(".")[0], f"{100 * float(b):g}%", profile, int(lo + float(b) * (hi - lo))) for b in BUDGETS]
    chain = chain_profile(3000)
    cases += [("chain", "chain 3000 (synthetic)", b, chain, resolve_budget(chain, b)) for b in ("80%", "50%")]
    for kind, label, blabel, profile, budget in cases:
        wall, cpu, result = _time(profile, budget, repeat)
        out[kind].append(wall)
        print(f"{label:28s} {blabel:>7s} {len(result.recompute):6d} {wall:7.3f} {cpu:7.3f}  {result.stats.notes[0][:90]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["corpus", "hypothesis", "time"], choices=["corpus", "hypothesis", "time"])
    ap.add_argument("--examples", type=int, default=300, help="hypothesis profiles drawn")
    ap.add_argument("--max-forward", type=int, default=10, help="profiles(max_forward=...): 10, the strategy's default")
    ap.add_argument("--max-backward", type=int, default=8, help="profiles(max_backward=...): 8, the strategy's default")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per CP-SAT solve")
    ap.add_argument("--threads", type=int, default=2, help="CP-SAT threads on the corpus")
    ap.add_argument("--repeat", type=int, default=3, help="timings: best of this many runs")
    ap.add_argument("--save-worst", default="", metavar="DIR", help="write the hypothesis profiles of the worst gaps here")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    results = {}
    if "hypothesis" in args.parts:
        drawn = draw_profiles(args.examples, args.max_forward, args.max_backward)
    if "corpus" in args.parts:
        results["corpus"] = corpus(args.time_limit, args.threads)
    if "hypothesis" in args.parts:
        results["hypothesis"] = hypothesis_profiles(drawn, args.max_forward, args.max_backward, args.time_limit, args.save_worst)
    if "time" in args.parts:
        results["time"] = timings(args.repeat)

    print("\n## Goals (issue 14)\n")
    for part in ("corpus", "hypothesis"):
        g = results.get(part, {}).get("greedy")
        if g:
            print(f"{part:11s} median gap {_pct(g['median'])} (goal <= 1%: {'met' if g['median'] <= GOALS['median'] else 'NOT met'}), "
                  f"worst {_pct(g['worst'])} (goal <= 5%: {'met' if g['worst'] <= GOALS['worst'] else 'NOT met'}; {g['where']})")  # fmt: skip
    t = results.get("time")
    if t and t["resnet"]:
        print(f"{'ResNet-152':11s} slowest {max(t['resnet']):.3f} s (goal <= 0.5 s: {'met' if max(t['resnet']) <= GOALS['resnet_s'] else 'NOT met'})")
    if t and t["chain"]:
        print(f"{'chain 3000':11s} slowest {max(t['chain']):.3f} s (goal <= 1 s: {'met' if max(t['chain']) <= GOALS['chain_s'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
