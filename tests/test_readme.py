"""README.md stays true to the tree: its Layout, its nursery tree, its settings table.

Merges of parallel branches each add a module, a setting or a line of the
task tree; these checks fail when README.md was not told.  They read files
only (no server, no Redis).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import attrs

from trio_portfolio.config import Settings

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "trio_portfolio"
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(heading: str) -> str:
    """The text of README's ``## heading`` section, up to the next ``## ``."""
    start = README.index(f"\n## {heading}")
    end = README.find("\n## ", start + 1)
    return README[start : None if end < 0 else end]


def layout_names() -> set[str]:
    """The names the Layout block lists first on its lines (``x.py``, ``dir/``)."""
    block = section("Layout").split("```text\n", 1)[1].split("```", 1)[0]
    firsts = (line.split()[0] for line in block.splitlines()[1:] if line.strip())
    return {name for name in firsts if name.endswith((".py", "/"))}


def test_the_layout_lists_every_module_and_folder_of_the_package() -> None:
    listed = layout_names()
    present = {p.name for p in PACKAGE.glob("*.py")}
    present |= {
        f"{p.name}/" for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")
    }
    present |= {p.name for p in (PACKAGE / "store").glob("*.py")}
    assert sorted(present - listed) == [], "add these to README's Layout section"
    assert sorted(listed - present) == [], "README's Layout names what is not there"


def test_the_readme_nursery_tree_is_the_one_in_server_py() -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / "server.py").read_text()), clean=False)
    assert doc is not None
    lines = doc.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("serve()"))
    tree = []
    for line in lines[first:]:
        if not line.strip():
            break
        tree.append(line[4:])
    block = section("How it is built").split("```text\n", 1)[1].split("```", 1)[0]
    assert block.rstrip("\n").splitlines() == tree


def test_every_setting_has_a_row_in_the_configuration_table() -> None:
    table = section("Configuration")
    rows = re.findall(r"^\| `--([a-z-]+)[^`]*` \| `(PORTFOLIO_[A-Z_]+)` \|", table, re.M)
    flags = [flag for flag, _ in rows]
    assert len(flags) == len(set(flags)), "a setting has two rows"
    fields = {field.name for field in attrs.fields(Settings)}
    assert {f.replace("-", "_") for f in flags} == fields
    assert all(env == "PORTFOLIO_" + flag.replace("-", "_").upper() for flag, env in rows)
