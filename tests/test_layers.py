"""The package's imports run one way, floor by floor, and no modules import each other in a circle.

Every `.py` file under `idiom_lens/` is read with `ast` (no import runs), and every import in it
counts: at module top, inside functions, and under `TYPE_CHECKING`. A lazy import is still a
dependency, and the circles this test was written against were all hidden in lazy imports.

- Floors: a module may import its own floor and the floors below it (`FLOORS`, lowest first).
  `idiom_lens/__init__.py` (the lazy public API, which names modules on every floor) and
  `__main__.py` (the entry point) stand outside the floors.
- Circles: no module may reach itself through imports, on one floor or across floors. All
  imports count here too: a circle hidden in a function still means that neither module can be
  read, tested or moved without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "idiom_lens"

# The floors, lowest first: (floor, the top-level modules or packages of idiom_lens on it). The
# docstring of idiom_lens/__init__.py and docs/usage.md name the same order (test below).
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("errors", "io", "types", "faults", "metrics", "groups", "locks")),
    ("datasets", ("datasets",)),
    ("models", ("models",)),
    ("lenses", ("lenses",)),
    ("analyses", ("analyses",)),
    ("plots", ("plots",)),
    ("study", ("study",)),
    ("cli", ("cli",)),
)
OUTSIDE = ("__init__", "__main__")  # idiom_lens/__init__.py and idiom_lens/__main__.py


def module_names(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of every .py file under the package folder `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def floor_of(module: str) -> int | None:
    """The floor index of a module of the package (None: outside the floors). A top-level name
    on no floor raises, so that a new module gets a floor when it is added."""
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in OUTSIDE):
        return None
    for index, (_, names) in enumerate(FLOORS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module}: idiom_lens.{parts[1]} is on no floor; add it to FLOORS in tests/test_layers.py")


def public_api(modules: dict[str, Path], package: str) -> dict[str, str]:
    """The `_API` map (public name -> defining module) of the package's `__init__.py`, read with ast."""
    for node in ast.parse(modules[package].read_text(encoding="utf-8")).body:
        target = (node.target if isinstance(node, ast.AnnAssign)
                  else (node.targets[0] if isinstance(node, ast.Assign) else None))
        if isinstance(target, ast.Name) and target.id == "_API" and node.value is not None:
            return ast.literal_eval(node.value)
    return {}


def imports(module: str, path: Path, modules: dict[str, Path], api: dict[str, str]) -> list[tuple[int, str]]:
    """(line, imported module of the package) for every import in the file, wherever it stands.

    `from a.b import c` names the module `a.b.c` when there is one, else `a.b`; `from idiom_lens
    import NAME` names the module that defines NAME in the public API."""
    package = module.split(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                anchor = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = []
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    targets.append(f"{base}.{alias.name}")
                elif base == package and alias.name in api:
                    targets.append(api[alias.name])
                else:
                    targets.append(base)
        else:
            continue
        for target in targets:
            if target == package or target.startswith(package + "."):
                while target not in modules and "." in target:  # `import a.b.name` of a non-module
                    target = target.rsplit(".", 1)[0]
                found.append((node.lineno, target))
    return list(dict.fromkeys(found))  # `from m import a, b`: one import of m


def import_graph(root: Path) -> dict[str, list[tuple[int, str]]]:
    """{module: [(line, imported module), ...]} over the package folder `root`."""
    modules = module_names(root)
    api = public_api(modules, root.name)
    return {module: imports(module, path, modules, api) for module, path in modules.items()}


def floor_errors(root: Path) -> list[str]:
    """One line per import of a higher floor: file:line, both modules and both floors."""
    modules = module_names(root)
    errors = []
    for module, found in import_graph(root).items():
        here = floor_of(module)
        if here is None:
            continue
        for line, target in found:
            there = floor_of(target)
            if there is not None and there > here:
                rel = modules[module].relative_to(root.parent)
                errors.append(f"{rel}:{line}: {module} (floor {FLOORS[here][0]}) imports {target} "
                              f"(floor {FLOORS[there][0]}, higher)")
    return errors


def import_cycles(root: Path) -> list[str]:
    """One line per circle found (depth-first, each reported once): the modules round it, with the
    file:line of each import."""
    modules = module_names(root)
    graph = import_graph(root)
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[tuple[str, int]] = []  # (module, line of its import of the next module)
    cycles = []

    def visit(module: str) -> None:
        state[module] = "open"
        for line, target in graph.get(module, []):
            if target == module:
                continue
            path.append((module, line))
            if state.get(target) == "open":
                start = next(i for i, (m, _) in enumerate(path) if m == target)
                steps = [f"{m} ({modules[m].relative_to(root.parent)}:{n})" for m, n in path[start:]]
                cycles.append(" -> ".join([*steps, target]))
            elif target not in state:
                visit(target)
            path.pop()
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module)
    return cycles


