"""Regenerate the explicit re-exports of optlayers/solvers, optlayers/layers and optlayers/__init__.py.

Each subpackage owns its ``__all__``; this script writes them out as explicit imports so the
public API stays curated and greppable. Run: ``python tools/gen_init.py``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "optlayers"

SOLVERS = ["projections", "prox", "lp", "dual", "dro", "ot", "qp", "sparse_ot", "pde"]
LAYERS = ["deq", "constrained", "dro", "ot", "qp", "sparse_ot", "physics"]
TOP = ["implicit", "solvers", "layers"]


def names(module: str) -> list[str]:
    mod = importlib.import_module(module)
    return list(getattr(mod, "__all__", []))


def block(rel: str, items: list[str]) -> str:
    body = "".join(f"    {n},\n" for n in sorted(items, key=str.lower))
    return f"from {rel} import (\n{body})\n"


def write(path: Path, doc: str, parts: list[tuple[str, list[str]]], pkg: str = "") -> list[str]:
    seen: dict[str, object] = {}
    lines = [f'"""{doc}"""\n\n']
    exported: list[str] = []
    for rel, items in parts:
        mod = importlib.import_module(rel, pkg) if pkg else None
        fresh = []
        for n in items:
            obj = getattr(mod, n, None) if mod is not None else None
            if n in seen:
                if mod is not None and seen[n] is not obj:
                    print(f"name clash: {n} from {rel} differs from the one already exported; keeping the first")
                continue
            seen[n] = obj
            fresh.append(n)
        if fresh:
            lines.append(block(rel, fresh))
            exported += fresh
    lines.append("\n__all__ = [\n" + "".join(f'    "{n}",\n' for n in exported) + "]\n")
    path.write_text("".join(lines))
    return exported


def available(pkg: str, subs: list[str]) -> list[str]:
    out = []
    for s in subs:
        try:
            importlib.import_module(f"{pkg}.{s}")
            out.append(s)
        except Exception as err:  # noqa: BLE001
            print(f"skipping {pkg}.{s}: {type(err).__name__}: {err}")
    return out


def main() -> None:
    solver_subs = available("optlayers.solvers", SOLVERS)
    write(ROOT / "solvers" / "__init__.py",
          "optlayers.solvers — problem-specific solvers, each differentiable through optlayers.implicit.",
          [(f".{s}", names(f"optlayers.solvers.{s}")) for s in solver_subs], "optlayers.solvers")
    layer_subs = available("optlayers.layers", LAYERS)
    write(ROOT / "layers" / "__init__.py",
          "optlayers.layers — what users embed: functional forms returning Results, and nn.Modules.",
          [(f".{s}", names(f"optlayers.layers.{s}")) for s in layer_subs], "optlayers.layers")
    importlib.invalidate_caches()
    for m in ("optlayers.solvers", "optlayers.layers"):
        importlib.reload(importlib.import_module(m))
    parts = [("._result", ["Result", "Status", "ConvergenceError", "AdjointSolveError"])]
    parts += [(f".{t}", names(f"optlayers.{t}")) for t in TOP]
    init = ROOT / "__init__.py"
    exported = write(init, "optlayers — differentiable optimization for PyTorch.\n\nCurated public API: "
                     "explicit re-exports from :mod:`optlayers.implicit`,\n:mod:`optlayers.solvers` and "
                     ":mod:`optlayers.layers` (regenerate with ``python tools/gen_init.py``).\n", parts, "optlayers")
    text = init.read_text().replace("\n__all__", '\n__version__ = "0.1.0"\n\n__all__')
    init.write_text(text)
    import subprocess

    subprocess.run(["ruff", "check", "--fix", "-q", str(ROOT / "__init__.py"), str(ROOT / "solvers" / "__init__.py"),
                    str(ROOT / "layers" / "__init__.py")], check=False)
    print(f"{len(exported)} public names")


if __name__ == "__main__":
    main()
