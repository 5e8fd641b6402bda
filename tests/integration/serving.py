"""What the serving tests of the integration tier share (test_serve.py, test_serve_elastic.py,
test_serve_privacy.py): the tiny models they serve, deploying an app on the session's one Serve
controller and deleting it by name, clients that keep sending requests while the app changes
(every outcome and every exception kept), and a model replica's counters.

Not a conftest: the test modules import these helpers by name and keep their own fixtures."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from tiny import tiny_model_dir, tiny_tokenizer
from waiting import wait_until

APP = "aigc"  # aigc_ray.serve.run_serve's app name; every app here is at route prefix "/"
KEY = "test-key-1"  # the replicas' keys, set by the ray_session fixture (runtime_env)
KEYS = ("test-key-1", "test-key-2")
REPLICA_HEADER = "x-aigc-replica"  # the model replica that answered (aigc_ray.serve)

SMALL = dict(hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=256)
# the slow model: a few hundred tokens per second at most, a context of 8192 tokens
SLOW = dict(hidden_size=256, num_layers=4, num_heads=4, max_position_embeddings=8192)
MODELS = {"a": (1, SMALL), "b": (2, SMALL), "slow": (3, SLOW)}  # name -> (seed, arch)


def model_dir(tmp_path_factory, name: str) -> str:
    """Model `name` of MODELS (one tokenizer for all), built once per test session under the
    session's base temp dir and reused by every module that serves it."""
    root = tmp_path_factory.getbasetemp() / "serve-models"
    out = root / name
    if not (out / "built").exists():
        root.mkdir(exist_ok=True)
        tok_dir = root / "tok"
        if (tok_dir / "built").exists():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tok_dir))
        else:
            tok = tiny_tokenizer(tok_dir, vocab=512, files=40, chars=5000)
            (tok_dir / "built").touch()
        seed, arch = MODELS[name]
        tiny_model_dir(out, tok, seed=seed, **arch)
        (out / "built").touch()
    return str(out)


def w8a8_dir(tmp_path_factory, name: str) -> str:
    """Model `name` as `aigc-ray optimize` writes it: an int8 W8A8 compressed-tensors directory
    (the built-in engine runs it on int8 kernels, vLLM on its own); built once per session."""
    from aigc_ray.config import OptimizeConfig
    from aigc_ray.optimize import run_optimize

    src = model_dir(tmp_path_factory, name)
    out = Path(f"{src}-w8a8")
    if not (out / "built").exists():
        cfg = OptimizeConfig(
            output_dir=str(out), quantization="w8a8", dtype="float32", benchmark=False
        )
        run_optimize(cfg, src, None)
        (out / "built").touch()
    return str(out)


def greedy_text(model_dir: str, prompt: str, max_tokens: int) -> str:
    """What greedy decoding of `prompt` must give, from transformers' own generate (not the
    serving engines): the text of up to `max_tokens` new tokens, stopping at EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------- deploying and deleting


def _replica_actors(app: str) -> list[str]:
    import ray

    names = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in names if a["name"].startswith(f"SERVE_REPLICA::{app}#")]


@contextmanager
def deployed(cfg, app: str = APP):
    """Deploy ServeConfig `cfg` as `app` on the session's Serve (cfg.port must be the session's
    serve_port) and yield its base URL; afterwards delete the app by name (the controller and
    proxy stay for the next module), wait until its replicas are gone, their CPUs are free
    again and route prefix "/" is free (no app left on it)."""
    import ray
    from ray import serve

    from aigc_ray.serve import run_serve

    cpus = ray.available_resources().get("CPU", 0.0)
    url = run_serve(cfg, app_name=app)
    try:
        yield url
    finally:
        serve.delete(app)  # blocks until the app is gone
        wait_until(lambda: not _replica_actors(app), 60, f"app {app}'s replicas gone")
        wait_until(
            lambda: ray.available_resources().get("CPU", 0.0) >= cpus - 1e-6,
            60,
            f"the {cpus:g} CPUs free before app {app} free again",
        )
        assert app not in serve.status().applications, "app still listed after serve.delete"


def redeploy(cfg, app: str = APP) -> str:
    """Deploy a changed config of a running app in place (a rolling update)."""
    from aigc_ray.serve import run_serve

    return run_serve(cfg, app_name=app)


# ---------------------------------------------------------------- a model replica's state


def stats(model: str, app: str = APP) -> dict:
    """Engine counters of one of `model`'s replicas (its pid and replica id too)."""
    from ray import serve

    return serve.get_deployment_handle(f"model-{model}", app).stats.remote().result()


