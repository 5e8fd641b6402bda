"""The suite's own house rules (issue 20), checked on every test file so they cannot regress:
no test module imports another test module or a conftest; no port is picked at import time; no
test sets an environment variable it does not restore; no test finds processes by name across
the machine (tests/raynodes.py finds a test's own Ray processes from its temp dir)."""

import ast
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
FILES = sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported_modules(tree: ast.Module) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def _top_level_calls(tree: ast.Module, name: str) -> list[int]:
    """Lines of calls to `name` that run at import time (outside any def or class body)."""
    lines = []
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for node in ast.walk(stmt):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name | ast.Attribute)
                and (getattr(node.func, "id", None) or getattr(node.func, "attr", None)) == name
            ):
                lines.append(node.lineno)
    return lines


def _environ_writes(tree: ast.Module) -> list[int]:
    """Lines that write os.environ directly (a monkeypatch restores; these do not)."""
    lines = []
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            target = next((t for t in targets if isinstance(t, ast.Subscript)), None)
            target = target.value if target is not None else None
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"update", "setdefault", "pop", "__setitem__"}
        ):
            target = node.func.value
        if isinstance(target, ast.Attribute) and target.attr == "environ":
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(TESTS)))
def test_file_follows_the_suite_rules(path):
    tree = _tree(path)
    imported = _imported_modules(tree)
    bad = [m for m in imported if m == "conftest" or m.split(".")[-1].startswith("test_")]
    assert not bad, f"{path.name} imports a test module or a conftest: {bad}"
    assert not _top_level_calls(tree, "free_port"), f"{path.name}: a port picked at import time"
    assert not _environ_writes(tree), f"{path.name}: os.environ written without restoring it"
    searches = _machine_wide(path.read_text())
    assert not searches or path.name == Path(__file__).name, (
        f"{path.name}: processes found by name machine-wide ({searches}); use "
        "aigc_ray.cluster.process_tree of the test's own Ray node, raynodes.actor_pids or Ray's "
        "state API"
    )


# Ways to find (or kill) processes across the whole machine, by name or command line: psutil's
# iteration over every process, the p-grep family, and reading every /proc entry. Spelled in
# parts, so that a search of tests/ for these calls finds real uses only, not this rule.
MACHINE_WIDE = tuple(
    "".join(parts)
    for parts in (
        ("process", "_iter"),
        ("p", "grep"),
        ("p", "kill"),
        ("kill", "all"),
        ("pid", "of"),
        ("psutil", ".pids"),
    )
)
ITER, PKILL = MACHINE_WIDE[0], MACHINE_WIDE[2]


def _machine_wide(text: str) -> list[str]:
    return [w for w in MACHINE_WIDE if re.search(rf"\b{re.escape(w)}\b", text)]


def test_the_package_never_searches_the_machine_for_processes():
    """`aigc-ray cluster local down` stops the processes under the head's pid, not every
    process whose command line looks like the cluster's."""
    pkg = TESTS.parent / "aigc_ray"
    found = [p.name for p in pkg.rglob("*.py") if _machine_wide(p.read_text())]
    assert not found, found


def test_the_rules_catch_what_they_forbid():
    """Each check above fires on a file that breaks it (so the parametrized test can fail)."""
    bad = ast.parse(
        "import os\nfrom test_engine import x\nfrom conftest import y\n"
        "PORT = free_port()\nos.environ['A'] = '1'\nos.environ.update(B='2')\n"
        "def f():\n    free_port()\n"
    )
    assert _imported_modules(bad) == ["os", "test_engine", "conftest"]
    assert _machine_wide(f"subprocess.run(['{PKILL}', '-f', 'raylet'])") == [PKILL]
    assert _machine_wide(f"for p in psutil.{ITER}(): pass") == [ITER]
    assert _machine_wide("procs = process_tree(node_pid)") == []
    assert _top_level_calls(bad, "free_port") == [4]
    assert _environ_writes(bad) == [5, 6]
