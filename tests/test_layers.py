"""The package's layers (docs/DESIGN.md): an import goes down, never up or sideways, and no two
modules need each other.

    config -> kernels, data -> parallel -> model -> checkpoint -> training -> posttrain
        -> convert, inference -> arguments (the flags of the entry scripts and tools)

Every import counts, at the top of a file or inside a function: a lazy import up a layer is the
same dependency, only hidden.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "megalm")

# Layer of each top-level piece of megalm; a piece may import only from lower layers (and itself).
LAYERS = {
    "config": 0,
    "kernels": 1, "data": 1,
    "parallel": 2,
    "model": 3,
    "checkpoint": 4,
    "training": 5,
    "posttrain": 6,
    "convert": 7, "inference": 7,
    "arguments": 8,  # the command-line flags of the entry scripts and tools
}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def all_modules() -> dict:
    """megalm module name -> its file."""
    out = {}
    for dirpath, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                out[module_name(path)] = path
    return out


MODULES = all_modules()


def imports_of(name: str) -> set:
    """The megalm modules `name` imports, anywhere in its file."""
    path = MODULES[name]
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from megalm.x import y` imports the module megalm.x.y when there is one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


def piece(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "megalm"


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_piece_of_the_package_has_a_layer():
    pieces = {piece(name) for name in MODULES} - {"megalm"}
    assert pieces <= set(LAYERS), f"give these a layer in LAYERS (and docs/DESIGN.md): {pieces - set(LAYERS)}"


def test_imports_go_down_the_layers():
    wrong = []
    for name, targets in GRAPH.items():
        if piece(name) == "megalm":
            continue
        for target in targets:
            mine, theirs = piece(name), piece(target)
            if theirs != mine and (theirs == "megalm" or LAYERS[theirs] >= LAYERS[mine]):
                wrong.append(f"{name} ({mine}, layer {LAYERS[mine]}) imports {target} "
                             f"({theirs}, layer {LAYERS.get(theirs, '?')})")
    assert not wrong, "imports that do not go down:\n" + "\n".join(sorted(wrong))


def test_no_import_circle():
    """Tarjan's strongly connected components over every import between megalm's modules."""
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                circles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles, f"modules that import each other: {circles}"


@pytest.mark.parametrize("source, expected", [
    ("from megalm.training import trainer", {"megalm.training.trainer"}),
    ("from megalm.config import Config", {"megalm.config"}),
    ("import megalm.model.gpt", {"megalm.model.gpt"}),
])
def test_the_import_reader_resolves_modules(tmp_path, source, expected, monkeypatch):
    """The check would pass vacuously if it read no imports: it must see these."""
    fake = os.path.join(PACKAGE, "inference", "_layer_probe.py")
    monkeypatch.setitem(MODULES, "megalm.inference._layer_probe", fake)
    monkeypatch.setattr("builtins.open", _opener(fake, source))
    assert imports_of("megalm.inference._layer_probe") == expected


def _opener(fake: str, source: str):
    real = open

    def fake_open(path, *args, **kwargs):
        if path == fake:
            import io
            return io.StringIO(source)
        return real(path, *args, **kwargs)
    return fake_open
