"""A real evaluation client against our endpoint: lm-evaluation-harness's `local-completions`
model scores a multiple-choice task (loglikelihoods: token-id prompts, echo, logprobs) against
`aigc-ray serve` and against vLLM's own OpenAI server on the same model; the scores must agree.

Nothing is downloaded: the task is defined from a local jsonl file, the model is a random-init
tiny Llama with a locally trained tokenizer."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from ports import free_port
from tiny import tiny_model_dir, tiny_tokenizer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
KEY = "eval-key"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("eval-model")
    tok = tiny_tokenizer(root, vocab=512, files=40, chars=5000)
    # head size 32: vLLM's CPU attention has no kernel for the unit tests' 16
    return tiny_model_dir(
        root, tok, seed=0, hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=512
    )


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("eval-task")
    rows = []
    for i in range(24):
        a, b = i % 7 + 2, i % 5 + 3
        rows.append(
            {
                "question": f"def add(x, y):\n    return x + y\n\nadd({a}, {b}) ==",
                "choices": [f" {a + b}", f" {a * b}", f" {a - b}", " None"],
                "answer": 0,
            }
        )
    data = root / "add.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "aigc_add.yaml").write_text(
        "task: aigc_add\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return str(root)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def evaluate(base_url: str, model: str, model_dir: str, task_dir: str) -> dict:
    """lm-eval's own entry point, as a user runs it; returns acc and per-choice loglikelihoods."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{base_url}/v1/completions",
            "model": model,
            "tokenizer_backend": "huggingface",
            "tokenizer": model_dir,
            "num_concurrent": 1,
            "max_retries": 1,
            "tokenized_requests": True,
        },
        tasks=["aigc_add"],
        task_manager=TaskManager(include_path=task_dir),
        log_samples=True,
    )
    samples = out["samples"]["aigc_add"]
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return {"acc": out["results"]["aigc_add"]["acc,none"], "loglikelihoods": lls}


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_lm_eval_scores_agree_with_vllms_own_server(tmp_path, model_dir, task_dir, monkeypatch):
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    for var, value in {**offline, "OPENAI_API_KEY": KEY}.items():  # lm-eval reads these here
        monkeypatch.setenv(var, value)
    env = {**os.environ, **offline, "RAY_AUTH_MODE": "disabled", "AIGC_RAY_API_KEYS": KEY}
    exe = str(Path(sys.executable).with_name("aigc-ray"))
    ours_port, vllm_port = free_port(), free_port()
    # Both servers start at once (each mostly waits on its own startup); each is evaluated alone.
    vllm = start(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model_dir,
            "--served-model-name",
            "tiny",
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--enforce-eager",
            "--port",
            str(vllm_port),
        ],
        {**env, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    try:
        ours = start(
            [
                exe,
                "serve",
                "--config",
                "configs/tiny.yaml",
                "--keep-serving",
                f"serve.model_dir={model_dir}",
                "serve.model_name=tiny",
                f"serve.port={ours_port}",
                "serve.engine=builtin",
                "serve.sample_prompts=[]",
            ],
            env,
        )
        try:
            wait_ready(f"http://127.0.0.1:{ours_port}/health", ours)
            mine = evaluate(f"http://127.0.0.1:{ours_port}", "tiny", model_dir, task_dir)
        finally:
            stop(ours)
        wait_ready(f"http://127.0.0.1:{vllm_port}/health", vllm)
        theirs = evaluate(f"http://127.0.0.1:{vllm_port}", "tiny", model_dir, task_dir)
    finally:
        stop(vllm)
    assert len(mine["loglikelihoods"]) == len(theirs["loglikelihoods"]) == 24
    for a, b in zip(mine["loglikelihoods"], theirs["loglikelihoods"], strict=True):
        assert a == pytest.approx(b, abs=2e-3)  # same model, same fp32 math, two servers
    assert mine["acc"] == theirs["acc"]
