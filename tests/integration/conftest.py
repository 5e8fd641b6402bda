"""Integration tier: one local Ray instance shared by the whole session (GUIDE §5)."""

import os

import pytest
from s3env import S3_ENV


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=1024**3,
        log_to_driver=False,
        runtime_env={"env_vars": {"AIGC_RAY_API_KEYS": "test-key-1,test-key-2", **S3_ENV}},
    )
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
