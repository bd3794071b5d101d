"""Every public name has its own docstring, and every one appears in the API reference pages.

The API pages (``docs/api/*.md``) are written by hand as mkdocstrings directives (``::: path``); this
test keeps them in step with the packages' ``__all__`` without building the site (the strict MkDocs
build in ``.ci/run`` checks the rendering itself).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

import optlayers

API = Path(__file__).resolve().parent.parent / "docs" / "api"
PACKAGES = ["optlayers.implicit", "optlayers.solvers", "optlayers.layers", "optlayers.kernels"]


def own_docstring(obj: object) -> str:
    """The object's own docstring: not one inherited from a base class, not a dataclass's generated
    signature line, and empty for plain values (constants have no docstring of their own)."""
    if not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj)):
        return "<value>"
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    doc = (doc or "").strip()
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""  # the line dataclasses writes when the class has no docstring
    if inspect.isclass(obj) and issubclass(obj, enum.Enum) and doc == "An enumeration.":
        return ""
    return doc


@pytest.mark.parametrize("name", optlayers.__all__)
def test_public_name_has_docstring(name: str) -> None:
    obj = getattr(optlayers, name)
    assert own_docstring(obj), f"optlayers.{name} has no docstring of its own"


def test_own_docstring_detects_missing() -> None:
    @dataclasses.dataclass
    class Bare:
        x: int = 0

    class Sub(ValueError):
        pass

    def f() -> None:
        pass

    assert own_docstring(Bare) == "" and own_docstring(Sub) == "" and own_docstring(f) == ""
    assert own_docstring(optlayers.Result)


def directives() -> set[str]:
    found: set[str] = set()
    for page in API.glob("*.md"):
        found |= set(re.findall(r"^:::\s+([\w.]+)\s*$", page.read_text(encoding="utf-8"), re.MULTILINE))
    return found


def documented_objects() -> dict[int, str]:
    """id(object) -> directive path, for every object the API pages render.

    A module directive renders the module's ``__all__``, except a name that is also a submodule of
    that module (``optlayers.implicit.root_solve`` is both): griffe resolves such a name to the
    submodule, which is not rendered, so those need a directive of their own.
    """
    out: dict[int, str] = {}
    for path in directives():
        try:
            obj = importlib.import_module(path)
        except ImportError:
            mod_path, _, attr = path.rpartition(".")
            obj = getattr(importlib.import_module(mod_path), attr)
            out[id(obj)] = path
            continue
        if not inspect.ismodule(obj):  # a re-exported name whose path looks like a module
            out[id(obj)] = path
            continue
        for name in getattr(obj, "__all__", []):
            if not hasattr(obj, "__path__") or importlib.util.find_spec(f"{path}.{name}") is None:
                out.setdefault(id(getattr(obj, name)), f"{path}.{name}")
    return out


def test_directives_resolve() -> None:
    for path in directives():
        mod_path = path
        while mod_path:
            try:
                importlib.import_module(mod_path)
                break
            except ImportError:
                mod_path = mod_path.rpartition(".")[0]
        assert mod_path.startswith("optlayers"), f"API page directive ::: {path} does not resolve"


@pytest.mark.parametrize("package", ["optlayers", *PACKAGES])
def test_public_names_in_api_pages(package: str) -> None:
    mod = importlib.import_module(package)
    done = documented_objects()
    missing = [n for n in mod.__all__ if id(getattr(mod, n)) not in done
               and (inspect.isclass(getattr(mod, n)) or inspect.isroutine(getattr(mod, n)))]
    assert not missing, (
        f"{package}: public names missing from docs/api/*.md: {missing}. Add them to their subpackage's "
        "page (a name that is also a submodule needs its own '::: package.module.name' directive)."
    )
