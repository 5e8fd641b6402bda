"""Where files live: local paths and object-store URIs (s3://, gs://), in one place.

Filesystems (pyarrow; S3 honours the standard AWS environment, AWS_ENDPOINT_URL for
S3-compatible servers), listing with globs, uploads, model-directory copies, and the per-node
cache that remote model directories are fetched into. Every stage goes through these functions;
no other module looks for "://". Never imports Ray.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pyarrow import fs as pafs

from aigc_ray.errors import ModelDirError, StorageError

log = logging.getLogger(__name__)


def is_uri(path: str | Path) -> bool:
    """True for s3:// / gs:// (any scheme://) locations, False for local paths."""
    return "://" in str(path)


def portable_location(path: str | Path) -> str:
    """`path` as any process can use it: a URI as given, a local path made absolute."""
    return str(path) if is_uri(path) else str(Path(path).resolve())


def scheme_prefix(uri: str) -> str:
    """``"s3://"`` for an s3:// URI, ``""`` for a local path (pyarrow paths drop the scheme)."""
    return uri.split("://")[0] + "://" if is_uri(uri) else ""


def filesystem_for(uri: str | Path):
    """(pyarrow FileSystem, path) for a local path or an s3:// / gs:// URI. On s3:// every
    object written through it carries the server-side encryption header (EncryptedS3)."""
    from pyarrow import fs

    if not is_uri(uri):
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    filesystem, path = fs.FileSystem.from_uri(str(uri))
    sse = sse_args()
    if filesystem.type_name == "s3" and sse:
        filesystem = fs.PyFileSystem(EncryptedS3(filesystem, sse))
    return filesystem, path


def writer_filesystem(uri: str):
    """The filesystem to hand Ray Data's writes (``write_parquet(uri, filesystem=...)``) and
    Ray Train's storage: None (Ray's own choice) except on s3://, where it is EncryptedS3."""
    return filesystem_for(uri)[0] if str(uri).startswith("s3://") else None


def list_files(spec: str, keep=lambda path: True) -> list[tuple[str, int]]:
    """(path or URI, size) of every file ``spec`` names, sorted: a file, a directory (walked
    recursively) or a glob (``*``, ``?``, ``[``), local or remote; ``keep(path)`` filters what
    a directory or glob yields. Raises StorageError when nothing is there."""
    from pyarrow import fs as pafs

    filesystem, path = filesystem_for(spec)
    prefix = scheme_prefix(spec)
    pattern = None
    if any(c in path for c in "*?["):
        cut = min(path.find(c) for c in "*?[" if c in path)
        pattern, path = path, path[:cut].rsplit("/", 1)[0]
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"input path does not exist: {spec}")
    if info.type == pafs.FileType.File:
        return [(spec, info.size)]
    found = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    out = []
    for f in sorted(found, key=lambda i: i.path):
        if f.type != pafs.FileType.File or not keep(f.path):
            continue
        if pattern and not fnmatch.fnmatch(f.path, pattern):
            continue
        out.append((prefix + f.path, f.size))
    return out


def read_bytes(path: str) -> bytes:
    filesystem, p = filesystem_for(path)
    with filesystem.open_input_stream(p) as fh:
        return fh.read()


