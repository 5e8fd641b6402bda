"""LoRA adapters served over one base model (serve.models[].adapters), in-process without Ray:
the OpenAI surface of a ModelIngress (serve.ingress: direct) and of a Router in front of the same
replica. A request names an adapter as its `model`; its greedy completion equals transformers'
on that adapter merged into the base; /v1/models lists each adapter with its base as parent; an
unknown adapter is a 404 naming it, an unusable one (another base, a rank above the maximum, a
corrupt file) a 400 with the reason, and the replica goes on serving the others."""

import asyncio
import json
import shutil

import pytest
from starlette.requests import Request
from tiny import lora_adapter

from aigc_ray.serve.security import API_KEYS_ENV, API_KEYS_FILE_ENV

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KEY = "sk-adapter-test-key-0001"
PROMPT = "def main("


def _plain(deployment, name: str):
    """Our class under Serve's ASGI wrapper."""
    return next(c for c in deployment.func_or_class.__mro__[1:] if c.__name__ == name)


def _request(body: dict) -> Request:
    raw = json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    headers = [(b"authorization", f"Bearer {KEY}".encode())]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers}, receive)


async def _read(response) -> tuple[int, dict | str]:
    if isinstance(response, dict):
        return 200, response
    if hasattr(response, "body_iterator"):
        return response.status_code, "".join([c async for c in response.body_iterator])
    return response.status_code, json.loads(response.body)


@pytest.fixture(scope="module")
def served(tiny_model_dir, model, tmp_path_factory):
    """A ModelIngress of the tiny model with adapters: `one` and `two` (random, different
    modules), `big` (rank 32 > max_lora_rank 16), `alien` (of another base: the `model` fixture,
    hidden size 64), `corrupt` (a truncated safetensors file), `missing` (no directory).
    Yields (replica, {adapter: its merged model}, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aigc_ray.serve.deployments import ModelIngress

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    root = tmp_path_factory.mktemp("served-adapters")
    merged = {
        "one": lora_adapter(base, root / "one", 1),
        "two": lora_adapter(base, root / "two", 2, targets=["q_proj", "v_proj", "down_proj"]),
    }
    lora_adapter(base, root / "big", 3, r=32)
    lora_adapter(model, root / "alien", 4)
    shutil.copytree(root / "one", root / "corrupt")
    weights = root / "corrupt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    names = ("one", "two", "big", "alien", "corrupt", "missing")
    mp = pytest.MonkeyPatch()
    mp.setenv(API_KEYS_ENV, KEY)
    mp.delenv(API_KEYS_FILE_ENV, raising=False)
    cls = _plain(ModelIngress, "ModelIngress")
    model_fields = {
        "name": "tiny",
        "model_dir": str(tiny_model_dir),
        "engine": "builtin",
        "adapters": {n: str(root / n) for n in names},
        "max_loras": 2,
    }
    replica = cls(model_fields, 64, 30.0, False)
    yield replica, merged, AutoTokenizer.from_pretrained(str(tiny_model_dir))
    replica.engine.close()
    mp.undo()


def _greedy_text(model, tok, prompt: str, n: int) -> str:
    import torch

    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _completion(model: str, **extra) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, **extra}


def test_a_request_names_an_adapter_and_gets_its_merged_models_greedy_text(served):
    from aigc_ray.serve.deployments import LocalHandle, Router

    replica, merged, tok = served
    router = _plain(Router, "Router").__new__(_plain(Router, "Router"))
    router._init_surface({"tiny": LocalHandle(replica)}, 64, 30.0, adapters={"one": "tiny"})

    async def go():
        out = {}
        for name in ("tiny", "one", "two"):
            status, body = await _read(await replica.completions(_request(_completion(name))))
            assert status == 200, body
            assert body["model"] == name
            out[name] = body["choices"][0]["text"]
        routed = await _read(await router.completions(_request(_completion("one"))))
        streamed = await _read(await replica.completions(_request(_completion("two", stream=True))))
        return out, routed, streamed

    texts, routed, (status, sse) = asyncio.run(go())
    for name, model in merged.items():
        assert texts[name] == _greedy_text(model, tok, PROMPT, 12), name
    assert len(set(texts.values())) == 3, f"the adapters did not change the text: {texts}"
    assert routed == (200, routed[1]) and routed[1]["choices"][0]["text"] == texts["one"]
    pieces = [
        c.get("text", "")
        for line in sse.splitlines()
        if line.startswith("data: {")
        for c in json.loads(line[6:])["choices"]
    ]
    assert status == 200 and "".join(pieces) == texts["two"]


def test_models_lists_each_adapter_with_its_base(served):
    replica, _, _ = served
    cards = {c["id"]: c for c in replica._list_models(_request({}))["data"]}
    assert set(cards) == {"tiny", "one", "two", "big", "alien", "corrupt", "missing"}
    assert "parent" not in cards["tiny"]
    assert {cards[a]["parent"] for a in cards if a != "tiny"} == {"tiny"}
    assert cards["one"]["engine"] == "builtin"


@pytest.mark.parametrize(
    "name, status, reason",
    [
        ("nope", 404, "model 'nope' not found"),
        ("big", 400, "rank 32 exceeds the configured max_lora_rank 16"),
        ("alien", 400, "was trained for another base model"),
        ("corrupt", 400, "cannot read"),
        ("missing", 400, "is not a PEFT adapter directory"),
    ],
)
def test_an_unknown_or_unusable_adapter_fails_its_request_only(served, name, status, reason):
    replica, _, _ = served

    async def go():
        bad = await _read(await replica.completions(_request(_completion(name))))
        bad_stream = await _read(
            await replica.chat_completions(
                _request(
                    {"model": name, "stream": True, "messages": [{"role": "user", "content": "x"}]}
                )
            )
        )
        good = await _read(await replica.completions(_request(_completion("one"))))
        return bad, bad_stream, good

    (code, body), (stream_code, stream_body), (ok, _) = asyncio.run(go())
    for got, err in ((code, body), (stream_code, stream_body)):
        assert got == status, err
        assert reason in err["error"]["message"] and err["error"]["param"] == "model", err
        assert err["error"]["type"] == (
            "not_found_error" if status == 404 else "invalid_request_error"
        )
    assert ok == 200  # the replica serves the others
    assert replica.open == 0


def test_adapter_names_must_not_clash_and_belong_to_one_model():
    from pydantic import ValidationError

    from aigc_ray.config import ServeConfig

    one = {"name": "a", "model_dir": "m"}
    with pytest.raises(ValidationError, match=r"adapter names must differ.*\['a'\]"):
        ServeConfig(models=[{**one, "adapters": {"a": "x"}}])
    with pytest.raises(ValidationError, match=r"\['x'\]"):
        ServeConfig(
            models=[
                {**one, "adapters": {"x": "p"}},
                {"name": "b", "model_dir": "m", "adapters": {"x": "q"}},
            ]
        )
    with pytest.raises(ValidationError, match=r"serve.models\[\].adapters"):
        ServeConfig(models=[one], adapters={"x": "p"})
    cfg = ServeConfig(model_dir="m", adapters={"x": "p"}, max_loras=3)
    (served,) = cfg.served_models()
    assert served.adapters == {"x": "p"} and served.max_loras == 3
    two = ServeConfig(models=[one, {"name": "b", "model_dir": "m", "adapters": {"y": "q"}}])
    assert [m.adapters for m in two.served_models()] == [{}, {"y": "q"}]
