"""serve.ingress on the session's Ray. The default, direct: Ray 2.60's HAProxy ingress forwards to
the model's own replicas, which serve the OpenAI surface (keys, streaming) with no Router. The
two other paths stay selectable and answer: haproxy (HAProxy, then the Router) and proxy (Serve's
Python proxy, then the Router). HAProxy never outlives what started it: SIGKILL of the
HAProxyManager actor takes HAProxy and its port with it and Serve starts a new one;
serve.shutdown() and `ray stop --force` leave no HAProxy process and the port free.

Serve reads the switch when its controller starts, so this module stops the session's Serve
controller first and stops its own at the end (the next module starts a new one)."""

import contextlib
import os
import signal

import httpx
import psutil
import pytest
from ports import free_port, listening
from serving import KEY, model_dir
from waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _manager():
    """The HAProxyManager actor of this node (Serve names proxies per node)."""
    import ray

    name = f"SERVE_PROXY_ACTOR-{ray.get_runtime_context().get_node_id()}"
    return ray.get_actor(name, namespace="serve")


def _haproxies(pid: int) -> list[psutil.Process]:
    """The HAProxy processes under `pid` (an HAProxyManager actor, or a node's root)."""
    from aigc_ray.cluster import process_tree

    found = []
    for p in process_tree(pid):
        with contextlib.suppress(psutil.Error):
            if os.path.basename(p.exe()) == "haproxy":
                found.append(p)
    return found


def _manager_pid() -> int:
    import ray

    return ray.get(_manager().__ray_call__.remote(lambda self: os.getpid()), timeout=30)


@pytest.fixture(scope="module")
def haproxy_app(ray_session, serve_port, tmp_path_factory):
    """(base URL, port, ServeConfig) of a one-model app with every ingress default."""
    from ray import serve

    from aigc_ray.config import ServeConfig
    from aigc_ray.serve import run_serve

    serve.shutdown()  # the switch is read when the controller starts
    cfg = ServeConfig(
        port=serve_port,
        num_cpus=0.25,
        models=[
            {"name": "tiny", "model_dir": model_dir(tmp_path_factory, "a"), "engine": "builtin"}
        ],
    )
    assert cfg.ingress == "direct"
    url = run_serve(cfg, app_name="haproxy")
    try:
        yield url, serve_port, cfg
    finally:
        serve.shutdown()


def _deployments() -> set[str]:
    from ray import serve

    return set(serve.status().applications["haproxy"].deployments)


def _surface_answers(url: str) -> httpx.Response:
    """Whole, streamed and keyless completions through `url`: 200 with 4 tokens, a stream
    ending in [DONE], and a 401 in OpenAI's shape; the whole one's response."""
    r = _complete(url)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    streamed = _complete(url, stream=True)
    lines = [x for x in streamed.text.splitlines() if x.startswith("data:")]
    assert streamed.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) >= 3
    refused = _complete(url, key=None)  # the keys hold on every path
    assert refused.status_code == 401 and refused.json()["error"]["type"], refused.text
    return r


def _complete(
    url: str, stream: bool = False, key: str | None = KEY, model: str = "tiny"
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "prompt": "def f(x):", "max_tokens": 4, "stream": stream}
    body["ignore_eos"] = True  # exactly 4 tokens (a sampled row may draw EOS first)
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)


def _answers(url: str) -> bool:
    try:
        return _complete(url).status_code == 200
    except httpx.HTTPError:  # nothing listening yet
        return False


def test_direct_haproxy_fronts_the_model_replica_itself(haproxy_app):
    """The default: no Router; the replica that answered is one of the model's own."""
    from serving import stats

    url, port, _ = haproxy_app
    assert _deployments() == {"model-tiny"}
    assert _haproxies(_manager_pid()), "no HAProxy under the HAProxyManager actor"
    r = _surface_answers(url)
    assert r.headers["x-aigc-replica"] == stats("tiny", app="haproxy")["replica"]


