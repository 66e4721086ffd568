"""The layering: imports point one way (node → swarm → protocol) and no module of the three packages
imports itself back through others; and the rooms stay small enough to change (size limits below).

Read from the source with ``ast``, so nothing is imported. Every import statement counts: at module
level, inside a function (a lazy import is still a dependency), and under ``if TYPE_CHECKING:`` (a
circle that only the type checker sees still ties two modules together). A package's own
``__init__`` counts only where it is named: ``import swarm.sim.link`` is an edge to
``swarm.sim.link``, not to ``swarm`` and ``swarm.sim``.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What each package may import, besides itself: the one direction of imports (STYLE.md).
MAY_IMPORT = {"protocol": {"protocol"}, "swarm": {"swarm", "protocol"}, "node": {"node", "swarm", "protocol"}}
# Circles that are known and not yet broken, each with why it exists. Shrink-only: a test fails once
# one of them is gone, so the entry goes too.
KNOWN_CIRCLES: set[frozenset[str]] = set()
# Size limits (issue 16): lines per file in the three packages, per class and per function anywhere but
# bench/ (a function's lines run from its ``def`` to its last line: docstring included, decorators not).
MAX_FILE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 450, 300, 60


def package_sources(root: Path = REPO) -> dict[str, tuple[str, bool]]:
    """Module name → (source text, whether it is a package ``__init__``) for node/, swarm/, protocol/."""
    sources = {}
    for package in MAY_IMPORT:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            sources[name] = (path.read_text(), is_package)
    return sources


def _named(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement asks for (``from a import b`` asks for ``a.b``: the module
    ``a.b`` if there is one, else a name inside ``a``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return [f"{base}.{alias.name}" for alias in node.names]


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """Module → the modules among ``sources`` it imports (the longest known prefix of each name)."""
    graph: dict[str, set[str]] = {}
    for module, (text, is_package) in sources.items():
        targets = set()
        for node in ast.walk(ast.parse(text, filename=module)):
            for name in _named(node, module, is_package):
                while name and name not in sources:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """Imports against node → swarm → protocol, as ``"a -> b"``."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if b.split(".")[0] not in MAY_IMPORT[a.split(".")[0]])


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Every set of modules that import each other round (strongly connected components of two or
    more modules; Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_imports_point_one_way() -> None:
    assert wrong_way(import_graph(package_sources())) == []


def test_no_import_circles() -> None:
    found = circles(import_graph(package_sources()))
    assert [sorted(c) for c in found if c not in KNOWN_CIRCLES] == []
    gone = [sorted(c) for c in KNOWN_CIRCLES if c not in found]
    assert gone == [], "broken circles: remove them from KNOWN_CIRCLES"


def test_the_checks_catch_circles_and_imports_the_wrong_way() -> None:
    sources = {
        "protocol": ("", True),
        "protocol.framing": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                             "    from protocol.shaper import Shaper\n", False),
        "protocol.shaper": ("from protocol import framing\n", False),
        "protocol.wire": ("def f():\n    from swarm.sim import run\n", False),
        "swarm.sim": ("from . import run\n", True),
        "swarm.sim.run": ("import node.cli\nfrom .faults import parse\n", False),
        "swarm.sim.faults": ("from swarm.sim.run import X\n", False),
        "node.cli": ("import hivemind\nfrom swarm.sim.run import run_simulation\nfrom protocol.wire import f\n",
                     False),
    }
    graph = import_graph(sources)
    assert graph["swarm.sim"] == {"swarm.sim.run"}
    assert wrong_way(graph) == ["protocol.wire -> swarm.sim.run", "swarm.sim.run -> node.cli"]
    assert sorted(sorted(c) for c in circles(graph)) == [
        ["node.cli", "protocol.wire", "swarm.sim.faults", "swarm.sim.run"],
        ["protocol.framing", "protocol.shaper"],
    ]


def oversized(root: Path = REPO) -> list[str]:
    """Files, classes and functions over the size limits, as ``"path: what (lines)"``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("bench", ".venv", "build") or rel.parts[0].startswith("."):
            continue
        text = path.read_text()
        if rel.parts[0] in MAY_IMPORT and len(text.splitlines()) > MAX_FILE_LINES:
            found.append(f"{rel}: file ({len(text.splitlines())} lines)")
        for node in ast.walk(ast.parse(text, filename=str(rel))):
            limit = (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else
                     MAX_FUNCTION_LINES if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
            if limit is not None and node.end_lineno - node.lineno + 1 > limit:
                found.append(f"{rel}: {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return found


def test_files_classes_and_functions_stay_small() -> None:
    assert oversized() == []


def test_the_size_check_catches_each_kind(tmp_path) -> None:
    lines = [f"    x{i} = {i}" for i in range(60)]
    body = "\n".join(lines)
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "big.py").write_text("\n" * 451)
    (tmp_path / "node" / "ok.py").write_text("def fits():\n" + "\n".join(lines[:59]) + "\n")  # 60 lines
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text(f"def long():\n{body}\n\n\nclass Wide:\n" + "    y = 1\n" * 300)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "b.py").write_text(f"def exempt():\n{body}\n")
    assert oversized(tmp_path) == ["node/big.py: file (451 lines)", "tests/t.py: long (61 lines)",
                                   "tests/t.py: Wide (301 lines)"]



def unmapped(root: Path = REPO) -> list[str]:
    """Modules that their package's ``__init__`` docstring (the package's map) does not name."""
    missing = []
    for init in sorted(p for package in MAY_IMPORT for p in (root / package).rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        package = ".".join(init.parent.relative_to(root).parts)
        for child in sorted(init.parent.iterdir()):
            name = child.stem if child.suffix == ".py" and child.name != "__init__.py" else (
                child.name if (child / "__init__.py").exists() else None)
            if name is not None and f"``{package}.{name}``" not in doc:
                missing.append(f"{package}.{name}")
    return missing


def test_every_package_map_names_all_its_modules() -> None:
    assert unmapped() == []


def test_the_map_check_names_what_is_missing(tmp_path) -> None:
    (tmp_path / "node" / "sub").mkdir(parents=True)
    (tmp_path / "node" / "__init__.py").write_text('"""- ``node.a`` a\n- ``node.sub`` a package"""\n')
    for name in ("a.py", "b.py", "sub/__init__.py", "sub/c.py"):
        (tmp_path / "node" / name).write_text("")
    assert unmapped(tmp_path) == ["node.b", "node.sub.c"]


def test_an_installed_wheel_holds_every_package():
    """`pip install .` (the Docker image) ships what setuptools finds: every source folder must be a package
    it finds from pyproject's include patterns (a folder without __init__.py would be left out)."""
    import tomllib

    from setuptools import find_packages

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(str(REPO), include=include))
    folders = {".".join(p.parent.relative_to(REPO).parts) for top in (*MAY_IMPORT, "configs")
               for p in (REPO / top).rglob("*.py")}
    assert folders and folders <= found, sorted(folders - found)
