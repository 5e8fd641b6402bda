"""ModelIngress (serve.ingress: direct) in-process, without Ray: the OpenAI surface over the
replica's own engine through a LocalHandle. Its answers equal the Router's in front of a
ModelServer on the same model; a stream the client leaves, or a request past its deadline,
cancels the engine request in the replica (nothing keeps decoding for nobody)."""

import asyncio
import json
import time

import pytest
from engine_support import slowed
from starlette.requests import Request

from aigc_ray.serve.security import API_KEYS_ENV, API_KEYS_FILE_ENV

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KEY = "sk-direct-test-key-0001"


def _plain(deployment, name: str):
    """Our class under Serve's ASGI wrapper."""
    return next(c for c in deployment.func_or_class.__mro__[1:] if c.__name__ == name)


@pytest.fixture(scope="module")
def ingress(tiny_model_dir):
    from aigc_ray.serve.deployments import ModelIngress

    mp = pytest.MonkeyPatch()
    mp.setenv(API_KEYS_ENV, KEY)
    mp.delenv(API_KEYS_FILE_ENV, raising=False)
    cls = _plain(ModelIngress, "ModelIngress")
    model = {"name": "tiny", "model_dir": str(tiny_model_dir), "engine": "builtin"}
    server = cls(model, 64, 30.0, False)
    yield server
    mp.undo()


def _request(body: dict, key: str | None = KEY) -> Request:
    raw = json.dumps(body).encode()
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


async def _read(response) -> tuple[int, str]:
    if isinstance(response, dict):
        return 200, json.dumps(response)
    if hasattr(response, "body_iterator"):
        return response.status_code, "".join([c async for c in response.body_iterator])
    return response.status_code, response.body.decode()


def _sse_text(body: str) -> str:
    out = []
    for line in body.splitlines():
        if line.startswith("data: {"):
            out += [c.get("text", "") for c in json.loads(line[6:])["choices"]]
    return "".join(out)


def test_answers_equal_the_routers_over_a_model_server(ingress, tiny_model_dir):
    from aigc_ray.serve.deployments import LocalHandle, Router

    router = _plain(Router, "Router").__new__(_plain(Router, "Router"))
    router._init_surface({"tiny": LocalHandle(ingress)}, 64, 30.0)  # a second front, same engine
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 12, "temperature": 0}

    async def go():
        direct = await _read(await ingress.completions(_request(body)))
        routed = await _read(await router.completions(_request(body)))
        stream = await _read(await ingress.completions(_request({**body, "stream": True})))
        chat = await _read(
            await ingress.chat_completions(
                _request({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
            )
        )
        return direct, routed, stream, chat

    direct, routed, stream, chat = asyncio.run(go())
    assert direct[0] == routed[0] == stream[0] == chat[0] == 200
    text = json.loads(direct[1])["choices"][0]["text"]
    assert text and text == json.loads(routed[1])["choices"][0]["text"]
    assert _sse_text(stream[1]) == text and stream[1].rstrip().endswith("data: [DONE]")
    assert json.loads(direct[1])["usage"]["completion_tokens"] == 12 or "stop" in direct[1]
    cards = ingress._list_models(_request({}))["data"]
    assert [(c["id"], c["engine"], c["version"]) for c in cards] == [
        ("tiny", "builtin", ingress.version)
    ]


def test_the_replica_that_takes_http_paces_no_stream_under_load(ingress):
    """8 streams at once (decode steps slowed to 10 ms). By default (serve.stream_chunks_per_s
    unset) the replica that takes HTTP holds no delta back: the pacing interval its streams ask
    for (``_stream_interval``, which EngineRequest.adeltas waits out between two chunks) stays
    0 while they run, and every stream gets all its tokens. With the Router path's budget
    (330 chunks/s per replica) the same load asks for 8/330 s between chunks."""
    from aigc_ray.serve.deployments import ModelServer

    assert ingress.cfg.stream_chunks_per_s is None and ingress.chunks_per_s == 0
    assert ModelServer.func_or_class.DEFAULT_CHUNKS_PER_S == 330
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 16, "ignore_eos": True}

    async def one() -> int:
        status, text = await _read(await ingress.completions(_request({**body, "stream": True})))
        assert status == 200, text
        return json.loads(text.split("data: ")[-2])["usage"]["completion_tokens"]

    async def load() -> tuple[list[int], set[float]]:
        asked: set[float] = set()

        async def sample():
            while True:
                if ingress.engine.num_running == 8:
                    asked.add(ingress._stream_interval())
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())
        tokens = await asyncio.gather(*(one() for _ in range(8)))
        sampler.cancel()
        return tokens, asked

    with slowed(ingress.engine, 0.01):
        tokens, asked = asyncio.run(load())
        ingress.chunks_per_s = 330.0
        try:
            _, budgeted = asyncio.run(load())
        finally:
            ingress.chunks_per_s = 0.0
    assert tokens == [16] * 8
    assert asked == {0.0}
    assert budgeted == {8 / 330}