def write_bytes(data: bytes, uri: str) -> None:
    filesystem, path = filesystem_for(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as out:
        out.write(data)


def upload_dir(local: Path, uri: str) -> None:
    """Copy the files of a local directory (not recursive) to ``uri``."""
    filesystem, path = filesystem_for(uri)
    filesystem.create_dir(path, recursive=True)
    for f in local.iterdir():
        with filesystem.open_output_stream(f"{path}/{f.name}") as out:
            out.write(f.read_bytes())


# ---------------------------------------------------------------- protection at rest

SSE_ENV = "AIGC_RAY_S3_SSE"  # sse-s3 (the default) | sse-kms:<key id> | none


def use_encryption(encryption: str, kms_key_id: str | None = None) -> None:
    """The server-side encryption that every s3:// object this process writes asks for (and
    the processes it starts: a local Ray's workers inherit the environment). Filesystems
    handed to Ray Data's and Ray Train's workers carry it with them (EncryptedS3 pickles)."""
    os.environ[SSE_ENV] = f"sse-kms:{kms_key_id}" if encryption == "sse-kms" else encryption


def sse_args() -> dict:
    """boto3's ExtraArgs for the configured server-side encryption; {} for none."""
    value = os.environ.get(SSE_ENV, "sse-s3")
    if value == "none":
        return {}
    if value.startswith("sse-kms:"):
        return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": value.split(":", 1)[1]}
    return {"ServerSideEncryption": "AES256"}


def _s3():
    """A boto3 S3 client for the AWS environment as it is now (endpoint and credentials)."""
    env = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION", "AWS_PROFILE")
    return _s3_client(tuple(os.environ.get(k) for k in env))


@functools.lru_cache(maxsize=4)
def _s3_client(_env: tuple):
    import boto3  # honours the AWS environment, AWS_ENDPOINT_URL included

    return boto3.client("s3")


def _bucket_key(path: str) -> tuple[str, str]:
    bucket, _, key = path.strip("/").partition("/")
    return bucket, key


class _Upload(io.RawIOBase):
    """What EncryptedS3.open_output_stream writes into: the bytes spool in memory (on disk
    past 64 MiB) and go to S3 on close in one managed upload (multipart when large), with the
    encryption header on the request that creates the object."""

    def __init__(self, path: str, sse: dict):
        self.bucket, self.key = _bucket_key(path)
        self.sse, self.size = sse, 0
        self.spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)  # noqa: SIM115 - closed in close()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = self.spool.write(data)
        self.size += n
        return n

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.spool.seek(0)
            _s3().upload_fileobj(self.spool, self.bucket, self.key, ExtraArgs=self.sse)
        finally:
            self.spool.close()
            super().close()


class EncryptedS3(pafs.FileSystemHandler):
    """A pyarrow filesystem handler (``pyarrow.fs.PyFileSystem(EncryptedS3(s3fs, sse))``):
    pyarrow's S3FileSystem reads and lists; every request that creates, copies or deletes
    objects goes through boto3, and each object created carries the server-side encryption
    header (`sse`: boto3 ExtraArgs). pyarrow cannot send that header (it drops such
    metadata), so a bucket policy that refuses unencrypted writes refused its writes, and its
    deletes too: after deleting the last object under a prefix pyarrow writes an empty,
    unencrypted 'directory' object. Ray Data and Ray Train take this filesystem as given."""

    def __init__(self, inner, sse: dict):
        self.inner, self.sse = inner, dict(sse)

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, EncryptedS3)
            and self.inner.equals(other.inner)
            and self.sse == other.sse
        )

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "s3+sse"

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths):
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.inner.get_file_info(selector)

    def open_input_stream(self, path: str):
        return self.inner.open_input_stream(path)

    def open_input_file(self, path: str):
        return self.inner.open_input_file(path)

    def open_output_stream(self, path: str, metadata):
        import pyarrow as pa

        return pa.PythonFile(_Upload(path, self.sse), mode="w")

    def open_append_stream(self, path: str, metadata):
        raise NotImplementedError(f"s3: objects cannot be appended to ({path})")

    def create_dir(self, path: str, recursive: bool) -> None:
        bucket, key = _bucket_key(path)
        if key and self.inner.get_file_info(path).type == pafs.FileType.NotFound:
            _s3().put_object(Bucket=bucket, Key=key.rstrip("/") + "/", Body=b"", **self.sse)

    def copy_file(self, src: str, dest: str) -> None:
        source, (bucket, key) = _bucket_key(src), _bucket_key(dest)
        _s3().copy({"Bucket": source[0], "Key": source[1]}, bucket, key, ExtraArgs=self.sse)

    def move(self, src: str, dest: str) -> None:
        self.copy_file(src, dest)
        self.delete_file(src)

    def delete_file(self, path: str) -> None:
        kind = self.inner.get_file_info(path).type
        if kind != pafs.FileType.File:
            raise (FileNotFoundError if kind == pafs.FileType.NotFound else IsADirectoryError)(path)
        _s3().delete_object(Bucket=_bucket_key(path)[0], Key=_bucket_key(path)[1])

    def delete_dir(self, path: str) -> None:
        self._delete_under(path, marker_too=True)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        if self.inner.get_file_info(path).type == pafs.FileType.NotFound:
            if missing_dir_ok:
                return
            raise FileNotFoundError(path)
        self._delete_under(path, marker_too=False)

    def delete_root_dir_contents(self) -> None:
        raise PermissionError("s3: refusing to delete every bucket's contents")

    def _delete_under(self, path: str, marker_too: bool) -> None:
        bucket, key = _bucket_key(path)
        if not key:
            raise PermissionError(f"s3: refusing to empty the whole bucket {bucket}")
        prefix = key.rstrip("/") + "/"
        for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys = [
                {"Key": o["Key"]}
                for o in page.get("Contents", [])
                if marker_too or o["Key"] != prefix
            ]
            if keys:
                _s3().delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


