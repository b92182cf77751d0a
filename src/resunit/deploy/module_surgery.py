"""Module surgery shared by the deploy steps: swap every submodule of one kind for another."""

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


__all__ = [
    "replace_modules",
]