def quiet_stats(model: str, timeout: float = 30.0) -> dict:
    """Stats once the model is idle and its counters have stopped moving.

    Requests left by earlier tests (a 408'd request still queued in Serve reaches the replica
    only after the one ahead of it is cancelled) must land before a test takes its baseline.
    """
    deadline = time.monotonic() + timeout
    last = stats(model)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = stats(model)
        if now == last and not now["running"] and not now["waiting"]:
            return now
        last = now
    raise AssertionError(f"model {model!r} never went quiet: {last}")


def running_replicas(model: str, app: str = APP) -> int:
    from ray import serve

    d = serve.status().applications[app].deployments[f"model-{model}"]
    return d.replica_states.get("RUNNING", 0)


# ---------------------------------------------------------------- clients under change


@dataclass
class Answer:
    """One request of a Load client: when it was sent and answered, its HTTP status (-1: an
    exception instead), the model version and replica that answered, its text or the error."""

    sent: float
    done: float
    status: int
    version: str | None = None
    replica: str | None = None
    text: str = ""
    stream: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


class Load:
    """Closed-loop clients sending completions (greedy, `max_tokens`) until stopped; `streams`
    of them stream. Every outcome is kept: an HTTP error, an error event inside a stream, a
    stream without its end, and any exception at all (a client thread that dies, or does not
    stop, is a failure too)."""

    def __init__(
        self,
        base: str,
        model: str,
        clients: int,
        max_tokens: int = 24,
        streams: int = 0,
        prompt: str = "def main(",
    ):
        self.url = f"{base}/v1/completions"
        self.body = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
        self.body["temperature"] = 0
        self.results: list[Answer] = []
        self.crashed: list[str] = []  # exceptions that escaped a client's loop
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(i < streams,), daemon=True)
            for i in range(clients)
        ]

    def _run(self, stream: bool):
        try:
            headers = {"Authorization": f"Bearer {KEY}"}
            with httpx.Client(timeout=120, headers=headers) as c:
                while not self.stop.is_set():
                    sent = time.monotonic()
                    try:
                        answer = self._stream(c, sent) if stream else self._complete(c, sent)
                    except Exception as e:  # noqa: BLE001 - every exception is a failed request
                        answer = Answer(sent, time.monotonic(), -1, stream=stream, error=repr(e))
                    self.results.append(answer)
        except BaseException as e:  # noqa: BLE001 - a client that dies is counted, not lost
            self.crashed.append(repr(e))

    def _complete(self, c: httpx.Client, sent: float) -> Answer:
        r = c.post(self.url, json=self.body)
        done = time.monotonic()
        if r.status_code != 200:
            return Answer(sent, done, r.status_code, error=r.text[:300])
        out = r.json()
        return Answer(
            sent,
            done,
            200,
            out.get("system_fingerprint"),
            r.headers.get(REPLICA_HEADER),
            out["choices"][0]["text"],
        )

    def _stream(self, c: httpx.Client, sent: float) -> Answer:
        with c.stream("POST", self.url, json={**self.body, "stream": True}) as r:
            if r.status_code != 200:
                r.read()
                return Answer(sent, time.monotonic(), r.status_code, stream=True, error=r.text)
            replica, texts, versions, finish, ended = r.headers.get(REPLICA_HEADER), [], set(), 0, 0
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    ended += 1
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Answer(sent, time.monotonic(), 200, stream=True, error=line[:300])
                versions.add(chunk.get("system_fingerprint"))
                for choice in chunk["choices"]:
                    texts.append(choice["text"])
                    finish += choice["finish_reason"] is not None
        done = time.monotonic()
        error = None
        if ended != 1 or finish != 1 or len(versions) != 1:
            error = f"stream: {ended} [DONE], {finish} finish reasons, versions {versions}"
        version = next(iter(versions)) if len(versions) == 1 else None
        return Answer(sent, done, 200, version, replica, "".join(texts), True, error)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(150)  # longer than one request's client timeout
            if t.is_alive():
                self.crashed.append(f"client {t.name} did not stop")

    @property
    def failed(self) -> list:
        """Every failed request and every crashed client."""
        return [a for a in self.results if not a.ok] + self.crashed

    def ok(self, since: float = 0.0) -> list[Answer]:
        """Successful answers to requests sent at or after `since` (time.monotonic())."""
        return [a for a in self.results if a.ok and a.sent >= since]
