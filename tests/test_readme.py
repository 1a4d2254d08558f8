"""README.md and docs/*.md hold true: their runnable examples run, the README reaches its first figure
and its two commands within 60 lines, and their relative links point at files that exist.

Convention: a fenced ```python block is runnable when the line right before its opening fence is
exactly ``<!-- test -->`` (an HTML comment, invisible on GitHub). Each runnable block is executed
on its own, in a fresh namespace, with a temporary directory as the working directory (so relative
paths like ``runs/...`` land there). Keep such examples seconds long (tiny presets, few steps).
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = "<!-- test -->"
FIRST_LINES = 60


def runnable_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of every marked ```python block in ``text``."""
    lines, out = text.split("\n"), []
    for i, line in enumerate(lines):
        if line.strip() == "```python" and i > 0 and lines[i - 1].strip() == MARK:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            out.append((i + 1, "\n".join(lines[i + 1:end])))
    return out


def test_runnable_blocks_are_found():
    """The marker finds a marked block and ignores an unmarked one (so a typo in the convention
    cannot silently leave every example untested)."""
    text = f"x\n{MARK}\n```python\na = 1\n```\n\n```python\nb = 2\n```\n"
    assert runnable_blocks(text) == [(3, "a = 1")]
    assert runnable_blocks((ROOT / "README.md").read_text()), "README.md has no runnable example"


EXAMPLES = [pytest.param(code, id=f"{page.name}:{line}")
            for page in PAGES for line, code in runnable_blocks(page.read_text())]


@pytest.mark.parametrize("code", EXAMPLES)
def test_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<readme example>", "exec"), {"__name__": "readme_example"})


def test_first_lines_reach_the_figure_and_the_commands():
    head = (ROOT / "README.md").read_text().split("\n")[:FIRST_LINES]
    assert any(re.search(r"!\[[^\]]*\]\([^)]+\.(png|gif|svg)\)", line) for line in head), \
        f"no image link in README.md's first {FIRST_LINES} lines"
    text = "\n".join(head)
    assert "pip install -e . && jaxconcept demo" in text
    assert "pip install -e '.[test]' && python -m pytest" in text
    # CI (.ci/run) runs the README's test command.
    ci = re.search(r"python -m pytest[^\n]*", (ROOT / ".ci" / "run").read_text()).group(0).strip()
    assert ci in text, f".ci/run's {ci!r} is not in README.md's first {FIRST_LINES} lines"


def test_relative_links_resolve():
    missing = []
    for page in [*PAGES, ROOT / "experiments" / "README.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing
