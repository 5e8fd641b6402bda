"""Where files live: local paths and object-store URIs (s3://, gs://), in one place.

Filesystems (pyarrow; S3 honours the standard AWS environment, AWS_ENDPOINT_URL for
S3-compatible servers), listing with globs, uploads, model-directory copies, and the per-node
cache that remote model directories are fetched into. Every stage goes through these functions;
no other module looks for "://". Never imports Ray.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

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
    """(pyarrow FileSystem, path) for a local path or an s3:// / gs:// URI."""
    from pyarrow import fs

    if not is_uri(uri):
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    return fs.FileSystem.from_uri(str(uri))


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
    """Server-side encryption for everything written under an s3:// `uri`, whoever writes it
    (this process, Ray Data's and Ray Train's workers through pyarrow, which cannot ask for
    encryption per object): the bucket's default encryption is read and, when it does not give
    what `encryption` asks, set. Returns what was found or done (for the command's output).
    Raises StorageError naming the bucket when it cannot be read or set."""
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
    except (ClientError, BotoCoreError) as e:
        had = current.get("SSEAlgorithm") or "no"
        raise StorageError(
            f"s3://{bucket} has {had} default encryption and setting {encryption} was refused "
            f"({e}): give this role s3:PutEncryptionConfiguration, set the bucket's default "
            f"encryption yourself, or set storage.encryption: none"
        ) from None
    return f"s3://{bucket}: default encryption set to {encryption}" + (
        f" (key {kms_key_id})" if kms_key_id else ""
    )


def protect_outputs(locations: list[str], encryption: str, kms_key_id: str | None) -> list[str]:
    """Before a stage writes: each s3:// bucket among `locations` encrypts at rest
    (ensure_bucket_encryption, once per bucket). Local outputs are owner-only through the
    umask (owner_only_files). Returns what changed, a line each."""
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
        filesystem, path = fs.FileSystem.from_uri(dest.rstrip("/"))
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
