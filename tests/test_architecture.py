"""Imports flow one way: app -> sphinx_model, storage; train -> sphinx_model; sphinx_model -> nothing of ours."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"sphinx_model", "train", "storage", "app"}
ALLOWED = {"sphinx_model": set(), "train": {"sphinx_model"}, "storage": {"sphinx_model"},
           "app": {"sphinx_model", "storage"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package):
    for path in (ROOT / package).rglob("*.py"):
        bad = imported_packages(path) - ALLOWED[package] - {package}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_storage_uses_only_the_torch_free_schema():
    for path in (ROOT / "storage").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sphinx_model"):
                assert node.module in {"sphinx_model.conversation", "sphinx_model.boxes", "sphinx_model.tiling",
                                       "sphinx_model.pixels", "sphinx_model.feedback_data"}, \
                    f"{path.name} imports {node.module}"
