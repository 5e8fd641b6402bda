"""Protection at rest (issue: privacy and security): every s3:// object we write carries the
server-side encryption header (SSE-S3 unless the config names a KMS key), so a bucket policy
that refuses unencrypted writes refuses none of ours; the bucket's default encryption is set
too. Checked from the stored objects' headers on an S3-compatible server (moto, in this
process, behind that policy: s3_policy); local outputs owner-only through the umask the command
line sets, inherited by the processes it starts (a local Ray)."""

import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3_policy
from ports import free_port
from pyarrow import fs as pafs

from aigc_ray.config import ConfigError, load_config
from aigc_ray.errors import StorageError
from aigc_ray.storage import (
    SSE_ENV,
    copy_model_dir,
    ensure_bucket_encryption,
    filesystem_for,
    protect_outputs,
    read_bytes,
    upload_dir,
    write_bytes,
)

REFUSED: list = []  # (method, path) the bucket policy refused


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on loopback whose bucket `locked` refuses unencrypted writes (the
    policy AWS recommends, evaluated by s3_policy), the AWS environment pointing at it; a boto3
    client. The encryption setting a test makes (use_encryption) is undone after it."""
    import boto3

    monkeypatch.delenv(SSE_ENV, raising=False)
    REFUSED.clear()
    server = s3_policy.server(free_port(), {"locked"}, REFUSED)
    port = server.server_address[1]
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
        server.shutdown()


def _sse(client, bucket: str, key: str) -> tuple[str | None, str | None]:
    head = client.head_object(Bucket=bucket, Key=key)
    return head.get("ServerSideEncryption"), head.get("SSEKMSKeyId")


def test_sse_s3_by_default_on_every_object_we_write(s3):
    s3.create_bucket(Bucket="plain")
    cfg = load_config("configs/tiny.yaml", [])
    assert cfg.storage.encryption == "sse-s3"  # the default a user gets
    # before: an object written by pyarrow itself is stored unencrypted
    raw, _ = pafs.FileSystem.from_uri("s3://plain/x")
    with raw.open_output_stream("plain/before.bin") as out:
        out.write(b"before")
    assert _sse(s3, "plain", "before.bin") == (None, None)
    # ours carries the header even before any stage set the bucket's default
    write_bytes(b"x", "s3://plain/early.bin")
    assert _sse(s3, "plain", "early.bin") == ("AES256", None)
    lines = protect_outputs(
        ["s3://plain/data", "s3://plain/model", "runs/x"], "sse-s3", cfg.storage.kms_key_id
    )
    assert lines == ["s3://plain: default encryption set to sse-s3"]  # once per bucket
    for key in ("data/shard-0.parquet", "ray/gpu/checkpoint_000001/model.pt", "model/config.json"):
        write_bytes(b"x" * 1024, f"s3://plain/{key}")
        assert _sse(s3, "plain", key) == ("AES256", None), key
    # a second stage finds the bucket as it wants it and changes nothing
    assert protect_outputs(["s3://plain/generated"], "sse-s3", None) == []


def _model_dir(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text("{}")
    (root / "model.safetensors").write_bytes(os.urandom(9 << 20))  # a multipart upload
    return root


def test_a_bucket_policy_refusing_unencrypted_writes_refuses_none_of_ours(s3, tmp_path):
    s3.create_bucket(Bucket="locked")
    # the policy bites: pyarrow's own writes (no header) are refused
    raw, _ = pafs.FileSystem.from_uri("s3://locked/x")
    with (
        pytest.raises(OSError, match="ACCESS_DENIED|Access Denied|403"),
        raw.open_output_stream("locked/raw.bin") as out,
    ):
        out.write(b"x")
    assert REFUSED, "the policy refused nothing"
    REFUSED.clear()
    model = _model_dir(tmp_path / "model")
    # every way a stage writes: a file, a directory, a model export (twice: the second replaces
    # the first, deleting under the prefix), parquet through the filesystem, pyarrow's copy
    write_bytes(b"{}", "s3://locked/data/manifest.json")
    upload_dir(model, "s3://locked/data/tokenizer")
    copy_model_dir(model, "s3://locked/model")
    (model / "config.json").write_text('{"v": 2}')
    copy_model_dir(model, "s3://locked/model")
    filesystem, path = filesystem_for("s3://locked/data/train/shard-0.parquet")
    pq.write_table(pa.table({"input_ids": [[1, 2], [3]]}), path, filesystem=filesystem)
    pafs.copy_files(str(model), "locked/ckpt/checkpoint_000001", destination_filesystem=filesystem)
    filesystem.move("locked/ckpt/checkpoint_000001/config.json", "locked/ckpt/moved.json")
    filesystem.delete_dir("locked/data/tokenizer")
    assert REFUSED == []
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="locked")["Contents"]]
    assert "data/train/shard-0.parquet" in keys and "model/model.safetensors" in keys
    assert not [k for k in keys if k.startswith("data/tokenizer")]  # deleted
    assert {k: _sse(s3, "locked", k) for k in keys} == {k: ("AES256", None) for k in keys}
    assert read_bytes("s3://locked/model/config.json") == b'{"v": 2}'  # the second export
    assert pq.read_table(path, filesystem=filesystem).num_rows == 2
    # the filesystem travels to Ray's workers pickled, its setting with it
    assert pickle.loads(pickle.dumps(filesystem)).equals(filesystem)


def test_a_refused_default_encryption_is_a_line_not_an_error(s3, monkeypatch):
    """A role without s3:PutEncryptionConfiguration: the bucket's default stays, our objects
    still carry the header."""
    from botocore.client import BaseClient
    from botocore.exceptions import ClientError

    real = BaseClient._make_api_call

    def refuse(self, operation, params):
        if operation == "PutBucketEncryption":
            raise ClientError({"Error": {"Code": "AccessDenied"}}, operation)
        return real(self, operation, params)

    s3.create_bucket(Bucket="norole")
    monkeypatch.setattr(BaseClient, "_make_api_call", refuse)
    (line,) = protect_outputs(["s3://norole/model"], "sse-s3", None)
    assert "keeps no default encryption" in line and "s3:PutEncryptionConfiguration" in line
    write_bytes(b"w", "s3://norole/model/w")
    assert _sse(s3, "norole", "model/w") == ("AES256", None)


def test_sse_kms_with_the_configured_key(s3):
    s3.create_bucket(Bucket="kms")
    cfg = load_config(
        "configs/tiny.yaml", ["storage.encryption=sse-kms", "storage.kms_key_id=alias/aigc"]
    )
    (line,) = protect_outputs(["s3://kms/model"], "sse-kms", cfg.storage.kms_key_id)
    assert line == "s3://kms: default encryption set to sse-kms (key alias/aigc)"
    write_bytes(b"weights", "s3://kms/model/model.safetensors")
    assert _sse(s3, "kms", "model/model.safetensors") == ("aws:kms", "alias/aigc")
    # the header names the key even where the bucket's default is something else
    s3.create_bucket(Bucket="locked")
    write_bytes(b"weights", "s3://locked/model/model.safetensors")
    assert _sse(s3, "locked", "model/model.safetensors") == ("aws:kms", "alias/aigc")
    # sse-s3 asked of a bucket that already uses a KMS key: kept, never downgraded
    assert ensure_bucket_encryption("s3://kms/x", "sse-s3") == ""
    # another key asked: the bucket's default is changed to it
    assert "key k2" in ensure_bucket_encryption("s3://kms/x", "sse-kms", "k2")
    s3.put_object(Bucket="kms", Key="model/b", Body=b"w")  # written by anything else
    assert _sse(s3, "kms", "model/b") == ("aws:kms", "k2")


def test_encryption_none_leaves_the_bucket_alone(s3):
    s3.create_bucket(Bucket="asis")
    assert protect_outputs(["s3://asis/data"], "none", None) == []
    write_bytes(b"x", "s3://asis/data/a")
    assert _sse(s3, "asis", "data/a") == (None, None)
    assert "BucketEncryption" not in str(s3.list_buckets())  # nothing asked of the bucket
    # and no header: a bucket that refuses unencrypted writes refuses ours, with S3's reason
    s3.create_bucket(Bucket="locked")
    with pytest.raises(Exception, match="Access Denied|ACCESS_DENIED|AccessDenied"):
        write_bytes(b"x", "s3://locked/data/a")


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
