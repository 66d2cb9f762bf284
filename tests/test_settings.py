"""Every environment variable the code reads is in ``attnlib.settings.ENV_VARS``, and the docs list exactly those."""
import ast
import importlib
import pathlib
import re

from attnlib import cli, settings

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("attnlib", "attnlib_kernels", "models_ref") for p in (ROOT / d).rglob("*.py"))


def _constant(tree: ast.Module, module: str, node: ast.expr):
    """The string an argument naming a variable stands for: a literal, a module-level ``NAME = "..."``, or a
    name / attribute imported from ``attnlib.settings``; None when it is none of these."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "settings":
        return getattr(settings, node.attr, None)
    if isinstance(node, ast.Name):
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == node.id for t in stmt.targets):
                return _constant(tree, module, stmt.value)
            if isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.module.endswith("settings"):
                for alias in stmt.names:
                    if (alias.asname or alias.name) == node.id:
                        return getattr(settings, alias.name, None)
    return None


def _environment_reads(path: pathlib.Path):
    """``(line, name or None)`` for every use of ``os.environ`` / ``os.getenv`` in ``path``."""
    tree = ast.parse(path.read_text())
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    module = path.stem
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"
                and node.attr in ("environ", "getenv")):
            continue
        parent = parents.get(node)
        if node.attr == "getenv" and isinstance(parent, ast.Call):
            out.append((node.lineno, _constant(tree, module, parent.args[0])))
        elif isinstance(parent, ast.Attribute) and parent.attr in ("get", "pop", "setdefault"):
            call = parents.get(parent)
            out.append((node.lineno, _constant(tree, module, call.args[0]) if isinstance(call, ast.Call) else None))
        elif isinstance(parent, ast.Subscript):
            out.append((node.lineno, _constant(tree, module, parent.slice)))
        elif isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name) and parent.func.id == "dict":
            out += [(node.lineno, kw.arg) for kw in parent.keywords]       # dict(os.environ, NAME=...)
        else:
            out.append((node.lineno, None))
    return out


def test_every_environment_read_uses_a_name_from_the_table():
    seen, wrong = set(), []
    for path in SOURCES:
        if path.name == "settings.py":       # it reads the table's own names, row by row
            continue
        for line, name in _environment_reads(path):
            rel = f"{path.relative_to(ROOT)}:{line}"
            if name is None:
                wrong.append(f"{rel}: the variable's name is not a literal, a module constant or a settings name")
            elif name not in settings.NAMES:
                wrong.append(f"{rel}: {name} is not in attnlib.settings.ENV_VARS")
            else:
                seen.add(name)
    assert not wrong, "\n".join(wrong)
    assert seen == settings.NAMES, f"in the table but read nowhere: {sorted(settings.NAMES - seen)}"


def test_the_low_level_table_imports_nothing_from_attnlib():
    tree = ast.parse((ROOT / "attnlib" / "settings.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(not (isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("attnlib")))
               for n in imports)


def test_configuration_docs_embed_the_table_and_name_no_other_variable():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert settings.markdown_table() in page, "docs/configuration.md is stale: paste `attnlib info --env`"
    pattern = re.compile(r"\b(?:ATTNLIB|DIFFUSION_ATTENTION|TRITON|TORCHINDUCTOR)_[A-Z0-9_]+\b")
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        unknown = set(pattern.findall(doc.read_text())) - settings.NAMES
        assert not unknown, f"{doc.name} names variables attnlib does not read: {sorted(unknown)}"


def test_info_prints_each_variable_with_its_value(monkeypatch, capsys):
    monkeypatch.setenv(settings.FLEX_CPU_GUARD, "1")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in settings.NAMES:
        assert name in out
    assert re.search(rf"{settings.FLEX_CPU_GUARD}\s+= '1'", out)
    assert cli.main(["info", "--env"]) == 0
    assert capsys.readouterr().out.strip() == settings.markdown_table()


def test_modules_name_the_variables_through_settings():
    registry = importlib.import_module("attnlib.registry")
    assert (registry.ENV_BACKEND, registry.ENV_FALLBACK) == (settings.BACKEND, settings.FALLBACK)
    assert registry.FALLBACK_POLICIES is settings.FALLBACK_POLICIES
