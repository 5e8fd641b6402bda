"""Prompt privacy and per-key usage on the Router and a real ModelServer (tiny model, built-in
engine), called in-process without Ray: no log record and no error body holds prompt or
completion text unless serve.log_prompts; usage is counted per key fingerprint, never per key."""

import asyncio
import hashlib
import inspect
import json
import logging

import pytest
from starlette.requests import Request

from aigc_ray.serve.protocol import ApiError
from aigc_ray.serve.security import API_KEYS_ENV, API_KEYS_FILE_ENV, key_fingerprint, request_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MARKER = "zq7-PRIVATE-marker-4481"  # in every prompt below; must never reach a log or an error
KEYS = ["sk-test-key-one-0001", "sk-test-key-two-0002"]


class _Response:
    """What a DeploymentHandle call returns: awaitable, or an async iterator for streams."""

    def __init__(self, result):
        if inspect.isasyncgen(result):
            self.gen = result
        else:
            self.task = asyncio.ensure_future(result)

    def __await__(self):
        return self.task.__await__()

    def __anext__(self):
        return self.gen.__anext__()

    def cancel(self):
        if hasattr(self, "task"):
            self.task.cancel()


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, job):
        return _Response(self.fn(job))


class FakeHandle:
    """A DeploymentHandle stand-in calling a deployment object's methods in-process."""

    def __init__(self, target):
        self.target = target

    def options(self, stream=False):
        return self

    def __getattr__(self, name):
        return _Method(getattr(self.target, name))


class Echoing:
    """A model deployment whose errors quote the prompt, as third-party messages may."""

    async def complete(self, job):
        if "raise" in job.prompts[0]:
            raise RuntimeError(f"engine exploded on {job.prompts[0]!r}")
        return {"error": ApiError(400, f"cannot take prompt {job.prompts[0]!r}").to_dict()}


class UsageSpy:
    def __init__(self):
        self.requests, self.tokens = [], []

    def record(self, fingerprint, model, status):
        self.requests.append((fingerprint, model, status))

    def add_tokens(self, fingerprint, model, prompt, completion):
        self.tokens.append((fingerprint, model, prompt, completion))


@pytest.fixture(scope="module")
def model_server(tiny_model_dir):
    from aigc_ray.serve.deployments import ModelServer

    cls = ModelServer.func_or_class
    return cls({"name": "tiny", "model_dir": str(tiny_model_dir), "engine": "builtin"})


@pytest.fixture
def caplog(caplog):
    """Also the records of Serve's request logger (it does not propagate to the root)."""
    serve_log = logging.getLogger("ray.serve")
    serve_log.addHandler(caplog.handler)
    yield caplog
    serve_log.removeHandler(caplog.handler)


def _router(monkeypatch, model_server, log_prompts: bool):
    from aigc_ray.serve.deployments import Router

    monkeypatch.setenv(API_KEYS_ENV, ",".join(KEYS))
    monkeypatch.delenv(API_KEYS_FILE_ENV, raising=False)
    wrapper = Router.func_or_class  # Serve's ASGI wrapper around our class
    plain = next(c for c in wrapper.__mro__[1:] if c.__name__ == "Router")
    router = plain.__new__(plain)
    models = {"tiny": FakeHandle(model_server), "echo": FakeHandle(Echoing())}
    plain.__init__(router, models, 16, 30.0, log_prompts=log_prompts)
    router.usage = UsageSpy()
    return router


def _request(body, key: str | None = KEYS[0]) -> Request:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


async def _call(router, path: str, body, key=KEYS[0]) -> tuple[int, str]:
    """(status, body text) of one request, a stream read to its end."""
    route = {"c": router.completions, "chat": router.chat_completions}[path]
    response = await route(_request(body, key))
    if isinstance(response, dict):
        return 200, json.dumps(response)
    if hasattr(response, "body_iterator"):
        return response.status_code, "".join([c async for c in response.body_iterator])
    return response.status_code, response.body.decode()


