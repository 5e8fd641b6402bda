"""The day-one cluster workflow on a real multi-node Ray on this machine: a head and a worker
started with `ray start` under token authentication, as cluster.yaml starts them (each with its
own --temp-dir, the worker declaring a custom resource), the pipeline submitted with the real
`ray job submit --working-dir .` CLI, the endpoint it leaves running called over HTTP, a client
without the token refused, then both nodes stopped."""

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

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GCS_PORT, DASHBOARD_PORT, SERVE_PORT = 6391, 8266, 8013


TOKEN_ENV: dict[str, str] = {}  # RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH, set by the fixture


def ray(*args, timeout=180, **kw):
    env = {**os.environ, **TOKEN_ENV, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env={**env, **kw.pop("env", {})},
                          capture_output=True, text=True, timeout=timeout, **kw)  # fmt: skip


@pytest.fixture
def two_node_cluster():
    # short temp dirs: Ray's unix sockets live under them (107-byte path limit)
    tmp = Path(tempfile.mkdtemp(prefix="aigc_", dir="/tmp"))
    token = tmp / "auth_token"  # as cluster.yaml mounts it: a file, never on a command line
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    TOKEN_ENV.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    head = ray("start", "--head", f"--port={GCS_PORT}", "--num-cpus=1",
               f"--temp-dir={tmp / 'h'}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
               "--disable-usage-stats")  # fmt: skip
    assert head.returncode == 0, head.stderr[-2000:]
    try:
        worker = ray("start", f"--address=127.0.0.1:{GCS_PORT}", "--num-cpus=1",
                     '--resources={"data_worker": 1}', f"--temp-dir={tmp / 'w'}",
                     "--disable-usage-stats")  # fmt: skip
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield f"http://127.0.0.1:{DASHBOARD_PORT}"
    finally:
        ray("stop", "--force")
        TOKEN_ENV.clear()
        shutil.rmtree(tmp, ignore_errors=True)


def test_pipeline_job_on_a_two_node_cluster(two_node_cluster, tmp_path):
    from aigc_ray.submit import check_upload

    # what `--working-dir .` packs: Ray's defaults (.git, .venv, __pycache__) + .gitignore +
    # .rayignore (runs/, data/): code and configs only
    plan = check_upload(ROOT)
    assert plan.package_size() < 5 * 2**20, plan.largest()
    submit = ray(
        "job", "submit", "--working-dir", ".", "--",
        "python", "jobs/pipeline.py", "--config", "configs/tiny.yaml",
        f"data.output_dir={tmp_path / 'data'}", f"train.run_dir={tmp_path / 'train'}",
        "train.max_steps=30", "train.eval_every=30", "train.checkpoint_every=30",
        f"serve.port={SERVE_PORT}", "serve.sample_max_tokens=8",
        env={"RAY_ADDRESS": two_node_cluster}, timeout=600,
    )  # fmt: skip
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0 and "succeeded" in out, out[-4000:]
    assert "aigc_ray pipeline summary" in out and "left serving at" in out
    # the job's driver exited; the endpoint it deployed stays up on the cluster
    body = json.dumps({"model": "aigc-tiny", "prompt": "def f(x):", "max_tokens": 5,
                       "temperature": 0}).encode()  # fmt: skip
    req = urllib.request.Request(f"http://127.0.0.1:{SERVE_PORT}/v1/completions", body,
                                 {"Content-Type": "application/json"})  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                assert json.loads(resp.read())["usage"]["completion_tokens"] == 5
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(1)
    status = ray("status", env={"RAY_ADDRESS": f"127.0.0.1:{GCS_PORT}"})
    assert "data_worker" in status.stdout  # the worker node and its custom resource joined
    # the Jobs API refuses a client without the token
    anon = urllib.request.Request(f"{two_node_cluster}/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(anon, timeout=30)
    assert refused.value.code in (401, 403)
