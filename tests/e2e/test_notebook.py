"""notebooks/quickstart.ipynb runs top to bottom in the venv's python3 kernel, cleans up after
itself, and is stored with its outputs stripped.

The kernel starts its own local Ray (pytest runs tests/e2e before the integration tier starts the
shared instance), so the test also checks that no Ray process and no Serve port outlive it: the
processes are this test's own (its process tree, kept whole while the notebook runs), never
searched for across the machine.

The test proves the notebook's plumbing, not learning: through AIGC_RAY_QUICKSTART_OVERRIDES and
AIGC_RAY_QUICKSTART_IMAGE_OVERRIDES (the notebook's environment overrides, which a user leaves
unset) it runs each step on a smaller model, fewer documents and steps, and fewer images, and
serves on a port picked when the test starts, on the built-in engine (see TEXT_OVERRIDES)."""

import contextlib
import ctypes
import os
import sys
import time
from pathlib import Path

import psutil
import pytest
from ports import free_port, listening

from aigc_ray.cluster import process_tree

pytestmark = pytest.mark.e2e  # the quick tier keeps the tests not marked slow here
ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
# The notebook's values, made smaller for the test (serve.port is added where the test starts).
TEXT_OVERRIDES = [
    "data.max_docs=100",
    "data.vocab_size=1024",
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "train.max_steps=10",
    "train.eval_every=10",
    "train.checkpoint_every=10",
    "train.warmup_steps=2",
    "train.eval_batches=2",
    # The built-in engine: with `auto` both the served model and batch generation would start
    # vLLM (compiled, ~1 min each here). The notebook's calls are engine-independent; `auto`
    # choosing vLLM is the pipeline test's path, and vLLM's own serving and batch generation
    # are tests/integration's (test_serve.py, test_batch_generation.py, test_serve_privacy.py).
    "serve.engine=builtin",
    "generate.engine=builtin",
]
SAMPLE_IMAGES = 10  # the notebook asks for 40; one per class is the least the config accepts
IMAGE_OVERRIDES = [
    "images.train.max_steps=10",
    "images.train.eval_every=10",
    "images.train.checkpoint_every=10",
    "images.train.sample_steps=5",
    f"images.sample_images={SAMPLE_IMAGES}",
    "serve.num_inference_steps=5",
]


@contextlib.contextmanager
def _keeping_descendants():
    """This test's process is a child subreaper (Linux) for the block: whatever the notebook's
    kernel starts (its local Ray, Serve's processes) stays in this process's tree even once the
    kernel has exited, instead of being re-parented to init. Yields the pids already there."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER on
    try:
        yield {p.pid for p in process_tree(os.getpid())}
    finally:
        libc.prctl(36, 0, 0, 0, 0)
        for child in psutil.Process().children():  # reap what ended under us
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, 0)


def _started_since(before: set[int]) -> list[int]:
    """Live processes of this test's tree that were not there before the notebook ran."""
    return [p.pid for p in process_tree(os.getpid()) if p.pid not in before]


def _text_of(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_notebook_is_stored_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert all(not c.outputs and c.execution_count is None for c in code), "strip the outputs"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    # jupyter_client runs a kernelspec whose argv[0] is "python" with sys.executable: this venv.
    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    assert argv0 in {"python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"} or (
        Path(argv0).resolve() == Path(sys.executable).resolve()
    ), f"kernel python3 runs {argv0}, not this venv's {sys.executable}"
    serve_port = free_port()

    work = tmp_path / "quickstart"
    monkeypatch.setenv("AIGC_RAY_QUICKSTART_DIR", str(work))
    port = f"serve.port={serve_port}"
    monkeypatch.setenv("AIGC_RAY_QUICKSTART_OVERRIDES", " ".join([*TEXT_OVERRIDES, port]))
    monkeypatch.setenv("AIGC_RAY_QUICKSTART_IMAGE_OVERRIDES", " ".join([*IMAGE_OVERRIDES, port]))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    for var in ("RAY_ADDRESS", "AIGC_RAY_API_KEYS", "AIGC_RAY_API_KEYS_FILE"):
        monkeypatch.delenv(var, raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    with _keeping_descendants() as before:
        try:
            client.execute()  # raises CellExecutionError on the first failing cell
        finally:
            deadline = time.time() + 30
            while _started_since(before) and time.time() < deadline:
                time.sleep(1)
            leftover = _started_since(before)
    assert not leftover, f"processes started by the notebook are still running: {leftover}"
    assert not listening(serve_port), "the Serve endpoint outlived the notebook"

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    text = "\n".join(_text_of(c) for c in code)
    for expected in (
        "overrides from the environment: data.max_docs=100",
        f"serve  'aigc-tiny' on 127.0.0.1:{serve_port}",  # the test's overrides took effect
        "model  2 layers x 64, 2 heads",
        "train  2 workers x 10 steps",
        "documents read     100\n",
        "steps              10\n",
        "train blocks",
        "val loss",
        "models: ['aigc-tiny']",
        "--- 'def fibonacci(n):'",
        "--- 'import os\\n'",
        "batch generation   5 rows, 1 errors",
        "'x = 1'",
        "one request: 2 images",
        f"samples        {SAMPLE_IMAGES} over HTTP",  # the notebook's 40, overridden
        "aigc_ray image pipeline summary",
    ):
        assert expected in text, f"notebook output lacks {expected!r}"
    plots = [o for c in code for o in c.outputs if o.get("data", {}).get("image/png")]
    assert len(plots) == 2, "the loss plot and the digits grid"
    assert (work / "digits-train" / "model" / "model_index.json").is_file()
    assert (work / "digits-train" / "served_samples.png").stat().st_size > 0
    assert "Ray stopped" in _text_of(code[-1])
    assert (work / "train" / "model" / "config.json").is_file()
    assert (work / "data" / "manifest.json").is_file()
    import pyarrow.parquet as pq

    rows = pq.read_table(work / "generate").to_pylist()
    assert len(rows) == 5 and sum(r["error"] is not None for r in rows) == 1
    short = next(r for r in rows if r["prompt"] == "import os\n")
    # the row's own max_tokens (8) wins over the config's 24
    assert short["error"] is None and 0 < short["completion_tokens"] <= 8
