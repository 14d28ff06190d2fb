"""The package's shape: every module imports, and no import circle anywhere (the wheel's contents are checked
in test_data_and_models).

The circle check reads the import statements of every module in finetune/ and tasks/ (installed as
finetune.tasks), function-level (lazy) imports included: a lazy import hides a circle from Python at
import time but still ties the two modules together. So are the families the task registry imports by
name. Imports under ``if TYPE_CHECKING:`` (type hints only) do not run and are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

#: source folder -> the package name it installs as
SOURCES = {"finetune": ROOT / "finetune", "finetune.tasks": ROOT / "tasks"}


def module_files() -> dict[str, Path]:
    """Installed module name -> source file, for every module of the package."""
    modules = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's own modules that ``name`` imports, at the top or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {target for target in targets if target in known and target != name}
    return found


def runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


def import_graph() -> dict[str, set[str]]:
    from finetune.tasks import FAMILIES

    files = module_files()
    graph = {name: imported_modules(name, path, set(files)) for name, path in files.items()}
    graph["finetune.tasks"] |= {f"finetune.tasks.{target.split(':')[0]}" for target in FAMILIES.values()}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_checker_sees_a_circle_through_a_lazy_import(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import finetune.c\n"
                                   "from finetune.b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from finetune import a\n")
    known = {"finetune", "finetune.a", "finetune.b", "finetune.c"}
    graph = {
        "finetune.a": imported_modules("finetune.a", tmp_path / "a.py", known),
        "finetune.b": imported_modules("finetune.b", tmp_path / "b.py", known),
    }
    assert graph == {"finetune.a": {"finetune.b"}, "finetune.b": {"finetune.a"}}
    assert cycles(graph) == [["finetune.a", "finetune.b"]]


def test_no_import_circles() -> None:
    graph = import_graph()
    assert len(graph) > 20 and "finetune.pipeline" in graph and "finetune.tasks.glue" in graph
    assert cycles(graph) == []


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    """From the installed package (not the source folders): a broken import fails here, not in a user's run."""
    names = sorted(module_files())
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", script, *names], cwd="/", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_tests_and_benchmarks_import_the_installed_package_only() -> None:
    """`tasks.glue` would be a second copy of `finetune.tasks.glue`, with its own classes and tables."""
    offenders = []
    for path in sorted([*(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "tasks" or n.startswith("tasks.")]
    assert offenders == []
