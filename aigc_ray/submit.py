"""`aigc-ray submit`: `ray job submit --working-dir DIR` after an upload-size preflight.

`ray job submit --working-dir .` zips the directory and uploads it to the cluster. Ray skips what
its default excludes (.git, .venv, venv, __pycache__), `.gitignore`, `.rayignore` and the
runtime_env's `excludes` name, and refuses a package at or over its gRPC limit (512 MiB), but only
after zipping everything, and a package just under the limit still costs minutes to upload and
unpack on every node. The preflight walks the directory with Ray's own rules, first, and refuses
with the largest offenders named and what to do about them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aigc_ray.cluster import ray_cli
from aigc_ray.errors import AigcRayError
from aigc_ray.storage import is_uri

log = logging.getLogger(__name__)  # Ray's walk logs every ignore file it honours at INFO
ZIP_HEADERS = 30 + 46 + 36  # local header + central entry + room for extra fields, per file
ZIP_END = 22  # end-of-central-directory record


class UploadError(AigcRayError, ValueError):
    """The working directory would not upload (too large), with what to exclude."""


def ray_upload_limit() -> int:
    """Ray's maximum working_dir package size (bytes), as the installed Ray computes it."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return GCS_STORAGE_MAX_SIZE


@dataclass
class UploadPlan:
    root: Path
    files: list[tuple[str, int]] = field(default_factory=list)  # (relative path, bytes)
    excludes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(size for _, size in self.files)

    def package_size(self) -> int:
        """The size of Ray's package: Ray zips without compression (ZIP_STORED), so it is the
        files' bytes plus a local header and a central-directory entry per file."""
        headers = sum(ZIP_HEADERS + 2 * len(rel.encode()) for rel, _ in self.files)
        return self.total + headers + ZIP_END

    def largest(self, n: int = 5) -> list[tuple[str, int]]:
        """The n largest top-level entries (directories summed), biggest first."""
        tops: dict[str, int] = {}
        for rel, size in self.files:
            top = rel.split("/", 1)[0] + ("/" if "/" in rel else "")
            tops[top] = tops.get(top, 0) + size
        return sorted(tops.items(), key=lambda kv: -kv[1])[:n]


