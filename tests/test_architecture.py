"""The shape of the code, measured: no import cycles, no private names imported across modules, mask
classes tested by type only at the edge, and no backend module repeating another's lines.

An ``ast`` walk of ``attnlib/`` (imports inside functions included): a module imports another when it
names it, or a name from it, in any ``import`` statement.
"""
import ast
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "attnlib"
MASK_CLASSES = {"Causal", "BlockDiagonal", "KeyPadding", "DenseMask", "BlockSparse", "Mask"}
#: isinstance tests on mask classes allowed outside attnlib/masks.py and attnlib/plan.py
ISINSTANCE_BUDGET = 6


def _modules():
    mods = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        mods[name] = path
    return mods


def _walk():
    mods = _modules()
    edges, private, isinstances = collections.defaultdict(set), [], []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "attnlib":
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    edges[name].add(full if full in mods else target)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and target != name:
                        private.append(f"{name} imports {target}.{alias.name}")
            elif isinstance(node, ast.Import):
                edges[name].update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                if names & MASK_CLASSES and name not in ("attnlib.masks", "attnlib.plan"):
                    isinstances.append(f"{name}:{node.lineno}")
    # a package's __init__ importing its own submodules is not a cycle through its children
    graph = {m: {t for t in ts if t in mods and not (mods[t].name == "__init__.py" and m.startswith(t + "."))}
             for m, ts in edges.items()}
    return mods, graph, private, isinstances


def _cycles(graph):
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    _, graph, _, _ = _walk()
    assert _cycles(graph) == []


def test_no_private_names_imported_across_modules():
    _, _, private, _ = _walk()
    assert private == []


def test_masks_are_tested_by_type_only_at_the_edge():
    _, _, _, found = _walk()
    assert len(found) <= ISINSTANCE_BUDGET, found


def test_backends_do_not_import_each_other_and_read_no_mask_classes():
    _, graph, _, _ = _walk()
    backends = {m for m in graph if m.startswith("attnlib.backends.") and m not in ("attnlib.backends.base",
                                                                                    "attnlib.backends.common")}
    for m in backends:
        assert not (graph[m] & (backends - {m})), m
        assert "attnlib.masks" not in graph[m], f"{m} reads masks; backends read the plan"


def _normalized_lines(path):
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#") and s not in ("", ")", "]", "}", "):", "else:", "try:", "return out"):
            out.append((n, s))
    return out


def test_no_run_of_six_lines_repeated_across_backend_modules():
    paths = sorted((PKG / "backends").glob("*.py"))
    seen = {}
    repeats = []
    for path in paths:
        lines = _normalized_lines(path)
        for i in range(len(lines) - 5):
            key = tuple(s for _, s in lines[i:i + 6])
            where = (path.name, lines[i][0])
            first = seen.setdefault(key, where)
            if first[0] != path.name:
                repeats.append(f"{first[0]}:{first[1]} and {path.name}:{lines[i][0]}")
    assert repeats == []
