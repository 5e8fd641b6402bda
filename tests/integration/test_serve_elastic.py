"""Serving under change: replicas that autoscale with load and back (no failed request), a cold
start after scale-to-zero that waits instead of failing, and a model replaced under load
(rolling update, then rollback) with zero failed requests. Each test reports what it measured
(requests sent and failed, times to scale and to switch) in the session's summary."""

import threading
import time
from pathlib import Path

import httpx
import pytest
from s3env import free_port
from waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "test-key-1"
PORT = free_port()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from aigc_ray.config import ModelConfig
    from aigc_ray.data import stdlib_files
    from aigc_ray.model import build_model, train_tokenizer

    root = tmp_path_factory.mktemp("elastic-models")
    texts = [
        Path(p).read_text(encoding="utf-8", errors="replace")[:4000]
        for p in sorted(stdlib_files())[:30]
    ]
    tok = train_tokenizer(texts, 512, root / "tok")
    out = {}
    for name, seed in (("a", 11), ("b", 12)):
        arch = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=256)
        build_model(arch, tok, seed=seed).save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
        out[name] = str(root / name)
    return out


def _serve_cfg(dirs, live_dir: str, live_version: str | None = None):
    from aigc_ray.config import ServeConfig

    fast = {"upscale_delay_s": 1, "look_back_period_s": 3}
    return ServeConfig(
        port=PORT,
        num_cpus=0.25,
        engine="builtin",
        request_timeout_s=60,
        models=[
            {
                "name": "elastic",
                "model_dir": dirs["a"],
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 2,
                    "downscale_delay_s": 2,
                    **fast,
                },
            },
            {
                "name": "cold",
                "model_dir": dirs["a"],
                "autoscaling": {
                    "min_replicas": 0,
                    "max_replicas": 1,
                    "initial_replicas": 1,
                    "downscale_delay_s": 1,
                    **fast,
                },
            },
            {"name": "live", "model_dir": live_dir, "version": live_version},
        ],
    )


@pytest.fixture(scope="module")
def base(ray_session, dirs):
    from ray import serve

    from aigc_ray.serve import run_serve

    yield run_serve(_serve_cfg(dirs, dirs["a"], "v1"))
    serve.shutdown()


class Load:
    """Closed-loop clients sending completions until stopped; every outcome is kept."""

    def __init__(self, base: str, model: str, clients: int, max_tokens: int = 24):
        self.url, self.model, self.max_tokens = f"{base}/v1/completions", model, max_tokens
        self.results: list[tuple[float, int, str | None]] = []  # (time, status, fingerprint)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self):
        body = {"model": self.model, "prompt": "def main(", "max_tokens": self.max_tokens}
        body["temperature"] = 0
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
            while not self.stop.is_set():
                try:
                    r = c.post(self.url, json=body)
                    ok = r.status_code == 200
                    fp = r.json().get("system_fingerprint") if ok else r.text[:300]
                    self.results.append((time.monotonic(), r.status_code, fp))
                except httpx.HTTPError as e:
                    self.results.append((time.monotonic(), -1, repr(e)))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()

    @property
    def failed(self) -> list:
        return [r for r in self.results if r[1] != 200]


def _running(model: str) -> int:
    from ray import serve

    d = serve.status().applications["aigc"].deployments[f"model-{model}"]
    return d.replica_states.get("RUNNING", 0)


def test_replicas_grow_under_load_and_shrink_after_with_no_failed_request(base, measured):
    assert _running("elastic") == 1
    with Load(base, "elastic", clients=8) as load:
        up = wait_until(lambda: _running("elastic") == 2, 90, "scaled to 2 replicas under load")
        time.sleep(3)  # both replicas serve
    sent = len(load.results)
    down = wait_until(lambda: _running("elastic") == 1, 90, "back to 1 replica after the load")
    assert not load.failed, load.failed[:3]
    measured(
        "autoscaling 1..2, 8 clients",
        f"{sent} requests, {len(load.failed)} failed; up in {up:.1f} s, down in {down:.1f} s",
    )


def test_first_request_after_scale_to_zero_waits_for_a_cold_start(base, measured):
    wait_until(lambda: _running("cold") == 0, 90, "scaled to zero when idle")
    t0 = time.monotonic()
    r = httpx.post(
        f"{base}/v1/completions",
        json={"model": "cold", "prompt": "x", "max_tokens": 4},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    latency = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    measured("cold start after scale to zero", f"first request 200 in {latency:.1f} s")


def _versions(base: str) -> dict:
    r = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    return {m["id"]: m["version"] for m in r.json()["data"]}


def _update_under_load(base, cfg, old: str, new: str) -> tuple[Load, float]:
    """Deploy `cfg` while 4 clients run; return the load and seconds until every response
    comes from `new`."""
    from aigc_ray.serve import run_serve

    with Load(base, "live", clients=4, max_tokens=8) as load:
        time.sleep(2)
        t0 = time.monotonic()
        run_serve(cfg)  # the same app name: Serve updates it in place
        wait_until(
            lambda: [fp for _, s, fp in load.results[-4:]] == [new] * 4,
            90,
            f"responses from version {new}",
        )
        switched = time.monotonic() - t0  # from the deploy call to all answers from `new`
        time.sleep(1)
    fps = [fp for _, s, fp in load.results if s == 200]
    assert fps[0] == old and fps[-1] == new
    # once the new version answered, the old one never answers again
    first_new = fps.index(new)
    assert old not in fps[first_new + 4 :], "old version answered after the switch"
    return load, switched


def test_model_update_and_rollback_under_load_fail_no_request(base, dirs, measured):
    from aigc_ray.storage import model_version

    assert _versions(base)["live"] == "v1"
    # roll out: the same name to a new directory with no label (its files' fingerprint)
    new = model_version(dirs["b"])
    load, switched = _update_under_load(base, _serve_cfg(dirs, dirs["b"]), "v1", new)
    assert not load.failed, load.failed[:3]
    assert _versions(base)["live"] == new
    measured(
        "model update under load (4 clients)",
        f"{len(load.results)} requests, 0 failed; all answers from the new model in "
        f"{switched:.1f} s",
    )
    # roll back: the previous config again
    back, switched = _update_under_load(base, _serve_cfg(dirs, dirs["a"], "v1"), new, "v1")
    assert not back.failed, back.failed[:3]
    assert _versions(base)["live"] == "v1"
    measured(
        "rollback under load (4 clients)",
        f"{len(back.results)} requests, 0 failed; back in {switched:.1f} s",
    )
