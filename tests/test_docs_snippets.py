"""Run the Python code blocks of the documentation pages, so the docs only show code that works.

Every fenced ```` ```python ```` block of a page under ``docs/`` (the API reference pages, generated
from docstrings, have none) runs in order, in one namespace per page, like a notebook. A block that
is not meant to run — another library's code on the migration page, a fragment — is preceded by the
line ``<!-- docs-test: skip -->``. Blocks run on the CPU at tiny sizes; a page must finish in seconds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SKIP = "<!-- docs-test: skip -->"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def code_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, skipped) for every ```python block of a Markdown page."""
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1), before == SKIP))
    return out


PAGES = sorted(p for p in DOCS.rglob("*.md") if code_blocks(p.read_text(encoding="utf-8")))


def test_pages_found() -> None:
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    # The pages that promise runnable code must keep some, or this test silently stops testing them.
    for page in ["getting-started.md", "guides/implicit-vs-unrolled.md", "guides/dro-uncertainty-sets.md",
                 "guides/migrating.md"]:
        assert page in names, f"docs/{page} has no ```python block"


def test_code_block_parser() -> None:
    text = "a\n```python\nx = 1\n```\n<!-- docs-test: skip -->\n```python\nimport qpth\n```\n```bash\nls\n```\n"
    assert code_blocks(text) == [(2, "x = 1\n", False), (6, "import qpth\n", True)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_code_runs(page: Path) -> None:
    blocks = code_blocks(page.read_text(encoding="utf-8"))
    runnable = [(line, code) for line, code, skipped in blocks if not skipped]
    assert runnable, f"{page.name}: every block is marked skip"
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for line, code in runnable:
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)  # noqa: S102
        except Exception as err:  # re-raised with the page and line that failed
            raise AssertionError(f"{page.relative_to(ROOT)}, block at line {line} failed: {err!r}") from err


def test_readme_example_is_in_getting_started() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"## Example[^\n]*\n+```python\n(.*?)```", readme, re.DOTALL)
    assert m, "README.md has no '## Example' python block"
    page = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    assert m.group(1) in [code for _, code, _ in code_blocks(page)], (
        "docs/getting-started.md must show the README's example verbatim (copy it over)"
    )
