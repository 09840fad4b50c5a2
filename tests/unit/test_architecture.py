"""docs/architecture.md's table of imports between the top-level parts of ``service`` against
the real import graph (grimp, which import-linter builds its contracts on): the drawing a
newcomer reads cannot drift from the code. The layers themselves are ``lint-imports``' job."""

from __future__ import annotations

import re
from pathlib import Path

import grimp

ARCHITECTURE = Path(__file__).parents[2] / "docs" / "architecture.md"


def documented_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for line in ARCHITECTURE.read_text().splitlines():
        match = re.fullmatch(r"\| `(\w+)` \| ([\w, ]+) \|", line)
        if match:
            edges[match[1]] = {name.strip() for name in match[2].split(",")}
    return edges


def real_edges() -> dict[str, set[str]]:
    graph = grimp.build_graph("service")
    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        source = module.split(".")[1] if "." in module else None
        for imported in graph.find_modules_directly_imported_by(module):
            target = imported.split(".")[1] if "." in imported else None
            if source and target and source != target and source != "__main__":
                edges.setdefault(source, set()).add(target)
    return edges


def test_the_documented_import_graph_is_the_real_one():
    documented = documented_edges()
    assert documented, "no import table found in docs/architecture.md"
    assert documented == real_edges()
