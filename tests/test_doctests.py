"""Run the docstring examples (``>>>`` lines) of every module of the package, so no docstring shows
code that does not work.

One test per module under ``optlayers/`` (found on disk, without importing anything at collection
time), except the demo, whose stages are run by ``tests/test_demo.py``. A module that needs an
optional package that is not installed (cvxpy, cvxpylayers, diffcp, numba, triton) is skipped, as
``pytest.importorskip`` would. Examples run with ``ELLIPSIS | NORMALIZE_WHITESPACE``, PyTorch's
default print options and the random seed reset to 0, in the module's own namespace (what
``python -m doctest`` would see). Only docstrings of objects defined in a module are collected
there, so an object re-exported elsewhere runs once.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io
import types
from pathlib import Path

import pytest
import torch

import optlayers

PACKAGE = Path(optlayers.__file__).resolve().parent
SKIP_PREFIXES = ("optlayers.demo", "optlayers.__main__")
OPTIONAL = {"cvxpy", "cvxpylayers", "diffcp", "numba", "triton", "llvmlite"}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def module_names() -> list[str]:
    """Dotted names of every module in the package (packages are those folders with ``__init__.py``)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        if any(not (PACKAGE.parent / Path(*rel.parts[:i]) / "__init__.py").exists()
               for i in range(1, len(rel.parts))):
            continue  # not inside a regular package
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if not name.startswith(SKIP_PREFIXES):
            names.append(name)
    return names


MODULES = module_names()


def import_or_skip(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs the optional package {err.name!r}, which is not installed")
        raise


def find_examples(module: types.ModuleType) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(module, module.__name__) if t.examples]


def run_examples(tests: list[doctest.DocTest]) -> tuple[int, list[str]]:
    """Run the doctests; return (number of examples run, one report per failing docstring)."""
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    failures = []
    ran = 0
    for test in sorted(tests, key=lambda t: t.lineno or 0):
        out = io.StringIO()
        torch.manual_seed(0)
        result = runner.run(test, out=out.write, clear_globs=True)
        ran += result.attempted
        if result.failed:
            failures.append(f"{test.name} (line {test.lineno}):\n{out.getvalue()}")
    return ran, failures


def test_module_list() -> None:
    # The walk must see the subpackages' modules, or this file silently stops testing them.
    for name in ["optlayers._result", "optlayers.implicit.root_solve", "optlayers.solvers.pde.residuals",
                 "optlayers.layers.physics.moe", "optlayers.implicit.linear_solvers.cg"]:
        assert name in MODULES
    assert not any(name.startswith("optlayers.demo") for name in MODULES)


def test_runner_reports_a_wrong_example() -> None:
    module = types.ModuleType("optlayers_doctest_probe")
    exec(  # noqa: S102
        'def good():\n    """\n    >>> 1 + 1\n    2\n    """\n'
        'def bad():\n    """\n    >>> [1,\n    ...  2]\n    [1, 3]\n    """\n',
        module.__dict__,
    )
    for fn in (module.good, module.bad):
        fn.__module__ = module.__name__
    ran, failures = run_examples(find_examples(module))
    assert ran == 2
    assert len(failures) == 1 and "bad" in failures[0] and "[1, 3]" in failures[0]


# Packages whose public names all carry a ``>>>`` example; the rest of the package is being brought
# up to the same rule (issue 11), after which this becomes the whole of ``optlayers.__all__``.
EXAMPLES_REQUIRED = (
    "optlayers._result", "optlayers.distributed", "optlayers.implicit", "optlayers.layers.deq",
    "optlayers.layers.physics", "optlayers.solvers.pde", "optlayers.solvers.projections",
    "optlayers.solvers.prox", "optlayers.solvers.lp", "optlayers.solvers.dual", "optlayers.layers.constrained",
    "optlayers.solvers.qp", "optlayers.layers.qp",
    "optlayers.solvers.sparse_ot", "optlayers.layers.sparse_ot",
    "optlayers.solvers.ot", "optlayers.layers.ot", "optlayers.kernels",
    "optlayers.solvers.dro", "optlayers.layers.dro",
)


def test_public_names_have_examples() -> None:
    missing = []
    for name in optlayers.__all__:
        obj = getattr(optlayers, name)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue  # constants and type aliases have no docstring of their own
        module = getattr(obj, "__module__", "") or ""
        if not module.startswith(EXAMPLES_REQUIRED):
            continue
        doc = (obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__) or ""
        if ">>>" not in doc:
            missing.append(f"{module}.{name}")
    assert not missing, f"public names without a runnable example in their docstring: {missing}"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = import_or_skip(name)
    tests = find_examples(module)
    if not tests:
        return  # a module with no examples (private helpers, or names documented elsewhere)
    torch.set_printoptions(profile="default")
    default_dtype = torch.get_default_dtype()
    try:
        ran, failures = run_examples(tests)
    finally:
        torch.set_printoptions(profile="default")
        torch.set_default_dtype(default_dtype)
    assert ran > 0
    assert not failures, f"{len(failures)} docstring(s) of {name} failed:\n\n" + "\n".join(failures)
