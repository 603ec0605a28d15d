"""The package's layering: no import cycle between its modules, and the config at the bottom (fast, no Ray).

Every import of a package module counts, at the top of a module or inside a function (a function-level import
hides a cycle from the interpreter until it runs, not from this walk), absolute or relative, and
`from avocado_ray.x import y` counts as an import of the module avocado_ray.x.y when y is one.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "avocado_ray"
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules that module `name` imports anywhere in its text."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def module(dotted: str) -> str | None:  # the longest prefix of `dotted` that is a module of the package
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {module(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(module(f"{source}.{alias.name}") if f"{source}.{alias.name}" in known else module(source))
    return found - {None, name}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each strongly connected group of modules (Tarjan's algorithm, then a
    breadth-first search back to the group's first module), as [a, b, ..., a]."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    found = []
    for group in groups:
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nexts = sorted(graph[path[-1]] & group)
            if start in nexts:
                found.append(path + [start])
                break
            for other in nexts:
                if other not in seen:
                    seen.add(other)
                    paths.append(path + [other])
    return sorted(found)


def test_the_walk_sees_function_level_relative_and_from_package_imports(tmp_path):
    package = tmp_path / "avocado_ray"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "a.py").write_text("def f():\n    from . import b\n")
    (package / "sub" / "b.py").write_text("from avocado_ray.sub import c\n")
    (package / "sub" / "c.py").write_text("import avocado_ray.sub.a.thing\n")
    known = {
        "avocado_ray.sub.a": package / "sub" / "a.py",
        "avocado_ray.sub.b": package / "sub" / "b.py",
        "avocado_ray.sub.c": package / "sub" / "c.py",
        "avocado_ray.sub": package / "sub" / "__init__.py",
    }
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert graph["avocado_ray.sub.a"] == {"avocado_ray.sub.b"}
    assert graph["avocado_ray.sub.b"] == {"avocado_ray.sub.c"}
    assert graph["avocado_ray.sub.c"] == {"avocado_ray.sub.a"}
    assert cycles(graph) == [["avocado_ray.sub.a", "avocado_ray.sub.b", "avocado_ray.sub.c", "avocado_ray.sub.a"]]


def test_no_import_cycle_between_modules_of_the_package():
    found = [" -> ".join(cycle) for cycle in cycles(import_graph())]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_the_config_imports_no_other_module_of_the_package():
    graph = import_graph()
    config = {name for name in graph if name == "avocado_ray.config" or name.startswith("avocado_ray.config.")}
    outside = {f"{name} -> {other}" for name in config for other in graph[name] - config}
    assert not outside, sorted(outside)
    code = (
        "import avocado_ray.config, json, sys; "
        "print(json.dumps(sorted(m for m in sys.modules if m == 'avocado_ray' or m.startswith('avocado_ray.'))))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout)
    assert "avocado_ray.config" in loaded
    assert [m for m in loaded if m != "avocado_ray" and not m.startswith("avocado_ray.config")] == []


def test_no_module_of_the_package_is_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_kinds_and_names_a_config_accepts_are_those_registered():
    import typing

    from avocado_ray.config import LOSS_NAMES, SCORER_NAMES, VLLMTeacher
    from avocado_ray.routing.selection import SCORERS
    from avocado_ray.teachers.backend import BACKENDS
    from avocado_ray.training.losses import LOSSES

    assert typing.get_args(VLLMTeacher.model_fields["kind"].annotation) == tuple(BACKENDS)
    assert sorted(SCORERS) == sorted(SCORER_NAMES)
    assert sorted(LOSSES) == sorted(LOSS_NAMES)
