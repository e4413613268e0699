"""The source tree's seams: lint clean, no module reaching into another's underscore names, no import cycles.

Read from the source with ``ast`` (no imports run), so a cycle that Python happens to tolerate at import time,
because one side imports late, is still found."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "omnitransfer"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name a ``from ... import`` statement in ``module`` reads from."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, tree: ast.Module, known: set[str], is_package: bool) -> list[tuple[str, str, int]]:
    """(imported project module, name imported from it or "", line) for each import in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            source = absolute(module, is_package, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in known:  # `from . import submodule`
                    found.append((f"{source}.{alias.name}", "", node.lineno))
                elif source in known:
                    found.append((source, alias.name, node.lineno))
    return found


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    ruff = str(Path(sys.executable).parent / "ruff")  # the test extra installs it beside the interpreter
    paths = ["src", "tests", "scripts", "benchmarks"]
    result = subprocess.run([ruff, *command, *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def private_uses(module: str, tree: ast.Module, known: set[str], is_package: bool) -> list[str]:
    """Where ``module`` imports another project module's underscore name or reads ``x._name`` off one."""
    found, aliases = [], {}  # aliases: local name -> project module (`from . import x`, `import omnitransfer.x`)
    for source, name, line in imports(module, tree, known, is_package):
        if name and private(name):
            found.append(f"{module}:{line} imports {source}.{name}")
        if not name:
            aliases[source.rsplit(".", 1)[-1]] = source
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and private(node.attr):
            if node.value.id in aliases:
                found.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each import cycle a depth-first walk of ``graph`` (module -> modules it imports) closes."""
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for following in sorted(graph.get(module, ())):
            if state.get(following) == "open":
                cycles.append(" -> ".join(path[path.index(following) :] + [following]))
            elif following not in state:
                visit(following, path + [following])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports. A package importing its own submodules (an
    ``__init__`` re-exporting them) is left out: that is not a cycle with them."""
    modules = project_modules()
    known, packages = set(modules), {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    graph = {}
    for module, tree in modules.items():
        sources = {source for source, _, _ in imports(module, tree, known, module in packages)}
        graph[module] = {s for s in sources if s != module and not s.startswith(module + ".")}
    return graph


def test_no_module_imports_another_modules_underscore_names():
    modules = project_modules()
    known, packages = set(modules), {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert [use for m, tree in modules.items() for use in private_uses(m, tree, known, m in packages)] == []


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_the_checks_find_what_they_look_for():
    """The readers see a private import, a private attribute of an imported module and a cycle."""
    tree = ast.parse("from .pipeline import _secret, Public\nfrom . import video\nvideo._hidden()\nvideo.shown()\n")
    known = {"omnitransfer.pipeline", "omnitransfer.video", "omnitransfer.cli"}
    assert private_uses("omnitransfer.cli", tree, known, is_package=False) == [
        "omnitransfer.cli:1 imports omnitransfer.pipeline._secret",
        "omnitransfer.cli:3 uses omnitransfer.video._hidden",
    ]
    nested = ast.parse("from ..errors import InputError\n").body[0]
    assert absolute("omnitransfer.training.trainer", False, nested) == "omnitransfer.errors"
    inside = ast.parse("from .cache import X\n").body[0]
    assert absolute("omnitransfer.training", True, inside) == "omnitransfer.training.cache"
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    assert "omnitransfer.pipeline" in import_graph()["omnitransfer.cli"]


def test_the_command_line_starts_without_torch():
    """Bad arguments are refused in about a second: the CLI module imports no torch, diffusers or transformers
    until a command needs them (every bad-input test and every user's typo pays this start-up)."""
    code = "import sys, omnitransfer.cli; print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
