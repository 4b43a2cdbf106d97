"""Eager peak of an HF workload with and without the "being compiled" flag, beside acopt's traced peak.

    python -m benchmarks.compiling_flag_peak --model opt --batch-size 8

acopt traces with ``torch.compiler._is_compiling_flag`` set (as torch.export's
non-strict mode does), and transformers then builds its attention mask another
way. This prints the eager step's measured peak without the flag, with it,
and the traced step's (SGD with momentum, one thread): docs/results.md,
finding 6.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.compiler

import acopt
from benchmarks import hf_models
from acopt.measure import measure_peak, state_tensors


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--model", default="opt")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    w = getattr(hf_models, args.model)(batch_size=args.batch_size)
    w = dataclasses.replace(w, optimizer=torch.optim.SGD(w.model.parameters(), lr=1e-3, momentum=0.9))
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)

    def alive():
        return state_tensors(w.model, w.optimizer, w.batch)

    def eager():
        return w.train_step(w.model, w.optimizer, *w.batch)

    eager()  # creates the momentum buffers, as the traced step's inputs hold them
    plain = measure_peak(eager, device="cpu", alive=alive).peak_bytes
    torch.compiler._is_compiling_flag = True
    try:
        flagged = measure_peak(eager, device="cpu", alive=alive).peak_bytes
    finally:
        torch.compiler._is_compiling_flag = False
    traced_peak = measure_peak(lambda: traced(*w.batch), device="cpu", alive=alive).peak_bytes
    print(f"{args.model} batch {args.batch_size}: eager {plain} B, eager with the flag {flagged} B, traced {traced_peak} B")


if __name__ == "__main__":
    main()