def plan_upload(working_dir: str | Path, excludes: list[str] | None = None) -> UploadPlan:
    """The files `ray job submit --working-dir` would pack, found with Ray's own walk and rules."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(working_dir).resolve()
    if not root.is_dir():
        raise UploadError(f"--working-dir {working_dir} is not a directory")
    all_excludes = ray_constants.get_runtime_env_default_excludes() + list(excludes or [])
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    plan = UploadPlan(root, excludes=all_excludes)

    def visit(path: Path) -> None:
        if path.is_file():
            plan.files.append((path.relative_to(root).as_posix(), path.stat().st_size))

    _dir_travel(root, [_get_excludes(root, all_excludes)], visit, include_gitignore, logger=log)
    return plan


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def check_upload(
    working_dir: str | Path, excludes: list[str] | None = None, limit: int | None = None
) -> UploadPlan:
    """Return the upload plan, or raise UploadError if Ray would refuse the package."""
    limit = ray_upload_limit() if limit is None else limit
    plan = plan_upload(working_dir, excludes)
    size = plan.package_size()
    if size < limit:
        return plan
    biggest = ", ".join(f"{name} ({_mib(n)})" for name, n in plan.largest())
    raise UploadError(
        f"the working dir {plan.root} would upload {_mib(size)} ({len(plan.files)} files), "
        f"over Ray's {_mib(limit)} limit for a job's working_dir. Largest: {biggest}. "
        "Exclude them in .rayignore (gitignore syntax) or with "
        "--runtime-env-json '{\"excludes\": [...]}', and keep datasets and checkpoints in object "
        "storage (s3://...) referenced from the config instead of in the working dir."
    )


@dataclass
class SubmitArgs:
    working_dir: str  # what Ray will pack: --working-dir, else the runtime env's, else "."
    excludes: list[str]  # the runtime env's `excludes`
    ray_options: list[str]  # everything else for `ray job submit`, as given
    entrypoint: list[str]
    from_flag: bool = True  # False when the runtime env names the working dir itself

    def argv(self, ray: str) -> list[str]:
        wd = ["--working-dir", self.working_dir] if self.from_flag else []
        return [ray, "job", "submit", *wd, *self.ray_options, "--", *self.entrypoint]


_VALUED = ("--working-dir", "--runtime-env", "--runtime-env-json")


def _runtime_env(name: str, value: str) -> dict:
    """The runtime env given as JSON (--runtime-env-json) or as a YAML file (--runtime-env)."""
    import yaml

    try:
        if name == "--runtime-env-json":
            env = json.loads(value)
        else:
            env = yaml.safe_load(Path(value).read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UploadError(f"aigc-ray submit: cannot read {name} {value!r}: {e}") from None
    if not isinstance(env, dict):
        raise UploadError(f"aigc-ray submit: {name} must hold a mapping, got {type(env).__name__}")
    return env


def split_submit_args(args: list[str]) -> SubmitArgs:
    """Our argv, `[ray job submit options] -- entrypoint`, split into what the preflight needs
    (the working dir and excludes, with Ray's precedence) and what passes through unchanged."""
    if "--" not in args:
        raise UploadError(
            "usage: aigc-ray submit [ray job submit options] -- python jobs/<x>.py --config <file>"
        )
    cut = args.index("--")
    opts, entrypoint = args[:cut], args[cut + 1 :]
    if not entrypoint:
        raise UploadError("aigc-ray submit: nothing to run after --")
    flag_dir, env, rest = None, {}, []
    i = 0
    while i < len(opts):
        name, eq, value = opts[i].partition("=")
        if name in _VALUED:
            if not eq:
                if i + 1 >= len(opts):
                    raise UploadError(f"aigc-ray submit: {name} needs a value")
                i += 1
                value = opts[i]
            if name == "--working-dir":
                flag_dir = value
            else:
                env.update(_runtime_env(name, value))
                rest += [name, value]
        else:
            rest.append(opts[i])
        i += 1
    env_dir = env.get("working_dir")
    return SubmitArgs(
        working_dir=flag_dir or env_dir or ".",
        excludes=list(env.get("excludes") or []),
        ray_options=rest,
        entrypoint=entrypoint,
        from_flag=flag_dir is not None or env_dir is None,
    )


def entrypoint_config(entrypoint: list[str]):
    """The PipelineConfig an entrypoint `python jobs/<x>.py --config C [k=v ...]` will load
    (None when it names no --config)."""
    from aigc_ray.config import load_config

    if "--config" not in entrypoint:
        return None
    i = entrypoint.index("--config")
    if i + 1 >= len(entrypoint):
        return None
    overrides = [a for a in entrypoint[i + 2 :] if "=" in a and not a.startswith("-")]
    return load_config(entrypoint[i + 1], overrides)


def check_fits_cluster(parsed: SubmitArgs) -> None:
    """Refuse a job whose GPU workers, replicas or actors no node type of the working dir's
    cluster.yaml (or AIGC_RAY_CLUSTER_YAML) can hold: it would wait forever for a node that
    can never come."""
    from aigc_ray.cluster import ClusterError, fit_problems, load_cluster_yaml

    path = os.environ.get("AIGC_RAY_CLUSTER_YAML") or str(Path(parsed.working_dir) / "cluster.yaml")
    if is_uri(parsed.working_dir) or not Path(path).is_file():
        return
    cfg = entrypoint_config(parsed.entrypoint)
    problems = fit_problems(cfg, load_cluster_yaml(path)) if cfg is not None else []
    if problems:
        raise ClusterError(f"the job does not fit {path}: " + "; ".join(problems))


def submit(args: list[str], limit: int | None = None) -> int:
    """Preflight the upload, then exec the real `ray job submit` (never returns on success)."""
    parsed = split_submit_args(args)
    if is_uri(parsed.working_dir):  # a remote package (s3://.../x.zip): nothing to upload
        print(
            f"aigc-ray submit: working dir {parsed.working_dir} is remote; no upload",
            file=sys.stderr,
            flush=True,
        )
    else:
        plan = check_upload(parsed.working_dir, parsed.excludes, limit)
        print(
            f"aigc-ray submit: uploading {plan.root} ({len(plan.files)} files, "
            f"{_mib(plan.package_size())})",
            file=sys.stderr,
            flush=True,
        )
    check_fits_cluster(parsed)
    argv = parsed.argv(ray_cli())
    os.execvp(argv[0], argv)
    return 0  # only reached when exec is patched out in tests