def test_replica_killed_mid_stream_ends_the_stream_and_is_replaced(haproxy_app):
    """The direct path has no Router to send an error event when a replica dies: the one
    replica is SIGKILLed after 3 chunks of a stream. The client's stream ends within seconds
    without [DONE] (it never hangs), HAProxy answers 502/503 while no replica is up, and Serve
    replaces the replica: requests succeed again."""
    import time

    from serving import stats

    url, port, _ = haproxy_app
    old = stats("tiny", app="haproxy")["pid"]
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 240, "stream": True}
    body["ignore_eos"] = True
    headers = {"Authorization": f"Bearer {KEY}"}
    lines, killed = [], None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        with contextlib.suppress(httpx.HTTPError):  # HAProxy may cut the chunked body short
            for line in r.iter_lines():
                lines += [line] if line.startswith("data:") else []
                if len(lines) == 3 and killed is None:
                    os.kill(old, signal.SIGKILL)
                    killed = time.monotonic()
    assert killed is not None, f"the stream ended before 3 chunks: {lines}"
    assert time.monotonic() - killed < 10, "the client's stream outlived its replica"
    assert "data: [DONE]" not in lines
    statuses = []

    def recovered() -> bool:
        try:
            r = _complete(url)
        except httpx.HTTPError as e:
            statuses.append(type(e).__name__)
            return False
        statuses.append(r.status_code)
        return r.status_code == 200

    wait_until(recovered, 120, "a new replica serving")
    assert set(statuses[:-1]) <= {502, 503, "RemoteProtocolError", "ReadError"}, statuses
    assert stats("tiny", app="haproxy")["pid"] != old


@pytest.mark.parametrize(
    ("ingress", "deployments"),
    [("direct", {"model-tiny", "AdapterRouter"}), ("haproxy", {"Router", "model-tiny"})],
)
def test_adapter_requests_go_to_the_replica_holding_the_adapter(
    haproxy_app, tmp_path_factory, ingress, deployments
):
    """2 replicas with 2 LoRA adapters, redeployed in place on each path that routes by
    adapter: direct (HAProxy asks serve.routing's AdapterRouter, which reads the body) and
    haproxy (HAProxy, then the Router; the smoke test of that path). An adapter's requests go
    to the replica that already holds it (Serve's multiplexing by adapter name): after its
    first request, every request naming adapter `one` is answered by that request's replica.
    The surface holds behind the router: keys, streams, an unknown adapter's 404."""
    import time

    from tiny import lora_adapter
    from transformers import AutoModelForCausalLM

    from aigc_ray.serve import run_serve

    url, port, cfg = haproxy_app
    base_dir = cfg.models[0].model_dir
    root = tmp_path_factory.mktemp(f"adapters-{ingress}")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    for seed, name in enumerate(("one", "two")):
        lora_adapter(base, root / name, seed)
    adapters = {name: str(root / name) for name in ("one", "two")}
    model = cfg.models[0].model_copy(update={"num_replicas": 2, "adapters": adapters})
    run_serve(cfg.model_copy(update={"ingress": ingress, "models": [model]}), app_name="haproxy")
    assert _deployments() == deployments
    _surface_answers(url)
    unknown = _complete(url, model="three")
    assert unknown.status_code == 404 and "three" in unknown.json()["error"]["message"]

    def replica(name: str) -> str:
        r = _complete(url, model=name)
        assert r.status_code == 200, r.text
        return r.headers["x-aigc-replica"]

    first = replica("one")
    time.sleep(2)  # the replica's adapter ids reach the router (pushed every 0.1 s)
    assert {replica(name) for name in ["one"] * 8} == {first}
    assert replica("two")
    assert len({replica("tiny") for _ in range(16)}) == 2, "the base model's load is not spread"


