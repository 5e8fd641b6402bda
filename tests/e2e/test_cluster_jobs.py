"""The day-one cluster workflow on a real multi-node Ray on this machine: a head and a worker
started with `ray start` under token authentication, as cluster.yaml starts them (each with its
own --temp-dir, the worker declaring a custom resource), the pipeline submitted with the real
`ray job submit --working-dir .` CLI, the endpoint it leaves running called over HTTP, a client
without the token refused, then both nodes stopped."""

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GCS_PORT, DASHBOARD_PORT, SERVE_PORT, S3_PORT = (free_port() for _ in range(4))
BUCKET = "aigc-e2e"
# An S3-compatible server (moto) on loopback stands in for the bucket of the README's workflow:
# the job gets its endpoint and credentials through the runtime env, as it would get AWS's.
S3_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


TOKEN_ENV: dict[str, str] = {}  # RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH, set by the fixture


def ray(*args, timeout=180, **kw):
    env = {**os.environ, **TOKEN_ENV, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [str(BIN / "ray"), *args],
        cwd=ROOT,
        env={**env, **kw.pop("env", {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


@pytest.fixture
def two_node_cluster():
    # short temp dirs: Ray's unix sockets live under them (107-byte path limit)
    tmp = Path(tempfile.mkdtemp(prefix="aigc_", dir="/tmp"))
    token = tmp / "auth_token"  # as cluster.yaml mounts it: a file, never on a command line
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    TOKEN_ENV.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    head = ray(
        "start",
        "--head",
        f"--port={GCS_PORT}",
        "--num-cpus=1",
        f"--temp-dir={tmp / 'h'}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={DASHBOARD_PORT}",
        "--disable-usage-stats",
    )
    assert head.returncode == 0, head.stderr[-2000:]
    try:
        worker = ray(
            "start",
            f"--address=127.0.0.1:{GCS_PORT}",
            "--num-cpus=1",
            '--resources={"data_worker": 1}',
            f"--temp-dir={tmp / 'w'}",
            "--disable-usage-stats",
        )
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield f"http://127.0.0.1:{DASHBOARD_PORT}"
    finally:
        _stop_nodes_under(tmp)  # these two nodes only: `ray stop` would stop every Ray here
        TOKEN_ENV.clear()
        shutil.rmtree(tmp, ignore_errors=True)


def _stop_nodes_under(temp_dir: Path) -> None:
    """Terminate the Ray processes started with ``--temp-dir`` under ``temp_dir`` (GCS, raylets,
    dashboard, log monitors) and every process they started (workers, drivers)."""
    import psutil

    roots = []
    for p in psutil.process_iter(["cmdline"]):
        if str(temp_dir) in " ".join(p.info["cmdline"] or []):
            roots.append(p)
    procs = {p.pid: p for r in roots for p in [r, *_children(r)]}
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _children(proc) -> list:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


@pytest.fixture
def s3_bucket():
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=S3_ENV["AWS_ENDPOINT_URL"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.2)
        yield client
    finally:
        proc.kill()


def test_pipeline_job_on_a_two_node_cluster(two_node_cluster, s3_bucket, tmp_path):
    """The README's cluster recipe: stage outputs in object storage, so nodes share them."""
    from aigc_ray.submit import check_upload

    # what `--working-dir .` packs: Ray's defaults (.git, .venv, __pycache__) + .gitignore +
    # .rayignore (runs/, data/): code and configs only
    plan = check_upload(ROOT)
    assert plan.package_size() < 5 * 2**20, plan.largest()
    env_vars = {**S3_ENV, "AIGC_RAY_CACHE": str(tmp_path / "cache")}
    submit = ray(
        "job",
        "submit",
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps({"env_vars": env_vars}),
        "--",
        "python",
        "jobs/pipeline.py",
        "--config",
        "configs/tiny.yaml",
        f"data.output_dir=s3://{BUCKET}/aigc/data",
        f"train.storage_path=s3://{BUCKET}/aigc/ray",
        f"train.export_dir=s3://{BUCKET}/aigc/model",
        f"train.run_dir={tmp_path / 'train'}",
        "train.max_steps=30",
        "train.eval_every=30",
        "train.checkpoint_every=30",
        f"serve.port={SERVE_PORT}",
        "serve.sample_max_tokens=8",
        env={"RAY_ADDRESS": two_node_cluster},
        timeout=600,
    )
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0 and "succeeded" in out, out[-4000:]
    assert "aigc_ray pipeline summary" in out and "left serving at" in out
    # the job's driver exited; the endpoint it deployed stays up on the cluster
    body = json.dumps(
        {"model": "aigc-tiny", "prompt": "def f(x):", "max_tokens": 5, "temperature": 0}
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{SERVE_PORT}/v1/completions", body, {"Content-Type": "application/json"}
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                assert json.loads(resp.read())["usage"]["completion_tokens"] == 5
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(1)
    # shards, checkpoints and the exported model went to the bucket; the replica loaded that copy
    keys = {
        o["Key"]
        for page in s3_bucket.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
    }
    assert "aigc/data/manifest.json" in keys and "aigc/model/config.json" in keys
    assert any(k.startswith("aigc/data/train/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith("aigc/ray/") for k in keys)
    assert "exported   s3://aigc-e2e/aigc/model" in out
    cached = [d for d in (tmp_path / "cache" / "models").iterdir() if d.is_dir()]
    assert any((d / "config.json").is_file() and list(d.glob("*.safetensors")) for d in cached)
    status = ray("status", env={"RAY_ADDRESS": f"127.0.0.1:{GCS_PORT}"})
    assert "data_worker" in status.stdout  # the worker node and its custom resource joined
    # the Jobs API refuses a client without the token
    anon = urllib.request.Request(f"{two_node_cluster}/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(anon, timeout=30)
    assert refused.value.code in (401, 403)