REQUESTS = [
    # (route, body, expected status)
    ("c", {"model": "tiny", "prompt": f"def {MARKER}(x):", "max_tokens": 4}, 200),
    ("c", {"model": "tiny", "prompt": f"# {MARKER}", "max_tokens": 4, "stream": True}, 200),
    (
        "chat",
        {"model": "tiny", "messages": [{"role": "user", "content": MARKER}], "max_tokens": 3},
        200,
    ),
    ("c", {"model": "tiny", "prompt": {"text": MARKER}}, 400),  # wrong type
    ("c", f'{{"model": "tiny", "prompt": "{MARKER}'.encode(), 400),  # not JSON
    ("chat", {"model": "tiny", "messages": [{"role": MARKER, "content": "hi"}]}, 400),
    ("c", {"model": "tiny", "prompt": MARKER * 40, "max_tokens": 4}, 400),  # context length
    ("c", {"model": "tiny", "prompt": MARKER, "stop": [MARKER] * 5}, 400),
    ("c", {"model": "tiny", "prompt": MARKER, "max_tokens": 999}, 400),
    ("c", {"model": "nope", "prompt": MARKER}, 404),
    ("c", {"model": "echo", "prompt": MARKER}, 400),  # a message quoting the prompt
    ("c", {"model": "echo", "prompt": f"raise {MARKER}"}, 500),  # an exception quoting it
]


def _run_all(router) -> list[tuple[int, str]]:
    async def go():
        return [await _call(router, path, body) for path, body, _ in REQUESTS]

    return asyncio.run(go())


def test_no_prompt_or_completion_text_in_logs_or_errors(monkeypatch, model_server, caplog):
    router = _router(monkeypatch, model_server, log_prompts=False)
    caplog.set_level(logging.DEBUG)
    results = _run_all(router)
    assert [s for s, _ in results] == [want for _, _, want in REQUESTS]
    completion = json.loads(results[0][1])["choices"][0]["text"]
    for (status, body), (_, sent, _) in zip(results, REQUESTS, strict=True):
        if status != 200:
            assert MARKER not in body, (sent, body)
            assert set(json.loads(body)) == {"error"}  # OpenAI's shape, no pydantic `input`
    assert "<prompt text>" in results[-2][1]  # the quoting message was cleaned, not dropped
    assert "internal error" in results[-1][1]
    assert MARKER not in caplog.text
    assert any("unexpected error" in r.getMessage() for r in caplog.records)  # still logged
    assert "response (key" not in caplog.text and repr(completion) not in caplog.text


def test_log_prompts_true_logs_requests_responses_and_rejected_bodies(
    monkeypatch, model_server, caplog
):
    router = _router(monkeypatch, model_server, log_prompts=True)
    caplog.set_level(logging.INFO)
    results = _run_all(router)
    assert [s for s, _ in results] == [want for _, _, want in REQUESTS]
    messages = [r.getMessage() for r in caplog.records]
    assert any("request (key" in m and f"def {MARKER}(x):" in m for m in messages)
    assert any("request rejected" in m and MARKER in m for m in messages)  # the bad JSON
    completion = json.loads(results[0][1])["choices"][0]["text"]
    assert any("response (key" in m and repr(completion) in m for m in messages)
    # our own error messages never quote prompts; with log_prompts, quoted ones pass unchanged
    for (status, body), (_, sent, _) in zip(results, REQUESTS, strict=True):
        if status in (400, 404):
            echo = isinstance(sent, dict) and sent["model"] == "echo"
            assert (MARKER in body) == echo, body


def test_usage_is_counted_per_key_fingerprint(monkeypatch, model_server):
    router = _router(monkeypatch, model_server, log_prompts=False)
    # ignore_eos: the token counts asserted below are exact (an unseeded temperature-1 row
    # may draw EOS early, depending on which tests used torch's generator before this one)
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 4, "ignore_eos": True}

    async def go():
        out = [await _call(router, "c", body, key) for key in (KEYS[0], KEYS[1], KEYS[1])]
        out.append(await _call(router, "c", {**body, "stream": True}, KEYS[0]))
        out.append(await _call(router, "c", body, "sk-not-a-key"))
        out.append(await _call(router, "c", {**body, "max_tokens": 999}, KEYS[1]))
        return out

    results = asyncio.run(go())
    assert [s for s, _ in results] == [200, 200, 200, 200, 401, 400]
    fp = [hashlib.sha256(k.encode()).hexdigest()[:8] for k in KEYS]
    assert router.usage.requests == [
        (fp[0], "tiny", 200),
        (fp[1], "tiny", 200),
        (fp[1], "tiny", 200),
        (fp[0], "tiny", 200),
        (fp[1], "tiny", 400),  # the 401 names no key: it presented none of ours
    ]
    usage = json.loads(results[0][1])["usage"]
    assert router.usage.tokens[0] == (fp[0], "tiny", usage["prompt_tokens"], 4)
    assert [t[0] for t in router.usage.tokens] == [fp[0], fp[1], fp[1], fp[0]]
    assert router.usage.tokens[3][2:] == (usage["prompt_tokens"], 4)  # the stream's, at its end
    recorded = json.dumps([router.usage.requests, router.usage.tokens])
    assert not any(k in recorded for k in KEYS)