OWNER_ONLY_UMASK = 0o077  # new directories 0700, new files 0600


def owner_only_files() -> int:
    """Make what this process (and every process it starts: a local Ray's raylets and their
    workers) creates from now on readable by its owner only: directories 0700, files 0600.
    The command line and the jobs call it first; a cluster's nodes get it from cluster.yaml's
    start commands (`umask 077`). Returns the previous umask."""
    return os.umask(OWNER_ONLY_UMASK)


def bucket_of(uri: str) -> str:
    return uri.split("://", 1)[1].split("/", 1)[0]


def _encryption_wanted(encryption: str, kms_key_id: str | None) -> dict:
    if encryption == "sse-kms":
        return {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": kms_key_id}
    return {"SSEAlgorithm": "AES256"}


def _satisfies(current: dict, encryption: str, kms_key_id: str | None) -> bool:
    algorithm = current.get("SSEAlgorithm")
    if encryption == "sse-s3":  # S3-managed keys, or a KMS key the bucket already uses
        return algorithm in ("AES256", "aws:kms", "aws:kms:dsse")
    key = current.get("KMSMasterKeyID") or ""
    # the same key as an id, an ARN or an alias ARN ends with what the config names
    return (
        algorithm in ("aws:kms", "aws:kms:dsse")
        and bool(key)
        and (key == kms_key_id or key.endswith(f"/{kms_key_id}") or kms_key_id.endswith(f"/{key}"))
    )


def ensure_bucket_encryption(uri: str, encryption: str, kms_key_id: str | None = None) -> str:
    """The bucket's default server-side encryption, for objects written under an s3:// `uri`
    by anything but our filesystems (which send the header on every object: EncryptedS3): it
    is read and, when it does not give what `encryption` asks, set. Returns what was found or
    done (for the command's output). Raises StorageError naming the bucket when it cannot be
    read (a missing bucket, no access); a refusal to set it is a line, not an error."""
    if encryption == "none" or not str(uri).startswith("s3://"):
        return ""
    import boto3  # honours the AWS environment, AWS_ENDPOINT_URL included
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = bucket_of(uri)
    client = boto3.client("s3")
    try:
        rules = client.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]
        current = (rules.get("Rules") or [{}])[0].get("ApplyServerSideEncryptionByDefault", {})
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code != "ServerSideEncryptionConfigurationNotFoundError":
            raise StorageError(
                f"s3://{bucket}: cannot read its default encryption ({code or e}); the bucket "
                f"must exist and this role needs s3:GetEncryptionConfiguration"
            ) from None
        current = {}
    except BotoCoreError as e:
        raise StorageError(f"s3://{bucket}: cannot reach the object store: {e}") from None
    if _satisfies(current, encryption, kms_key_id):
        return ""
    wanted = _encryption_wanted(encryption, kms_key_id)
    try:
        client.put_bucket_encryption(
            Bucket=bucket,
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": wanted}]
            },
        )
    except (ClientError, BotoCoreError) as e:  # not fatal: every object sends the header
        had = current.get("SSEAlgorithm") or "no"
        log.warning("s3://%s: setting default encryption refused: %s", bucket, e)
        return (
            f"s3://{bucket} keeps {had} default encryption (setting {encryption} was refused: "
            f"this role lacks s3:PutEncryptionConfiguration); every object is still written "
            f"with the {encryption} header"
        )
    return f"s3://{bucket}: default encryption set to {encryption}" + (
        f" (key {kms_key_id})" if kms_key_id else ""
    )


def protect_outputs(locations: list[str], encryption: str, kms_key_id: str | None) -> list[str]:
    """Before a stage writes: every s3:// object written from now on carries the encryption
    header (use_encryption), and each s3:// bucket among `locations` also encrypts by default
    (ensure_bucket_encryption, once per bucket), for whatever else writes there. Local outputs
    are owner-only through the umask (owner_only_files). Returns what changed, a line each."""
    use_encryption(encryption, kms_key_id)
    done, lines = set(), []
    for loc in locations:
        if str(loc).startswith("s3://") and bucket_of(loc) not in done:
            done.add(bucket_of(loc))
            if line := ensure_bucket_encryption(loc, encryption, kms_key_id):
                lines.append(line)
    return lines


