"""How the greedy planners' time grows with the number of activations.

    python benchmarks/greedy_scaling.py                   # synthetic chains and ResNet-like profiles
    python benchmarks/greedy_scaling.py --profile out/resnet152_bs32.profile.json   # also a real profile

For each profile and budget (a share of the no-recompute peak) it times, on
a fresh copy of the profile (no cached simulations or memory model):

* ``greedy`` (the default, acopt/greedy.py) and ``mu-two`` (the mu-TWO
  greedy, acopt/mu_two.py): the planner itself, called directly:
  memory-model set-up, the search and the final simulation. This is what
  the performance goals (<= 1 s) are about.
* ``floor``: :func:`acopt.floor`, one simulation of the schedule that
  recomputes every candidate. Its length is quadratic in depth for chain-like
  graphs (every block reaches back to the input), so it is timed only for
  real profiles and small synthetic ones (``--floor-up-to``).
* ``plan()``: ``acopt.plan`` right after, with the floor cached (what a sweep
  pays per budget).

Synthetic profiles (tests/strategies.py): ``chain N`` is an MLP-like chain
of N layers (N activations); ``residual B`` is B ResNet-like residual blocks
(4B activations, 21B nodes).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acopt.greedy import GreedyOptions, greedy  # noqa: E402
from acopt.mu_two import MuTwoOptions, mu_two  # noqa: E402
from acopt.planning import InfeasibleBudget, floor, plan, resolve_budget  # noqa: E402
from acopt.records import Profile  # noqa: E402
from acopt.simulator import memory_model  # noqa: E402
from tests.strategies import chain_profile, residual_profile  # noqa: E402


def fresh(profile: Profile) -> Profile:
    """An equal profile object with empty caches."""
    return Profile.from_dict(profile.to_dict())


PLANNERS = {"greedy": (greedy, GreedyOptions), "mu-two": (mu_two, MuTwoOptions)}


def row(label: str, profile: Profile, budget: str, with_floor: bool, repeat: int, planner: str = "greedy") -> dict:
    budget_bytes = resolve_budget(fresh(profile), budget)
    fn, options = PLANNERS[planner]
    t_greedy = float("inf")
    for _ in range(repeat):  # the best of a few runs: the machine may be shared
        p = fresh(profile)
        t = time.perf_counter()
        try:
            result = fn(profile=p, budget_bytes=budget_bytes, options=options())
        except InfeasibleBudget:
            result = None
        t_greedy = min(t_greedy, time.perf_counter() - t)
    t_floor = t_plan = None
    if with_floor:
        p = fresh(profile)
        t = time.perf_counter()
        floor(p)
        t_floor = time.perf_counter() - t
        t = time.perf_counter()
        try:
            plan(p, budget=budget_bytes, solver=planner)
        except InfeasibleBudget:
            pass
        t_plan = time.perf_counter() - t
    g = result.stats if result is not None else None
    return dict(
        profile=label, nodes=len(profile.nodes), candidates=len(memory_model(profile).candidates), budget=budget,
        planner=planner, recomputed=len(result.recompute) if result else "below floor",
        recompute_s=result.recompute_time_s if result else None, sims=g.iterations if g else 0,
        greedy_s=t_greedy, floor_s=t_floor, plan_s=t_plan,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chains", type=int, nargs="*", default=[100, 300, 1000, 3000, 5000])
    ap.add_argument("--residual", type=int, nargs="*", default=[25, 75, 250, 750, 1250])
    ap.add_argument("--budgets", nargs="*", default=["80%", "50%"])
    ap.add_argument("--profile", action="append", default=[], help="a .profile.json to time as well")
    ap.add_argument("--repeat", type=int, default=3, help="report the best of this many runs of the greedy")
    ap.add_argument("--planners", nargs="+", default=list(PLANNERS), choices=list(PLANNERS))
    ap.add_argument(
        "--floor-up-to", type=int, default=300, help="time the floor and plan() for synthetic profiles up to this many candidates"
    )
    args = ap.parse_args(argv)

    cases = [(f"chain {n}", lambda n=n: chain_profile(n), n <= args.floor_up_to) for n in args.chains]
    cases += [(f"residual {b}", lambda b=b: residual_profile(b), 4 * b <= args.floor_up_to) for b in args.residual]
    cases += [(Path(f).name.removesuffix(".profile.json"), lambda f=f: Profile.from_json(f), True) for f in args.profile]
    print(f"python {platform.python_version()} on {platform.machine()}; greedy: best of {args.repeat} runs, floor and plan(): one run")
    head = (
        f"{'profile':22s} {'nodes':>6s} {'cands':>6s} {'budget':>6s} {'planner':>7s} {'recomp':>6s} {'rec. ms':>9s} "
        f"{'sims':>4s} {'time':>8s} {'floor':>8s} {'plan()':>8s}"
    )
    print(head)
    print("-" * len(head))

    def secs(x):
        return "-" if x is None else f"{x:.3f}s"

    for label, make, with_floor in cases:
        profile = make()
        for budget in args.budgets:
            for planner in args.planners:
                r = row(label, profile, budget, with_floor, args.repeat, planner)
                ms = "-" if r["recompute_s"] is None else f"{r['recompute_s'] * 1e3:.1f}"
                print(
                    f"{r['profile']:22s} {r['nodes']:6d} {r['candidates']:6d} {r['budget']:>6s} {planner:>7s} "
                    f"{r['recomputed']!s:>6s} {ms:>9s} {r['sims']:4d} {secs(r['greedy_s']):>8s} "
                    f"{secs(r['floor_s']):>8s} {secs(r['plan_s']):>8s}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
