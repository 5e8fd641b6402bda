"""End to end: the real `aigc-ray pipeline` command on the embedded corpus, minute-sized.

Runs in its own process with its own local Ray (the integration tier's shared instance is
not started yet: pytest runs tests/e2e first)."""

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_port

pytestmark = pytest.mark.e2e  # the quick tier keeps the tests not marked slow here
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_pipeline_command_end_to_end(tmp_path):
    overrides = [
        f"data.output_dir={tmp_path / 'data'}",
        # a slice of the corpus, a 2048-token vocabulary and 30 steps: enough for the 10%
        # validation-loss drop asserted below (2 runs: 7.676 -> 6.579, -14.3%, both)
        "data.max_docs=400",
        "data.vocab_size=2048",
        f"train.run_dir={tmp_path / 'train'}",
        "train.max_steps=30",
        "train.warmup_steps=5",
        "train.eval_every=30",
        "train.checkpoint_every=30",
        f"serve.port={free_port()}",
        "serve.sample_max_tokens=16",
        # the optimize step between train and serve: W8A8 int8, served on the int kernels
        "optimize.enabled=true",
        "optimize.quantization=w8a8",
        "optimize.benchmark=false",
        f"optimize.output_dir={tmp_path / 'optimized'}",
    ]
    exe = Path(sys.executable).with_name("aigc-ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [str(exe), "pipeline", "--config", "configs/tiny.yaml", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for label in (
        "documents",
        "tokens",
        "shards",
        "training",
        "train loss",
        "val loss",
        "model dir",
    ):
        assert re.search(rf"^{label}\s", out, re.M), f"summary lacks {label!r}:\n{out}"
    m = re.search(r"val loss\s+([\d.]+) untrained -> ([\d.]+) trained", out)
    assert float(m.group(2)) < 0.9 * float(m.group(1))
    assert out.count("  --- ") == 3, "three sample completions expected"
    assert (tmp_path / "train" / "model" / "config.json").is_file()
    assert "[3/4] optimize" in out and "quantization w8a8" in out
    report = json.loads((tmp_path / "optimized" / "report.json").read_text())
    assert report["passed"] and report["size_ratio"] < 0.6
    assert re.search(rf"^served model\s+{tmp_path / 'optimized'}$", out, re.M)
    # engine auto with every vLLM default a user gets (compiled, its KV cache sized by aigc_ray
    # from the memory free): the suite's one run of that path (test_vllm_start.py says why)
    engine = r"^serve: aigc-tiny on vllm [\d.]+ \(vLLM supports this model\)"
    assert re.search(engine, out, re.M), out[-3000:]
    assert (tmp_path / "data" / "manifest.json").is_file()
    # progress while training (plain lines: stdout is a pipe), and none of Ray's noise
    assert re.search(r"^train\s+30/30 steps \(100%\)  loss [\d.]+  tokens/s ", out, re.M), out
    for noise in ("will hang", "Progress bars disabled", "(raylet)", "Started Serve in"):
        assert noise not in out + proc.stderr, f"{noise!r} printed"
    # Outside a terminal (a pipe here, a log file or `ray job submit`), each stage prints its
    # own lines, not Ray Data's progress (this replaces a separate `aigc-ray preprocess` run
    # into a log file: the same condition, one Ray start less)
    assert "Running Dataset" not in out + proc.stderr
    preprocess = out.split("[1/4] preprocess", 1)[1].split("[2/4] train", 1)[0]
    assert "kept" in preprocess and len(preprocess.strip().splitlines()) <= 15, preprocess
    # everything the stages wrote (the driver and the local Ray's workers) is owner-only
    # (storage.owner_only_files: umask 077): directories 0700, files 0600
    modes = {}
    for out_dir in ("data", "train", "optimized"):
        for p in (tmp_path / out_dir).rglob("*"):
            if not p.is_symlink():
                modes[str(p.relative_to(tmp_path))] = stat.S_IMODE(p.stat().st_mode)
    assert len(modes) > 20, modes
    wrong = {
        k: oct(m) for k, m in modes.items() if m != (0o700 if Path(tmp_path, k).is_dir() else 0o600)
    }
    assert not wrong, wrong


def test_pipeline_bad_input_fails_before_ray(tmp_path):
    exe = Path(sys.executable).with_name("aigc-ray")
    proc = subprocess.run(
        [
            str(exe),
            "pipeline",
            "--config",
            "configs/tiny.yaml",
            f"data.inputs=[{tmp_path}/missing]",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"{tmp_path}/missing" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "name", ["preprocess", "train", "optimize", "serve", "pipeline", "generate"]
)
def test_job_wrappers_are_importable_and_documented(name):
    path = ROOT / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"job_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert callable(mod.main)
    assert f"ray job submit --working-dir . -- python jobs/{name}.py --config" in mod.__doc__
    assert len(path.read_text().splitlines()) <= 30
