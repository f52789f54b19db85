"""The package's three rooms and the one direction of dependence between them.

``book`` (machinery) may import ``studies`` and ``sim``; ``studies`` may import ``sim`` only;
``sim`` (the engine) imports neither. Every import statement of every module is read with
:mod:`ast` (relative imports resolved), including imports inside functions.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lib" / "saddle_escape"
ROOMS = ("sim", "studies", "book")
ALLOWED = {"sim": {"sim"}, "studies": {"sim", "studies"}, "book": {"sim", "studies", "book"}}


def imported_rooms(path: Path) -> list[tuple[int, str]]:
    """(line, room) for every import of a ``saddle_escape`` room in the module at `path`."""
    module = ("saddle_escape",) + path.relative_to(PACKAGE).with_suffix("").parts
    package = module[:-1]  # for a package's __init__ too: its parts end in "__init__"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            targets = [name] if node.module else [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            if parts[0] == "saddle_escape" and len(parts) > 1 and parts[1] in ROOMS:
                found.append((node.lineno, parts[1]))
            elif parts[0] == "saddle_escape" and len(parts) > 1 and parts[1] not in ("__main__",):
                found.append((node.lineno, f"top-level module {parts[1]}"))
    return found


def modules_of(room: str) -> list[Path]:
    return sorted((PACKAGE / room).rglob("*.py"))


def test_every_module_lives_in_a_room():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert loose == [], f"modules outside sim/, studies/, book/: {loose}"
    for room in ROOMS:
        assert (PACKAGE / room / "__init__.py").is_file()


@pytest.mark.parametrize("room", ROOMS)
def test_imports_point_one_way(room):
    wrong = [f"{path.relative_to(PACKAGE)}:{line} imports {target}"
             for path in modules_of(room) for line, target in imported_rooms(path)
             if target not in ALLOWED[room]]
    assert wrong == [], "import against the direction book → studies → sim:\n" + "\n".join(wrong)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The reader of imports is not vacuous: a relative import of the book from the engine is seen."""
    fake = tmp_path / "saddle_escape"
    (fake / "sim").mkdir(parents=True)
    bad = fake / "sim" / "bad.py"
    bad.write_text("def f():\n    from ..book import pipeline\n    from ..studies.drift import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert [t for _, t in imported_rooms(bad)] == ["book", "studies"]


def test_the_engine_loads_lazily_and_lists_every_module():
    """``sim`` loads its modules on first use (the command line needs none of torch, scipy.stats,
    sympy); a module missing from its list would be unreachable as ``sim.<name>``."""
    import subprocess

    from saddle_escape import sim
    files = {p.stem for p in (PACKAGE / "sim").glob("*.py") if p.stem != "__init__"}
    assert set(sim._MODULES) == files
    probe = "import sys, saddle_escape.book; print(sorted({'torch', 'scipy.stats', 'sympy'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
