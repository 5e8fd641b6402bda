"""The dashboards against a real Prometheus (Debian's `prometheus` package): it scrapes the
shared local Ray's metrics export port while a text and an image model serve real requests and a
tiny training run steps; then, for each dashboard in aigc_ray/dashboards, every query of every
panel must return data at one moment (a screen of panels that all show something).

Prometheus is configured the way Ray's own setup does it (<session>/metrics/prometheus/
prometheus.yml: file_sd_configs on a service discovery file listing each node's metrics export
port), with a 1 s scrape interval, temp storage and a free port; the test stops it by pid.
"""

import json
import math
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from ports import free_port

from aigc_ray.config import load_config
from aigc_ray.dashboards import DASHBOARD_FILES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "test-key-1"  # set for the replicas by the ray_session fixture (runtime_env)
RUN = "monitoring"
APP = "monitoring"
RATE_INTERVAL = "30s"  # $__rate_interval: Grafana's value for a 10 s scrape interval is 40 s
OVERRIDES = [
    "data.inputs=[stdlib]",
    "data.max_docs=30",
    "data.vocab_size=512",
    "data.seq_len=64",
    "train.seq_len=64",
    "data.val_fraction=0.1",
    "data.near_dedup=false",
    "data.num_tokenize_actors=1",
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.max_position_embeddings=128",
    f"train.name={RUN}",
    "train.num_workers=1",
    "train.cpus_per_worker=0.5",
    "train.batch_size=4",
    "train.max_steps=20",
    "train.eval_every=10",
    "train.checkpoint_every=10",
    "train.eval_batches=1",
    "train.warmup_steps=5",
]


