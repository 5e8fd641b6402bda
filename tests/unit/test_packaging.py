"""What installing aigc_ray needs is declared in pyproject.toml: every third-party package the
code imports, and the Python floor the code needs (the suite here runs on that floor)."""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {
        re.split(r"[<>=\[ ;!~]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements
    }


def _imported_modules() -> set[str]:
    found = set()
    for path in (ROOT / "aigc_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"aigc_ray"}


def test_every_imported_package_is_declared():
    """A package the code imports is a dependency (or in the extra that enables its feature:
    vllm, peft), never something another package happens to pull in."""
    declared = _names(PROJECT["dependencies"])
    for extra in PROJECT["optional-dependencies"].values():
        declared |= _names(extra)
    dists = packages_distributions()
    missing = {}
    for module in sorted(_imported_modules()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            missing[module] = sorted(names)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_unstable_apis_have_upper_bounds():
    """torch (private oneDNN/int4 ops), compressed-tensors and fastapi: the bounds vLLM 0.32
    sets for them, so a new major release cannot break an install silently."""
    deps = {_names([r]).pop(): r for r in PROJECT["dependencies"]}
    for name in ("torch", "compressed-tensors", "fastapi", "ray", "transformers"):
        assert "<" in deps[name], f"{deps[name]} has no upper bound"


def test_the_code_parses_on_the_stated_python_floor():
    floor = re.fullmatch(r">=(\d+)\.(\d+)", PROJECT["requires-python"].split("#")[0].strip())
    assert floor, PROJECT["requires-python"]
    version = (int(floor.group(1)), int(floor.group(2)))
    assert version == (3, 11)  # asyncio.timeout (serving): 3.11
    assert sys.version_info[:2] >= version
    for path in (ROOT / "aigc_ray").rglob("*.py"):
        ast.parse(path.read_text(), filename=str(path), feature_version=version)
