"""Profile tables as pandas frames and CSV files (columns as in the original plan).

``{prefix}_node_stats.csv``: one row per node in execution order.
``{prefix}_activation_stats.csv``: one row per activation, with the liveness
ranks and times the planners use.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from acopt.records import Profile


def node_frame(profile: Profile) -> pd.DataFrame:
    sizes = profile.storage_by_name
    timeline = profile.timeline or (0,) * len(profile.nodes)
    return pd.DataFrame(
        {
            "rank": range(len(profile.nodes)),
            "node_name": [n.name for n in profile.nodes],
            "op": [n.op for n in profile.nodes],
            "region": [n.region.value for n in profile.nodes],
            "run_time_s": [n.time_s for n in profile.nodes],
            "alloc_bytes": [sum(sizes[s].bytes for s in n.allocates) for n in profile.nodes],
            "live_bytes": list(timeline),
            "random": [n.random for n in profile.nodes],
            "mutates": [";".join(n.mutates) for n in profile.nodes],
            "recomputable": [n.recomputable for n in profile.nodes],
            "inputs": [";".join(n.inputs) for n in profile.nodes],
        }
    )


def activation_frame(profile: Profile) -> pd.DataFrame:
    columns = [
        "activation_name",
        "node_name",
        "module",
        "creation_rank",
        "last_fw_use_rank",
        "first_bw_use_rank",
        "last_bw_use_rank",
        "median_mem_size_bytes",
        "inactive_time_s",
        "recomp_time_s",
        "recomputable",
        "sources",
    ]
    rows = [
        (
            a.name,
            a.node,
            a.module,
            a.creation_rank,
            a.last_fw_use_rank,
            a.first_bw_use_rank,
            a.last_bw_use_rank,
            a.bytes,
            a.inactive_time_s,
            a.recomp_time_s,
            a.recomputable,
            ";".join(a.sources),
        )
        for a in profile.activations
    ]
    return pd.DataFrame(rows, columns=columns)


def write_profile_csvs(profile: Profile, out_dir: str | Path, prefix: str = "profile") -> tuple[Path, Path]:
    """Write ``{prefix}_node_stats.csv`` and ``{prefix}_activation_stats.csv``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nodes = out / f"{prefix}_node_stats.csv"
    acts = out / f"{prefix}_activation_stats.csv"
    node_frame(profile).to_csv(nodes, index=False)
    activation_frame(profile).to_csv(acts, index=False)
    return nodes, acts
