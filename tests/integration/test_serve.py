"""The serving stage through real clients: the official `openai` package and raw HTTP, against
one app with several models on the session's shared Ray and Serve (tiny random-init models).

Engines: the tests of what a model answers (sampling params, n, seed, usage, streaming, stop,
logprobs, chat, context length, timeouts and disconnects freeing the engine, which engine
answered, a dead vLLM engine, metrics) run on both engines, builtin and vLLM; the tests of what
the Router and Serve do before or around any engine (model list and health, routing by name,
request validation, auth and 404 errors, Serve's queue overflow, scale from zero, a killed
replica replaced) run once, on the builtin engine (`ROUTER_ONLY`, each says why)."""

import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
from serving import KEY, deployed, model_dir, quiet_stats, running_replicas, stats, w8a8_dir

pytestmark = pytest.mark.integration

TIMEOUT_S = 8.0  # every request but the slow model's long ones ends well within it
SLOW_LIMIT = 8000  # the slow model cannot make this many tokens within TIMEOUT_S


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {
        "a": model_dir(tmp_path_factory, "a"),
        "b": w8a8_dir(tmp_path_factory, "b"),  # what `aigc-ray optimize` writes (int8 W8A8)
        "slow": model_dir(tmp_path_factory, "slow"),
    }


# vLLM runs its CPU build here, in eager mode (no torch.compile warm-up: 25 s instead of 55 s
# per engine start) with a small KV cache each. Its app takes ~2 min to start: slow tier only.
VLLM = {
    "engine": "vllm",
    "vllm": {"kv_cache_memory_gb": 0.25, "engine_kwargs": {"enforce_eager": True}},
}


@pytest.fixture(scope="module", params=["builtin", pytest.param("vllm", marks=pytest.mark.slow)])
def engine(request):
    return request.param


# Tests of the Router and Serve, not of an engine: run once, against the builtin app.
ROUTER_ONLY = pytest.mark.parametrize("engine", ["builtin"], indirect=True)


@pytest.fixture(scope="module")
def base_url(ray_session, serve_port, model_dirs, engine):
    from aigc_ray.config import ServeConfig

    chosen = VLLM if engine == "vllm" else {"engine": "builtin"}
    cfg = ServeConfig(
        port=serve_port,
        num_cpus=0.25,
        request_timeout_s=TIMEOUT_S,
        max_tokens_limit=SLOW_LIMIT,
        models=[
            {"name": "tiny-a", "model_dir": model_dirs["a"], **chosen},
            {"name": "tiny-b", "model_dir": model_dirs["b"], **chosen},
            # one request at a time, one more in the queue: the third gets a 503
            {
                "name": "slow",
                "model_dir": model_dirs["slow"],
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
                "max_batch_size": 1,
                "max_model_len": 8192,
                **chosen,
            },
            # no replica until the first request arrives (Serve's scale from zero does not
            # depend on the engine: the builtin one in both runs keeps the vLLM run shorter)
            {
                "name": "lazy",
                "model_dir": model_dirs["a"],
                "engine": "builtin",
                "autoscaling": {
                    "min_replicas": 0,
                    "max_replicas": 1,
                    "initial_replicas": 0,
                    "upscale_delay_s": 0,
                    "downscale_delay_s": 600,
                },
            },
        ],
    )
    with deployed(cfg) as url:  # deleted by name after the module: its CPUs free again
        yield f"{url}/v1"


@pytest.fixture
def client(base_url):
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=60)


