"""The docs keep their promises: every python block of docs/extending.md runs as written,
and every link in README.md resolves. (`make test` also builds docs/ with
`mkdocs build --strict`, which fails on a broken link or a page missing from the nav.)

Each block is self-contained, as a reader copies it: it runs in a fresh module of its
own, from the repository root, and the kinds it registers are removed afterwards, so
that other tests see the registries as discovery filled them.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from polymodal import registry

ROOT = Path(__file__).resolve().parent.parent
EXTENDING = ROOT / "docs" / "extending.md"
README = ROOT / "README.md"


def python_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(section heading, first line number, code) of each ```python block of a markdown file."""
    blocks, heading, code, start = [], "", None, 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if code is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif code is None and line.strip() == "```python":
            code, start = [], number + 1
        elif code is not None and line.strip() == "```":
            blocks.append((heading, start, "\n".join(code) + "\n"))
            code = None
        elif code is not None:
            code.append(line)
    return blocks


def block_id(block: tuple[str, int, str]) -> str:
    heading, start, _ = block
    return f"{re.sub(r'[^a-z0-9]+', '-', heading.lower()).strip('-')}-line{start}"


EXAMPLES = python_blocks(EXTENDING)


@pytest.fixture
def registries_restored():
    """The registries as discovery filled them, given back after the test."""
    registry.discover()
    tables = [value for value in vars(registry).values() if isinstance(value, registry.Registry)]
    saved = [dict(table._entries) for table in tables]
    yield
    for table, entries in zip(tables, saved):
        table._entries.clear()
        table._entries.update(entries)


def test_extending_has_examples():
    assert len(EXAMPLES) >= 7, f"docs/extending.md: {len(EXAMPLES)} python blocks"


@pytest.mark.parametrize("block", EXAMPLES, ids=[block_id(block) for block in EXAMPLES])
def test_extending_example_runs(block, registries_restored, monkeypatch):
    heading, start, code = block
    monkeypatch.chdir(ROOT)  # the examples name files as a reader at the repository root does
    name = f"docs_extending_line{start}"
    module = types.ModuleType(name)
    module.__file__ = f"{EXTENDING}:{start}"
    sys.modules[name] = module  # dataclasses and type hints look their module up here
    try:
        exec(compile(code, f"{EXTENDING.name}:{start} ({heading})", "exec"), module.__dict__)
    finally:
        del sys.modules[name]


# ---------------------------------------------------------------- README links

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a markdown file's headings (lower case, spaces to hyphens)."""
    anchors, fenced = set(), False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if line.startswith("#") and not fenced:  # a comment in a code block is no heading
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (README.parent / path) if path else README
        anchored = file.is_file() and file.suffix == ".md" and anchor
        if not file.exists() or (anchored and anchor not in heading_anchors(file.read_text(encoding="utf-8"))):
            broken.append(target)
    assert not broken, f"README.md links that resolve to nothing: {broken}"


def test_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= 250, f"README.md has {lines} lines; at most 250 (the guides live in docs/)"


def test_readme_recipe_parses(tmp_path):
    """The recipe in the README's anatomy is one the parser accepts, field for field."""
    from polymodal.config import load_recipe

    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    recipes = [block for block in blocks if block.startswith("name:")]
    assert recipes, "README.md: no recipe block (```yaml starting with name:)"
    for number, block in enumerate(recipes):
        path = tmp_path / f"recipe{number}.yaml"
        path.write_text(block, encoding="utf-8")
        load_recipe(path)


def test_readme_python_runs(registries_restored, monkeypatch, tmp_path):
    """The README's Python example runs as written, from a folder that has the repository's
    recipes/ and tests/ (its outputs, out/ and runs/, land in the temporary folder)."""
    for name in ("recipes", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(README)
    assert blocks, "README.md: no python block"
    for heading, start, code in blocks:
        exec(compile(code, f"README.md:{start} ({heading})", "exec"), {"__name__": "readme_example"})


def test_readme_layout_names_every_module():
    """The README's layout names each top-level module and package of polymodal, and only those."""
    text = README.read_text(encoding="utf-8")
    layout = re.search(r"## Layout\n+```\n(.*?)```", text, re.S)
    assert layout, "README.md: no '## Layout' code block"
    named = {word.rstrip("/") for line in layout.group(1).splitlines()[1:] if line.startswith("  ")
             for word in line.split() if word.endswith((".py", "/"))}
    package = ROOT / "polymodal"
    present = {path.name for path in package.iterdir() if path.suffix == ".py" and not path.name.startswith("__")}
    present |= {path.name for path in package.iterdir() if (path / "__init__.py").is_file()}
    assert named == present, f"README layout: missing {sorted(present - named)}, stale {sorted(named - present)}"
