"""The library's import structure: one-way, read from the source with ast (nothing is imported).

    config, data, metrics       import no model code (the foundations)
    autoencoder                 does not import the diffusion maths
    pipeline                    does not import training code
    cli                         is imported by nobody but __main__
    and no module reaches itself through a chain of imports (a circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "syndiff_lib"
MODEL_CODE = {"autoencoder", "unet", "diffusion", "pipeline", "baseline", "train", "tiny_sdxl", "synthesis", "ablations", "bench"}


def package_imports(path: Path) -> set[str]:
    """The syndiff_lib modules a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y / from . import x
            found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("syndiff_lib."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("syndiff_lib.")}
    return found


GRAPH = {p.stem: package_imports(p) for p in PACKAGE.glob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a circle, or None (depth-first search)."""
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for other in sorted(graph.get(node, ())):
            if state.get(other) == "open":
                return path[path.index(other):] + [other] if other in path else [node, other]
            if other not in state:
                cycle = visit(other, path + [other])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    assert find_cycle(GRAPH) is None, f"import circle: {' -> '.join(find_cycle(GRAPH))}"


@pytest.mark.parametrize("module", ["config", "data", "metrics"])
def test_foundations_import_no_model_code(module):
    assert not GRAPH[module] & MODEL_CODE, f"{module} imports {sorted(GRAPH[module] & MODEL_CODE)}"


def test_the_codec_does_not_import_the_diffusion_maths():
    assert "diffusion" not in GRAPH["autoencoder"]


def test_pipeline_does_not_import_training_code():
    assert not GRAPH["pipeline"] & {"train", "ablations", "synthesis", "cli"}


def test_only_main_imports_cli():
    importers = sorted(m for m, imports in GRAPH.items() if "cli" in imports)
    assert importers == ["__main__"], importers
