"""Unit tests for aigc_ray.serve's pure pieces: API keys, bind policy, request handling (no Ray)."""

import asyncio
import json

import pytest
from starlette.requests import Request

from aigc_ray.engine import GenerationResult, InvalidParamError
from aigc_ray.model import ModelDirError
from aigc_ray.serve import (
    API_KEYS_ENV,
    API_KEYS_FILE_ENV,
    CompletionRequest,
    ServeError,
    _prompt,
    _sampling,
    build_app,
    check_bind,
    completion_body,
    key_allowed,
    load_api_keys,
    parse_body,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------- API keys


def test_key_allowed_without_keys():
    assert key_allowed(None, [])
    assert key_allowed("Bearer anything", [])


def test_key_allowed_with_keys():
    keys = ["k1", "second-key"]
    assert key_allowed("Bearer k1", keys)
    assert key_allowed("Bearer second-key", keys)
    assert not key_allowed("Bearer k2", keys)
    assert not key_allowed("Bearer k1x", keys)
    assert not key_allowed("Bearer ", keys)
    assert not key_allowed(None, keys)
    assert not key_allowed("", keys)
    assert not key_allowed("k1", keys)  # no scheme
    assert not key_allowed("Basic k1", keys)


@pytest.fixture
def no_key_env(monkeypatch):
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    monkeypatch.delenv(API_KEYS_FILE_ENV, raising=False)
    return monkeypatch


def test_load_api_keys_none(no_key_env):
    assert load_api_keys() == []


def test_load_api_keys_from_env(no_key_env):
    no_key_env.setenv(API_KEYS_ENV, " a, b ,,c,")
    assert load_api_keys() == ["a", "b", "c"]


def test_load_api_keys_from_file(no_key_env, tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text("file-key-1\n\n  file-key-2  \n")
    no_key_env.setenv(API_KEYS_FILE_ENV, str(f))
    assert load_api_keys() == ["file-key-1", "file-key-2"]
    no_key_env.setenv(API_KEYS_ENV, "env-key")
    assert load_api_keys() == ["env-key", "file-key-1", "file-key-2"]


def test_load_api_keys_missing_file_is_loud(no_key_env, tmp_path):
    no_key_env.setenv(API_KEYS_FILE_ENV, str(tmp_path / "missing.txt"))
    with pytest.raises(ServeError, match="missing.txt"):
        load_api_keys()


# ---------------------------------------------------------------- bind policy


def test_check_bind_refuses_public_without_keys():
    with pytest.raises(ServeError) as ei:
        check_bind("0.0.0.0", [])
    msg = str(ei.value)
    assert "0.0.0.0" in msg and API_KEYS_ENV in msg
    with pytest.raises(ServeError):
        check_bind("10.1.2.3", [])


def test_check_bind_allows_public_with_keys():
    check_bind("0.0.0.0", ["k"])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_check_bind_allows_loopback(host):
    check_bind(host, [])


# ---------------------------------------------------------------- request handling


def req(**kw) -> CompletionRequest:
    return CompletionRequest(**{"model": "m", "prompt": "p", **kw})


@pytest.mark.parametrize("max_tokens", [0, -1, 513])
def test_sampling_rejects_max_tokens_out_of_range(max_tokens):
    with pytest.raises(InvalidParamError) as ei:
        _sampling(req(max_tokens=max_tokens), 512)
    assert ei.value.param == "max_tokens"
    assert "512" in str(ei.value)


def test_sampling_maps_fields():
    p = _sampling(req(max_tokens=512, temperature=0.5, top_p=0.9, top_k=5, stop="\n", seed=7), 512)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (512, 0.5, 0.9, 5, 7)
    assert p.stop == ["\n"]
    assert _sampling(req(stop=["a", "b"]), 16).stop == ["a", "b"]
    assert _sampling(req(), 16).stop == []
    assert _sampling(req(), 16).max_tokens == 16  # OpenAI's default


def test_prompt_forms():
    assert _prompt(req(prompt="hi")) == "hi"
    assert _prompt(req(prompt=["hi"])) == "hi"
    for bad in ([], ["a", "b"]):
        with pytest.raises(InvalidParamError) as ei:
            _prompt(req(prompt=bad))
        assert ei.value.param == "prompt"


def test_completion_body_usage_and_shape():
    result = GenerationResult(text=" world", token_ids=[5, 6, 0], prompt_tokens=7,
                              completion_tokens=3, finish_reason="stop")  # fmt: skip
    body = completion_body(result, "aigc-tiny")
    assert body["object"] == "text_completion"
    assert body["model"] == "aigc-tiny"
    assert body["id"].startswith("cmpl-")
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    (choice,) = body["choices"]
    assert choice == {"index": 0, "text": " world", "logprobs": None, "finish_reason": "stop"}
    assert completion_body(result, "x")["id"] != body["id"]
    json.dumps(body)  # serializable


def parse(raw: bytes):
    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    return asyncio.run(parse_body(request, CompletionRequest))


def error_of(resp) -> tuple[int, dict]:
    return resp.status_code, json.loads(resp.body)["error"]


def test_parse_body_valid():
    r = parse(json.dumps({"model": "m", "prompt": "x", "max_tokens": 3, "extra": 1}).encode())
    assert isinstance(r, CompletionRequest)
    assert r.max_tokens == 3


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b""])
def test_parse_body_invalid_json(raw):
    status, err = error_of(parse(raw))
    assert status == 400
    assert err["type"] == "invalid_request_error"
    assert "not valid JSON" in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_parse_body_not_an_object():
    status, err = error_of(parse(b"[1, 2]"))
    assert status == 400 and "JSON object" in err["message"]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "m", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "x", "n": 2}, "n"),
        ({"prompt": "x"}, "model"),
        ({"model": "m", "prompt": "x", "max_tokens": "lots"}, "max_tokens"),
    ],
)
def test_parse_body_validation_error_names_param(body, param):
    status, err = error_of(parse(json.dumps(body).encode()))
    assert status == 400
    assert err["param"] == param
    assert err["message"].startswith(param)


# ---------------------------------------------------------------- app builder (no deploy)


def test_build_app_requires_model_dir():
    with pytest.raises(ServeError, match="model_dir"):
        build_app({})


def test_build_app_rejects_non_model_dir(tmp_path):
    with pytest.raises(ModelDirError):
        build_app({"model_dir": str(tmp_path)})


def test_build_app_rejects_unknown_arg(tiny_model_dir):
    with pytest.raises(ValueError, match="num_replica"):
        build_app({"model_dir": str(tiny_model_dir), "num_replica": 2})
