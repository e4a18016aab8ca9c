"""The package's import graph has no circle.

An AST scan of every module under ``dera_fast/`` collects the imports that run when the module loads: statements at
module level and in class bodies, including inside ``if`` / ``try`` / ``with`` blocks, but not inside functions
(deferred to the call) nor under ``if TYPE_CHECKING:`` (never run). Relative imports are resolved; ``from pkg import
name`` counts as an import of ``pkg.name`` when that is a module. No source is executed.
"""
import ast
from pathlib import Path

import pytest

import dera_fast

ROOT = Path(dera_fast.__file__).parent


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = module_files()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _load_time_imports(body: list[ast.stmt]):
    """Import statements that run when a block of module-level (or class-body) statements runs."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _load_time_imports(node.body)
            yield from _load_time_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _load_time_imports(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _load_time_imports(node.body)


def imports_of(name: str) -> set[str]:
    """The dera_fast modules that loading ``name`` imports directly."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _load_time_imports(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        found.update(t for t in targets if t in MODULES and t != name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None (iterative three-colour DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_scanner_sees_the_package():
    graph = {name: imports_of(name) for name in MODULES}
    assert len(MODULES) > 20
    assert {"dera_fast.backends", "dera_fast.ops"} <= graph["dera_fast"]  # `from . import backends, ops`
    assert {"dera_fast.ops", "dera_fast._config"} <= graph["dera_fast.models.ar"]  # `from .. import ops`, ...
    assert "dera_fast._progress" in graph["dera_fast.generate"]  # `from ._progress import progress_bar`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    graph = {name: imports_of(name) for name in MODULES}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("model,sampler", [("dera_fast.models.ar", "dera_fast.generate")])
def test_model_does_not_import_its_sampler_at_load_time(model, sampler):
    """The sampler takes the model; the model's ``generate`` shortcut imports the sampler only when called."""
    assert sampler not in imports_of(model)
    assert model not in imports_of(sampler)  # the sampler needs the model's type only for annotations
