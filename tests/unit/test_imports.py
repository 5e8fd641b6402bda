"""Every module imports, and model/engine code never imports Ray (it runs in processes that
need not have it, and is testable without it)."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import aigc_ray

MODULES = sorted(m.name for m in pkgutil.walk_packages(aigc_ray.__path__, "aigc_ray."))


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


def test_model_engine_and_optimize_code_never_import_ray():
    code = (
        "import sys, aigc_ray.model, aigc_ray.engine, aigc_ray.engine.vllm_engine, "
        "aigc_ray.optimize, aigc_ray.serve.protocol; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
