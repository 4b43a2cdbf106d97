"""matplotlib for acopt's plots (PNG files of the CLI, compare and bench): an optional
extra, ``pip install 'acopt[plots]'``. Everything else (CSVs, tables, the library) runs
without it."""

from __future__ import annotations

INSTALL = "pip install 'acopt[plots]'"


class PlotsUnavailable(ImportError):
    """matplotlib is not installed; the message says how to install it."""


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files, no window), or :class:`PlotsUnavailable`."""
    try:
        import matplotlib
    except ImportError as e:
        raise PlotsUnavailable(f"plots need matplotlib: {INSTALL}") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