def test_every_import_runs_down_the_floors() -> None:
    errors = floor_errors(PACKAGE)
    assert not errors, "imports of a higher floor:\n" + "\n".join(errors)


def test_no_import_cycles() -> None:
    cycles = import_cycles(PACKAGE)
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_docs_name_the_floors_in_order() -> None:
    """The one-way sentence of the package docstring and of docs/usage.md follows FLOORS."""
    import re

    order = [name for name, _ in FLOORS[1:]]
    for path in (PACKAGE / "__init__.py", PACKAGE.parent / "docs" / "usage.md"):
        text = path.read_text(encoding="utf-8")
        match = re.search(r"Data flows one way: (.*?)\.\n\n", text, re.S)
        assert match, f"{path}: no 'Data flows one way: ...' sentence"
        named = [re.match(r"`?(\w+)", step.strip()).group(1) for step in re.split(r"->|→", match.group(1))]
        assert named == order, f"{path}: the floors named are {named}, FLOORS says {order}"


def _tree(root: Path, files: dict[str, str]) -> Path:
    package = root / "idiom_lens"
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text, encoding="utf-8")
    return package


def test_the_checks_catch_a_back_arrow_and_a_circle(tmp_path: Path) -> None:
    """On a small tree: an import up a floor (hidden under TYPE_CHECKING, in a function), a circle
    between two floors' modules, and a clean tree that passes."""
    package = _tree(tmp_path, {
        "__init__.py": '_API: dict[str, str] = {"run": "idiom_lens.analyses.b"}\n',
        "errors.py": "",
        "datasets/__init__.py": "",
        "datasets/a.py": (
            "from typing import TYPE_CHECKING\n"
            "import idiom_lens.errors\n"
            "def f():\n"
            "    if TYPE_CHECKING:\n"
            "        from idiom_lens.analyses.b import B\n"
        ),
        "datasets/c.py": "def g():\n    from idiom_lens import run\n",
        "analyses/__init__.py": "",
        "analyses/b.py": "from idiom_lens.datasets import a\nclass B: ...\n",
    })
    errors = floor_errors(package)
    assert errors == [
        "idiom_lens/datasets/a.py:5: idiom_lens.datasets.a (floor datasets) imports idiom_lens.analyses.b "
        "(floor analyses, higher)",
        "idiom_lens/datasets/c.py:2: idiom_lens.datasets.c (floor datasets) imports idiom_lens.analyses.b "
        "(floor analyses, higher)",
    ]
    (cycle,) = import_cycles(package)
    assert "idiom_lens.datasets.a (idiom_lens/datasets/a.py:5) -> idiom_lens.analyses.b" in cycle
    assert "idiom_lens.analyses.b (idiom_lens/analyses/b.py:1) -> idiom_lens.datasets.a" in cycle

    (package / "datasets" / "a.py").write_text("import idiom_lens.errors\n", encoding="utf-8")
    (package / "datasets" / "c.py").write_text("from . import a\n", encoding="utf-8")
    assert floor_errors(package) == [] and import_cycles(package) == []


def test_a_module_on_no_floor_is_reported(tmp_path: Path) -> None:
    package = _tree(tmp_path, {"__init__.py": "", "newroom.py": ""})
    with pytest.raises(AssertionError, match="idiom_lens.newroom is on no floor"):
        floor_errors(package)
