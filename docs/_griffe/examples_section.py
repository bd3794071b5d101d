"""Griffe extension used by the docs build only (not part of the package).

It adapts four habits of the optlayers docstrings to griffe's Google-style parser, rewriting the
docstring text just before it is parsed (the source files are untouched):

* ``Example:`` (singular) headings become ``Examples:``, so doctest blocks render as code instead of
  an admonition in which output lines such as ``[2.0, -1.0]`` would read as Markdown links;
* grouped argument entries (``G, h: Inequality data``, possibly wrapped over several lines) are
  split into one entry per name, each with the shared description;
* Sphinx roles (``:func:`~optlayers.sinkhorn` ``) become inline code, since MkDocs does not read reST;
* reST math (``:math:`x` `` and ``.. math::`` blocks) becomes ``\\(x\\)`` and ``$$ … $$``, which the
  ``pymdownx.arithmatex`` extension hands to MathJax.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_MATH_ROLE = re.compile(r":math:`(.+?)`", re.DOTALL)
_MATH_BLOCK = re.compile(r"^([ \t]*)\.\. math::[ \t]*(.*)$")
_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj|py:\w+):`~?([^`]+)`")
_PARAM_SECTIONS = {
    "args", "arguments", "params", "parameters", "keyword args", "keyword arguments",
    "other args", "other arguments", "other params", "other parameters",
}
_HEADER = re.compile(r"^(\s*)([A-Za-z][A-Za-z ]*):\s*$")


def _role(match: re.Match[str]) -> str:
    target = match.group(1)
    if match.group(0).split("`", 1)[1].startswith("~"):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _math_blocks(text: str) -> str:
    """``.. math:: a`` plus its deeper-indented continuation lines -> a ``$$`` block."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _MATH_BLOCK.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        pad = m.group(1)
        body = [m.group(2).strip()] if m.group(2).strip() else []
        i += 1
        while i < len(lines):
            nxt = lines[i]
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= len(pad):
                break
            if not nxt.strip() and body and (i + 1 >= len(lines) or not lines[i + 1].strip()
                                            or len(lines[i + 1]) - len(lines[i + 1].lstrip()) <= len(pad)):
                break
            if nxt.strip():
                body.append(nxt.strip())
            i += 1
        out += ["", f"{pad}$$", *(f"{pad}{b}" for b in body), f"{pad}$$", ""]
    return "\n".join(out)


def _split_grouped_params(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    section_indent: int | None = None  # indent of the current parameter section's header
    item_indent: int | None = None
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        header = _HEADER.match(line)
        if header and header.group(2).lower() in _PARAM_SECTIONS:
            section_indent, item_indent = indent, None
            out.append(line)
            i += 1
            continue
        if section_indent is not None and stripped and indent <= section_indent:
            section_indent = item_indent = None
        if section_indent is None or not stripped:
            out.append(line)
            i += 1
            continue
        if item_indent is None:
            item_indent = indent
        if indent != item_indent:
            out.append(line)
            i += 1
            continue
        # An item line: gather a name list that wraps onto the next lines ("a, b,\n    c: desc").
        head = stripped
        j = i
        while ":" not in head and head.endswith(",") and j + 1 < len(lines):
            j += 1
            head = head + " " + lines[j].strip()
        names, sep, desc = head.partition(":")
        if not sep or "," not in names:
            out.append(line)
            i += 1
            continue
        # The description's continuation lines (deeper indent) belong to every name.
        k = j + 1
        cont: list[str] = []
        while k < len(lines):
            nxt = lines[k] if lines[k].strip() else (lines[k + 1] if k + 1 < len(lines) else "")
            if not nxt.strip() or len(nxt) - len(nxt.lstrip()) <= item_indent:
                break
            cont.append(lines[k])
            k += 1
        pad = " " * item_indent
        for name in (n.strip() for n in names.split(",")):
            if name:
                out.append(f"{pad}{name}:{desc}")
                out.extend(cont)
        i = k
    return "\n".join(out)


class ExampleSection(griffe.Extension):
    """Normalise optlayers docstrings for griffe's Google-style parser (see the module docstring)."""

    def _fix(self, obj: griffe.Object) -> None:
        doc = obj.docstring
        if doc is None:
            return
        value = doc.value
        if "Example:" in value:
            value = _EXAMPLE.sub(r"\1Examples:", value)
        if ".. math::" in value:
            value = _math_blocks(value)
        value = _MATH_ROLE.sub(lambda m: "\\(" + " ".join(m.group(1).split()) + "\\)", value)
        value = _ROLE.sub(_role, value)
        if "," in value:
            value = _split_grouped_params(value)
        doc.value = value

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the docstring of every loaded object before it is parsed."""
        self._fix(obj)
