"""cluster.yaml, understood: its node types, whether a config fits them, and a local copy of it.

`aigc-ray cluster local up|down|status` runs cluster.yaml's autoscaling cluster on this machine
with Ray's fake-multinode node provider (RAY_FAKE_CLUSTER=1): the Ray autoscaler reads the same
node types and launches each node it decides on as local raylet processes that carry the
resources the type declares, GPUs included, and removes idle ones after the idle timeout. The
config it runs is derived from cluster.yaml, never hand-copied: the same `available_node_types`
(names, resources, min_workers, max_workers), `max_workers`, `upscaling_speed` and
`idle_timeout_minutes` (overridable, so a test can use a short one). What only a cloud needs
(provider, node_config, auth, file mounts, setup and start commands) is dropped. Like cluster.yaml's
start commands, the head runs with Ray token authentication (a token made for this cluster).

`fit_problems(cfg, spec)` is the preflight `aigc-ray doctor --config` and `aigc-ray submit` run:
a stage that asks for GPUs when no node type has any, or for more per worker than any node type
holds, would wait forever for a node that can never come.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from aigc_ray.errors import AigcRayError

FAKE_HEAD_TYPE = "ray.head.default"  # the type name the fake provider gives its head node
# keys of a node type the local copy keeps, and those only a cloud needs (dropped)
KEPT_KEYS = {"resources", "min_workers", "max_workers", "labels"}
CLOUD_KEYS = {"node_config", "worker_setup_commands", "docker"}
NUMERIC = (int, float)
STATE_FILE = "cluster.json"


class ClusterError(AigcRayError, ValueError):
    """cluster.yaml cannot be run locally as it is, or a config does not fit its node types."""


# ---------------------------------------------------------------- cluster.yaml


def load_cluster_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ClusterError(f"{p}: no such cluster file")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ClusterError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("available_node_types"), dict):
        raise ClusterError(f"{p}: no available_node_types mapping")
    if spec.get("head_node_type") not in spec["available_node_types"]:
        raise ClusterError(
            f"{p}: head_node_type {spec.get('head_node_type')!r} is not one of "
            f"available_node_types ({', '.join(spec['available_node_types'])})"
        )
    return spec


def node_types(spec: dict) -> dict[str, dict]:
    """Each node type's resources and worker bounds, checked: a key the local copy cannot map
    (anything besides resources, min/max_workers, labels and the cloud-only node_config,
    worker_setup_commands, docker), a type without `resources` (a cloud provider may detect them
    from the instance type; a local node cannot) or a resource that is not a non-negative number
    (GPU: a whole number) is an error naming it."""
    out = {}
    head = spec["head_node_type"]
    for name, t in spec["available_node_types"].items():
        where = f"cluster.yaml: available_node_types.{name}"
        if not isinstance(t, dict):
            raise ClusterError(f"{where}: not a mapping")
        unknown = set(t) - KEPT_KEYS - CLOUD_KEYS
        if unknown:
            raise ClusterError(
                f"{where}: {', '.join(sorted(unknown))} cannot be mapped to a local node "
                f"(known: {', '.join(sorted(KEPT_KEYS | CLOUD_KEYS))})"
            )
        res = t.get("resources")
        if not isinstance(res, dict):
            raise ClusterError(
                f"{where}: no `resources` mapping; a local node carries only what the type "
                "declares (e.g. resources: {CPU: 4, GPU: 1})"
            )
        for key, value in res.items():
            if isinstance(value, bool) or not isinstance(value, NUMERIC) or value < 0:
                raise ClusterError(
                    f"{where}.resources.{key}: {value!r} is not a non-negative number"
                )
            if key == "GPU" and value != int(value):
                raise ClusterError(f"{where}.resources.GPU: {value!r} is not a whole number")
        lo, hi = t.get("min_workers", 0), t.get("max_workers", spec.get("max_workers", 2))
        if name != head and not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            raise ClusterError(
                f"{where}: min_workers {lo!r} / max_workers {hi!r} are not 0 <= min <= max"
            )
        out[name] = {
            "resources": dict(res),
            "min_workers": 0 if name == head else lo,
            "max_workers": 0 if name == head else hi,
            "head": name == head,
            **({"labels": dict(t["labels"])} if t.get("labels") else {}),
        }
    return out


def derive_local_config(
    spec: dict,
    gcs_address: str,
    node_temp_root: str,
    idle_timeout_minutes: float | None = None,
    object_store_bytes: int | None = None,
    cluster_name: str | None = None,
) -> dict:
    """The fake-multinode autoscaling config for cluster.yaml `spec`. The head type is renamed
    to the provider's `ray.head.default`; every worker type keeps its name, resources (GPU
    included), min_workers and max_workers. `object_store_bytes` caps each local node's object
    store (all nodes share this machine's memory) unless the type sets object_store_memory.
    The provider is Ray's fake-multinode one, each node in its own temp dir under
    `node_temp_root` (aigc_ray.local_provider says why)."""
    types = node_types(spec)
    available = {}
    for name, t in types.items():
        res = dict(t["resources"])
        if object_store_bytes and "object_store_memory" not in res:
            res["object_store_memory"] = object_store_bytes
        entry = {
            "resources": res,
            "node_config": {},
            "min_workers": t["min_workers"],
            "max_workers": t["max_workers"],
        }
        if "labels" in t:
            entry["labels"] = t["labels"]
        available[FAKE_HEAD_TYPE if t["head"] else name] = entry
    idle = (
        spec.get("idle_timeout_minutes", 5)
        if idle_timeout_minutes is None
        else idle_timeout_minutes
    )
    return {
        "cluster_name": cluster_name or f"{spec.get('cluster_name', 'aigc-ray')}-local",
        "max_workers": spec.get("max_workers", 2),
        "upscaling_speed": spec.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle,
        "provider": {
            "type": "external",
            "module": "aigc_ray.local_provider.LocalNodeProvider",
            "node_temp_root": node_temp_root,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": available,
        "head_node_type": FAKE_HEAD_TYPE,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def describe(spec: dict) -> str:
    """One line per node type: name, resources, worker bounds."""
    lines = []
    for name, t in node_types(spec).items():
        res = ", ".join(f"{k} {v:g}" for k, v in t["resources"].items())
        bounds = "head" if t["head"] else f"{t['min_workers']}..{t['max_workers']} workers"
        lines.append(f"  {name:<14} {res:<28} {bounds}")
    return "\n".join(lines)


# ---------------------------------------------------------------- does a config fit?


def _demands(cfg) -> list[tuple[str, dict]]:
    """(what, resources per worker/replica/actor) for the GPU users of a PipelineConfig."""
    out = []
    t = cfg.train
    if t.use_gpu:
        out.append(
            (
                f"train: {t.num_workers} workers x",
                {"GPU": 1, "CPU": t.cpus_per_worker, **t.worker_resources},
            )
        )
    for what, s in (("serve: a replica", cfg.serve), ("generate: an actor", cfg.generate)):
        if s.num_gpus > 0:
            out.append((what, {"GPU": s.num_gpus, "CPU": s.num_cpus}))
    return out


def fit_problems(cfg, spec: dict) -> list[str]:
    """Why a PipelineConfig's GPU workers, replicas or actors could never be placed on
    cluster.yaml's node types (empty when they fit)."""
    types = {n: t for n, t in node_types(spec).items() if t["head"] or t["max_workers"] > 0}
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    problems = []
    for what, need in _demands(cfg):
        if not gpu_types:
            problems.append(
                f"{what} asks for GPUs but cluster.yaml has no node type with a GPU "
                f"(types: {', '.join(types)}); add one or set the stage to CPU"
            )
            continue
        fits = [
            n
            for n, t in types.items()
            if all(t["resources"].get(k, 0) >= v for k, v in need.items())
        ]
        if not fits:
            most = max(t["resources"].get("GPU", 0) for t in gpu_types.values())
            have = "; ".join(f"{n}: {_fmt(t['resources'])}" for n, t in gpu_types.items())
            problems.append(
                f"{what} needs {_fmt(need)} on one node, more than any node type of cluster.yaml "
                f"holds (the most GPUs on one node: {most:g}; {have})"
            )
    return problems


def _fmt(res: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in res.items())


# ---------------------------------------------------------------- the local cluster


@dataclass
class LocalCluster:
    dir: str  # where cluster.json, the derived config and the token live
    temp_dir: str  # Ray's --temp-dir (short: Ray's unix sockets live under it)
    gcs_address: str
    dashboard_url: str
    token_path: str
    config_path: str
    head_type: str  # the head's name in cluster.yaml
    types: dict
    head_pid: int = 0  # `ray start --head --block`: every process of the cluster is under it

    def client_env(self) -> dict[str, str]:
        """What `ray job submit`, `ray status` or ray.init need to reach this cluster."""
        return {
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
        }

    def token(self) -> str:
        return Path(self.token_path).read_text().strip()

    @classmethod
    def load(cls, directory: str | Path) -> LocalCluster:
        state = Path(directory) / STATE_FILE
        if not state.is_file():
            raise ClusterError(f"{directory}: no local cluster here (no {STATE_FILE})")
        return cls(**json.loads(state.read_text()))


def ray_cli() -> str:
    """The `ray` executable next to this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def local_up(
    cluster_yaml: str | Path,
    directory: str | Path,
    idle_timeout_s: float | None = None,
    object_store_mb: int = 256,
    update_interval_s: int = 1,
    node_lost_after_s: int = 10,
) -> LocalCluster:
    """Start cluster.yaml's head with the autoscaler on the fake provider; return how to reach
    it. Refuses (before starting anything) a cluster.yaml it cannot map, or a directory that
    already holds a running cluster."""
    import ray._private.services as services

    spec = load_cluster_yaml(cluster_yaml)
    types = node_types(spec)  # raises on what cannot be mapped, before anything starts
    d = Path(directory).resolve()
    if (d / STATE_FILE).exists() and processes_of(LocalCluster.load(d)):
        raise ClusterError(f"{d}: a local cluster is already running; `down` it first")
    d.mkdir(parents=True, exist_ok=True)
    ip = services.get_node_ip_address()
    gcs = f"{ip}:{_free_port()}"
    dash_port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="aigc_lc_", dir="/tmp")
    cfg = derive_local_config(
        spec,
        gcs,
        temp_dir,
        idle_timeout_minutes=None if idle_timeout_s is None else idle_timeout_s / 60,
        object_store_bytes=object_store_mb * 2**20,
    )
    config_path = d / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    token = d / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    head_name = spec["head_node_type"]
    cluster = LocalCluster(
        dir=str(d),
        temp_dir=temp_dir,
        gcs_address=gcs,
        dashboard_url=f"http://127.0.0.1:{dash_port}",
        token_path=str(token),
        config_path=str(config_path),
        head_type=head_name,
        types=types,
    )
    head_res = dict(types[head_name]["resources"])
    cmd = [
        "--head",
        f"--port={gcs.rsplit(':', 1)[1]}",
        f"--autoscaling-config={config_path}",
        f"--temp-dir={cluster.temp_dir}",
        f"--num-cpus={head_res.pop('CPU', 0):g}",
        f"--num-gpus={head_res.pop('GPU', 0):g}",
        f"--object-store-memory={head_res.pop('object_store_memory', object_store_mb * 2**20):.0f}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        f"--ray-client-server-port={_free_port()}",
        # the head's agent (job submission) on a free port, not Ray's fixed 52365, which
        # another Ray on this machine may hold (its agent would not start: "No available
        # agent to submit job"); the launched nodes' agents already take free ports
        "--dashboard-agent-listen-port=0",
        "--disable-usage-stats",
        # a lost node is declared dead in ~3 s (Ray's default: 15 s), so the autoscaler and
        # Train react to a preempted node quickly
        '--system-config={"health_check_period_ms":1000,"health_check_failure_threshold":3}',
    ]
    if "memory" in head_res:
        cmd.append(f"--memory={head_res.pop('memory'):.0f}")
    if head_res:
        cmd.append(f"--resources={json.dumps(head_res)}")
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": str(update_interval_s),
        "AUTOSCALER_HEARTBEAT_TIMEOUT_S": str(node_lost_after_s),
        **cluster.client_env(),
        # as cluster.yaml's start commands do: this venv first, so a job's `python` is its python
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS")
    cluster.head_pid = start_ray_node(cmd, env, d / "head.log")
    (d / STATE_FILE).write_text(json.dumps(asdict(cluster), indent=1))
    return cluster


def start_ray_node(args: list[str], env: dict, log_path: str | Path, timeout_s: float = 180) -> int:
    """`ray start <args> --block` as a process of its own (its own session, its output in
    `log_path`); returns its pid once Ray says the node started. Every process of the node (GCS,
    raylet, dashboard, autoscaler, the nodes the fake provider launches, workers, drivers) runs
    under that pid, so `process_tree(pid)` finds them all without searching the machine."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [ray_cli(), "start", *args, "--block"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_adopt_orphans,
        )
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in Path(log_path).read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_tree(proc.pid, 3)
            tail = Path(log_path).read_text(errors="replace")[-2000:]
            raise ClusterError(f"ray start failed (exit {proc.poll()}): {tail}")
        time.sleep(0.2)
    return proc.pid


