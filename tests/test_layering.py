"""The package's layers, enforced: each subpackage imports only from the layers below it (never from the UI),
and no two modules import each other in a loop.

`python tests/test_layering.py` prints the layer -> layer import edges (what docs/architecture.md shows);
`--at REV` reads the tree of a git revision instead (the flat layout before the subpackages is mapped with
OLD_HOMES, the layer each old module's code moved to).
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# bottom to top; a module may import its own subpackage and anything lower, never higher
LAYERS = ("infra", "config", "data", "model", "interventions", "method", "eval", "run", "cli", "studio")
TOP = {"cli", "studio"}  # the two faces: both drive the engine, neither knows the other
OLD_HOMES = {  # the flat layout of 2a9d66e: where each module's code lives now
    "cache_io": "infra", "distributed": "infra", "config": "config", "data": "data", "splits": "data",
    "models": "model", "preflight": "model", "neuron_map": "model", "tiny": "model", "scoring": "model",
    "hooks": "interventions", "modulation": "interventions", "gating": "interventions", "generation": "interventions",
    "attribution": "method", "neuron_scores": "method", "selection": "method", "metalearn": "method",
    "judge": "eval", "evaluate": "eval", "baselines": "eval", "sweep": "run", "evaluation_run": "run",
    "pipeline": "run", "export": "run", "jobs": "studio", "cli": "cli", "studio": "studio",
}


def sources(rev: str | None = None) -> dict[str, str]:
    """Module name (e.g. `neurontune.run.folder`) -> source, from the work tree or a git revision."""
    if rev is None:
        files = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in (ROOT / "neurontune").rglob("*.py")}
    else:
        names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "neurontune"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split()
        files = {n: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
                 for n in names if n.endswith(".py")}
    return {n[:-3].replace("/", ".").removesuffix(".__init__"): src for n, src in files.items()}


def imports(modules: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (module level and inside functions, absolute and relative)."""
    out = {}
    for name, src in modules.items():
        package = name if name + ".__init__" in modules or _is_package(name, modules) else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("neurontune")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                if not base.startswith("neurontune"):
                    continue
                for alias in node.names:  # `from . import x` imports the module x when there is one
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        out[name] = {m for m in found if m in modules and m != name}
    return out


def _is_package(name: str, modules: dict[str, str]) -> bool:
    return any(m.startswith(name + ".") for m in modules)


def layer_of(module: str, old: bool = False) -> str | None:
    """The layer of a project module (None for the package's face: neurontune, neurontune.__main__)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "__main__":
        return None
    return OLD_HOMES.get(parts[1], parts[1]) if old else parts[1]


def edges(graph: dict[str, set[str]], old: bool = False) -> Counter:
    """(from layer, to layer) -> number of module imports, across layers only."""
    count = Counter()
    for a, targets in graph.items():
        for b in targets:
            la, lb = layer_of(a, old), layer_of(b, old)
            if la and lb and la != lb:
                count[(la, lb)] += 1
    return count


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward(count: Counter) -> list[tuple[str, str, int]]:
    """Edges that import a higher layer, or one face importing the other."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [(a, b, n) for (a, b), n in sorted(count.items())
            if rank[b] > rank[a] or (a in TOP and b in TOP)]


# -- tests --------------------------------------------------------------------------------------------
def test_every_module_lives_in_a_known_layer():
    modules = sources()
    strays = [m for m in modules if layer_of(m) is not None and layer_of(m) not in LAYERS]
    assert strays == [], f"modules outside the layers {LAYERS}: {strays}; move them into a layer (and update LAYERS)"


def test_imports_only_go_down():
    graph = imports(sources())
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for a, targets in graph.items():
        for b in targets:
            la, lb = layer_of(a), layer_of(b)
            if la is None or lb is None or la == lb:
                continue
            if rank[lb] > rank[la] or (la in TOP and lb in TOP):
                bad.append(f"{a} -> {b}")
    assert bad == [], "imports that run up the layers (" + " < ".join(LAYERS) + "):\n" + "\n".join(bad)


def test_nothing_below_the_ui_imports_it():
    graph = imports(sources())
    assert [a for a, t in graph.items() if layer_of(a) not in ("studio", None) and any(layer_of(b) == "studio" for b in t)] == []


def test_no_import_cycles():
    assert cycles(imports(sources())) == []


def test_the_checker_catches_a_loop_and_an_upward_import():
    """On a made-up tree: a model module and a method module importing each other are one loop, and the model
    -> method import runs up the layers (this runs everywhere, also in a clone without history)."""
    tree = {"neurontune": "", "neurontune.model": "", "neurontune.method": "",
            "neurontune.model.a": "from ..method import b\n", "neurontune.method.b": "from ..model import a\n",
            "neurontune.method.c": "from ..model.a import x\n"}
    graph = imports(tree)
    assert graph["neurontune.model.a"] == {"neurontune.method.b"} and graph["neurontune.method.c"] == {"neurontune.model.a"}
    assert cycles(graph) == [["neurontune.method.b", "neurontune.model.a"]]
    assert upward(edges(graph)) == [("model", "method", 1)]


