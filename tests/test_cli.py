"""The command line: user errors are one line on stderr (exit 2, no traceback),
bugs keep their traceback, and every documented ``acopt ...`` example parses
(and the cheap ones run; the heavy ones under ``-m slow``)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from acopt import cli
from acopt.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_user_error(code, err, *expected):
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.match(r"acopt( \w+)?: error: ", last), err
    for text in expected:
        assert text in last, err


@pytest.fixture(scope="module")
def mlp_profile(tmp_path_factory):
    """A fake-tensor profile of mlp at batch 512 (floor ~86% of the peak); a second of work."""
    out = tmp_path_factory.mktemp("profile")
    assert main(["profile", "mlp", "--batch-size", "512", "--fake", "--out", str(out)]) == 0
    return out / "mlp_bs512_fake.profile.json"


# ---- user errors: one line, exit status 2 -------------------------------------------
USAGE_ERRORS = [
    (["run", "mlp", "--budgt", "70%"], "unrecognized arguments: --budgt"),  # an option typo: argparse's own error
    (["run", "mlp", "--batch-size", "0"], "argument --batch-size"),
    (["run", "mlp", "--batch-size", "two"], "argument --batch-size"),
    (["run", "mlp", "--budget", "abc"], "argument --budget"),
    (["run", "mlp", "--budget", "0%"], "argument --budget"),
    (["run", "mlp", "--budget", "7x%"], "argument --budget"),
    (["run", "mlp", "--budget", "0.0"], "argument --budget: a budget must be positive"),  # never 0 bytes
    (["run", "mlp", "--budget", "floor+120%"], "argument --budget"),
    (["run", "mlp", "--steps", "0"], "argument --steps"),
    (["run", "mlpp"], "unknown model 'mlpp'"),
    (["run", "no_such_module:factory"], "argument model"),
    (["run", "mlp", "--model-arg", "foo=1"], "argument --model-arg"),
    (["run", "mlp", "--model-arg", "width=abc"], "argument --model-arg: width='abc'"),
    (["run", "mlp", "--model-arg", "width"], "argument --model-arg"),
    (["run", "mlp", "--solver", "gredy"], "unknown solver 'gredy'"),
    (["run", "mlp", "--option", "foo=1"], "argument --option: unknown option 'foo'"),
    (["run", "mlp", "--option", "bad"], "argument --option"),
    (["plan", "nonexistent.json", "--budget", "1GiB"], "argument profile: no such file: 'nonexistent.json'"),
    (["plan", ".", "--budget", "1GiB"], "argument profile: not a file"),
    (["plan", "p.json"], "--budget"),
    (["sweep", "p.json", "--points", "1"], "argument --points"),
    (["compare", "nope.profile.json"], "no such profile file"),
    ([], "required"),
]


@pytest.mark.parametrize("argv,expected", USAGE_ERRORS, ids=[" ".join(a) or "no-args" for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(argv, capsys)
    _assert_user_error(code, err, expected)
    assert err.startswith("usage: acopt")  # argparse style: usage, then the error naming the option
    assert not (tmp_path / "out").exists()  # refused before any work


def test_device_cuda_without_cuda(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = _run(["run", "mlp", "--device", "cuda", "--out", str(tmp_path)], capsys)
    _assert_user_error(code, err, "argument --device: cuda is not available")


def test_bench_device_cuda_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = _run(["bench", "mlp", "--device", "cuda", "--fast"], capsys)
    _assert_user_error(code, err, "argument --device: cuda is not available")


def test_budget_below_the_floor_names_a_budget_that_fits(mlp_profile, capsys, tmp_path):
    code, _, err = _run(["plan", str(mlp_profile), "--budget", "50%", "--out", str(tmp_path)], capsys)
    _assert_user_error(code, err, "below the floor", "try --budget")
    hint = re.search(r"try --budget (\d+%)", err)[1]
    assert main(["plan", str(mlp_profile), "--budget", hint, "--out", str(tmp_path)]) == 0


def test_budget_when_recomputation_cannot_help(capsys, tmp_path):
    """mlp at batch 4: the floor is the peak, so any lower budget fails with advice."""
    out = tmp_path / "out"
    assert main(["profile", "mlp", "--batch-size", "4", "--fake", "--out", str(out)]) == 0
    code, _, err = _run(["plan", str(out / "mlp_bs4_fake.profile.json"), "--budget", "70%", "--out", str(out)], capsys)
    _assert_user_error(code, err, "recomputation cannot lower")


def test_corrupt_profile(capsys, tmp_path):
    bad = tmp_path / "bad.profile.json"
    bad.write_text("{not json")
    code, _, err = _run(["sweep", str(bad), "--out", str(tmp_path)], capsys)
    _assert_user_error(code, err, "cannot read profile")


def test_out_is_a_file(mlp_profile, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = _run(["plan", str(mlp_profile), "--budget", "95%", "--out", str(blocker)], capsys)
    _assert_user_error(code, err, str(blocker))


def item_step_workload(*, batch_size, device="cpu", seed=0):
    """A workload whose step reads ``loss.item()``: acopt refuses it (UnsupportedStep)."""
    from acopt import models

    def step(model, optimizer, x, y):
        optimizer.zero_grad()
        loss = model(x).logsumexp(-1).mean()
        if loss.item() > 0:
            loss = loss * 2
        loss.backward()
        optimizer.step()
        return loss.detach()

    w = models.mlp(batch_size=batch_size, device=device, seed=seed, width=8)
    return dataclasses.replace(w, train_step=step)


def test_unsupported_step(capsys, tmp_path):
    code, _, err = _run(["run", f"{__name__}:item_step_workload", "--batch-size", "4", "--out", str(tmp_path)], capsys)
    _assert_user_error(code, err, "unsupported training step")


def test_interrupt_is_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_solvers", interrupted)
    code, _, err = _run(["solvers"], capsys)
    assert code == 130 and err == "acopt: interrupted\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_solvers", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["solvers"])


@pytest.mark.parametrize("argv", [["--debug", "plan", "nope.json", "--budget", "1GiB"], ["plan", "nope.json", "--budget", "1GiB", "--debug"]])
def test_debug_shows_the_traceback(argv):
    with pytest.raises(cli.UsageError, match="no such file"):
        main(argv)


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "acopt run" in capsys.readouterr().out
    assert main(["run", "--help"]) == 0


@pytest.mark.parametrize(
    "argv,expected",
    [(["plan", "nonexistent.json", "--budget", "1GiB"], "no such file"), (["run", "mlp", "--budgt", "70%"], "unrecognized")],
)
def test_console_script_exit_status(argv, expected, tmp_path):
    """The real process: exit status 2 and one error line on stderr, nothing on stdout."""
    r = subprocess.run([sys.executable, "-m", "acopt.cli", *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    _assert_user_error(r.returncode, r.stderr, expected)
    assert r.stdout == ""


# ---- documented examples --------------------------------------------------------------
def _commands(text: str, *, indented: bool = False) -> list[str]:
    """``acopt ...`` commands in text: one per line or ``;``-separated, comments and
    a leading ``pip install ... &&`` dropped; ``python -m acopt.cli`` counts.
    ``indented``: only lines indented by 4 spaces (the examples of a help text, not its prose)."""
    found = []
    for line in text.splitlines():
        if indented and not line.startswith("    "):
            continue
        line = line.split("#", 1)[0].strip()
        for part in re.split(r";|&&", line):
            part = part.strip().replace("python -m acopt.cli ", "acopt ", 1)
            if part.startswith("acopt ") or part == "acopt":
                found.append(part)
    return found


def _doc_commands() -> list[tuple[str, str]]:
    """(file, command) for every ``acopt`` command in a fenced block of README.md and docs/*.md."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        blocks = re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), flags=re.S)
        out += [(path.relative_to(ROOT).as_posix(), c) for b in blocks for c in _commands(b)]
    return out


def _help_texts() -> list[str]:
    """``acopt --help``, each subcommand's ``--help``, and the harness's (``acopt bench --help``)."""
    parser = build_parser()
    texts = [parser.format_help()]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    texts += [sp.format_help() for name, sp in sub.choices.items() if name != "bench"]
    sys.path.insert(0, str(ROOT))
    from acopt.bench import build_parser as bench_parser

    return [*texts, bench_parser().format_help()]


HELP_EXAMPLES = [c for text in _help_texts() for c in _commands(text, indented=True)]
DOC_EXAMPLES = _doc_commands()


def test_examples_are_found():
    assert len(HELP_EXAMPLES) >= 6
    assert {c.split()[1] for c in HELP_EXAMPLES} >= {"run", "profile", "plan", "sweep", "models", "solvers", "bench"}
    assert {c.split()[1] for _, c in DOC_EXAMPLES} >= {"run", "profile", "plan", "sweep", "compare", "bench"}


def _parse(command: str):
    argv = shlex.split(command)[1:]
    if argv[:1] == ["bench"]:
        from acopt.bench import build_parser as bench_parser

        return bench_parser().parse_args(argv[1:])
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("command", HELP_EXAMPLES + [c for _, c in DOC_EXAMPLES])
def test_documented_example_parses(command):
    """Every documented command line is accepted by the parser (option names, value types)."""
    _parse(command)


def _run_in_order(commands, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the examples write to out/
    for command in commands:
        code = main(shlex.split(command)[1:])
        out, err = capsys.readouterr()
        assert code == 0, f"{command}\n{out}\n{err}"


CHEAP = ("acopt models", "acopt solvers", "acopt run mlp ")


def test_cheap_help_examples_run(tmp_path, monkeypatch, capsys):
    cheap = [c for c in HELP_EXAMPLES if c.startswith(CHEAP)]
    assert len(cheap) >= 3
    _run_in_order(cheap, tmp_path, monkeypatch, capsys)


@pytest.mark.slow
def test_every_help_example_runs(tmp_path, monkeypatch, capsys):
    """All of ``acopt --help``'s examples, in order (profile resnet152 --fake, then plan and sweep it): ~1 min."""
    _run_in_order(HELP_EXAMPLES, tmp_path, monkeypatch, capsys)


@pytest.mark.slow
def test_doc_examples_run(tmp_path, monkeypatch, capsys):
    """README and docs examples, in order, but compare and bench (minutes to hours; see docs/solvers.md, docs/results.md)."""
    commands = [c for _, c in DOC_EXAMPLES if c.split()[1] not in ("compare", "bench")]
    _run_in_order(commands, tmp_path, monkeypatch, capsys)
