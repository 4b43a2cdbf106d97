"""Markdown tables and verdicts of the compiled comparison (docs/results.md,
"Compiled: acopt + inductor against torch.compile's memory budget").

    python benchmarks/inductor_table.py benchmarks/results/cpu-inductor-*.csv

Per model: every row of none, acopt-inductor, torch-budget and
ckpt-every-compiled (peak measured, step time as the median of the timed steps,
the paired eager step's median beside it). Verdicts, per model:

* at equal measured peak: each acopt-inductor ``match:M`` row against row M
  (fits = acopt's measured peak <= M's; faster = its step time relative to
  the eager step timed alternately with it is lower: under this machine's load
  raw times of one plan vary by tens of percent between rows, the ratio much less);
* floors: the lowest measured peak of acopt-inductor and of torch-budget;
* budgets: every acopt-inductor row with a budget is within it (or refused).
"""

from __future__ import annotations

import sys

from acopt.bench import read_csv

MiB = 1 << 20
METHODS = ("none", "acopt-inductor", "torch-budget", "ckpt-every-compiled")


def _ms(v) -> str:
    return f"{v * 1e3:.2f}" if isinstance(v, (int, float)) else ""


def _mib(v) -> str:
    return f"{v / MiB:.2f}" if isinstance(v, (int, float)) else ""


def _ratio(r: dict) -> str:
    t, e = r.get("step_time_s"), r.get("paired_none_step_time_s")
    return f"{t / e:.2f}" if isinstance(t, (int, float)) and isinstance(e, (int, float)) and e else ""


def table(rows: list[dict]) -> str:
    out = ["| method | budget | status | peak MiB | simulated MiB | step ms | eager ms (paired) | step / eager | recomputed | loss diff vs eager |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if r["method"] not in METHODS:
            continue
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {str(r.get('error', ''))[:90]}"
        out.append(
            f"| {r['method']} | {r.get('budget', '')} | {status} | {_mib(r.get('peak_bytes'))} | {_mib(r.get('sim_peak_bytes'))} "
            f"| {_ms(r.get('step_time_s'))} | {_ms(r.get('paired_none_step_time_s'))} | {_ratio(r)} | {r.get('recomputed', '')} "
            f"| {r.get('loss_max_abs_diff_vs_none', '')} |"
        )
    return "\n".join(out)


def verdicts(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if r["status"] == "ok"]
    label = {}
    for r in ok:
        label[r["method"] + (f"@{r['budget']}" if r.get("budget") else "")] = r
    out = []
    for r in rows:
        b = str(r.get("budget", ""))
        if r["method"] != "acopt-inductor" or not b.startswith("match:"):
            continue
        base = label.get(b.removeprefix("match:"))
        if base is None:
            continue
        if r["status"] != "ok":
            out.append(f"at {b[6:]}'s peak {_mib(base['peak_bytes'])} MiB: acopt-inductor {r['status']}")
            continue
        fits = r["peak_bytes"] <= base["peak_bytes"]
        faster = float(_ratio(r)) <= float(_ratio(base))
        out.append(
            f"at {b[6:]}'s peak {_mib(base['peak_bytes'])} MiB: acopt-inductor {_mib(r['peak_bytes'])} MiB "
            f"({'fits' if fits else 'OVER'}), step/eager {_ratio(r)} vs {_ratio(base)} "
            f"({'faster or equal' if faster else 'SLOWER'}; raw {_ms(r['step_time_s'])} vs {_ms(base['step_time_s'])} ms)"
        )
    floors = {m: min((r["peak_bytes"] for r in ok if r["method"] == m), default=None) for m in ("acopt-inductor", "torch-budget")}
    out.append(
        "lowest measured peak: acopt-inductor " + _mib(floors["acopt-inductor"]) + " MiB, torch-budget "
        + _mib(floors["torch-budget"]) + " MiB"
    )
    budgeted = [r for r in rows if r["method"] == "acopt-inductor" and isinstance(r.get("budget_bytes"), int)]
    over = [r for r in budgeted if r["status"] == "ok" and r["peak_bytes"] > r["budget_bytes"]]
    refused = [r for r in budgeted if r["status"] != "ok"]
    out.append(
        f"budgets: {len(budgeted)} given, {len(budgeted) - len(over) - len(refused)} met, {len(over)} exceeded, "
        f"{len(refused)} refused" + (" (" + "; ".join(f"{r['budget']}: {str(r.get('error', ''))[:80]}" for r in refused) + ")" if refused else "")
    )
    return out


def main(paths: list[str]) -> None:
    for path in paths:
        rows = read_csv(path)
        if not rows:
            continue
        r0 = rows[0]
        print(f"#### {r0['model']} (batch {r0['batch_size']}{', ' + r0['model_args'] if r0.get('model_args') else ''})\n")
        print(table(rows) + "\n")
        for line in verdicts(rows):
            print(f"- {line}")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
