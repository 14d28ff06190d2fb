"""pyproject declares what the code imports, and nothing it does not need.

Imports are read with ast from every module of finetune/ and tasks/ (function-level imports included) and
mapped to distributions with importlib.metadata; the evaluate metric modules the tasks load by default are
held to the same rule, since evaluate imports their dependencies in our process.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import tomllib
from conftest import MIRROR, ROOT
from packaging.requirements import Requirement

#: metric modules a run loads without --metric (GLUE tasks, custom classification, summaries, translations)
DEFAULT_METRIC_MODULES = ("glue", "accuracy", "rouge", "sacrebleu", "chrf")

#: declared although no module imports them, and why
NOT_IMPORTED_BUT_NEEDED = {
    "sentencepiece": "transformers loads T5, Marian and mBART tokenizers through it",
    "gguf": "transformers reads --gguf_file checkpoints through it",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(files: Iterable[Path]) -> set[str]:
    """Top-level names of the absolute imports in ``files``, standard library and finetune itself left out."""
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("finetune", "__future__")}


def distributions_of(modules: set[str]) -> dict[str, set[str]]:
    """module -> the installed distributions that provide it; an optional package that is not installed here
    (bitsandbytes, an extra) is taken to be the distribution of its own name."""
    providers = metadata.packages_distributions()
    return {module: {canonical(d) for d in providers.get(module, [])} or {canonical(module)} for module in modules}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def declared(extras: bool = False) -> set[str]:
    project = pyproject()
    lines = list(project["dependencies"])
    if extras:
        lines += [line for name, group in project["optional-dependencies"].items() if name != "test" for line in group]
    return {canonical(Requirement(line).name) for line in lines}


def requirement_closure(names: set[str]) -> set[str]:
    """``names`` and everything they require, transitively (unconditional requirements only)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requirements:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonical(requirement.name))
    return seen


def code_files() -> list[Path]:
    return sorted([*(ROOT / "finetune").rglob("*.py"), *(ROOT / "tasks").rglob("*.py")])


def metric_module_files() -> list[Path]:
    return [MIRROR / "spaces" / "evaluate-metric" / name / f"{name}.py" for name in DEFAULT_METRIC_MODULES]


def test_every_import_of_the_code_is_declared() -> None:
    providers = distributions_of(imported_modules(code_files()))
    missing = {module: dists for module, dists in providers.items() if not dists & declared(extras=True)}
    assert not missing, f"imported but not declared in pyproject.toml (module: installed distribution): {missing}"


def test_the_default_metric_modules_dependencies_come_with_the_declared_ones() -> None:
    available = requirement_closure(declared())
    providers = distributions_of(imported_modules(metric_module_files()) - {"evaluate", "datasets"})
    missing = {module: dists for module, dists in providers.items() if not dists & available}
    assert not missing, f"evaluate metric modules import what no declared dependency brings: {missing}"


def test_every_declared_dependency_is_used() -> None:
    used = set().union(*distributions_of(imported_modules(code_files() + metric_module_files())).values())
    unused = declared() - used - set(NOT_IMPORTED_BUT_NEEDED)
    assert not unused, f"declared in pyproject.toml but imported by nothing: {sorted(unused)}"
