"""Each library module's ``__all__`` names exactly the public things it defines."""

import importlib
import inspect

import pytest

MODULES = ["blocks", "models", "checkpoint", "deploy", "analysis", "train", "data"]


def _defined_here(module) -> set[str]:
    # Public functions and classes whose home is this module (imports from elsewhere excluded).
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module.__name__
    }


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_every_public_function_and_class_and_nothing_missing(name):
    module = importlib.import_module(f"resunit.{name}")
    exported = set(module.__all__)
    assert not [n for n in exported if not hasattr(module, n)]
    assert sorted(_defined_here(module) - exported) == []
