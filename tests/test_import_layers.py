"""Import layers of the project: no circle among project modules, no import that runs up a layer.

The modules are read with :mod:`ast` (nothing is imported). Every ``import``/``from ... import``
counts, at module level or inside a function, absolute or relative; ``from pkg import name``
is an edge to the submodule ``pkg.name`` when that is a module, else to ``pkg`` itself.
Importing ``a.b.c`` is an edge to ``a.b.c`` only, not to the packages ``a`` and ``a.b`` whose
``__init__`` Python runs first (the project's package ``__init__`` files import nothing that
imports back). Imports built from strings at run time (``importlib.import_module(name)``) are
not seen: the project uses one, for the ``creditflow`` tools table in ``flows/cli.py``, and it
points within ``flows``.

Layers, lowest first; a module may import modules of its own layer or a lower one:

====  =====================  ===============================================================
 0    foundation             ``stages.config_fields`` (config fields and their rules)
 1    environment library    ``environments`` and all of it except the stage-1 modules:
                             the environment protocol, ground-truth credit type, family
                             registry, task families, sandbox backends
 2    stage data             ``stages.schema`` (Trajectory / Batch / CreditResult / Overhead)
 3    stages                 every other ``stages`` module, and the stage-1 modules
                             ``environments.construct`` (slots) and ``environments.start``
                             (start, retry, replay, play slots), which use stage data
 4    orchestration          ``flows``
 5    entry points           ``benchmarks``, ``tests``
====  =====================  ===============================================================

So environments never import the stages (the ground-truth type lives in
``environments.ground_truth``), and neither stages nor environments import ``flows``. Besides,
``stages`` and ``environments`` never import ``prefect`` or ``mlflow`` (DESIGN.md, "Rule of the
house"). Within a layer, circles are what the cycle check refuses.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "environments", "flows", "benchmarks", "tests")

#: (layer, name, rule): the first rule that matches a module decides its layer (longest prefix first)
LAYERS: list[tuple[int, str, tuple[str, ...]]] = [
    (0, "foundation", ("stages.config_fields",)),
    (2, "stage data", ("stages.schema",)),
    (3, "stages", ("environments.construct", "environments.start")),
    (1, "environment library", ("environments",)),
    (3, "stages", ("stages",)),
    (4, "orchestration", ("flows",)),
    (5, "entry points", ("benchmarks", "tests")),
]
#: third-party packages the pure layers (stages, environments) never import
FORBIDDEN_IN_PURE = ("prefect", "mlflow")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every .py under the project's top-level packages."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[module_name(path, root)] = path
    return out


def _resolve(name: str, modules: set[str]) -> Optional[str]:
    """The longest prefix of dotted ``name`` that is a project module (None: not ours)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in modules:
            return cand
    return None


