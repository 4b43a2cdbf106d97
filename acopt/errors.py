"""The errors acopt raises about a training step (no torch import)."""

from __future__ import annotations


class UnsupportedStep(RuntimeError):
    """The training step uses something acopt cannot trace faithfully."""


class GuardFailure(UnsupportedStep):
    """Something the traced graph assumed about the live program has changed
    since tracing (a module's training flag, a parameter, the optimizer's
    groups, the batch's strides...). Nothing was run or changed: trace again
    (``acopt.compile`` does so by itself)."""
