"""The house rules of distill/, checked on its source: no import cycle (function-level imports counted),
a function-level import only for an optional or heavy dependency, small modules and functions, tests that
mirror the packages."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "distill"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path], tree: ast.Module | None = None
             ) -> list[tuple[str, ast.AST]]:
    """(distill module imported, the import node) for every import in the file (`tree`), at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    out = []
    for node in ast.walk(tree or ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t.startswith("distill"):
                r = resolve(t)
                if r and r != name:
                    out.append((r, node))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for t, _ in _imports(m, p, modules)} for m, p in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start, [start])
        if found:
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_inside_distill_function_level_imports_counted():
    assert _cycle(_graph()) is None


def test_function_level_imports_of_distill_are_gone():
    """A function-level import stays only for an optional or heavy third-party dependency, never for distill's
    own modules (those would hide a cycle)."""
    modules = _modules()
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for target, node in _imports(name, path, modules, tree):
            if id(node) not in top and not _under_type_checking(tree, node):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert not found, "\n".join(sorted(set(found)))


def _under_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            if any(n is node for n in ast.walk(stmt)):
                return True
    return False


def test_modules_and_functions_are_small():
    long_modules = [f"{p.relative_to(ROOT)}: {n} lines" for p in _modules().values()
                    if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    long_functions = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long_modules, "\n".join(long_modules)
    assert not long_functions, "\n".join(long_functions)


def test_tests_mirror_the_packages():
    """Every subpackage of distill/ has its tests/<package>/ (behaviour tests sit together in tests/behaviour/)."""
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    missing = [p for p in packages if not (ROOT / "tests" / p).is_dir()]
    assert not missing, f"no tests/ dir for {missing}"


def test_comments_and_docstrings_name_modules_that_exist():
    """A module or function named in distill/'s or conf/'s text (`distill.cell.identity`, `distill/losses/...py`)
    exists: the names outlive moves only if a test reads them."""
    from tests.test_docs import DOTTED, dotted_name_exists

    stale = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "conf").rglob("*.yaml")]:
        text = path.read_text()
        stale += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in DOTTED.finditer(text)
                  if m.group(0) not in ("distill.train", "distill.cell_log") and not dotted_name_exists(m.group(0))]
        stale += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(r"(?<![\w/.-])distill/[\w/.-]*\w\.py", text)
                  if not (ROOT / m.group(0)).exists()]
    assert not stale, "\n".join(stale)
