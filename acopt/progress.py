"""What a person at a terminal sees while acopt works: a spinner with the time spent and the
latest line acopt logs (``logging.getLogger("acopt")``: the exact planners' builds and
solves, re-plans), and progress bars. Nothing is drawn unless stdout and stderr are terminals, so
tests, pipes and CI logs stay clean.

    with working("planning with ilp"):
        plan = acopt.plan(prof, budget="60%", solver="ilp")
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.markup import escape

LOGGER = "acopt"


def on_terminal() -> bool:
    """True when stdout and stderr are terminals (not pytest's capture, a pipe or CI): what
    the block prints goes above the spinner, and nothing of the spinner lands in a file."""
    return Console(stderr=True).is_terminal and Console().is_terminal


class _ToSpinner(logging.Handler):
    """Shows each acopt log record as the spinner's text; warnings and errors are printed."""

    def __init__(self, progress, task, label: str):
        super().__init__(logging.DEBUG)
        self.progress, self.task, self.label = progress, task, label

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                self.progress.console.print(f"{record.levelname.lower()}: {escape(message)}")
            else:
                self.progress.update(self.task, description=f"{escape(self.label)}: {escape(message[:100])}")
        except Exception:  # noqa: BLE001 - logging must never break the work
            self.handleError(record)


@contextlib.contextmanager
def working(label: str) -> Iterator[None]:
    """A spinner, the time spent and the latest acopt log line, while the block runs (terminal only)."""
    if not on_terminal():
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:  # fmt: skip
        task = progress.add_task(escape(label), total=None)
        logger = logging.getLogger(LOGGER)
        handler, level = _ToSpinner(progress, task, label), logger.level
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.DEBUG:
            logger.setLevel(logging.DEBUG)  # the solver's progress lines are DEBUG records
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)


def bar(total: int, label: str, enabled: bool = True) -> Callable[[int], None]:
    """A progress bar over ``total`` steps (terminal only); call it with the steps done.
    It closes itself at ``total``."""
    if not enabled or not on_terminal() or total <= 0:
        return lambda _done: None
    from rich.progress import Progress

    prog = Progress(console=Console(stderr=True), transient=True)
    task = prog.add_task(escape(label), total=total)
    prog.start()

    def update(done: int) -> None:
        prog.update(task, completed=done)
        if done >= total:
            prog.stop()

    return update
