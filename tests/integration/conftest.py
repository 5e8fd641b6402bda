"""Integration tier: one local Ray instance and one Serve controller shared by the whole session
(GUIDE §5), and a real S3-compatible server (moto) on loopback for s3:// paths.

Ports are picked when the session's first integration test needs them, never at import time.
Every environment variable set here is restored when the session ends."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ports import free_port


@pytest.fixture(scope="session")
def session_env():
    """A MonkeyPatch for the session: what it sets in os.environ is undone at the end."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="session")
def s3_env():
    """Settings of the session's S3 server: moto with bucket aigc-test, which refuses every
    object written without the server-side encryption header (s3_policy: the bucket policy
    AWS recommends), so each test that writes there shows our writes carry it. It starts here,
    its port taken the moment it is chosen (not minutes later, after Ray's processes took
    ports of their own); Ray's workers get the settings through the runtime env, as they would
    get real AWS settings."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parents[1] / "s3_policy.py"), str(port), "aigc-test"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        if proc.poll() is not None:
            pytest.fail(f"the S3 server (s3_policy.py) exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"the S3 server (s3_policy.py) never listened on 127.0.0.1:{port}")
    yield {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    proc.kill()
    proc.wait(30)


@pytest.fixture(scope="session")
def serve_port() -> int:
    """The HTTP port of the session's one Serve instance: every app of the integration tier is
    deployed behind it (Serve keeps the port of its first start) and deleted by name after."""
    return free_port()


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory, session_env, s3_env):
    import ray

    if "RAY_AUTH_MODE" not in os.environ:
        session_env.setenv("RAY_AUTH_MODE", "disabled")
    # Serve's handles and replicas report their load every 1 s instead of 10 s (the node's
    # processes inherit this environment): autoscaling and cold-start tests take seconds less.
    for who in ("HANDLE", "REPLICA"):
        session_env.setenv(f"RAY_SERVE_{who}_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    # A stopping ingress replica (an app deleted, scaled down or rolled) stays reachable 1 s,
    # not the 5 s a user gets (serve.ingress.DEFAULT_DRAIN_S), before HAProxy must retry
    # elsewhere: the rollouts under load then prove the retry path with less slack, and the
    # tier's many app deletions wait 4 s less per ingress replica. Serve's controller reads it
    # when the first app starts it (serve.ingress.controller_options).
    session_env.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    # A replica whose constructor fails is tried once, not Serve's 3 times, before the deploy
    # fails (test_vllm_start.py: each try starts vLLM); a replica that dies once running is
    # replaced as before (Serve's constructor retries count failures to start only).
    session_env.setenv("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "1")
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
                **s3_env,
            }
        },
    )
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(s3_env, session_env):
    """The session's S3 server (s3_env) with bucket aigc-test; its settings are set in this
    process while the session runs (restored at its end). A boto3 client."""
    for k, v in s3_env.items():
        session_env.setenv(k, v)
    import boto3

    boto3.client("s3").create_bucket(Bucket="aigc-test")
    return boto3.client("s3")
