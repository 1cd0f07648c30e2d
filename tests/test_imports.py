"""minisae's module graph, read from the source (ast, every import statement, top-level and inside
functions alike): it has no cycle, the one-way doors hold (sae/ and models/ import nothing above
them), and no module imports another module's private name."""

import ast
from pathlib import Path

import minisae

ROOT = Path(minisae.__file__).parent
ABOVE = ("training", "dist", "eval", "experiment", "cli", "data")  # the pipeline, built on sae/, models/, io/
FOUNDATION = ("minisae.errors", "minisae.xp", "minisae.threads", "minisae.sites", "minisae.progress")


def module_name(path):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name):
    """[(imported module, names imported from it)] of every import statement in module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, ()) for a in node.names if a.name.startswith("minisae")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if not base.startswith("minisae"):
                continue
            names = [a.name for a in node.names]
            out += [(f"{base}.{n}", ()) for n in names if f"{base}.{n}" in MODULES]  # from package import module
            rest = tuple(n for n in names if f"{base}.{n}" not in MODULES)
            if rest:
                out.append((base, rest))
    return out


def graph():
    return {name: sorted({m for m, _ in imports(name) if m in MODULES and m != name}) for name in MODULES}


def find_cycle(edges):
    """One cycle as a list of modules, or None (iterative depth-first search)."""
    state = {}  # 1 on the stack, 2 done
    for start in edges:
        if state.get(start):
            continue
        stack, path = [(start, iter(edges[start]))], [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(edges[child])))
                path.append(child)
    return None


def test_the_module_graph_finds_a_planted_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": []}) in (["a", "b", "c", "a"],)
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None
    assert ("minisae.io.saelens", ()) in imports("minisae.io.saefile")


def test_no_import_cycle_among_minisae_modules():
    # the package itself is left out: minisae.SAE etc. are looked up lazily (module __getattr__)
    edges = {n: [m for m in ms if m != "minisae"] for n, ms in graph().items() if n != "minisae"}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_sae_and_models_import_nothing_above_them():
    for name, deps in graph().items():
        if name.startswith("minisae.sae"):
            allowed = ("minisae.sae",) + FOUNDATION
        elif name.startswith("minisae.models"):
            allowed = ("minisae.models", "minisae.io") + FOUNDATION
        else:
            continue
        bad = [m for m in deps if not m.startswith(allowed) or m.split(".")[1] in ABOVE]
        assert not bad, f"{name} imports {bad}"


def test_the_packages_import_each_other_one_way():
    # package level: sae <- io <- models, data <- eval <- training <- experiment <- cli (dist
    # beside training); a lazy import inside a function counts like any other
    def package(name):
        parts = name.split(".")
        return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1]).is_dir()) else "foundation"

    edges = {}
    for name, deps in graph().items():
        if name == "minisae":
            continue
        edges.setdefault(package(name), set()).update(package(m) for m in deps if m != "minisae")
    edges = {p: sorted(d - {p}) for p, d in edges.items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))
    assert edges["foundation"] == [] and edges["sae"] == ["foundation"]
    assert set(edges["io"]) <= {"sae", "foundation"}
    assert not set(edges["eval"]) & {"training", "experiment", "cli"}
    assert not set(edges["training"]) & {"experiment", "cli"}


CHECKED_FOR_PRIVATE = ("minisae.io", "minisae.sae")  # (the rest: a list in the report of issue 19)


def test_no_module_imports_a_private_name_of_another():
    found = [(name, m, n) for name in MODULES for m, names in imports(name) for n in names
             if n.startswith("_") and not n.startswith("__") and m != name
             and (name.startswith(CHECKED_FOR_PRIVATE) or m.startswith(CHECKED_FOR_PRIVATE))]
    assert not found, found
