"""The package's import graph, read from its source with ``ast`` (nothing is imported): no import cycles, and the
layering the architecture promises (the models below everything that trains, evaluates, generates or loads files;
training below the inference pipeline)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = "mmgpt"
PACKAGE_DIR = Path(importlib.util.find_spec(PACKAGE).origin).parent

# (importers, what they must not import, even through other mmgpt modules): a name covers its submodules.
LAYERS = [
    (
        "mmgpt.models",  # nn.Modules only: no data, training, evaluation, generation, file formats or Lightning
        ("mmgpt.data", "mmgpt.train", "mmgpt.eval", "mmgpt.generation", "mmgpt.pipeline", "mmgpt.checkpoint",
         "mmgpt.convert", "lightning"),
    ),
    ("mmgpt.train", ("mmgpt.pipeline",)),  # training never imports the inference layer
]
# The native decoder stands alone, as nanoGPT's model.py does: its config and the attention masks.
DECODER = "mmgpt.models.decoder"
DECODER_MAY_IMPORT = {"mmgpt.config", "mmgpt.models.attention"}


def module_files(package_dir: Path, package: str) -> dict[str, Path]:
    """Every module of the package by dotted name; a package's ``__init__.py`` is the package itself."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """The ``(module, names)`` of every import statement, at module level or inside functions and classes, with
    relative imports made absolute. ``if TYPE_CHECKING:`` blocks never run, so they are skipped."""

    def __init__(self, module: str, is_package: bool):
        self.package = module.split(".") if is_package else module.split(".")[:-1]
        self.found: list[tuple[str, tuple[str, ...]]] = []

    def visit_If(self, node: ast.If) -> None:
        for child in node.orelse if _is_type_checking(node.test) else [*node.body, *node.orelse]:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [(alias.name, ()) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # from . import x / from ..y import z: relative to this module's package
            base = self.package[: len(self.package) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module
        self.found.append((module, tuple(alias.name for alias in node.names)))


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """``module -> every module it imports``, internal and external, as dotted names.

    ``from pkg import name`` imports the module ``pkg.name`` where there is one, else ``pkg`` (which defines
    ``name``). Importing ``pkg.sub.mod`` runs ``pkg.sub``'s ``__init__`` first, so it counts as importing ``pkg.sub``
    too; except from inside ``pkg.sub``, which is then imported already (if unfinished), and except for the
    top-level package, which is always imported first: an edge to those takes an import of a name they define.
    """
    modules = module_files(package_dir, package)
    graph = {}
    for module, path in modules.items():
        visitor = _Imports(module, is_package=path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        targets = set()
        for name, names in visitor.found:
            submodules = {f"{name}.{n}" for n in names if f"{name}.{n}" in modules}
            targets |= submodules
            if len(submodules) < max(len(names), 1):  # import name, or from name import something it defines
                targets.add(name)
        importer = module.split(".")
        for target in [t for t in targets if t.startswith(package + ".")]:
            parts = target.split(".")
            targets |= {".".join(parts[:k]) for k in range(2, len(parts)) if parts[:k] != importer[:k]}
        graph[module] = targets
    return graph


def internal(graph: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """The graph between the package's own modules."""
    return {module: {t for t in targets if t in graph} for module, targets in graph.items()}


