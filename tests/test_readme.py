"""The README's example runs, and its quick start is exactly two complete commands."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    m = re.search(r"implicit dz/dλ = (\S+)\s+closed form = (\S+)", out)
    assert m and abs(float(m.group(1)) - float(m.group(2))) < 1e-8


def test_quick_start_has_two_commands():
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```\w*\n(.*?)```", section, flags=re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 2
    assert "torch==2.13.0" in lines[0] and "python -m optlayers demo" in lines[0]
    assert "torch==2.13.0" in lines[1] and "pytest" in lines[1]
