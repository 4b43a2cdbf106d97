"""Which module made each traced node: ``node.meta["acopt_module"]``, the dotted path of
the innermost submodule of the model (``"encoder.layer.3.attention.self"``) whose forward
was running when the node was traced; absent for nodes outside any submodule (the loss,
the backward, the optimizer).

``make_fx(record_module_stack=True)`` records only modules reachable from the traced
callable, and acopt traces a function (``train_step``), so the stack is kept here with
global forward hooks while tracing. Names only: nothing traced or planned depends on them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode

META_KEY = "acopt_module"


@contextlib.contextmanager
def recording(model: torch.nn.Module) -> Iterator[None]:
    """While tracing under make_fx: tag each node with the innermost submodule of ``model`` running."""
    names = {id(m): name for name, m in model.named_modules() if name}
    stack: list[tuple[torch.nn.Module, object]] = []

    def graph():
        mode = get_proxy_mode()
        return None if mode is None else mode.tracer.graph

    def before(module, _args):
        g = graph()
        if g is not None and id(module) in names:
            stack.append((module, next(iter(reversed(g.nodes)), None)))  # the last node before its forward

    def after(module, _args, _out):
        g = graph()
        if g is None or not stack or stack[-1][0] is not module:
            return
        _, last = stack.pop()
        node = next(iter(g.nodes), None) if last is None else last.next
        while node is not None and node.op != "root":  # the graph's node list is circular through its root
            node.meta.setdefault(META_KEY, names[id(module)])  # inner modules finish first: innermost wins
            node = node.next

    pre = torch.nn.modules.module.register_module_forward_pre_hook(before)
    post = torch.nn.modules.module.register_module_forward_hook(after)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def module_of(node) -> str:
    """The module path recorded for ``node`` ("" if none)."""
    return node.meta.get(META_KEY, "")
