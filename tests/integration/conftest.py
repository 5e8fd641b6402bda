"""Integration tier: one local Ray instance shared by the whole session (GUIDE §5), and a real
S3-compatible server (moto) on loopback for s3:// paths."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3env import MOTO_PORT, S3_ENV


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Serve's handles and replicas report their load every 1 s instead of 10 s (the node's
    # processes inherit this environment): autoscaling and cold-start tests take seconds less.
    for who in ("HANDLE", "REPLICA"):
        os.environ[f"RAY_SERVE_{who}_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "1"
    cache = str(tmp_path_factory.mktemp("model-cache"))  # remote model dirs are copied here
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=1024**3,
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "AIGC_RAY_API_KEYS": "test-key-1,test-key-2",
                "AIGC_RAY_CACHE": cache,
                **S3_ENV,
            }
        },
    )
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server with bucket aigc-test; S3_ENV is set in this process while it runs."""
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(MOTO_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", MOTO_PORT), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"moto_server never listened on 127.0.0.1:{MOTO_PORT}")
    old = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    import boto3

    boto3.client("s3").create_bucket(Bucket="aigc-test")
    yield boto3.client("s3")
    proc.kill()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
