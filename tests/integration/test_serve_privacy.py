"""Privacy of the served API on the shared Ray, on both engines (vLLM logs and handles requests
its own way): per-key usage in Prometheus by key fingerprint (never the key), and no prompt
text in any log file of the Ray session (Serve's replica and proxy logs, the workers' output,
vLLM's) or in error bodies, for good and malformed requests."""

import hashlib
import json
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
from serving import KEYS, deployed, model_dir

pytestmark = pytest.mark.integration
MARKER = "zq7-PRIVATE-marker-9913"
# the label each key must get, computed here from the key (security.key_fingerprint's definition)
FP = [hashlib.sha256(k.encode()).hexdigest()[:8] for k in KEYS]
MODEL = "tiny-private"
# vLLM in eager mode with a small KV cache, as in test_serve.py (vLLM with every default, which
# was this app, is the pipeline test's: tests/e2e/test_pipeline.py)
VLLM = {
    "engine": "vllm",
    "vllm": {"kv_cache_memory_gb": 0.25, "engine_kwargs": {"enforce_eager": True}},
}


@pytest.fixture(scope="module", params=["builtin", pytest.param("vllm", marks=pytest.mark.slow)])
def app(request, ray_session, serve_port, tmp_path_factory):
    """(base URL, ServeConfig, engine) of a one-model app (tiny random model)."""
    from aigc_ray.config import ServeConfig

    engine = request.param
    chosen = VLLM if engine == "vllm" else {"engine": "builtin"}
    cfg = ServeConfig(
        port=serve_port,
        num_cpus=0.25,
        max_tokens_limit=16,
        models=[{"name": MODEL, "model_dir": model_dir(tmp_path_factory, "a"), **chosen}],
    )
    with deployed(cfg) as url:
        yield f"{url}/v1", cfg, engine


def _post(base_url, path, body, key):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{base_url}{path}", content=content, headers=headers, timeout=60)


