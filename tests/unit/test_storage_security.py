"""Protection at rest (issue: privacy and security): s3:// outputs encrypted server-side by the
bucket's default encryption (SSE-S3 unless the config names a KMS key), checked from the stored
objects' headers on an S3-compatible server (moto, in this process); local outputs owner-only
through the umask the command line sets, inherited by the processes it starts (a local Ray)."""

import os
import stat
import subprocess
import sys

import pytest
from ports import free_port

from aigc_ray.config import ConfigError, load_config
from aigc_ray.errors import StorageError
from aigc_ray.storage import ensure_bucket_encryption, protect_outputs, write_bytes


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on loopback, the AWS environment pointing at it; a boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    try:
        yield boto3.client("s3")
    finally:
        server.stop()


def _sse(client, bucket: str, key: str) -> tuple[str | None, str | None]:
    head = client.head_object(Bucket=bucket, Key=key)
    return head.get("ServerSideEncryption"), head.get("SSEKMSKeyId")


def test_sse_s3_by_default_on_objects_pyarrow_writes(s3):
    s3.create_bucket(Bucket="plain")
    cfg = load_config("configs/tiny.yaml", [])
    assert cfg.storage.encryption == "sse-s3"  # the default a user gets
    # before: an object written the way the stages write (pyarrow) is stored unencrypted
    write_bytes(b"before", "s3://plain/before.bin")
    assert _sse(s3, "plain", "before.bin") == (None, None)
    lines = protect_outputs(
        ["s3://plain/data", "s3://plain/model", "runs/x"], "sse-s3", cfg.storage.kms_key_id
    )
    assert lines == ["s3://plain: default encryption set to sse-s3"]  # once per bucket
    for key in ("data/shard-0.parquet", "ray/gpu/checkpoint_000001/model.pt", "model/config.json"):
        write_bytes(b"x" * 1024, f"s3://plain/{key}")
        assert _sse(s3, "plain", key) == ("AES256", None), key
    # a second stage finds the bucket as it wants it and changes nothing
    assert protect_outputs(["s3://plain/generated"], "sse-s3", None) == []


def test_sse_kms_with_the_configured_key(s3):
    s3.create_bucket(Bucket="kms")
    cfg = load_config(
        "configs/tiny.yaml", ["storage.encryption=sse-kms", "storage.kms_key_id=alias/aigc"]
    )
    line = ensure_bucket_encryption("s3://kms/model", "sse-kms", cfg.storage.kms_key_id)
    assert line == "s3://kms: default encryption set to sse-kms (key alias/aigc)"
    write_bytes(b"weights", "s3://kms/model/model.safetensors")
    assert _sse(s3, "kms", "model/model.safetensors") == ("aws:kms", "alias/aigc")
    # sse-s3 asked of a bucket that already uses a KMS key: kept, never downgraded
    assert ensure_bucket_encryption("s3://kms/x", "sse-s3") == ""
    # another key asked: the bucket's default is changed to it
    assert "key k2" in ensure_bucket_encryption("s3://kms/x", "sse-kms", "k2")
    write_bytes(b"w", "s3://kms/model/b")
    assert _sse(s3, "kms", "model/b") == ("aws:kms", "k2")


def test_encryption_none_leaves_the_bucket_alone(s3):
    s3.create_bucket(Bucket="asis")
    assert protect_outputs(["s3://asis/data"], "none", None) == []
    write_bytes(b"x", "s3://asis/data/a")
    assert _sse(s3, "asis", "data/a") == (None, None)


def test_a_missing_bucket_is_a_clear_error_naming_it(s3):
    with pytest.raises(StorageError, match=r"s3://no-such-bucket: cannot read its default"):
        ensure_bucket_encryption("s3://no-such-bucket/data", "sse-s3")


def test_kms_settings_are_checked_with_the_config():
    with pytest.raises(ConfigError, match="sse-kms needs storage.kms_key_id"):
        load_config("configs/tiny.yaml", ["storage.encryption=sse-kms"])
    with pytest.raises(ConfigError, match="kms_key_id is used only with"):
        load_config("configs/tiny.yaml", ["storage.kms_key_id=k1"])


def test_output_locations_name_what_each_stage_writes():
    cfg = load_config(
        "configs/tiny.yaml",
        ["train.storage_path=s3://b/ray", "train.export_dir=s3://b/model", "optimize.enabled=true"],
    )
    assert cfg.output_locations({"preprocess"}) == [cfg.data.output_dir]
    assert cfg.output_locations({"train"}) == [cfg.train.run_dir, "s3://b/ray", "s3://b/model"]
    assert cfg.output_locations({"optimize"}) == [cfg.optimize.output_dir]
    assert cfg.output_locations({"generate"}) == [cfg.generate.output_dir]
    assert cfg.output_locations({"serve"}) == []


OWNER_ONLY = """
import os, subprocess, sys
from aigc_ray.storage import owner_only_files
owner_only_files()
os.makedirs("out/shards")
open("out/shards/a.parquet", "w").write("x")
# a process this one starts (a local Ray's raylet, its workers) writes with the same mask
subprocess.run([sys.executable, "-c", "import os; os.mkdir('out/ckpt'); open('out/ckpt/m.pt','w')"],
               check=True)
"""


def test_owner_only_files_for_the_process_and_its_children(tmp_path):
    subprocess.run([sys.executable, "-c", OWNER_ONLY], cwd=tmp_path, check=True, timeout=60)
    for rel in ("out", "out/shards", "out/ckpt"):
        assert stat.S_IMODE(os.stat(tmp_path / rel).st_mode) == 0o700, rel
    for rel in ("out/shards/a.parquet", "out/ckpt/m.pt"):
        assert stat.S_IMODE(os.stat(tmp_path / rel).st_mode) == 0o600, rel