def test_errors_keep_openais_shape(ingress):
    async def go():
        calls = [
            ingress.completions(_request({"model": "nope", "prompt": "x"})),
            ingress.completions(_request({"model": "tiny", "prompt": "x"}, key=None)),
            ingress.completions(_request({"model": "tiny", "prompt": "x", "max_tokens": 999})),
            ingress.image_generations(_request({"model": "tiny", "prompt": "a cat"})),
        ]
        return [await _read(await c) for c in calls]

    results = asyncio.run(go())
    assert [s for s, _ in results] == [404, 401, 400, 400]
    assert "'nope' not found" in results[0][1]
    assert all(set(json.loads(b)) == {"error"} for _, b in results)


def test_a_left_stream_and_a_timeout_cancel_the_engine_request(ingress):
    """Each decode step slowed to 20 ms: the 40-token requests last 0.8 s unless cancelled."""
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 40, "ignore_eos": True}
    before = ingress.engine.stats()

    async def left_stream():
        response = await ingress.completions(_request({**body, "stream": True}))
        assert response.status_code == 200, response.body
        chunks = response.body_iterator
        await chunks.__anext__()  # the role chunk
        await chunks.__anext__()  # the first text
        assert ingress.engine.num_running == 1
        await chunks.aclose()  # the client went away (Starlette closes the body iterator)
        await asyncio.sleep(0.1)

    async def late():
        return await _read(await ingress.completions(_request(body)))

    with slowed(ingress.engine, 0.02):
        asyncio.run(left_stream())
        assert ingress.engine.num_running == 0
        left = ingress.engine.stats()
        ingress.timeout = 0.3  # past its deadline mid-decode: a 408, then no more decoding
        try:
            status, text = asyncio.run(late())
        finally:
            ingress.timeout = 30.0
        time.sleep(0.1)
    assert left["cancelled"] == before["cancelled"] + 1, left
    assert left["generated_tokens"] - before["generated_tokens"] < 40
    assert status == 408 and "timed out" in text
    assert ingress.engine.num_running == 0
    after = ingress.engine.stats()
    assert after["cancelled"] == left["cancelled"] + 1 and after["finished"] == left["finished"]


def test_past_its_queue_the_replica_answers_503_in_openais_shape(tiny_model_dir, monkeypatch):
    """max_ongoing_requests 1 + max_queued_requests 1: two streams are taken (one decoding,
    one waiting in the engine), the third request gets OpenAI's 503; once they end, requests
    are taken again. (Serve's own rejection would be plain text: ingress_options lets them
    reach the replica.)"""
    from aigc_ray.config import ServedModel
    from aigc_ray.serve.app import ingress_options
    from aigc_ray.serve.deployments import ModelIngress

    monkeypatch.setenv(API_KEYS_ENV, KEY)
    model = {
        "name": "tiny",
        "model_dir": str(tiny_model_dir),
        "engine": "builtin",
        "max_ongoing_requests": 1,
        "max_queued_requests": 1,
        "max_batch_size": 1,
    }
    options = ingress_options(ServedModel(**model))
    assert options["max_ongoing_requests"] > 2 and options["max_queued_requests"] == -1
    server = _plain(ModelIngress, "ModelIngress")(model, 64, 30.0, False)
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 20, "ignore_eos": True}

    async def go():
        first = await server.completions(_request({**body, "stream": True}))
        second = await server.completions(_request({**body, "stream": True}))
        third = await _read(await server.completions(_request(body)))
        streamed = [await _read(first), await _read(second)]
        after = await _read(await server.completions(_request({**body, "max_tokens": 2})))
        return third, streamed, after

    try:
        with slowed(server.engine, 0.02):
            third, streamed, after = asyncio.run(go())
    finally:
        server.engine.close()
    assert third[0] == 503, third
    assert json.loads(third[1])["error"]["code"] == "overloaded"
    assert [s for s, _ in streamed] == [200, 200]
    assert all(b.rstrip().endswith("data: [DONE]") for _, b in streamed)
    assert after[0] == 200 and server.open == 0