def import_cycles(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """One cycle through each strongly connected component of more than one module, and through each module that
    imports itself, spelled ``a -> b -> c -> a`` from the component's first module in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:  # v is the root of a component: it and everything above it on the stack
            component = {stack.pop()}
            while v not in component:
                component.add(stack.pop())
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:
        start = min(component)
        if len(component) == 1 and start not in graph.get(start, ()):
            continue
        paths = {start: [start]}  # breadth first inside the component: the shortest way back to start
        queue = [start]
        for v in queue:
            targets = sorted(graph.get(v, ()))
            if start in targets:
                cycles.append(" -> ".join([*paths[v], start]))
                break
            for w in targets:
                if w in component and w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
    return sorted(cycles)


def _covers(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layering_violations(graph: Mapping[str, Iterable[str]], layers) -> list[str]:
    """Each import chain ``importer -> ... -> forbidden`` that breaks a ``(importers, forbidden)`` rule of ``layers``,
    following imports through the package's own modules (the shortest chain for each importer and forbidden
    module)."""
    found = []
    for importers, forbidden in layers:
        for start in sorted(m for m in graph if _covers(importers, m)):
            chains = {start: [start]}
            queue = [start]
            for v in queue:
                for w in sorted(graph.get(v, ())):
                    if w in chains:
                        continue
                    chains[w] = [*chains[v], w]
                    if any(_covers(f, w) for f in forbidden):
                        found.append(" -> ".join(chains[w]))
                    elif w in graph:
                        queue.append(w)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    graph = import_graph(PACKAGE_DIR, PACKAGE)
    # The checks below pass on an empty graph: it must really hold the package's modules and their imports.
    assert len(graph) > 20 and sum(map(len, internal(graph).values())) > 50
    return graph


def test_no_import_cycles(graph):
    cycles = import_cycles(internal(graph))
    assert not cycles, "import cycles in mmgpt:\n" + "\n".join(cycles)


def test_layering(graph):
    violations = layering_violations(graph, LAYERS)
    assert not violations, "imports across the layers of mmgpt:\n" + "\n".join(violations)
    decoder = {t for t in graph[DECODER] if _covers(PACKAGE, t)}
    assert decoder <= DECODER_MAY_IMPORT, f"{DECODER} imports {sorted(decoder - DECODER_MAY_IMPORT)}"


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_cycles_are_spelled_out():
    # From the component's first module: a component of three, a self-import, and acyclic edges beside them.
    edges = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"a", "e"}, "f": {"d"}}
    assert import_cycles(edges) == ["a -> b -> c -> a", "e -> e"]
    assert import_cycles({"x": {"y"}, "y": set()}) == []


def test_import_graph_of_a_small_package(tmp_path):
    # Relative imports, ``from pkg import submodule``, a function-level import, a package's __init__ running first,
    # and a TYPE_CHECKING import that does not count.
    root = _write_package(tmp_path / "pkg", {
        "__init__.py": "from pkg.a import f\n",
        "a.py": "from . import b\n\ndef f():\n    from .sub.c import g\n",
        "b.py": "from typing import TYPE_CHECKING\nimport pkg.sub.c as c\nif TYPE_CHECKING:\n    import pkg.a\n",
        "sub/__init__.py": "from pkg.sub.c import g\n",  # no edge to itself
        "sub/c.py": "import lightning\nfrom ..b import x\n",
        "d.py": "from pkg import f\n",  # a name defined in the top-level package: an edge to it
    })
    graph = import_graph(root, "pkg")
    assert graph["pkg"] == {"pkg.a"}
    assert graph["pkg.a"] == {"pkg.b", "pkg.sub", "pkg.sub.c"}
    assert graph["pkg.b"] == {"typing", "pkg.sub", "pkg.sub.c"}
    assert graph["pkg.sub"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"lightning", "pkg.b"}
    assert graph["pkg.d"] == {"pkg"}
    assert import_cycles(internal(graph)) == ["pkg.b -> pkg.sub.c -> pkg.b"]
    assert layering_violations(graph, [("pkg.a", ("lightning",))]) == ["pkg.a -> pkg.sub.c -> lightning"]
    assert layering_violations(graph, [("pkg.sub", ("pkg.a",))]) == []


def test_a_cycle_through_a_package_init_is_found(tmp_path):
    # No module imports a module that imports it back, but importing pkg.y.n first fails: pkg.x.other runs pkg.x's
    # __init__, which needs pkg.y.n, still unfinished.
    root = _write_package(tmp_path / "pkg", {
        "__init__.py": "",
        "x/__init__.py": "from pkg.x.m import M\n",
        "x/m.py": "from pkg.y.n import N\n",
        "x/other.py": "",
        "y/__init__.py": "",
        "y/n.py": "from pkg.x.other import O\n",
    })
    assert import_cycles(internal(import_graph(root, "pkg"))) == ["pkg.x -> pkg.x.m -> pkg.y.n -> pkg.x"]


# What importing one part loads at run time (the static graph above cannot see lazy package attributes): a fresh
# interpreter imports the module and reports which of the heavy or higher-layer modules came with it.
@pytest.mark.parametrize("module,must_not_load", [
    ("mmgpt", ("torch", "lightning", "transformers")),  # public names load on first use
    ("mmgpt.config", ("torch",)),  # configs are torch-free
    ("mmgpt.generation.config", ("torch",)),
    ("mmgpt.pipeline", ("lightning", "mmgpt.train", "mmgpt.data.datamodule")),  # inference needs no Lightning
    ("mmgpt.train.module", ("mmgpt.pipeline",)),  # training never imports the inference layer
])
def test_importing_a_module_loads_only_its_layer(module, must_not_load):
    code = f"import sys, {module}; print([m for m in {list(must_not_load)!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} loaded {out.strip()}"


def test_lazy_public_names_resolve():
    import mmgpt
    import mmgpt.data
    import mmgpt.generation

    for package in (mmgpt, mmgpt.data, mmgpt.generation):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
        with pytest.raises(AttributeError, match="has no attribute 'nope'"):
            package.nope  # noqa: B018
