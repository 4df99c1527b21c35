"""Something entered around each forward of a module: the way every speed part attaches to a model
(attention redirects, fp8 weight swaps, dynamo's config patch, sequence parallel's exchange) without
changing the module's class or code."""
from __future__ import annotations

from contextlib import ExitStack

from torch import nn


def while_running(module: nn.Module, stack: ExitStack, enter, leave) -> None:
    """``enter()`` before each forward of ``module``, ``leave()`` after it (also when it raises; not
    when a pre-hook before ours raised, so nothing is left that was not entered); the hooks come off
    when ``stack`` closes."""
    entered = []

    def pre(_module, _args):
        enter()
        entered.append(True)

    def post(_module, _args, _output):
        if entered:
            entered.pop()
            leave()

    stack.callback(module.register_forward_pre_hook(pre).remove)
    stack.callback(module.register_forward_hook(post, always_call=True).remove)
