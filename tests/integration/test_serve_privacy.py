"""Privacy of the served API on the shared Ray: per-key usage in Prometheus by key fingerprint
(never the key), and no prompt text in any log file of the Ray session (Serve's replica and
proxy logs, the workers' output) or in error bodies, for good and malformed requests."""

import hashlib
import json
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
from s3env import free_port

pytestmark = pytest.mark.integration
KEYS = ("test-key-1", "test-key-2")  # the replicas' keys (the ray_session fixture)
MARKER = "zq7-PRIVATE-marker-9913"
FP = [hashlib.sha256(k.encode()).hexdigest()[:8] for k in KEYS]


@pytest.fixture(scope="module")
def app(ray_session, tmp_path_factory):
    """(base URL, ServeConfig) of a one-model app (builtin engine, tiny random model)."""
    from ray import serve

    from aigc_ray.config import ModelConfig, ServeConfig
    from aigc_ray.data import stdlib_files
    from aigc_ray.model import build_model, train_tokenizer
    from aigc_ray.serve import run_serve

    root = tmp_path_factory.mktemp("privacy")
    texts = [Path(p).read_text(errors="replace")[:4000] for p in stdlib_files()[:20]]
    tok = train_tokenizer(texts, 300, root / "tok")
    model = build_model(
        ModelConfig(hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=128),
        tok,
        seed=0,
    )
    model.save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    cfg = ServeConfig(
        port=free_port(),
        model_name="tiny-private",
        model_dir=str(root / "model"),
        engine="builtin",
        num_cpus=0.25,
        max_tokens_limit=16,
    )
    yield f"{run_serve(cfg)}/v1", cfg
    serve.shutdown()


def _post(base_url, path, body, key):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{base_url}{path}", content=content, headers=headers, timeout=60)


def _series(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _logs_holding(node, needle: str) -> tuple[list[str], bool]:
    """Files under the Ray session's log directory that hold ``needle``; and whether any holds
    Serve's request log lines (so the search looked where requests are logged)."""
    logs = Path(node.get_logs_dir_path())
    found, request_log = [], False
    for f in logs.rglob("*"):
        if f.is_file() and f.stat().st_size < 200_000_000:
            data = f.read_bytes()
            request_log |= b"POST /v1/completions" in data
            if needle.encode() in data:
                found.append(str(f.relative_to(logs)))
    return found, request_log


def test_usage_by_key_fingerprint_and_no_prompt_in_logs(app, ray_session):
    base_url, _ = app
    node = ray_session._private.worker.global_worker.node
    metrics_url = f"http://127.0.0.1:{node.metrics_export_port}/metrics"
    good = {"model": "tiny-private", "prompt": f"def {MARKER}(x):", "max_tokens": 5}
    for key in (KEYS[0], KEYS[0], KEYS[1]):
        assert _post(base_url, "/completions", good, key).status_code == 200
    chat = {
        "model": "tiny-private",
        "messages": [{"role": "user", "content": f"my secret is {MARKER}"}],
        "max_tokens": 3,
        "stream": True,
    }
    assert _post(base_url, "/chat/completions", chat, KEYS[1]).status_code == 200
    bad = [
        (f'{{"model": "tiny-private", "prompt": "{MARKER}'.encode(), 400),
        ({"model": "tiny-private", "prompt": {"x": MARKER}}, 400),
        ({"model": "tiny-private", "prompt": MARKER * 40, "max_tokens": 5}, 400),
        ({"model": "missing", "prompt": MARKER}, 404),
    ]
    for body, status in bad:
        r = _post(base_url, "/completions", body, KEYS[1])
        assert r.status_code == status and MARKER not in r.text, r.text
    assert _post(base_url, "/completions", good, "wrong-key-424242").status_code == 401

    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        tokens = "ray_aigc_ray_key_tokens_total"
        if (
            _series(text, "ray_aigc_ray_key_requests_total", key_fingerprint=FP[0], status="200")
            >= 2
            and _series(text, tokens, key_fingerprint=FP[1], kind="completion") >= 1
        ):
            break
        time.sleep(2)
    requests = "ray_aigc_ray_key_requests_total"
    assert _series(text, requests, key_fingerprint=FP[0], status="200") >= 2
    assert _series(text, requests, key_fingerprint=FP[1], status="200") >= 2
    assert _series(text, requests, key_fingerprint=FP[1], status="400") >= 3
    assert _series(text, "ray_aigc_ray_key_tokens_total", key_fingerprint=FP[0], kind="prompt") > 0
    for secret in (*KEYS, "wrong-key-424242", MARKER):
        assert secret not in text

    leaks, request_log = _logs_holding(node, MARKER)
    assert request_log and not leaks, leaks


def test_log_prompts_true_writes_prompts_to_the_replica_log(app, ray_session):
    """The same search finds a prompt once serve.log_prompts is on: the check above can fail."""
    from aigc_ray.serve import run_serve

    base_url, cfg = app
    run_serve(cfg.model_copy(update={"log_prompts": True}))  # the Router restarts with it
    marker = "zq7-LOGGED-marker-5127"
    good = {"model": "tiny-private", "prompt": f"def {marker}(x):", "max_tokens": 3}
    assert _post(base_url, "/completions", good, KEYS[0]).status_code == 200
    node = ray_session._private.worker.global_worker.node
    deadline, found = time.monotonic() + 30, []
    while time.monotonic() < deadline and not found:
        found, _ = _logs_holding(node, marker)
        time.sleep(1)
    assert any("replica_aigc_Router" in f for f in found), found
