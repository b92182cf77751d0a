"""Every library module's ``__all__`` lists each public function and class it defines, and
only names that exist."""

import importlib
import inspect
import pkgutil

import pytest

import resunit

# Every module and package of the library, found rather than listed, subpackages included
# (resunit.deploy is one); the cli package is the command line, not the library.
MODULES = sorted(
    info.name.removeprefix("resunit.")
    for info in pkgutil.walk_packages(resunit.__path__, "resunit.")
    if not info.name.startswith(("resunit.cli", "resunit.__main__"))
)


def _defined_here(module) -> set[str]:
    # Public functions and classes whose home is this module (imports from elsewhere excluded).
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module.__name__
    }


def test_the_module_list_is_found():
    assert {"blocks", "models", "deploy", "deploy.inference", "train"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_every_public_function_and_class_and_only_real_names(name):
    module = importlib.import_module(f"resunit.{name}")
    exported = set(module.__all__)
    assert [n for n in sorted(exported) if not hasattr(module, n)] == []
    assert sorted(_defined_here(module) - exported) == []