def imports_of(mod: str, path: Path, modules: set[str]) -> Iterable[tuple[str, int, str]]:
    """``(imported name, line, kind)`` for every import in the file; kind is ``project`` for a
    project module (resolved as the module docstring says) or ``external`` for the top-level
    name of anything else."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target is not None:
                    yield target, node.lineno, "project"
                else:
                    yield alias.name.split(".")[0], node.lineno, "external"
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            target = _resolve(source, modules)
            if target is None:
                yield source.split(".")[0], node.lineno, "external"
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                yield (sub if sub in modules else target), node.lineno, "project"


def import_graph(root: Path = ROOT) -> tuple[dict[str, dict[str, int]], dict[str, Path], list[tuple[str, str, int]]]:
    """``(edges, files, externals)``: edges[a][b] = first line of ``a`` that imports ``b``;
    externals = (module, top-level external name, line)."""
    files = project_files(root)
    modules = set(files)
    edges: dict[str, dict[str, int]] = {m: {} for m in files}
    externals: list[tuple[str, str, int]] = []
    for mod, path in files.items():
        for target, line, kind in imports_of(mod, path, modules):
            if kind == "external":
                externals.append((mod, target, line))
            elif target != mod:
                edges[mod].setdefault(target, line)
    return edges, files, externals


def strongly_connected(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative); only those with more than one module
    or a self-loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on_stack.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1 or v in edges[v]:
                        out.append(sorted(comp))
                continue
            if w not in edges:
                continue
            if w not in index:
                index[w] = low[w] = counter
                counter += 1
                stack.append(w)
                on_stack.add(w)
                work.append((w, iter(sorted(edges[w]))))
            elif w in on_stack:
                low[v] = min(low[v], index[w])
    return out


def cycle_in(comp: list[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """One concrete circle inside a strongly connected component: a -> b -> ... -> a."""
    members = set(comp)
    start = comp[0]
    # breadth-first from start's successors back to start, inside the component
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w not in members or w in prev:
                    continue
                prev[w] = v
                if w == start:
                    path = [start]
                    x = v
                    while x != start:
                        path.append(x)
                        x = prev[x]
                    path.append(start)
                    return list(reversed(path))
                nxt.append(w)
        frontier = nxt
    return comp


def layer_of(mod: str) -> tuple[int, str]:
    for layer, name, prefixes in LAYERS:
        if any(mod == p or mod.startswith(p + ".") for p in prefixes):
            return layer, name
    raise AssertionError(f"module {mod!r} has no layer: add it to LAYERS in {Path(__file__).name}")


def _where(files: dict[str, Path], mod: str, line: int, root: Path = ROOT) -> str:
    return f"{files[mod].relative_to(root)}:{line}"


def circle_violations(root: Path = ROOT) -> list[str]:
    edges, files, _ = import_graph(root)
    out = []
    for comp in strongly_connected(edges):
        path = cycle_in(comp, edges)
        hops = ", ".join(f"{a} -> {b} ({_where(files, a, edges[a][b], root)})" for a, b in zip(path, path[1:]))
        more = f" (one circle of {len(comp)} mutually importing modules: {', '.join(comp)})" if len(comp) > len(path) - 1 else ""
        out.append(f"import circle {' -> '.join(path)}: {hops}{more}")
    return out


def upward_violations(root: Path = ROOT) -> list[str]:
    edges, files, externals = import_graph(root)
    out = []
    for a in sorted(edges):
        la, na = layer_of(a)
        for b, line in sorted(edges[a].items(), key=lambda kv: kv[1]):
            lb, nb = layer_of(b)
            if lb > la:
                out.append(f"{_where(files, a, line, root)}: {a} (layer {la}, {na}) imports {b} (layer {lb}, {nb})")
    for mod, name, line in externals:
        if mod.split(".")[0] in ("stages", "environments") and name in FORBIDDEN_IN_PURE:
            out.append(f"{_where(files, mod, line, root)}: {mod} imports {name} (stages/ and environments/ never do)")
    return out


def test_every_module_has_a_layer():
    edges, _, _ = import_graph()
    assert len(edges) > 50
    for mod in edges:
        layer_of(mod)


def test_no_import_circle():
    bad = circle_violations()
    assert not bad, "\n".join(bad)


def test_no_upward_import():
    bad = upward_violations()
    assert not bad, "\n".join(bad)


# --- the checker itself, on small made-up trees ------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
    return tmp_path


def test_checker_names_a_circle_through_a_function_level_relative_import(tmp_path):
    root = _tree(tmp_path, {
        "stages/__init__.py": "",
        "stages/credit/__init__.py": "",
        "stages/credit/base.py": "def load():\n    from . import methods\n",
        "stages/credit/methods/__init__.py": "from stages.credit.methods import episode\n",
        "stages/credit/methods/episode.py": "import os\nfrom ..base import load\n",
        "stages/credit/other.py": "import stages.credit.base\n",
    })
    bad = circle_violations(root)
    assert len(bad) == 1
    assert bad[0].startswith("import circle stages.credit.base -> stages.credit.methods -> "
                             "stages.credit.methods.episode -> stages.credit.base")
    assert "stages/credit/base.py:2" in bad[0] and "stages/credit/methods/episode.py:2" in bad[0]


def test_checker_names_an_upward_edge_and_a_forbidden_library(tmp_path):
    root = _tree(tmp_path, {
        "stages/__init__.py": "",
        "stages/schema.py": "import torch\n",
        "stages/config_fields.py": "",
        "environments/__init__.py": "",
        "environments/base.py": "from stages.config_fields import param\nfrom stages import schema\n",
        "environments/construct.py": "from stages.schema import Overhead\n",
        "stages/reward.py": "def main():\n    import mlflow\n    from flows.cli import run\n",
        "flows/__init__.py": "",
        "flows/config.py": "import os\n",
        "flows/train.py": "from stages import reward  # downward: fine\n",
        "flows/cli.py": "from flows.config import x\n",
    })
    bad = upward_violations(root)
    assert bad == [
        "environments/base.py:2: environments.base (layer 1, environment library) imports stages.schema (layer 2, stage data)",
        "stages/reward.py:3: stages.reward (layer 3, stages) imports flows.cli (layer 4, orchestration)",
        "stages/reward.py:2: stages.reward imports mlflow (stages/ and environments/ never do)",
    ]
    assert circle_violations(root) == []