def _series(text: str, name: str, **labels) -> dict[str, float]:
    """{series (its full label set): value} of metric `name` with `labels`; one series per
    ingress replica (Serve adds the replica's tag)."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


# (series, labels) this test counts, by the fingerprint of each key: its own model's, and the
# requests that name no model ("-": unparsable) or a missing one
REQUESTS, TOKENS = "ray_aigc_ray_key_requests_total", "ray_aigc_ray_key_tokens_total"
WATCHED = {
    "fp0 200": (REQUESTS, dict(key_fingerprint=FP[0], model=MODEL, status="200")),
    "fp1 200": (REQUESTS, dict(key_fingerprint=FP[1], model=MODEL, status="200")),
    "fp1 400": (REQUESTS, dict(key_fingerprint=FP[1], model=MODEL, status="400")),
    "fp1 400 no model": (REQUESTS, dict(key_fingerprint=FP[1], model="-", status="400")),
    "fp1 404 missing": (REQUESTS, dict(key_fingerprint=FP[1], model="missing", status="404")),
    "fp0 prompt": (TOKENS, dict(key_fingerprint=FP[0], model=MODEL, kind="prompt")),
    "fp0 completion": (TOKENS, dict(key_fingerprint=FP[0], model=MODEL, kind="completion")),
    "fp1 prompt": (TOKENS, dict(key_fingerprint=FP[1], model=MODEL, kind="prompt")),
    "fp1 completion": (TOKENS, dict(key_fingerprint=FP[1], model=MODEL, kind="completion")),
}


def _counts(text: str) -> dict[str, dict[str, float]]:
    return {k: _series(text, name, **labels) for k, (name, labels) in WATCHED.items()}


def _delta(now: dict, before: dict) -> dict[str, float]:
    """What each watched count grew by, series by series (a series of an ingress replica that
    is gone may stop being exported: only series exported now count)."""
    return {k: sum(v - before[k].get(series, 0.0) for series, v in now[k].items()) for k in now}


def _logs(node) -> list[tuple[str, bytes]]:
    logs = Path(node.get_logs_dir_path())
    return [
        (str(f.relative_to(logs)), f.read_bytes())
        for f in logs.rglob("*")
        if f.is_file() and f.stat().st_size < 200_000_000
    ]


def _wait_for_request_logs(node, request_ids: list[str], timeout: float = 60) -> list:
    """The session's log files once Serve's request log lines of every one of `request_ids`
    are in them (so a search of them sees what these requests left)."""
    deadline = time.monotonic() + timeout
    while True:
        files = _logs(node)
        lines = [line for _, data in files for line in data.splitlines() if b" -- " in line]
        missing = [r for r in request_ids if not any(r.encode() in line for line in lines)]
        if not missing:
            return files
        assert time.monotonic() < deadline, f"no request log line for {missing}"
        time.sleep(1)


def _usage(response: httpx.Response) -> dict:
    """The usage of a whole response, or of a stream (on its last chunk that has one)."""
    if not response.headers["content-type"].startswith("text/event-stream"):
        return response.json()["usage"]
    chunks = [
        json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")
    ]
    return [c["usage"] for c in chunks if c.get("usage")][-1]


def test_usage_by_key_fingerprint_and_no_prompt_in_logs(app, ray_session):
    base_url, _, engine = app
    node = ray_session._private.worker.global_worker.node
    metrics_url = f"http://127.0.0.1:{node.metrics_export_port}/metrics"
    before = _counts(urllib.request.urlopen(metrics_url, timeout=10).read().decode())
    sent: list[httpx.Response] = []
    good = {"model": MODEL, "prompt": f"def {MARKER}(x):", "max_tokens": 5}
    for key in (KEYS[0], KEYS[0], KEYS[1]):
        sent.append(_post(base_url, "/completions", good, key))
        assert sent[-1].status_code == 200, sent[-1].text
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"my secret is {MARKER}"}],
        "max_tokens": 3,
        "stream": True,
    }
    sent.append(_post(base_url, "/chat/completions", chat, KEYS[1]))
    assert sent[-1].status_code == 200
    usages = [_usage(r) for r in sent]  # what the metrics must have added, key by key
    bad = [
        (f'{{"model": "{MODEL}", "prompt": "{MARKER}'.encode(), 400),
        ({"model": MODEL, "prompt": {"x": MARKER}}, 400),
        ({"model": MODEL, "prompt": MARKER * 40, "max_tokens": 5}, 400),
        ({"model": "missing", "prompt": MARKER}, 404),
    ]
    for body, status in bad:
        sent.append(_post(base_url, "/completions", body, KEYS[1]))
        r = sent[-1]
        assert r.status_code == status and MARKER not in r.text, r.text
    sent.append(_post(base_url, "/completions", good, "wrong-key-424242"))
    assert sent[-1].status_code == 401

    def tokens(kind: str, *which: int) -> int:
        return sum(usages[i][f"{kind}_tokens"] for i in which)

    want = {  # this test's requests, counted on its own model
        "fp0 200": 2,
        "fp1 200": 2,  # a completion and the chat stream
        "fp1 400": 1,  # the prompt too long for the model's context
        "fp1 400 no model": 2,  # bad JSON and a prompt of the wrong type: no model parsed
        "fp1 404 missing": 1,
        "fp0 prompt": tokens("prompt", 0, 1),
        "fp0 completion": tokens("completion", 0, 1),
        "fp1 prompt": tokens("prompt", 2, 3),
        "fp1 completion": tokens("completion", 2, 3),
    }
    deadline, text, delta = time.monotonic() + 60, "", {}
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        delta = _delta(_counts(text), before)
        if delta == want:
            break
        time.sleep(2)
    assert delta == want, engine
    for secret in (*KEYS, "wrong-key-424242", MARKER):
        assert secret not in text

    request_ids = [r.headers["x-request-id"] for r in sent]
    files = _wait_for_request_logs(node, request_ids)
    leaks = [name for name, data in files if MARKER.encode() in data]
    assert not leaks, leaks


# the app's ingress writes these logs whatever the engine (the model's replica itself under
# serve.ingress direct, this one-model app's default): once, on the builtin app
@pytest.mark.parametrize("app", ["builtin"], indirect=True)
def test_log_prompts_true_writes_prompts_to_the_replica_log(app, ray_session):
    """The same search finds a prompt once serve.log_prompts is on: the check above can fail."""
    from aigc_ray.serve import run_serve

    base_url, cfg, _ = app
    run_serve(cfg.model_copy(update={"log_prompts": True}))  # its replica restarts with it
    marker = "zq7-LOGGED-marker-5127"
    good = {"model": MODEL, "prompt": f"def {marker}(x):", "max_tokens": 3}
    r = _post(base_url, "/completions", good, KEYS[0])
    assert r.status_code == 200
    node = ray_session._private.worker.global_worker.node
    files = _wait_for_request_logs(node, [r.headers["x-request-id"]])
    found = [name for name, data in files if marker.encode() in data]
    assert any(f"replica_aigc_model-{MODEL}" in f for f in found), found


def test_one_model_replica_runs_on_serves_own_loop_and_vllm_on_it(app):
    """(Here because this module's app is the tier's one-model app on both engines.) On the
    default path the replica's code runs on Serve's own event loop, so a streamed chunk does
    not cross threads to reach the replica's HTTP server (serve.app.ingress_options sets it in
    the replica's runtime env, merged with the app's), and vLLM's output handler runs on that
    same loop (VllmEngine on_caller_loop)."""
    from serving import stats

    base_url, _, engine = app
    s = stats(MODEL)
    # Ray runs an async actor's loop in its thread "AsyncIO Thread: default"; Serve's thread
    # for user code is "Thread-N (_run_user_code_event_loop)"
    assert s["engine"] == engine and s["thread"].startswith("AsyncIO Thread"), s
    if engine == "vllm":
        assert s["vllm_on_replica_loop"] is True, s
    # the app's own runtime env still reached the replica: its API keys hold
    good = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    assert _post(base_url, "/completions", good, KEYS[1]).status_code == 200
    assert _post(base_url, "/completions", good, "sk-wrong").status_code == 401


def test_vllm_worker_has_its_cores_to_itself(app):
    """(Here for the same reason.) vLLM's CPU worker binds itself to cores of its own; with the
    default serve.vllm.cpu_isolation the replica then keeps this Ray node's other processes on
    the cores it left: the replica, vLLM's scheduler process, Serve's controller, Ray's GCS;
    not the process that started Ray (this test's). bench_serve measured why (docs/serving.md);
    tests/unit/test_cpu_isolation.py checks that the cores are given back."""
    import os

    import psutil
    from serving import stats

    from aigc_ray.engine.cpu_isolation import _SESSION

    _, _, engine = app
    if engine != "vllm" or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("vLLM engine only (its CPU worker binds cores), on 2 or more cores")
    s = stats(MODEL)
    iso = s["cpu_isolation"]
    assert iso and iso["engine_cpus"] and iso["reserved_cpus"], s
    engine_cpus, reserved = set(iso["engine_cpus"]), set(iso["reserved_cpus"])
    replica = psutil.Process(s["pid"])
    raylet = replica.parent()  # this session's (another xdist worker runs its own)
    session = _SESSION.search(" ".join(raylet.cmdline())).group(1)

    def named(text, among):
        return [p.pid for p in among if text in " ".join(p.cmdline())]

    scheds = [psutil.Process(pid) for pid in s["engine_pids"]]
    workers = [c.pid for p in scheds for c in p.children(recursive=True)]
    bound = {
        frozenset(os.sched_getaffinity(int(t)))
        for w in workers
        for t in os.listdir(f"/proc/{w}/task")
    }
    assert frozenset(engine_cpus) in bound, bound
    gcs = [p for p in raylet.parent().children() if p.name() == "gcs_server"]
    others = {
        "replica": [s["pid"]],
        "scheduler": s["engine_pids"],
        "controller": named("ray::ServeController", raylet.children()),
        "gcs": named(session, gcs),
    }
    for what, pids in others.items():
        assert pids and all(os.sched_getaffinity(p) == reserved for p in pids), (what, pids)
    # untouched: this driver, the raylet (workers it starts get every core)
    assert os.sched_getaffinity(0) == engine_cpus | reserved
    assert os.sched_getaffinity(raylet.pid) == engine_cpus | reserved
