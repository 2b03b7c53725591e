import ast
import importlib
from pathlib import Path


def test_hugging_face_tokenizers_is_not_shadowed():
    tokenizers = importlib.import_module("tokenizers")
    assert hasattr(tokenizers, "Tokenizer"), "top-level `tokenizers` must be Hugging Face's"
    assert "mmgen" not in (tokenizers.__file__ or "")
    ours = importlib.import_module("mmgen.tokenizers.text")
    assert hasattr(ours, "TextTokenizer")


def test_transformers_still_imports_its_tokenizers():
    from transformers import PreTrainedTokenizerFast  # noqa: F401


# -- no import cycle among mmgen modules -------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(name, line) for every import in `tree`, inside functions too: `import a.b` gives a.b, `from a
    import b` gives a and a.b (a module or not: the caller keeps the names that are modules).
    Imports under `if TYPE_CHECKING:` count too: a type-only import back is still a cycle of design."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names] + [(base, node.lineno)]
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    """mmgen module -> the mmgen modules it imports, the packages on the way included (so a package
    `__init__` that imports its own submodules counts as a cycle with them); (importer, imported) -> "file:line"."""
    files = {_module_name(p): p for p in sorted((ROOT / "mmgen").rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    where: dict[tuple[str, str], str] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for imported, line in _imports(tree, module, path.name == "__init__.py"):
            parts = imported.split(".")  # importing a.b.c runs the packages a and a.b first
            for name in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
                if name in files and name != module:
                    graph[module].add(name)
                    where.setdefault((module, name), f"{path.relative_to(ROOT)}:{line}")
    return graph, where


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_mmgen_modules():
    graph, where = import_graph()
    cycles = import_cycles(graph)
    report = []
    for component in cycles:
        members = set(component)
        edges = [f"{a} -> {b} ({where[a, b]})" for a in component for b in sorted(graph[a] & members)]
        report.append("cycle: " + ", ".join(component) + "\n    " + "\n    ".join(edges))
    assert not cycles, "import cycles (move the shared code into a leaf module):\n" + "\n".join(report)
