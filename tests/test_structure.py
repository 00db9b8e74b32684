"""The shape of the code: no import cycle among the project's modules (imports inside functions
included), no Ray on the model side, and no module outside a family's own package naming its stages or
folders."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.serving import ROOT

PACKAGES = ("stages", "serve", "benchmarks")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name in modules:
                found.add(name)
            elif name.rpartition(".")[0] in modules and not isinstance(node, ast.Import):
                found.add(name.rpartition(".")[0])
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_the_projects_modules():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    assert sum(map(len, graph.values())) > 50  # the walk really found the imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from stages.cascade import Cascade\n")
    assert _imports(source, {"stages.cascade": source}) == {"stages.cascade"}


def test_the_model_side_never_imports_ray():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("stages"):
            tree = ast.parse(path.read_text())
            imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not any(m == "ray" or m.startswith("ray.") for m in imported), name


@pytest.mark.parametrize(
    "package,names",
    [
        (
            "deepfloyd_if",
            ('"IF-I"', '"IF-II"', '"x4-upscaler"', '"stage1"', '"stage2"', '"stage3"', '"StageI"', '"StageIII"'),
        ),
        ("decidiffusion", ('"DeciDiffusion-v1-0"', '"denoiser"', '"UNetNAS"', '"CLIPTextEncoder"', "denoiser_steps")),
    ],
)
def test_only_the_family_names_its_stages_and_folders(package, names):
    family_package = ROOT / "stages" / "families" / package
    for path in _modules().values():
        if family_package in path.parents:
            continue
        text = path.read_text()
        assert not [n for n in names if n in text], (path, [n for n in names if n in text])


def _declared() -> set[str]:
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_imported_package_is_declared():
    """The code and the tests import only what pyproject.toml names (the package's own dependencies and
    its `test` extra), so a fresh virtual environment has all of it."""
    import sys
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    ours = {*PACKAGES, "tests"}
    imported: dict[str, str] = {}
    for path in [*_modules().values(), *(ROOT / "tests").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in ours:
                    imported.setdefault(top, str(path.relative_to(ROOT)))
    declared = _declared()
    assert {"torch", "ray", "httpx", "openai"} <= declared
    missing = {
        top: where
        for top, where in imported.items()
        if not {d.lower().replace("_", "-") for d in distributions.get(top, [top])} & declared
    }
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
