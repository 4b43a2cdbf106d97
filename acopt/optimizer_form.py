"""Which form of an optimizer's step the trace runs: eager's own, else the capturable one.

Optimizers with a ``capturable`` option (Adam, AdamW, NAdam, RAdam, Adamax,
ASGD) run, in eager's default form, host arithmetic on their step count:
``step_t += 1; step = step_t.item()``, then Python floats such as ``1 -
beta1 ** step``. The tracer runs that form first, as eager does (with
``torch.compiler.is_compiling()`` false inside ``optimizer.step()``). Under
``make_fx``'s fake tensors ``.item()`` is an unbacked ``SymFloat``: the
graph reads the live step tensor with ``aten._local_scalar_dense`` at every
call and records the Python arithmetic on it as ``operator`` nodes (the
hyperparameters in it stay live through :mod:`acopt.hyperparams`). An
unbacked value has no value at trace time, so nothing can be specialised
on it silently: a step that branches on it (RAdam's ``if rho_t > 5``,
ASGD's ``max(1, step - t0)``) fails to trace with a data-dependent error,
and that optimizer is traced again in its capturable form (a tensor step
count, the form ``torch.compile`` uses): :class:`NeedsCapturable`. So is
one whose eager form puts a hyperparameter where acopt cannot keep it live
(Rprop writes ``etaplus`` with ``index_put_``: a tensor constant), which
the tracer's two traces with different sentinels reveal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from acopt.errors import UnsupportedStep


class NeedsCapturable(UnsupportedStep):
    """Eager's form of the optimizers ``indices`` cannot be traced faithfully: trace their capturable form."""

    def __init__(self, indices: set[int], cause: BaseException):
        super().__init__(f"optimizers {sorted(indices)} cannot be traced in eager's form ({type(cause).__name__}: {cause})")
        self.indices = set(indices)


def has_capturable_form(optimizer: torch.optim.Optimizer) -> bool:
    return any("capturable" in group for group in optimizer.param_groups)


def _data_dependent(e: BaseException) -> bool:
    from torch._subclasses.fake_tensor import DataDependentOutputException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (GuardOnDataDependentSymNode, DataDependentOutputException)):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def eager_form(index: int) -> Iterator[None]:
    """Run optimizer ``index``'s step as eager does (not "compiling"); a data-dependent
    error becomes :class:`NeedsCapturable`."""
    import torch.compiler

    old = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = False
    try:
        yield
    except Exception as e:
        if _data_dependent(e):
            raise NeedsCapturable({index}, e) from e
        raise
    finally:
        torch.compiler._is_compiling_flag = old