def test_the_checker_sees_what_it_should():
    """The rules above would catch the old layout's faults: its preflight <-> models loop and its config ->
    attribution import up the layers (read from the commit before the subpackages)."""
    try:
        old = sources("2a9d66e")
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("commit 2a9d66e is not in this clone (a shallow clone?): `git fetch --unshallow` to read the old layout")
    graph = imports(old)
    assert ["neurontune.models", "neurontune.preflight"] in cycles(graph)
    assert ("config", "method", 1) in upward(edges(graph, old=True))


def _definitions() -> list[tuple[str, str]]:
    """(file, name) of every module-level function, class and constant, and every method, of the package."""
    out = []
    for path in sorted((ROOT / "neurontune").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        rel = path.relative_to(ROOT).as_posix()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                out.append((rel, node.name))
            elif isinstance(node, ast.Assign):
                out += [(rel, t.id) for t in node.targets if isinstance(t, ast.Name)]
            if isinstance(node, ast.ClassDef):
                out += [(rel, m.name) for m in node.body if isinstance(m, ast.FunctionDef)]
    return [(f, n) for f, n in out if not n.startswith("__")]


def test_nothing_is_defined_and_never_used():
    """Every function, class, constant and method of the package is named somewhere besides its definition (the
    package, the tests, the benchmarks or app.py): nothing written and never called."""
    corpus = "\n".join(p.read_text(encoding="utf-8") for pattern in ("neurontune/**/*.py", "tests/*.py", "bench/**/*.py", "app.py")
                       for p in ROOT.glob(pattern))
    unused = [f"{f}: {n}" for f, n in _definitions()
              if len(re.findall(rf"\b{re.escape(n)}\b", corpus)) <= 1]
    assert unused == [], "defined but never used (delete them, or use them):\n" + "\n".join(unused)


def test_comments_name_modules_that_exist():
    """Comments and docstrings name today's modules: a `neurontune/...py` path exists, and no flat-layout module
    that is gone (`cache_io`, `pipeline` ...; not a name the code still uses, like the function `evaluate`) is named."""
    modules = sources()
    now = {m.rsplit(".", 1)[-1] for m in modules}
    now |= {getattr(node, attr) for src in modules.values() for node in ast.walk(ast.parse(src))
            for attr in ("id", "attr", "name", "arg") if isinstance(getattr(node, attr, None), str)}
    retired = [old for old in OLD_HOMES if old not in now]
    stale = []
    for name, src in modules.items():
        stale += [f"{name}: {m.group()}" for m in re.finditer(r"neurontune/[\w/]+\.py", src) if not (ROOT / m.group()).exists()]
        stale += [f"{name}: {m.group()}" for old in retired for m in re.finditer(rf"`{old}`|\bneurontune\.{old}\b|\b{old}\.py\b", src)]
    assert stale == [], "stale module names:\n" + "\n".join(stale)


def test_only_the_run_folder_names_run_files():
    """`RunFolder` is the one code that names a run's files: no other module spells "eval.json", "README.md" ..."""
    from neurontune.run.folder import RunFolder
    names = RunFolder.names()
    found = [f"{name}: {node.value!r}" for name, src in sources().items() if name != "neurontune.run.folder"
             for node in ast.walk(ast.parse(src)) if isinstance(node, ast.Constant) and node.value in names]
    assert found == [], "run file names spelled outside run/folder.py (use RunFolder's constants):\n" + "\n".join(found)


def main(argv: list[str]) -> None:
    rev = argv[argv.index("--at") + 1] if "--at" in argv else None
    modules = sources(rev)
    old = rev is not None and "neurontune.cache_io" in modules
    graph = imports(modules)
    count = edges(graph, old)
    print(f"{'revision ' + rev if rev else 'work tree'}: {len(modules)} modules, {sum(map(len, graph.values()))} imports")
    print("layer -> layer (module imports):")
    for (a, b), n in sorted(count.items(), key=lambda kv: (LAYERS.index(kv[0][0]), LAYERS.index(kv[0][1]))):
        print(f"  {a:>13} -> {b:<13} {n}")
    up = upward(count)
    print(f"upward: {sum(n for *_, n in up)} imports in {len(up)} edges" + "".join(f"\n  {a} -> {b} ({n})" for a, b, n in up))
    print(f"cycles: {cycles(graph) or 'none'}")


if __name__ == "__main__":
    main(sys.argv[1:])