def post(base_url, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{base_url}{path}", content=content, headers=headers, timeout=60, **kw)


# ---------------------------------------------------------------- the API


@ROUTER_ONLY  # the Router lists its models and answers /health, whatever the engine
def test_models_and_health(client, base_url):
    assert sorted(m.id for m in client.models.list().data) == ["lazy", "slow", "tiny-a", "tiny-b"]
    health = httpx.get(base_url.replace("/v1", "/health")).json()  # no key needed
    assert health["status"] == "ok"


def test_completion_params_n_seed_usage(client):
    out = client.completions.create(
        model="tiny-a", prompt="def add(a, b):", max_tokens=8, temperature=0
    )
    assert out.model == "tiny-a" and out.object == "text_completion"
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8
    assert out.choices[0].finish_reason == "length"
    kw = dict(
        model="tiny-a",
        prompt="import os",
        max_tokens=10,
        temperature=1.0,
        top_p=0.9,
        seed=123,
        n=3,
        extra_body={"top_k": 40, "ignore_eos": True},
    )
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded
    assert len({c.text for c in first.choices}) > 1  # n choices sample independently
    assert first.usage.completion_tokens == 30  # usage counts all n choices


def test_models_show_the_engine_that_answered(client, engine, model_dirs):
    client.completions.create(model="tiny-b", prompt="x", max_tokens=2)
    cards = {m.id: m for m in client.models.list().data}
    assert cards["tiny-b"].engine == engine  # learnt from its responses
    assert stats("tiny-b")["engine"] == engine
    assert "quantization_config" in Path(model_dirs["b"], "config.json").read_text()


def _stop_candidate(text: str) -> int | None:
    """Index i >= 2 of the first occurrence of a printable character (a stop string)."""
    return next(
        (
            i
            for i in range(2, len(text))
            if text[i].isprintable()
            and text[i].strip()
            and text[i] != "\ufffd"
            and text.find(text[i]) == i
        ),
        None,
    )


def test_stop_string_cuts_the_text(client):
    for seed in range(20):  # random-init model: find a sample with visible text to stop on
        kw = dict(
            model="tiny-a",
            prompt="x = ",
            max_tokens=30,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        text = client.completions.create(**kw).choices[0].text
        if (i := _stop_candidate(text)) is not None:
            break
    else:
        pytest.fail("no sample with a usable stop string")
    cut = client.completions.create(**kw, stop=[text[i]])
    assert cut.choices[0].text == text[:i]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_completion(client):
    out = client.chat.completions.create(
        model="tiny-b",
        messages=[
            {"role": "system", "content": "You write Python."},
            {"role": "user", "content": "A stack class:"},
        ],
        max_tokens=12,
        temperature=0,
    )
    assert out.object == "chat.completion" and out.model == "tiny-b"
    assert out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.usage.completion_tokens <= 12 and out.usage.prompt_tokens > 10  # template added
    # no max_tokens: as many as fit in the context window (256), capped by the server's limit
    free = client.chat.completions.create(
        model="tiny-b",
        temperature=0,
        extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": "hi"}],
    )
    assert free.usage.prompt_tokens + free.usage.completion_tokens == 256


@ROUTER_ONLY  # the Router picks the deployment by name; each engine's answers are tested apart
def test_models_are_routed_by_name(client):
    # same seed, same prompt: only the weights differ (greedy tiny random models just repeat)
    outs = {
        m: client.completions.create(
            model=m,
            prompt="class Stack:",
            max_tokens=20,
            temperature=1.0,
            seed=0,
            extra_body={"ignore_eos": True},
        )
        for m in ("tiny-a", "tiny-b")
    }
    assert outs["tiny-a"].choices[0].text != outs["tiny-b"].choices[0].text
    assert stats("tiny-a")["finished"] > 0 and stats("tiny-b")["finished"] > 0


def test_streaming_completion_equals_whole_completion(client, base_url):
    kw = dict(model="tiny-a", prompt="def main():", max_tokens=20, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole and len([t for t in texts if t]) > 1
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 20  # usage rides on the last chunk
    raw = post(base_url, "/completions", {**kw, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]")
    assert raw.startswith("data: {")


def test_streaming_chat_with_usage_and_n(client):
    stream = client.chat.completions.create(
        model="tiny-b",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        n=2,
        temperature=0.7,
        seed=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant", "assistant"]
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_prompt_lists_and_token_ids_give_one_choice_per_prompt(client, model_dirs):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dirs["a"])("def f():")["input_ids"]
    kw = dict(model="tiny-a", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    single = [
        client.completions.create(prompt=p, **kw).choices[0].text for p in ("def f():", "import os")
    ]
    both = client.completions.create(prompt=["def f():", "import os"], n=2, **kw)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]  # prompt by prompt, n each
    assert [c.text for c in both.choices] == [single[0], single[0], single[1], single[1]]
    assert both.usage.completion_tokens == 16
    by_ids = client.completions.create(prompt=ids, **kw)
    assert by_ids.choices[0].text == single[0]
    assert by_ids.usage.prompt_tokens == len(ids)
    two_ids = client.completions.create(prompt=[ids, ids[:-1]], **kw)
    assert len(two_ids.choices) == 2 and two_ids.usage.prompt_tokens == 2 * len(ids) - 1


def _reference_logprobs(model_dir: str, ids: list[int]):
    """transformers' own log-softmax over the model's logits at every position."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].log_softmax(-1)


def test_logprobs_and_echo_match_transformers(client, model_dirs):
    """What loglikelihood evaluation (lm-eval's local-completions) sends: token ids, echo,
    logprobs=1, max_tokens=1; and top-N logprobs of generated tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dirs["a"])
    ids = tok("def add(a, b): return a + b")["input_ids"]
    out = client.completions.create(
        model="tiny-a", prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert out.choices[0].text.startswith(tok.decode(ids))
    ref = _reference_logprobs(model_dirs["a"], ids)
    for t in range(1, len(ids)):
        assert abs(lp.token_logprobs[t] - float(ref[t - 1, ids[t]])) < 2e-3, t
        assert abs(max(lp.top_logprobs[t].values()) - float(ref[t - 1].max())) < 2e-3, t
    greedy = int(ref[-1].argmax())
    assert out.choices[0].logprobs.tokens[-1] == tok.decode([greedy])  # the generated token
    scored = client.completions.create(
        model="tiny-a", prompt=ids, max_tokens=0, echo=True, logprobs=0
    )
    assert scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs[1:] == lp.token_logprobs[1:-1]
    gen = client.completions.create(
        model="tiny-a",
        prompt="import os",
        max_tokens=5,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    glp = gen.choices[0].logprobs
    assert len(glp.tokens) == len(glp.token_logprobs) == 5
    assert all(3 <= len(top) <= 4 for top in glp.top_logprobs)  # 3 (+ the chosen one)
    assert all(
        abs(t - max(top.values())) < 1e-4
        for t, top in zip(glp.token_logprobs, glp.top_logprobs, strict=True)
    )  # greedy: the best
    chat = client.chat.completions.create(
        model="tiny-b",
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": "hi"}],
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)


# ---------------------------------------------------------------- bad input


BAD = [
    (b"{not json", 400, None),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "tiny-a"}, 400, "prompt"),
    ({"model": "tiny-a", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "tiny-a", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny-a", "prompt": "x", "max_tokens": SLOW_LIMIT + 1}, 400, "max_tokens"),
    ({"model": "tiny-a", "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"model": "tiny-a", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny-a", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "tiny-a", "prompt": 5}, 400, "prompt"),
    ({"model": "tiny-a", "prompt": "x", "stream": True, "max_tokens": -2}, 400, "max_tokens"),
    ({"model": "tiny-a", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": "tiny-a", "prompt": "x", "logprobs": 1, "stream": True}, 400, "stream"),
    ({"model": "tiny-a", "prompt": [[]]}, 400, "prompt"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
]


@ROUTER_ONLY  # the Router validates these (pydantic, to_job, the stream's options) first
@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_requests_get_openai_errors(base_url, body, status, param):
    resp = post(base_url, "/completions", body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert "detail" not in resp.json()


def test_context_overflow_and_empty_chat_get_400(client):
    """The engine measures the prompt against its context window (builtin and vLLM each)."""
    from openai import BadRequestError

    for stream in (False, True):
        with pytest.raises(BadRequestError) as e:
            client.completions.create(
                model="tiny-a", prompt="x " * 300, max_tokens=10, stream=stream
            )
        assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="tiny-a", messages=[], max_tokens=3)
    assert e.value.body["param"] == "messages"
    # the server is still up and the next valid request succeeds
    ok = client.completions.create(
        model="tiny-a", prompt="x", max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert ok.usage.completion_tokens == 2


@ROUTER_ONLY  # keys, unknown models and unknown paths are the Router's, before any engine
def test_auth_and_not_found_errors(client, base_url):
    from openai import AuthenticationError, NotFoundError, OpenAI

    with pytest.raises(NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{base_url}/models").status_code == 401  # no key at all
    resp = post(base_url, "/chat/completions", {"model": "tiny-a"}, key=None)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    resp = httpx.get(f"{base_url}/nothing-here")
    assert resp.status_code == 404 and "error" in resp.json()
    # the server is still up and the next valid request succeeds
    ok = client.completions.create(
        model="tiny-a", prompt="x", max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert ok.usage.completion_tokens == 2


# ---------------------------------------------------------------- load, time and faults


def test_timeout_gets_408_and_frees_the_engine(client, base_url):
    started = time.monotonic()
    resp = post(
        base_url,
        "/completions",
        {"model": "slow", "prompt": "x", "max_tokens": SLOW_LIMIT, "ignore_eos": True},
    )
    assert resp.status_code == 408, resp.text
    assert resp.json()["error"]["type"] == "timeout"
    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 5
    deadline = time.monotonic() + 10
    while stats("slow")["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    s = stats("slow")
    assert s["running"] == 0 and s["cancelled"] >= 1


@ROUTER_ONLY  # Serve's queue (max_queued_requests) rejects it before any engine sees it
def test_overload_beyond_the_queue_gets_503(base_url):
    body = {"model": "slow", "prompt": "x", "max_tokens": SLOW_LIMIT, "ignore_eos": True}
    results: list = [None] * 4

    def send(i):
        results[i] = post(base_url, "/completions", body)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.3)  # in order: one running, one queued, then overflow
    for t in threads:
        t.join(60)
    codes = sorted(r.status_code for r in results)
    assert 503 in codes, codes
    assert set(codes) <= {408, 503}, codes  # the admitted ones run into the 4 s timeout
    overloaded = next(r for r in results if r.status_code == 503)
    assert overloaded.json()["error"]["code"] == "overloaded"
    assert overloaded.headers["retry-after"] == "1"


def test_client_disconnect_cancels_generation(base_url):
    before = quiet_stats("slow")
    body = {
        "model": "slow",
        "prompt": "x",
        "max_tokens": SLOW_LIMIT,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{base_url}/completions",
        json=body,
        timeout=30,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as resp:
        assert resp.status_code == 200
        got = 0
        for line in resp.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break
    # connection closed after 3 chunks: generation for it must stop, well before the app's
    # request timeout could have cancelled it instead
    closed = time.monotonic()
    while stats("slow")["running"] and time.monotonic() < closed + 10:
        time.sleep(0.05)
    # (3 s: a row never cancelled runs to SLOW_LIMIT tokens; the stall of one Ray hop on a busy
    # 2-core machine is not a failure to cancel)
    assert time.monotonic() - closed < 3.0, "the row outlived the disconnect"
    assert time.monotonic() - started < TIMEOUT_S, "too slow to tell a disconnect from a 408"
    first = stats("slow")
    time.sleep(1.0)
    second = stats("slow")
    assert first["running"] == 0
    assert second["generated_tokens"] == first["generated_tokens"]  # nothing more generated
    assert first["cancelled"] == before["cancelled"] + 1
    assert first["generated_tokens"] - before["generated_tokens"] < SLOW_LIMIT


@ROUTER_ONLY  # the lazy model is on the builtin engine in both apps: Serve's scale from zero
def test_scale_from_zero(client):
    """No replica at first: the request starts one. A cold start longer than this app's 4 s
    request timeout gets an OpenAI-shaped 408 and the retry succeeds."""
    from openai import APIStatusError

    assert running_replicas("lazy") == 0
    deadline = time.monotonic() + 120
    while True:
        try:
            out = client.completions.create(
                model="lazy", prompt="x", max_tokens=3, extra_body={"ignore_eos": True}
            )
            break
        except APIStatusError as e:
            assert e.status_code == 408 and e.body["type"] == "timeout"
            assert time.monotonic() < deadline, "lazy model never came up"
    assert out.usage.completion_tokens == 3
    assert running_replicas("lazy") == 1


# Serve replaces a dead replica whatever its engine (vLLM's own failure and replacement: the
# dead-engine test below)
@ROUTER_ONLY
def test_killed_replica_is_replaced_and_requests_succeed_again(client):
    old = stats("tiny-b")["pid"]
    os.kill(old, signal.SIGKILL)
    statuses, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            out = client.completions.create(model="tiny-b", prompt="x", max_tokens=3)
            if out.usage.completion_tokens == 3:
                break
        except Exception as e:  # noqa: BLE001 - record what clients saw meanwhile
            statuses.append(getattr(e, "status_code", type(e).__name__))
        time.sleep(0.5)
    else:
        pytest.fail(f"tiny-b never recovered; saw {statuses}")
    assert stats("tiny-b")["pid"] != old
    assert all(s in (503, 408) for s in statuses), statuses  # OpenAI-shaped while down


# the builtin engine runs in the replica's own process (the kill test above covers it)
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["vllm"], indirect=True)
def test_dead_vllm_engine_gets_503_and_the_replica_is_replaced(engine, client, base_url):
    """vLLM's engine process dies inside a replica: the request in flight gets an OpenAI-shaped
    503, Serve's health check replaces the replica, later requests succeed."""
    before = stats("tiny-a")
    assert before["engine_pids"], before
    result: dict = {}

    def long_request():
        result["resp"] = post(
            base_url,
            "/completions",
            {"model": "tiny-a", "prompt": "x", "max_tokens": 250, "ignore_eos": True},
        )

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 10
    while not stats("tiny-a")["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in before["engine_pids"]:
        os.kill(pid, signal.SIGKILL)
    thread.join(60)
    resp = result["resp"]
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "replica_unavailable"
    statuses, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            out = client.completions.create(model="tiny-a", prompt="x", max_tokens=3)
            if out.usage.completion_tokens == 3:
                break
        except Exception as e:  # noqa: BLE001 - record what clients saw meanwhile
            statuses.append(getattr(e, "status_code", type(e).__name__))
        time.sleep(0.5)
    else:
        pytest.fail(f"tiny-a never recovered; saw {statuses}")
    assert stats("tiny-a")["pid"] != before["pid"]  # a new replica
    assert all(s in (503, 408) for s in statuses), statuses


def test_prometheus_metrics_are_exported(client, ray_session, engine):
    node = ray_session._private.worker.global_worker.node
    url = f"http://127.0.0.1:{node.metrics_export_port}/metrics"
    before = _counter(urllib.request.urlopen(url, timeout=10).read().decode(), "tiny-a")
    client.completions.create(model="tiny-a", prompt="x", max_tokens=4)
    client.completions.create(model="tiny-a", prompt="y", max_tokens=4)
    wanted = [
        "ray_aigc_ray_requests_total",
        "ray_aigc_ray_request_errors_total",
        "ray_aigc_ray_time_to_first_token_seconds_bucket",
        "ray_aigc_ray_inter_token_latency_seconds_bucket",
        "ray_aigc_ray_generated_tokens_total",
        "ray_aigc_ray_running_requests",
        "ray_aigc_ray_queued_requests",
    ]
    if engine == "vllm":  # vLLM's own series too, through Ray's metrics agent
        wanted += [
            "ray_aigc_ray_kv_cache_usage",
            "ray_vllm_kv_cache_usage_perc",
            "ray_vllm_num_requests_running",
            "ray_vllm_num_requests_waiting",
        ]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        if all(w in text for w in wanted) and _counter(text, "tiny-a") >= before + 2:
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    assert _counter(text, "tiny-a") >= before + 2  # the counter moved with our two requests
    assert 'status="200"' in text and 'status="404"' in text


def _counter(text: str, model: str) -> float:
    """Sum of ray_aigc_ray_requests_total over the 200 series of ``model``."""
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("ray_aigc_ray_requests_total{")
            and f'model="{model}"' in line
            and 'status="200"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total