def _fingerprint(key: str) -> str:
    """The label a key must get, computed here from the key alone (security.key_fingerprint's
    definition: the first 8 hex digits of its SHA-256), not by the code under test."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def test_request_key_and_fingerprint():
    assert request_key(f"Bearer {KEYS[1]}", KEYS) == KEYS[1]
    assert request_key("Bearer sk-test-key-one-000", KEYS) is None
    assert request_key(None, KEYS) is None and request_key("Bearer x", []) is None
    assert [key_fingerprint(k) for k in KEYS] == [_fingerprint(k) for k in KEYS]
    assert key_fingerprint(None) == "none"


def test_key_usage_metrics_label_requests_by_the_fingerprint_of_their_key(
    monkeypatch, model_server
):
    """The real metrics class behind the real Router: requests carrying each key come out
    labelled with that key's fingerprint, computed independently from the key; no label holds
    a key."""
    from aigc_ray.serve.metrics import KeyUsageMetrics

    seen = []

    class Counter:  # what KeyUsageMetrics hands to Ray's metrics API
        def __init__(self, name, description, tag_keys):
            self.name, self.tag_keys = name, tag_keys

        def inc(self, n, tags):
            assert set(tags) == set(self.tag_keys)
            seen.append((self.name, n, tags))

    monkeypatch.setattr("ray.serve.metrics.Counter", Counter)
    router = _router(monkeypatch, model_server, log_prompts=False)
    router.usage = KeyUsageMetrics()  # the real class instead of the spy
    # ignore_eos: the token counts asserted below are exact (an unseeded temperature-1 row
    # may draw EOS early, depending on which tests used torch's generator before this one)
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 4, "ignore_eos": True}

    async def go():
        return [
            await _call(router, "c", body, KEYS[0]),
            await _call(router, "c", {**body, "stream": True}, KEYS[1]),
            await _call(router, "c", {**body, "max_tokens": 999}, KEYS[1]),
            await _call(router, "c", body, "sk-not-a-key"),
        ]

    results = asyncio.run(go())
    assert [s for s, _ in results] == [200, 200, 400, 401]
    prompt = json.loads(results[0][1])["usage"]["prompt_tokens"]
    fp0, fp1 = _fingerprint(KEYS[0]), _fingerprint(KEYS[1])
    requests = [(n, t) for name, n, t in seen if name == "aigc_ray_key_requests"]
    assert requests == [
        (1, {"key_fingerprint": fp0, "model": "tiny", "status": "200"}),
        (1, {"key_fingerprint": fp1, "model": "tiny", "status": "200"}),
        (1, {"key_fingerprint": fp1, "model": "tiny", "status": "400"}),
    ]  # the 401 presented none of our keys: no per-key count
    tokens = [(n, t) for name, n, t in seen if name == "aigc_ray_key_tokens"]
    assert tokens == [
        (prompt, {"key_fingerprint": fp0, "model": "tiny", "kind": "prompt"}),
        (4, {"key_fingerprint": fp0, "model": "tiny", "kind": "completion"}),
        (prompt, {"key_fingerprint": fp1, "model": "tiny", "kind": "prompt"}),  # the stream's
        (4, {"key_fingerprint": fp1, "model": "tiny", "kind": "completion"}),
    ]
    labels = json.dumps(seen)
    assert not any(k in labels for k in (*KEYS, "sk-not-a-key"))
