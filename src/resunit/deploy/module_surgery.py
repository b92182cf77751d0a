"""Module surgery shared by the deploy steps: swap every submodule of one kind for another,
and ask whether a module runs hooks that a rewrite would skip."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def replace_modules(
    model: nn.Module, kind: type[nn.Module], make: Callable[[nn.Module, nn.Module], nn.Module]
) -> nn.Module:
    """Replace, in place, every submodule of type ``kind`` by ``make(old, parent)`` and return
    the model (``model`` itself may be one: then ``make(model, model)``).

    ``make`` gets the parent so that a replacement can be built where the surrounding unit
    computes (its dtype and device). Children are listed before any is replaced, so a
    replacement that contains a ``kind`` is not visited again.
    """
    if isinstance(model, kind):
        return make(model, model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(child, parent))
    return model


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward hooks: its own or the process-wide ones.

    A rewrite that computes the module some other way (a head as one convolution, a layer as
    a oneDNN primitive) would skip them, and with them whatever they change.
    """
    from torch.nn.modules import module as module_globals

    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module_globals._global_forward_hooks
        or module_globals._global_forward_pre_hooks
    )


__all__ = [
    "has_hooks",
    "replace_modules",
]