@pytest.fixture(scope="module")
def prometheus(ray_session, tmp_path_factory):
    """A Prometheus scraping every node of the shared Ray each second; yields its URL."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("no `prometheus` on PATH: `apt-get install prometheus` (make test does)")
    root = tmp_path_factory.mktemp("prometheus")
    # what Ray's dashboard writes to <session>/prom_metrics_service_discovery.json (the shared
    # session runs without the dashboard, so the test writes it from the node table)
    targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray_session.nodes()]
    (root / "sd.json").write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
    (root / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n- job_name: ray\n  file_sd_configs:\n"
        f"  - files: ['{root / 'sd.json'}']\n"
    )
    proc, url = _start_prometheus(exe, root)
    try:
        _wait_for(lambda: _up(url, len(targets)), 30, f"Prometheus never scraped {targets}")
        yield url
    finally:
        proc.kill()
        proc.wait(10)


def _start_prometheus(exe: str, root: Path) -> tuple[subprocess.Popen, str]:
    """Prometheus on a free port, ready; another try on a new port when the port was taken
    between the check and the bind (the machine is shared)."""
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen(
            [
                exe,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(root / "prometheus.log").open("a"),
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=5).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        proc.kill()
        proc.wait(10)
    pytest.fail(f"Prometheus did not start: {(root / 'prometheus.log').read_text()[-2000:]}")


def _up(url: str, n: int) -> bool:
    try:
        result = _query(url, 'up{job="ray"} == 1')
    except httpx.HTTPError:
        return False
    return len(result) == n


def _wait_for(check, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(message)
        time.sleep(0.5)


def _query(url: str, expr: str, at: float | None = None) -> list:
    params = {"query": expr, **({"time": at} if at is not None else {})}
    body = httpx.get(f"{url}/api/v1/query", params=params, timeout=30).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _query_range(url: str, expr: str, start: float, end: float) -> list:
    params = {"query": expr, "start": start, "end": end, "step": 1}
    body = httpx.get(f"{url}/api/v1/query_range", params=params, timeout=30).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _metric_names_seen(url: str, start: float, end: float) -> set[str]:
    params = {"start": start, "end": end}
    body = httpx.get(f"{url}/api/v1/label/__name__/values", params=params, timeout=30).json()
    return set(body["data"])


def _finite(value: str) -> bool:
    return math.isfinite(float(value))


def _shows_data(expr: str, value: str) -> bool:
    """A finite value; for rates a positive one (traffic never stops while the test runs, and
    a counter left by an earlier module's replicas would give 0)."""
    return _finite(value) and ("rate(" not in expr or float(value) > 0)


# ---------------------------------------------------------------- the dashboards' queries


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel (rows' nested panels too), with
    the variables as Grafana substitutes them when 'All' is selected."""
    values = {"__rate_interval": RATE_INTERVAL, "__interval": "1s", "__range": "5m"}
    for var in dashboard["templating"]["list"]:
        if var["type"] in ("query", "custom"):
            values[var["name"]] = var.get("allValue") or ".*"

    def substitute(expr: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)

    out = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out += [(p["title"], substitute(t["expr"])) for t in p.get("targets", [])]
    return out


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(ray_\w+)", expr))


# ---------------------------------------------------------------- workload


def _model_dirs(root: Path) -> dict:
    """A random-init text model (its own small tokenizer) and a digits image model."""
    import torch
    from tiny import tiny_model_dir, tiny_tokenizer

    from aigc_ray.config import ImageModelConfig
    from aigc_ray.images.model import build_unet, noise_scheduler, save_pipeline

    tok = tiny_tokenizer(root / "tok", vocab=512, files=20)
    text = tiny_model_dir(root / "text", tok, seed=1, hidden_size=64, num_layers=2, num_heads=2)
    torch.manual_seed(0)
    unet = build_unet(ImageModelConfig(block_out_channels=[16, 32]), 16, 1, 10)
    save_pipeline(unet, noise_scheduler(1000), [str(i) for i in range(10)], root / "digits")
    return {"text": text, "digits": str(root / "digits")}


def _traffic(base: str, stop: threading.Event, sent: dict) -> None:
    """Completions (whole and streamed), an unknown model (404) and an image, round after
    round, so every rate window holds requests, tokens, errors and images."""
    headers = {"Authorization": f"Bearer {KEY}"}
    text = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 6, "ignore_eos": True}
    calls = [
        ("/v1/completions", text),
        ("/v1/completions", {**text, "stream": True}),
        ("/v1/completions", {**text, "model": "nope"}),
        ("/v1/images/generations", {"model": "digits", "prompt": "3", "n": 2}),
    ]
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        while not stop.is_set():
            for path, body in calls:
                status = client.post(path, json=body).status_code
                sent[status] = sent.get(status, 0) + 1
            stop.wait(1.0)  # a few requests per 10 s report is enough: save the CPU


def _train_in_thread(cfg) -> tuple[threading.Thread, dict]:
    """Train on the preprocessed shards (Ray Train) in a thread.

    Ray's processes report their metrics every 10 s (metrics_report_interval_ms) and Ray
    Train stops its workers without a last report: values set in a worker's last seconds are
    never exported. The run lasts seconds, so fit() runs in a task whose runtime env (which
    its Train workers inherit) makes them report every second, as the scrape interval is.
    """
    import ray

    from aigc_ray.train import fit

    box: dict = {}
    fast_reports = {"env_vars": {"RAY_metrics_report_interval_ms": "1000"}}
    fit_task = ray.remote(num_cpus=0, max_retries=0, runtime_env=fast_reports)(fit)

    def run():
        try:
            task = fit_task.remote(cfg.train, cfg.model, cfg.data.output_dir)
            box["result"] = ray.get(task)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


@pytest.fixture(scope="module")
def workload(prometheus, serve_port, tmp_path_factory):
    """A small corpus preprocessed (Ray Data), then two models served under steady traffic
    (until the module ends) while a 1-worker run trains in a thread; ``finished()`` waits for
    the run. Serve's replicas take 0.5 CPU, the training worker 0.5, its data ingest 1."""
    from ray import serve

    from aigc_ray.config import ServeConfig
    from aigc_ray.data import run_preprocess
    from aigc_ray.serve import run_serve

    root = tmp_path_factory.mktemp("monitoring")
    cfg = load_config(
        "configs/tiny.yaml",
        [*OVERRIDES, f"data.output_dir={root / 'data'}", f"train.run_dir={root / 'run'}"],
    )
    start = time.time()
    # before Serve: the data stage's read tasks and tokenizer pool take every CPU they find
    run_preprocess(cfg.data)
    trainer, box = _train_in_thread(cfg)  # its startup overlaps Serve's
    dirs = _model_dirs(root)
    serve_cfg = ServeConfig(
        port=serve_port,
        num_cpus=0.25,
        num_inference_steps=2,
        models=[
            {"name": "tiny", "model_dir": dirs["text"], "engine": "builtin"},  # vLLM: +30 s
            {"name": "digits", "model_dir": dirs["digits"], "batch_wait_timeout_s": 0.05},
        ],
    )
    base = run_serve(serve_cfg, app_name=APP)
    stop, sent = threading.Event(), {}
    traffic = threading.Thread(target=_traffic, args=(base, stop, sent))
    traffic.start()

    def finished() -> list[dict]:
        """The run's metrics.jsonl rows, once fit() has returned."""
        trainer.join(600)
        if "error" in box:
            raise box["error"]
        text = Path(cfg.train.run_dir, "metrics.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]

    yield {"start": start, "sent": sent, "finished": finished}
    stop.set()
    traffic.join(120)
    trainer.join(600)
    serve.delete(APP)  # the session's Serve instance stays for the next module


# ---------------------------------------------------------------- tests


def _moment_with_all_data(url: str, queries: list, start: float, end: float):
    """(latest time at which every query shows data, or None; queries never showing any)."""
    moments, empty = None, []
    for title, expr in queries:
        result = _query_range(url, expr, start, end)
        times = {t for s in result for t, v in s["values"] if _shows_data(expr, v)}
        if not times:
            empty.append((title, expr))
        moments = times if moments is None else moments & times
    return (max(moments) if moments else None), empty


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_every_panel_query_returns_data_from_prometheus(prometheus, workload, path):
    """A moment at which every query of the dashboard shows data (finite, rates positive):
    found with range queries (what Grafana's time-series panels send) as soon as there is one,
    then confirmed with an instant query (/api/v1/query) of each at that moment. A query naming
    a metric nobody exports never returns data, and the failure names it."""
    queries = panel_queries(json.loads(path.read_text()))
    assert queries, f"{path.name} has no panel queries"
    start, deadline = workload["start"], time.monotonic() + 240
    while True:  # Ray's agents take ~10 s per report, and rates need two
        end = time.time()
        at, empty = _moment_with_all_data(prometheus, queries, start, end)
        if at is not None or time.monotonic() > deadline:
            break
        time.sleep(2)
    unknown = sorted(
        {m for _, e in queries for m in metric_names(e)}
        - _metric_names_seen(prometheus, start, end)
    )
    assert not unknown, f"{path.name} queries metrics Prometheus never scraped: {unknown}"
    assert not empty, f"{path.name}: panels with no data: {empty}"
    assert at is not None, f"{path.name}: no moment at which every panel has data"
    for title, expr in queries:
        result = _query(prometheus, expr, at)
        assert any(_shows_data(expr, s["value"][1]) for s in result), (title, expr, result)
    print(f"{path.name}: {len(queries)} queries return data at {time.ctime(at)}")
    for title, expr in queries:
        print(f"  [{title}] {expr}")


def test_training_gauges_hold_the_runs_numbers(prometheus, workload):
    """The exported values are the run's: its last step, last logged loss and eval loss."""
    rows = workload["finished"]()
    last = rows[-1]
    assert last["step"] == 20

    def last_value(metric: str, labels: str = "") -> float | None:
        window = f"[{int(time.time() - workload['start']) + 5}s]"
        expr = f'last_over_time({metric}{{run="{RUN}"{labels}}}{window})'
        result = _query(prometheus, expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    # the last row's values reach Prometheus with the worker's next report
    _wait_for(lambda: last_value("ray_aigc_ray_train_step") == 20, 60, "step 20 never scraped")
    assert last_value("ray_aigc_ray_train_loss") == pytest.approx(last["loss"], abs=1e-4)
    assert last_value("ray_aigc_ray_train_eval_loss") == pytest.approx(last["val_loss"])
    assert last_value("ray_aigc_ray_train_throughput", ', unit="tokens"') > 0
    assert 0 < last_value("ray_aigc_ray_train_step_seconds") < 60
    sent = workload["sent"]
    assert sent.get(200, 0) >= 3 and sent.get(404, 0) >= 1, sent
