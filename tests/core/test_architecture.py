"""The import rules of the package layout (docs/architecture.md), read from the source with `ast`, so a
rule holds for every module whether or not a test happens to import it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every absolute import in a module, at any depth (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules("core"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_no_process_package(path: Path) -> None:
    """core/ is what the robot and the learner agree on; it must stand alone below both of them."""
    assert not imported_packages(path) & {"learner", "robot", "sim"}


# What each process package may import of ours (core/ is checked above). A robot install carries no
# training code: robot/ never imports learner/. sim/ wraps the robot's device code in emulators and
# stands in for the robot, so it may import robot/ but never learner/. The learner reaches the
# simulator through Gymnasium ids and never imports the robot's code.
ALLOWED = {"robot": {"core"}, "sim": {"core", "robot"}, "learner": {"core", "sim"}}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_process_packages_import_only_what_the_layout_allows(package: str) -> None:
    broken = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & ({"core", "robot", "sim", "learner"} - {package}
                                                                         - ALLOWED[package]))
              for p in modules(package)}
    assert not {k: v for k, v in broken.items() if v}


def test_the_rule_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from learner.train import Trainer\n    return Trainer\n")
    assert "learner" in imported_packages(module)  # a lazy import inside a function counts too