# ---------------------------------------------------------------- model directories


def remote_files(uri: str) -> tuple[object, str, list]:
    """(filesystem, base path, FileInfo of every file under it) for a remote directory."""
    from pyarrow import fs

    try:
        filesystem, base = fs.FileSystem.from_uri(uri.rstrip("/"))
        infos = filesystem.get_file_info(fs.FileSelector(base, recursive=True))
    except FileNotFoundError:
        raise ModelDirError(f"model directory not found: {uri}") from None
    except (OSError, ValueError) as e:  # ArrowInvalid (a ValueError): unsupported URI
        raise ModelDirError(f"cannot list model directory {uri}: {e}") from None
    return filesystem, base, [i for i in infos if i.type == fs.FileType.File]


def cache_root() -> Path:
    """Where remote model directories are copied on each node ($AIGC_RAY_CACHE)."""
    return Path(os.environ.get("AIGC_RAY_CACHE", "~/.cache/aigc_ray")).expanduser() / "models"


def local_model_dir(path: str | Path) -> str:
    """A local directory holding the model (or tokenizer) directory at `path`.

    Local paths are returned resolved. An s3:// / gs:// directory is copied once per node into
    cache_root(), under a key made of the URI and the listing (names, sizes, mtimes), so a model
    re-exported to the same URI is fetched again. Processes on one node take a file lock, so
    replicas starting together fetch once; the copy lands in a temporary directory renamed into
    place, so a killed fetch never leaves a half copy that looks complete.
    """
    if not is_uri(path):
        return portable_location(path)
    import fcntl

    from pyarrow import fs

    uri = str(path).rstrip("/")
    filesystem, base, files = remote_files(uri)
    listing = sorted((f.path, f.size, str(f.mtime)) for f in files)
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:20]
    dest = cache_root() / key
    if dest.is_dir():  # only ever complete: it appears by rename
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we die
        if dest.is_dir():  # another process fetched it while we waited
            return str(dest)
        tmp = dest.parent / f".{key}.partial"  # leftovers of a killed fetch are replaced
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            fs.copy_files(
                base,
                str(tmp),
                source_filesystem=filesystem,
                destination_filesystem=fs.LocalFileSystem(),
            )
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetched %s -> %s", uri, dest)
    return str(dest)


def model_version(path: str | Path) -> str:
    """A short fingerprint of a model directory's files (names, sizes, mtimes; local or remote):
    a model exported again, even to the same path, gets a new one. Serve shows it as the model's
    version when none is configured."""
    if is_uri(path):
        _, base, files = remote_files(str(path))
        listing = sorted((f.path[len(base) :], f.size, str(f.mtime)) for f in files)
    else:
        root = Path(path)
        listing = sorted(
            (str(f.relative_to(root)), st.st_size, st.st_mtime_ns)
            for f in root.rglob("*")
            if f.is_file() and (st := f.stat())
        )
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:12]


def check_export_dir(model_dir: str | Path, dest: str) -> None:
    """Refuse a local export dir that is, contains or lies inside the model dir it copies
    (exporting replaces the destination, which would delete the model)."""
    if is_uri(dest):
        return
    src, target = Path(model_dir).resolve(), Path(dest).resolve()
    if target == src or target in src.parents or src in target.parents:
        raise ModelDirError(
            f"train.export_dir {dest} overlaps the model directory {src}; "
            "choose a directory outside it (or an s3:// URI)"
        )


def copy_model_dir(local: str | Path, dest: str) -> str:
    """Copy a local model directory to `dest` (a local path or s3:// / gs://), replacing what
    was there, so no file of an earlier export (e.g. other weight shards) survives; return
    `dest`."""
    from pyarrow import fs

    src = Path(local).resolve()
    if is_uri(dest):
        filesystem, path = filesystem_for(dest.rstrip("/"))
        filesystem.delete_dir_contents(path, missing_dir_ok=True)
    else:
        target = Path(dest).resolve()
        check_export_dir(src, dest)
        filesystem, path = fs.LocalFileSystem(), str(target)
        shutil.rmtree(path, ignore_errors=True)
    filesystem.create_dir(path, recursive=True)
    fs.copy_files(
        str(src), path, source_filesystem=fs.LocalFileSystem(), destination_filesystem=filesystem
    )
    return dest
