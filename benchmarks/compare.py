"""The profile corpus the solver comparison runs on (benchmarks/profiles/), and the comparison.

    python -m benchmarks.compare corpus [--only NAME ...]     # regenerate benchmarks/profiles/
    python -m benchmarks.compare run [PROFILES...] --out DIR  # = acopt compare ... (acopt/compare.py)

See docs/solvers.md for what the comparison shows and benchmarks/profiles/README.md
for the corpus.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from acopt.compare import PROFILES_DIR, add_compare_arguments, cmd_run


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
