"""The code's import graph, read with `ast` (nothing is imported): no two project files import each other,
directly or through others; no module imports another module's underscore name; and a lower layer never imports
a higher one (manifests -> cxrshards -> trainer -> cli; phantom only from the demo and benches)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("manifests", "cxrshards", "trainer", "cli", "phantom")
LAYER = {"manifests": 0, "phantom": 0, "cxrshards": 1, "trainer": 2, "cli": 3}


def _graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """({module: modules it imports}, cross-module underscore imports) over the project's packages."""
    files = {".".join(f.relative_to(root).with_suffix("").parts): f for p in PACKAGES for f in (root / p).rglob("*.py")}
    modules = {m.removesuffix(".__init__") for m in files}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges, private = {}, []
    for mod, f in files.items():
        mod = mod.removesuffix(".__init__")
        outs = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = mod.split(".")[: len(mod.split(".")) - node.level + (f.name == "__init__.py")]
                    base = ".".join(parts + ([base] if base else []))
                targets = [(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base, a.name) for a in node.names]
            for name, what in targets:
                t = resolve(name)
                if t is None or t == mod:
                    continue
                outs.add(t)
                if what and what.startswith("_") and not what.startswith("__"):
                    private.append(f"{mod} imports {what} from {t}")
        edges[mod] = {t for t in outs if not mod.startswith(t + ".")}   # a package's own __init__ is not an edge
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_and_no_borrowed_underscore_name():
    edges, private = _graph(REPO)
    assert len(edges) > 60
    assert _cycles(edges) == []
    assert private == []


def test_a_lower_layer_never_imports_a_higher_one():
    edges, _ = _graph(REPO)
    allowed_phantom = {"trainer.demo"}   # the demo writes phantom data; nothing else of the engine may
    wrong = []
    for mod, outs in edges.items():
        top = mod.split(".")[0]
        for t in outs:
            other = t.split(".")[0]
            if other == "phantom" and top != "phantom" and mod not in allowed_phantom and top != "cli":
                wrong.append(f"{mod} -> {t}")
            elif other != "phantom" and LAYER[other] > LAYER[top]:
                wrong.append(f"{mod} -> {t}")
    assert wrong == []


def test_the_walk_finds_a_planted_circle_and_a_borrowed_name(tmp_path):
    for p in PACKAGES:
        (tmp_path / p).mkdir()
    (tmp_path / "trainer" / "a.py").write_text("from trainer.b import _helper\n")
    (tmp_path / "trainer" / "b.py").write_text("import trainer.c\n")
    (tmp_path / "trainer" / "c.py").write_text("from trainer import a\n")
    edges, private = _graph(tmp_path)
    assert _cycles(edges) == [["trainer.a", "trainer.b", "trainer.c"]]
    assert private == ["trainer.a imports _helper from trainer.b"]
