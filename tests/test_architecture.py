"""Structure checks: one-way imports, small files, short module docstrings, no outside references.

The import graph is built from the source with :mod:`ast`, counting imports inside functions too,
so a circle cannot hide behind a lazy import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PKG = SRC / "normlab"

MAX_FILE_LINES = 800
MAX_MODULE_DOCSTRING_LINES = 40
MAX_FUNCTION_IMPORTS = 10


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The normlab module an imported name lives in (the longest known prefix)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(known: dict[str, Path]) -> list[tuple[str, str, bool, int, str]]:
    """(importer, imported module, inside a function?, line, source line) for normlab imports."""
    out = []
    for mod, path in known.items():
        is_pkg = path.name == "__init__.py"
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        func_nodes: set[int] = set()
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for sub in ast.walk(fn):
                    if isinstance(sub, ast.Import | ast.ImportFrom):
                        func_nodes.add(id(sub))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                names = [f"{base}.{a.name}" for a in node.names] or [base]
            else:
                continue
            for name in names:
                if not name.startswith("normlab"):
                    continue
                tgt = _target(name, known)
                if tgt is None or tgt == mod:
                    continue
                # A package's own submodule imported from its __init__ is not an upward edge.
                out.append((mod, tgt, id(node) in func_nodes, node.lineno, lines[node.lineno - 1]))
    return out


def _graph() -> dict[str, set[str]]:
    known = _modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for src, dst, _inside, _line, _text in _imports(known):
        graph[src].add(dst)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # importing a submodule runs its package's __init__ first; that is not a circle
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles() -> None:
    cycle = _find_cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_nn_is_the_bottom_layer() -> None:
    bad = [
        f"{src}:{line} imports {dst}"
        for src, dst, _inside, line, _ in _imports(_modules())
        if src.startswith("normlab.nn") and not dst.startswith("normlab.nn")
    ]
    assert not bad, "normlab.nn must import nothing of normlab outside normlab.nn:\n" + "\n".join(
        bad
    )


def test_report_is_downstream_of_experiments() -> None:
    edges = _imports(_modules())
    back = [
        f"{s}:{line} imports {d}"
        for s, d, _i, line, _ in edges
        if s.startswith("normlab.experiments") and d.startswith("normlab.report")
    ]
    assert not back, "experiments must not import report:\n" + "\n".join(back)
    private = []

    def package(mod: str) -> str:  # normlab.report.plots -> report; normlab -> ""
        parts = mod.split(".")
        return parts[1] if len(parts) > 1 else ""

    for s, d, _i, line, text in edges:
        if package(s) == package(d):
            continue
        m = re.search(r"import\s+(.*)", text)
        names = [
            n.strip().split(" as ")[0] for n in (m.group(1) if m else "").strip("()").split(",")
        ]
        if any(n.startswith("_") and not n.startswith("__") for n in names):
            private.append(f"{s}:{line}: {text.strip()}")
    assert not private, "private names imported across packages:\n" + "\n".join(private)


def test_few_function_level_imports_each_with_a_reason() -> None:
    # one entry per import statement (an import of several names counts once)
    inside = sorted({(s, line, text) for s, _d, i, line, text in _imports(_modules()) if i})
    assert len(inside) <= MAX_FUNCTION_IMPORTS, "\n".join(
        f"{s}:{line} {text.strip()}" for s, line, text in inside
    )
    for s, line, text in inside:
        assert "#" in text, f"{s}:{line}: a function-level import needs a comment with its reason"


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_file_size_and_module_docstring(path: Path) -> None:
    text = path.read_text()
    n = len(text.splitlines())
    assert n <= MAX_FILE_LINES, f"{path.relative_to(ROOT)} has {n} lines (max {MAX_FILE_LINES})"
    doc = ast.get_docstring(ast.parse(text), clean=False)
    if doc:
        k = len(doc.splitlines())
        assert k <= MAX_MODULE_DOCSTRING_LINES, (
            f"{path.relative_to(ROOT)}: module docstring has {k} lines (max "
            f"{MAX_MODULE_DOCSTRING_LINES})"
        )


_OUTSIDE = [
    (re.compile(r"\bissues?\s+#?\d+", re.IGNORECASE), "a reference to an issue"),
    (re.compile(r"DESIGN\.md"), "a reference to DESIGN.md"),
    (re.compile(r"\.\./shared"), "a path outside the repository"),
    (re.compile(r"/work/|/home/\w+|/Users/\w+"), "an absolute machine path"),
    (
        re.compile(r"\b00[0-4][ _](?:Sec|Eq|Table|Tables|Fig|Alg|Figs|Algorithm)\b"),
        "a numeric paper prefix",
    ),
    (re.compile(r"\b00[0-4]_[a-z]"), "a numeric paper prefix in an id"),
]


def _repo_text_files() -> list[Path]:
    files = []
    for top in ("src", "tests", "docs", "experiments", "benchmarks", "results", ".ci"):
        base = ROOT / top
        if base.exists() and ".egg-info" not in str(base):
            files += [
                p
                for p in base.rglob("*")
                if p.is_file()
                and ".egg-info" not in str(p)
                and p.suffix in {".py", ".md", ".toml", ".txt", ".sh", ".json", ""}
            ]
    files += [ROOT / "README.md", ROOT / "pyproject.toml"]
    return [p for p in files if p.exists() and p != Path(__file__).resolve()]


def test_nothing_refers_outside_the_repository() -> None:
    bad = []
    for path in _repo_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for no, line in enumerate(text.splitlines(), 1):
            for pattern, what in _OUTSIDE:
                if pattern.search(line):
                    bad.append(f"{path.relative_to(ROOT)}:{no}: {what}: {line.strip()[:100]}")
    assert not bad, f"{len(bad)} lines refer to things outside the repository:\n" + "\n".join(
        bad[:60]
    )
