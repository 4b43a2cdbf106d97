"""Module mode (acopt.wrap) on a GPT-2-shaped model: measured forward+backward peak and
time, eager vs wrapped at several budgets vs transformers' gradient checkpointing.

    python -m benchmarks.module_mode --layers 4 --width 256 --seq 128 --batch 8 --threads 1

Per method: the allocator's peak while one ``model(**batch).loss.backward()`` runs
(torch.profiler's CPU allocation events, plus the parameters, buffers and batch
already held: the same count as acopt's simulator), acopt's simulated peak where
there is one, the median time of a forward+backward, and whether the gradients are
bitwise eager's (dropout on; the same seed before each call).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from acopt.profiler import added_peak_bytes


def main(argv=None) -> None:
    import transformers

    import acopt
    from acopt.units import format_bytes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budgets", nargs="+", default=["act50%", "ckpt", "floor"],
                    help="act50%% = floor + half of (peak - floor); ckpt = HF checkpointing's measured peak; "
                         "floor; or anything acopt.wrap takes")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = transformers.GPT2Config(
        vocab_size=args.vocab, n_positions=args.seq, n_embd=args.width, n_layer=args.layers, n_head=args.heads,
        bos_token_id=0, eos_token_id=0, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    base_model = transformers.GPT2LMHeadModel(cfg).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    held = sum(t.untyped_storage().nbytes() for t in [*base_model.parameters(), *base_model.buffers(), ids])

    def measure(model):
        def once():
            model(**batch).loss.backward()

        for _ in range(2):  # warm-up; a wrapped model plans again without the unused logits' grad_output
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            once()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        peak = held + added_peak_bytes(once)
        grads = [p.grad.clone() for p in model.parameters()]
        times = []
        for _ in range(args.repeats):
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            once()
            times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
        return peak, statistics.median(times), grads

    rows = []
    eager_peak, eager_time, eager_grads = measure(base_model)
    rows.append(("eager", "", eager_peak, None, eager_time, "reference"))
    ckpt = copy.deepcopy(base_model)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt_peak, t, grads = measure(ckpt)
    peak = ckpt_peak
    rows.append(("HF gradient checkpointing", "", peak, None, t, _same(grads, eager_grads)))
    probe = acopt.wrap(copy.deepcopy(base_model), budget="100%", **batch)
    full, floor = probe.profile.peak_bytes, acopt.floor(probe.profile)
    for budget in args.budgets:
        value = {"act50%": floor + (full - floor) // 2, "ckpt": ckpt_peak, "floor": floor}.get(budget, budget)
        model = copy.deepcopy(base_model)
        start = time.perf_counter()
        wrapped = acopt.wrap(model, budget=value, **batch)
        plan_s = time.perf_counter() - start
        peak, t, grads = measure(wrapped)
        sim = wrapped.report().peak_after_bytes  # the variant that ran (without the logits' grad_output)
        rows.append((f"acopt.wrap {budget}", f"{len(wrapped.plan.recompute)} recomputed, planned in {plan_s:.1f} s",
                     peak, sim, t, _same(grads, eager_grads)))  # fmt: skip
    print(f"GPT-2 {args.layers} layers, width {args.width}, batch {args.batch} x {args.seq} tokens, "
          f"torch {torch.__version__}, {args.threads} thread(s); floor {format_bytes(floor)}")  # fmt: skip
    print("| method | plan | peak, measured | peak, simulated | fwd+bwd time | grads vs eager |")
    print("|---|---|---:|---:|---:|---|")
    for name, note, peak, sim, t, same in rows:
        sim_text = format_bytes(sim) if sim is not None else ""
        print(f"| {name} | {note} | {format_bytes(peak)} ({peak / eager_peak:.0%}) | {sim_text} | "
              f"{t * 1e3:.1f} ms ({t / eager_time:.2f}x) | {same} |")  # fmt: skip


def _same(grads, reference) -> str:
    if all(torch.equal(a, b) for a, b in zip(grads, reference)):
        return "bitwise equal"
    worst = max(float((a - b).abs().max()) for a, b in zip(grads, reference))
    return f"max abs diff {worst:.1e}"


if __name__ == "__main__":
    main()
