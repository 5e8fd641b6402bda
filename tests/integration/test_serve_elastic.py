"""Serving under change: replicas that autoscale with load (both replicas answer) and back while
clients keep sending (no failed request), a cold start after scale-to-zero that waits instead
of failing, and a model replaced under load (rolling update, then rollback) with zero failed
requests, plain and streamed, each answer the greedy text of the version that gave it. The
autoscaling and cold-start tests serve an app of three models (the Router in front); the
rollout serves its one model alone, on the default path (HAProxy straight to the model's
replicas, which drain as Serve replaces them). Each test reports what it measured (requests
sent and failed, times to scale and to switch) in the session's summary."""

import time

import httpx
import pytest
from serving import KEY, Load, deployed, greedy_text, model_dir, redeploy, running_replicas
from waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT, MAX_TOKENS = "def main(", 8  # what the rollout's clients send (greedy)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {name: model_dir(tmp_path_factory, name) for name in ("a", "b")}


def _serve_cfg(dirs, port: int, live_dir: str, live_version: str | None = None):
    from aigc_ray.config import ServeConfig

    fast = {"upscale_delay_s": 1, "look_back_period_s": 3}
    return ServeConfig(
        port=port,
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


def _live_cfg(dirs, port: int, live_dir: str, live_version: str | None = None):
    """The app of model `live` alone: serve.ingress direct (the default) puts no Router in
    front of it; HAProxy forwards to its replicas, which a rollout replaces."""
    cfg = _serve_cfg(dirs, port, live_dir, live_version)
    return cfg.model_copy(update={"models": cfg.models[-1:]})


@pytest.fixture(scope="module")
def base(ray_session, serve_port, dirs):
    with deployed(_serve_cfg(dirs, serve_port, dirs["a"], "v1")) as url:
        yield url


def test_replicas_grow_under_load_and_shrink_while_clients_run_with_no_failed_request(
    base, measured
):
    assert running_replicas("elastic") == 1
    # two light clients (one streaming) run the whole time, six more make the load that scales
    # up: 8 ongoing / target 2 wants 2 replicas; the light 2 alone want 1
    with Load(base, "elastic", clients=2, streams=1) as light:
        with Load(base, "elastic", clients=6) as heavy:
            up = wait_until(
                lambda: running_replicas("elastic") == 2, 90, "scaled to 2 replicas under load"
            )
            t_up = time.monotonic()
            wait_until(
                lambda: len({a.replica for a in heavy.ok(t_up) + light.ok(t_up)}) == 2,
                60,
                "both replicas answering",
            )
        both = {a.replica for a in heavy.ok(t_up) + light.ok(t_up)}
        t_light = time.monotonic()
        down = wait_until(
            lambda: running_replicas("elastic") == 1, 90, "back to 1 replica, clients running"
        )
        t_down = time.monotonic()
        wait_until(lambda: len(light.ok(t_down + 2)) >= 4, 60, "answers after scaling down")
    assert None not in both and len(both) == 2, both  # two distinct replicas answered
    assert not heavy.failed, heavy.failed[:3]
    assert not light.failed, light.failed[:3]  # none failed while a replica was taken away
    during = [a for a in light.results if a.sent >= t_light]
    assert any(a.stream for a in during) and any(not a.stream for a in during)
    after = {a.replica for a in light.ok(t_down + 2)}  # sent once the replica had stopped
    assert len(after) == 1 and after < both, (after, both)
    sent = len(heavy.results) + len(light.results)
    measured(
        "autoscaling 1..2..1, 8 then 2 clients",
        f"{sent} requests ({len(during)} while scaling down), 0 failed; both replicas "
        f"answered; up in {up:.1f} s, down in {down:.1f} s",
    )


def test_first_request_after_scale_to_zero_waits_for_a_cold_start(base, measured):
    wait_until(lambda: running_replicas("cold") == 0, 90, "scaled to zero when idle")
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


def _update_under_load(base, cfg, old: str, new: str, expected: dict) -> tuple[Load, float]:
    """Deploy `cfg` while 4 clients run (one of them streaming); return the load and seconds
    until every client's answers come from `new`. Every answer, streamed or not, must be the
    greedy text of the version that says it answered (`expected`: version -> text)."""
    with Load(base, "live", clients=4, streams=1, max_tokens=MAX_TOKENS, prompt=PROMPT) as load:
        wait_until(
            lambda: {a.stream for a in load.ok()} == {True, False}, 30, "answers before the update"
        )
        t0 = time.monotonic()
        redeploy(cfg)  # the same app name: Serve updates it in place
        wait_until(
            lambda: (
                [a.version for a in load.results[-4:]] == [new] * 4
                and any(a.stream and a.version == new for a in load.results)
            ),
            90,
            f"responses from version {new}",
        )
        switched = time.monotonic() - t0  # from the deploy call to all answers from `new`
        time.sleep(1)
    ok = sorted(load.ok(), key=lambda a: a.done)
    assert not load.failed, load.failed[:3]
    assert ok[0].version == old and ok[-1].version == new
    for kind in (False, True):  # plain and streamed answers of both versions
        assert {a.version for a in ok if a.stream == kind} == {old, new}, kind
    wrong = [(a.version, a.stream, a.text) for a in ok if a.text != expected[a.version]]
    assert not wrong, wrong[:3]  # each answer is its own version's model's greedy text
    # once the new version answered, the old one never answers again (after the answers
    # already in flight then: one per client)
    versions = [a.version for a in ok]
    assert old not in versions[versions.index(new) + 4 :], "old version answered after the switch"
    return load, switched


def test_model_update_and_rollback_under_load_fail_no_request(base, dirs, serve_port, measured):
    from ray import serve

    from aigc_ray.storage import model_version

    # the one-model app of `live` (the default path: no Router), in place of the module's app
    redeploy(_live_cfg(dirs, serve_port, dirs["a"], "v1"))
    assert set(serve.status().applications["aigc"].deployments) == {"model-live"}
    assert _versions(base) == {"live": "v1"}
    new = model_version(dirs["b"])  # the same name to a new directory with no label
    expected = {
        "v1": greedy_text(dirs["a"], PROMPT, MAX_TOKENS),
        new: greedy_text(dirs["b"], PROMPT, MAX_TOKENS),
    }
    assert expected["v1"] != expected[new]  # the two versions can be told apart by their text
    load, switched = _update_under_load(
        base, _live_cfg(dirs, serve_port, dirs["b"]), "v1", new, expected
    )
    assert _versions(base)["live"] == new
    measured(
        "model update under load (4 clients, 1 streaming)",
        f"{len(load.results)} requests, 0 failed, each the greedy text of its version; all "
        f"answers from the new model in {switched:.1f} s",
    )
    # roll back: the previous config again
    back, switched = _update_under_load(
        base, _live_cfg(dirs, serve_port, dirs["a"], "v1"), new, "v1", expected
    )
    assert _versions(base)["live"] == "v1"
    measured(
        "rollback under load (4 clients, 1 streaming)",
        f"{len(back.results)} requests, 0 failed; back in {switched:.1f} s",
    )
