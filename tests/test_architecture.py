"""Stages talk through tables: a stage package imports library modules (and itself) only,
never another stage; library modules import no stage. The kinds are declared in
``patternlake.LIBRARY`` and ``patternlake.SHELLS`` (everything else is a stage); see the
package's docstring."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import patternlake

ROOT = Path(patternlake.__file__).parent


def unit_of(module: str) -> str:
    """``patternlake.students.segment_training`` -> ``students``; ``patternlake.registry`` ->
    ``registry``; ``patternlake`` -> ``""`` (the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """(dotted name, is a package's ``__init__``) of a file under ``root`` (the package)."""
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imported(tree: ast.AST, module: str, is_package: bool, top: str) -> list[tuple[int, str]]:
    """(line, module) of every import of ``top``'s modules in ``tree``, at any depth (lazy
    imports inside functions count); ``from top import x`` gives ``top.x``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == top:
                out += [(node.lineno, f"{top}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
    return sorted((line, m) for line, m in out if m == top or m.startswith(top + "."))


def kind(unit: str, library: frozenset[str], shells: frozenset[str]) -> str:
    if unit == "" or unit in library:
        return "library"
    return "shell" if unit in shells else "stage"


def violations(root: Path, library: frozenset[str], shells: frozenset[str]) -> list[str]:
    """Every import that breaks the rules, as ``file:line: what``, for the package at
    ``root``. A top-level module or subpackage named in neither set is a stage."""
    top = root.name
    found = []
    units = {p.stem if p.is_file() else p.name for p in root.iterdir()}
    for name in sorted((library | shells) - units):
        found.append(f"{top}: {name} is declared but does not exist")
    for path in sorted(root.rglob("*.py")):
        module, is_package = module_name(path, root)
        unit = unit_of(module)
        mine = kind(unit, library, shells)
        if mine == "shell":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, target in imported(tree, module, is_package, top):
            other = unit_of(target)
            if other == unit or kind(other, library, shells) == "library":
                continue
            where = f"{path.relative_to(root.parent)}:{line}"
            found.append(
                f"{where}: {mine} {unit} imports {target} ({kind(other, library, shells)} {other})"
            )
    return found


def test_stages_import_only_library_modules_and_the_library_imports_no_stage():
    assert violations(ROOT, patternlake.LIBRARY, patternlake.SHELLS) == []


def test_every_stage_of_the_pipeline_lives_in_a_stage_package():
    from patternlake.pipeline import STAGES

    for stage in STAGES.values():
        unit = unit_of(stage.call.partition(":")[0])
        assert kind(unit, patternlake.LIBRARY, patternlake.SHELLS) == "stage", stage.name


def _tree(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    for name, text in files.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return pkg


def test_the_check_finds_each_kind_of_violation(tmp_path):
    pkg = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "lib.py": "import os\n",
            "bad_lib.py": "def f():\n    from pkg.alpha import x  # lazy: still counted\n",
            "shell.py": "import pkg.alpha.x\nimport pkg.beta.y\n",
            "alpha/__init__.py": "from . import x\n",  # itself: fine
            "alpha/x.py": "from pkg import lib\nfrom pkg.alpha import z\nfrom ..beta import y\n",
            "alpha/z.py": "import pkg.lib\nfrom pkg import beta\n",
            "beta/__init__.py": "",
            "beta/y.py": "from pkg.lib import *\nfrom pkg import shell\n",
        },
    )
    found = violations(pkg, frozenset({"lib", "bad_lib"}), frozenset({"shell"}))
    assert found == [
        "pkg/alpha/x.py:3: stage alpha imports pkg.beta (stage beta)",
        "pkg/alpha/z.py:2: stage alpha imports pkg.beta (stage beta)",
        "pkg/bad_lib.py:2: library bad_lib imports pkg.alpha (stage alpha)",
        "pkg/beta/y.py:2: stage beta imports pkg.shell (shell shell)",
    ]


def test_the_check_passes_a_clean_tree_and_names_declared_parts_that_are_gone(tmp_path):
    pkg = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "lib.py": "",
            "alpha/__init__.py": "",
            "alpha/x.py": "from pkg import lib\nfrom pkg.alpha import x\n",
        },
    )
    assert violations(pkg, frozenset({"lib"}), frozenset()) == []
    assert violations(pkg, frozenset({"lib", "gone"}), frozenset()) == [
        "pkg: gone is declared but does not exist"
    ]