def _adopt_orphans() -> None:
    """In the child before exec: become a child subreaper (Linux), so a process of the node
    whose parent dies (a job's driver, a worker) is re-parented to the node's root instead of
    init, and stays in its tree. Elsewhere nothing is done."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def process_tree(pid: int) -> list:
    """The live process `pid` and every process under it (none if it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    alive = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


def processes_of(cluster: LocalCluster) -> list:
    """Every process of the local cluster: the head's `ray start --block` and its descendants."""
    return process_tree(cluster.head_pid) if cluster.head_pid else []


def stop_tree(pid: int, timeout_s: float = 3) -> int:
    """Stop `pid` and everything under it, in rounds (a process started while the others stop
    is caught by the next); returns how many processes there were. The autoscaler goes first in
    each round, so it launches no node meanwhile. Raises if any survives."""
    stopped = 0
    for _ in range(3):
        procs = process_tree(pid)
        if not procs:
            break
        monitor = [p for p in procs if "autoscaler/_private/monitor.py" in _cmdline(p)]
        _stop(monitor, timeout_s)
        _stop(procs, timeout_s)
        stopped += len(procs)
    left = process_tree(pid)
    if left:
        raise ClusterError(f"{len(left)} Ray processes survived: {[p.pid for p in left]}")
    return stopped


def _cmdline(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _stop(procs: list, timeout_s: float) -> None:
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout_s)


def local_down(directory: str | Path, timeout_s: float = 3) -> int:
    """Stop every process of the local cluster in `directory` (terminate, then kill); return
    how many there were. Raises if any survives."""
    cluster = LocalCluster.load(directory)
    stopped = stop_tree(cluster.head_pid, timeout_s) if cluster.head_pid else 0
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return stopped


def local_status(directory: str | Path) -> str:
    """The autoscaler's view (`ray status`: nodes by type, pending launches, demands)."""
    cluster = LocalCluster.load(directory)
    env = {**os.environ, **cluster.client_env()}
    r = subprocess.run(
        [ray_cli(), "status", f"--address={cluster.gcs_address}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        raise ClusterError(f"ray status failed: {(r.stderr or r.stdout)[-1000:]}")
    return r.stdout


def banner(cluster: LocalCluster, spec: dict) -> str:
    env = cluster.client_env()
    return "\n".join(
        [
            f"local cluster from cluster.yaml (fake-multinode autoscaler), state in {cluster.dir}",
            "node types:",
            describe(spec),
            f"dashboard / Jobs API: {cluster.dashboard_url}",
            f"GCS: {cluster.gcs_address}",
            "submit work to it with:",
            "  export " + " ".join(f"{k}={v}" for k, v in env.items()),
            "  aigc-ray submit -- python jobs/<stage>.py --config <config.yaml>",
        ]
    )


# ---------------------------------------------------------------- watching it


class ClusterApi:
    """The cluster's dashboard HTTP APIs (state and Serve), with its token."""

    def __init__(self, cluster: LocalCluster):
        self.url = cluster.dashboard_url
        self.headers = {"Authorization": f"Bearer {cluster.token()}"}
        self.types = cluster.types

    def get(self, path: str) -> dict:
        import urllib.request

        req = urllib.request.Request(self.url + path, headers=self.headers)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def _state(self, kind: str, **filters) -> list[dict]:
        from urllib.parse import quote

        q = "".join(
            f"&filter_keys={k}&filter_predicates=%3D&filter_values={quote(str(v), safe='')}"
            for k, v in filters.items()
        )
        return self.get(f"/api/v0/{kind}?detail=1&limit=10000{q}")["data"]["result"]["result"]

    def nodes(self) -> list[dict]:
        """Every node (alive or dead) with its cluster.yaml type (`node_type`)."""
        out = self._state("nodes")
        for n in out:
            n["node_type"] = self.type_of(n)
        return out

    def tasks(self, **filters) -> list[dict]:
        return self._state("tasks", **filters)

    def actors(self, **filters) -> list[dict]:
        return self._state("actors", **filters)

    def type_of(self, node: dict) -> str:
        """A node's type in cluster.yaml, by the resources it carries (CPU, GPU, custom)."""
        if node.get("is_head_node"):
            return next(n for n, t in self.types.items() if t["head"])
        have = node.get("resources_total", {})
        skip = ("memory", "object_store_memory")
        for name, t in self.types.items():
            want = {k: v for k, v in t["resources"].items() if k not in skip}
            same = all(have.get(k, 0) == v for k, v in want.items())
            if not t["head"] and same and have.get("GPU", 0) == want.get("GPU", 0):
                return name
        return "unknown"

    def alive_by_type(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes():
            if n["state"] == "ALIVE":
                counts[n["node_type"]] = counts.get(n["node_type"], 0) + 1
        return counts

    def replicas(self, app: str, deployment: str) -> list[dict]:
        """Serve's replicas of one deployment ({state, node_id, ...}); [] before it exists."""
        apps = self.get("/api/serve/applications/").get("applications") or {}
        dep = (apps.get(app) or {}).get("deployments", {}).get(deployment) or {}
        return dep.get("replicas") or []


class Timeline:
    """Samples nodes by type, running replicas and the request rate once a second (a thread),
    for docs/cluster.md's figure: `Timeline(api, app, deployment, completed=callable)`."""

    def __init__(self, api: ClusterApi, app: str, deployment: str, completed):
        import threading

        self.api, self.app, self.deployment, self.completed = api, app, deployment, completed
        self.rows: list[dict] = []
        self.events: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.time()

    def __enter__(self) -> Timeline:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def mark(self, what: str) -> None:
        self.events.append({"t": round(time.time() - self.t0, 2), "event": what})

    def _run(self) -> None:
        last_n, last_t = self.completed(), time.time()
        while not self._stop.wait(1.0):
            with contextlib.suppress(OSError, ValueError, KeyError):
                nodes = self.api.alive_by_type()
                reps = self.api.replicas(self.app, self.deployment)
                n, now = self.completed(), time.time()
                self.rows.append(
                    {
                        "t": round(now - self.t0, 2),
                        "nodes": nodes,
                        "replicas": sum(r.get("state") == "RUNNING" for r in reps),
                        "rps": round((n - last_n) / max(now - last_t, 1e-6), 2),
                    }
                )
                last_n, last_t = n, now

    def to_json(self) -> dict:
        return {"rows": self.rows, "events": self.events}


def plot_timeline(timeline: dict, out: str | Path) -> None:
    """Nodes by type and running replicas (top), requests/s (bottom), events as lines."""
    from matplotlib.figure import Figure

    rows = timeline["rows"]
    t = [r["t"] for r in rows]
    fig = Figure(figsize=(9, 5.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    types = sorted({k for r in rows for k in r["nodes"]})
    for name in types:
        top.step(t, [r["nodes"].get(name, 0) for r in rows], where="post", label=f"{name} nodes")
    top.step(t, [r["replicas"] for r in rows], where="post", ls="--", lw=2, label="replicas")
    top.set_ylabel("count")
    top.legend(loc="upper right", fontsize=8)
    bottom.plot(t, [r["rps"] for r in rows], color="k")
    bottom.set_ylabel("completed requests/s")
    bottom.set_xlabel("seconds")
    for ax in (top, bottom):
        for e in timeline["events"]:
            ax.axvline(e["t"], color="grey", lw=0.8, ls=":")
    for e in timeline["events"]:
        top.annotate(e["event"], (e["t"], top.get_ylim()[1]), fontsize=7, rotation=90, va="top")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