def test_haproxy_dies_with_its_manager_and_is_replaced(haproxy_app):
    """The HAProxyManager actor's process killed (its raylet alive, which reaps what it
    leaves): HAProxy goes with it and Serve starts a new manager and HAProxy."""
    url, port, _ = haproxy_app
    pid = _manager_pid()
    before = _haproxies(pid)
    assert before
    os.kill(pid, signal.SIGKILL)
    gone = psutil.wait_procs(before, timeout=15)[1]
    assert not gone, f"HAProxy outlived its manager: {[p.pid for p in gone]}"
    assert not _answers(url), "something still answers on the port"
    wait_until(lambda: _answers(url), 120, "a new HAProxy serving")
    assert _manager_pid() != pid


def test_serve_shutdown_leaves_no_haproxy_and_frees_the_port(haproxy_app):
    from ray import serve

    url, port, _ = haproxy_app
    procs = _haproxies(_manager_pid())
    assert procs and listening(port)
    serve.shutdown()
    alive = psutil.wait_procs(procs, timeout=30)[1]
    assert not alive, f"HAProxy left running: {[p.pid for p in alive]}"
    wait_until(lambda: not listening(port), 30, f"port {port} free")


def test_ingress_proxy_keeps_serves_python_proxy(haproxy_app):
    """serve.ingress: proxy on a new Serve: its Python proxy actor, no HAProxy, the Router."""
    from aigc_ray.serve import run_serve

    url, port, cfg = haproxy_app
    run_serve(cfg.model_copy(update={"ingress": "proxy"}), app_name="haproxy")
    assert _deployments() == {"Router", "model-tiny"}
    assert not _haproxies(_manager_pid())
    assert "ProxyActor" in repr(_manager()), repr(_manager())
    _surface_answers(url)


def test_ray_stop_force_leaves_no_haproxy_holding_the_port(tmp_path, tmp_path_factory):
    """`ray stop --force` SIGKILLs every Ray process, raylet included, and never HAProxy: with
    nothing left to reap it, HAProxy kept the port and the next `aigc-ray serve` could not
    bind. Here on a node of its own (`aigc-ray serve --keep-serving`, every ingress default,
    against it): every process of the node is SIGKILLed at once, and HAProxy dies too (the
    kernel's parent-death signal, set by aigc-ray-haproxy) and the port is free."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from aigc_ray.cluster import process_tree, start_ray_node

    bin_dir = Path(sys.executable).parent
    gcs, port = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    ray_dir = tempfile.mkdtemp(prefix="aigc_hp_", dir="/tmp")  # short: Ray's unix sockets
    args = ["--head", f"--port={gcs}", f"--temp-dir={ray_dir}", "--num-cpus=2"]
    root = start_ray_node([*args, "--include-dashboard=false"], env, tmp_path / "head.log")
    driver = subprocess.Popen(
        [str(bin_dir / "aigc-ray"), "serve", "--config", "configs/tiny.yaml", "--keep-serving"]
        + [f"serve.model_dir={model_dir(tmp_path_factory, 'a')}", f"serve.port={port}"]
        + ["serve.engine=builtin", "serve.num_cpus=0.5"],  # serve.ingress: direct, the default
        cwd=Path(__file__).resolve().parents[2],
        env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: listening(port) and _haproxies(root), 180, "HAProxy up")
        haproxies = _haproxies(root)
        ray_procs = [p for p in process_tree(root) if p not in haproxies]
        for p in ray_procs:  # what `ray stop --force` does: Ray's processes, not HAProxy
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        alive = psutil.wait_procs(haproxies, timeout=15)[1]
        assert not alive, f"HAProxy outlived `ray stop --force`: {[p.pid for p in alive]}"
        wait_until(lambda: not listening(port), 15, f"port {port} free")
    finally:
        driver.kill()
        out = driver.communicate(timeout=30)[0]
        for p in process_tree(root):
            p.kill()
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert "HAProxy ingress not usable" not in out, out
