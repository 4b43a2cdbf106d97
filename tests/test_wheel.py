"""The installed package is whole: a wheel built from this checkout, installed in a
fresh venv and run from a directory outside the checkout, gives every CLI command.

The default test installs the wheel with ``--no-deps`` into a venv that sees this
environment's packages (torch, pulp, ...) and checks the venv imports acopt from the
wheel, not from a checkout. The slow test installs the wheel with its dependencies
into an isolated venv (torch from the local wheel directory or the registry) and runs
every command of docs/usage.md's "The command line" block.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "benchmarks" / "profiles" / "mlp_bs512.profile.json"
SOURCES = ("pyproject.toml", "README.md", "acopt", "solvers")  # what the build reads


def _run(cmd, cwd, timeout=300, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    env.pop("PYTHONPATH", None)  # the venv must not see the checkout through the path
    r = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of this checkout's sources (the build writes build/ beside them)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, src]
    try:  # no build isolation: the setuptools here builds it, with no download
        _run([*build, "--no-build-isolation"], cwd=src)
    except AssertionError:  # this environment's setuptools is too old (pyproject wants >= 68): an isolated build
        _run(build, cwd=src)
    (whl,) = out.glob("acopt-*.whl")
    return whl


def _venv_bin(env_dir: Path, name: str) -> Path:
    return env_dir / ("Scripts" if os.name == "nt" else "bin") / name


def test_installed_wheel_runs_the_cli(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    py, acopt = _venv_bin(env_dir, "python"), _venv_bin(env_dir, "acopt")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "-q", wheel], cwd=tmp_path)
    work = tmp_path / "elsewhere"  # outside the checkout: nothing resolves through the current directory
    work.mkdir()

    code = (
        "import sys, acopt, acopt.solvers.ilp as s, acopt.compiler, acopt.profiler, acopt.rewriter; "
        "print(acopt.__file__, s.__file__); print(sorted(m for m in ('pandas', 'matplotlib') if m in sys.modules))"
    )
    where, imported = _run([py, "-c", code], cwd=work).stdout.splitlines()
    site = str(env_dir.resolve())
    assert all(path.startswith(site) for path in where.split()), f"acopt not imported from the wheel: {where}"
    assert imported == "[]", f"the library (trace, profile, plan, rewrite) imports {imported}: only the CLI's outputs need them"

    solvers = _run([acopt, "solvers"], cwd=work).stdout
    assert {"greedy", "mu-two", "ilp", "cpsat"} <= {line.split()[0] for line in solvers.splitlines() if line.strip()}
    assert "--methods" in _run([acopt, "bench", "--help"], cwd=work).stdout

    out = work / "cmp"
    _run([acopt, "compare", PROFILE, "--budgets", "floor+50%", "--solvers", "greedy", "ilp", "cpsat", "torch-greedy",
          "--time-limit", "600", "--out", out], cwd=work)  # fmt: skip  (asserts optima: a limit never reached)
    csv = (out / "compare.csv").read_text()
    assert csv.count("\n") == 1 + 4 and "optimal" in csv  # a header and one row per solver; the exact ones proved

    run = _run([acopt, "run", "mlp", "--batch-size", "512", "--budget", "95%", "--steps", "1", "--timing-steps", "1",
                "--iterations", "1", "--out", work / "run"], cwd=work).stdout  # fmt: skip
    assert re.search(r"bitwise equal over 1 steps\W+yes", run), run
    assert list((work / "run").glob("*.plan.json"))


# for `acopt bench --suite ...`: one small model instead of the suite, the command's other options kept
BENCH_SMALL = ["mlp", "--batch-sizes", "256", "--fast", "--methods", "none", "acopt-greedy", "--no-match"]


def _usage_commands() -> list[str]:
    """The commands of docs/usage.md's "The command line" block, one per ``;``-separated part."""
    text = (ROOT / "docs" / "usage.md").read_text()
    block = re.search(r"## The command line\s+```bash\n(.*?)```", text, re.DOTALL)
    assert block, "docs/usage.md has no 'The command line' block"
    commands = []
    for line in block[1].splitlines():
        line = line.split("#", 1)[0].strip()
        commands += [c.strip() for c in line.split(";") if c.strip()]
    return commands


@pytest.mark.slow
def test_isolated_install_runs_every_usage_command(wheel, tmp_path):
    """A venv with nothing but the wheel and its dependencies ([solvers,models,bench] extras) runs
    docs/usage.md's commands. Sized down where the work, not the package, is what costs: the
    corpus for ``acopt compare`` is one small profile, and ``acopt bench`` (a suite takes 20 min
    and more) runs its documented options on one small model and batch (``BENCH_SMALL``)."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=False, with_pip=False)
    py = _venv_bin(env_dir, "python")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "torch==2.13.0", f"{wheel}[solvers,models,bench]"],
         cwd=tmp_path, timeout=1800)  # fmt: skip
    work = tmp_path / "elsewhere"
    (work / "benchmarks" / "profiles").mkdir(parents=True)
    shutil.copy2(PROFILE, work / "benchmarks" / "profiles")
    path = f"{_venv_bin(env_dir, '')}{os.pathsep}{os.environ['PATH']}"
    for command in _usage_commands():
        argv = shlex.split(command)
        if argv[:2] == ["acopt", "bench"] and "--suite" in argv:
            at = argv.index("--suite")
            argv = argv[:at] + argv[at + 2 :] + BENCH_SMALL
        _run(argv, cwd=work, timeout=1800, env={"PATH": path})
