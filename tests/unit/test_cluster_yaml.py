"""cluster.yaml: valid for Ray's cluster launcher and secure by default.

Offline and fast: Ray's own config preparation and JSON-schema validation (the steps `ray up`
runs before it talks to AWS), botocore's offline parameter validation of each node_config against
EC2 RunInstances, and `check_cluster_security`, our rules that a careless edit must not break.
Sockets are blocked for the whole module, so nothing here can reach AWS.
"""

from __future__ import annotations

import copy
import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"

# Ray 2.60 reads the token from $RAY_AUTH_TOKEN, else the file at $RAY_AUTH_TOKEN_PATH, else this
# default path (ray._private.authentication.authentication_token_setup._get_default_token_path).
RAY_DEFAULT_TOKEN_PATH = "~/.ray/auth_token"
PROJECT_MOUNT = "~/aigc_ray"
OPEN_CIDRS = {"0.0.0.0/0", "::/0"}

_RAY_START = re.compile(r"\bray start\b")
_AUTH_EXPORT = re.compile(r"(?:^|[;&|\s])(?:export\s+)?RAY_AUTH_MODE=token\b")
_AUTH_ANY = re.compile(r"RAY_AUTH_MODE=(\S+?)(?=[\s;'\"]|$)")
_VENV_PATH = re.compile(r"\bPATH=\$HOME/venv/bin:\$PATH\b")
_DASHBOARD_HOST = re.compile(r"--dashboard-host[= ](\S+)")
_PIP_INSTALL = re.compile(r"\bpip install\b")
_PROJECT_INSTALL = re.compile(r"\bpip install\b.*-c constraints\.txt\b.*-e \.(?:\s|$)")
_CUDA_TORCH = re.compile(
    r"\bpip install\b.*\btorch\b.*--(?:extra-)?index-url https://download\.pytorch\.org/whl/cu\d+"
)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that tries to open a connection (e.g. a boto3 call to AWS)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def load_cluster_yaml() -> dict[str, Any]:
    with CLUSTER_YAML.open() as f:
        return yaml.safe_load(f)


def prepare(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as `ray up` sees it before any cloud call: defaults merged, commands merged."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(cfg))


def _local_path(path: str) -> Path:
    """A file_mounts LOCAL_PATH as `ray up` resolves it, run from the repo root."""
    expanded = Path(path).expanduser()
    return (expanded if expanded.is_absolute() else REPO_ROOT / expanded).resolve()


def _is_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _effective_worker_setup(prepared: dict[str, Any], node_type: str) -> list[str]:
    """Ray runs a node type's own worker_setup_commands instead of the global ones, if set."""
    node = prepared["available_node_types"][node_type]
    return node.get("worker_setup_commands", prepared["worker_setup_commands"])


def _all_command_lists(prepared: dict[str, Any]) -> dict[str, list[str]]:
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    lists = {key: list(prepared.get(key) or []) for key in keys}
    for name, node in prepared["available_node_types"].items():
        for key in ("initialization_commands", "worker_setup_commands"):
            if key in node:
                lists[f"available_node_types.{name}.{key}"] = list(node[key])
    return lists


def _check_head(prepared: dict[str, Any]) -> list[str]:
    head = prepared["head_node_type"]
    resources = prepared["available_node_types"][head].get("resources", {})
    if resources.get("CPU") != 0:
        return [f"available_node_types.{head}.resources.CPU must be 0 (got {resources.get('CPU')})"]
    return []


def _check_start_commands(prepared: dict[str, Any]) -> list[str]:
    errors = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [cmd for cmd in prepared.get(key, []) if _RAY_START.search(cmd)]
        if not starts:
            errors.append(f"{key}: no `ray start` command")
        for cmd in starts:
            before_start = cmd[: _RAY_START.search(cmd).start()]
            if not _AUTH_EXPORT.search(before_start):
                errors.append(f"{key}: `ray start` without RAY_AUTH_MODE=token before it: {cmd!r}")
            if not re.search(r"RAY_USE_TLS=1\b", before_start) or "aigc-ray tls node" not in (
                before_start
            ):
                errors.append(
                    f"{key}: `ray start` without its own node certificate and RAY_USE_TLS=1 "
                    f"before it (traffic between nodes in clear text): {cmd!r}"
                )
            if not re.search(r"(^|[;&\s])umask 0?77\b", before_start):
                errors.append(
                    f"{key}: `ray start` without `umask 077` before it (files Ray's processes "
                    f"write on the node would be readable by other users): {cmd!r}"
                )
            if not _VENV_PATH.search(before_start):
                errors.append(
                    f"{key}: `ray start` without the venv first on PATH (jobs' `python` "
                    f"would be the system's): {cmd!r}"
                )
    head_starts = [c for c in prepared.get("head_start_ray_commands", []) if "--head" in c]
    for cmd in head_starts:
        hosts = _DASHBOARD_HOST.findall(cmd)
        if hosts != ["127.0.0.1"]:
            errors.append(f"head_start_ray_commands: dashboard host must be 127.0.0.1, got {hosts}")
    return errors


def _check_security_group(prepared: dict[str, Any]) -> list[str]:
    errors = []
    rules = prepared["provider"].get("security_group", {}).get("IpPermissions", [])
    for i, rule in enumerate(rules):
        where = f"provider.security_group.IpPermissions[{i}]"
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if OPEN_CIDRS & set(cidrs):
            errors.append(f"{where}: open to the internet ({sorted(OPEN_CIDRS & set(cidrs))})")
        if (rule.get("IpProtocol"), rule.get("FromPort"), rule.get("ToPort")) != ("tcp", 22, 22):
            errors.append(
                f"{where}: only tcp 22 (SSH) may be open, got {rule.get('IpProtocol')} "
                f"{rule.get('FromPort')}-{rule.get('ToPort')}"
            )
    return errors


def _check_token(prepared: dict[str, Any]) -> list[str]:
    errors = []
    mounts = prepared.get("file_mounts", {})
    if RAY_DEFAULT_TOKEN_PATH not in mounts:
        errors.append(f"file_mounts: no token mounted at {RAY_DEFAULT_TOKEN_PATH}")
    else:
        local = _local_path(mounts[RAY_DEFAULT_TOKEN_PATH])
        if _is_inside(local, REPO_ROOT):
            errors.append(f"file_mounts: token comes from inside the repo ({local})")
    for where, cmds in _all_command_lists(prepared).items():
        for cmd in cmds:
            if re.search(r"RAY_AUTH_TOKEN=", cmd):
                errors.append(f"{where}: a token value on a command line: {cmd!r}")
            for mode in _AUTH_ANY.findall(cmd):
                if mode != "token":
                    errors.append(f"{where}: RAY_AUTH_MODE={mode} weakens the cluster: {cmd!r}")
    return errors


def _check_installs(prepared: dict[str, Any]) -> list[str]:
    errors = []
    if prepared.get("file_mounts", {}).get(PROJECT_MOUNT) != ".":
        errors.append(f"file_mounts: {PROJECT_MOUNT} must map to '.' (the repo root)")
    setups = {"head_setup_commands": prepared["head_setup_commands"]}
    for name in prepared["available_node_types"]:
        if name != prepared["head_node_type"]:
            setups[f"{name} setup"] = _effective_worker_setup(prepared, name)
    for where, cmds in setups.items():
        if not any(_PROJECT_INSTALL.search(c) and PROJECT_MOUNT in c for c in cmds):
            errors.append(
                f"{where}: no `cd {PROJECT_MOUNT} && pip install -c constraints.txt -e .`"
            )
    for where, cmds in _all_command_lists(prepared).items():
        for cmd in cmds:
            if _PIP_INSTALL.search(cmd) and "constraints.txt" not in cmd and "==" not in cmd:
                errors.append(f"{where}: unpinned pip install: {cmd!r}")
    return errors


def _check_gpu_workers(prepared: dict[str, Any]) -> list[str]:
    gpu_types = {
        name: node
        for name, node in prepared["available_node_types"].items()
        if node.get("resources", {}).get("GPU", 0) >= 1
    }
    if not gpu_types:
        return ["available_node_types: no node type with GPU resources"]
    errors = []
    for name, node in gpu_types.items():
        if node.get("min_workers", 0) != 0:
            errors.append(f"available_node_types.{name}.min_workers must be 0 (idle GPUs cost)")
        if not any(_CUDA_TORCH.search(c) for c in _effective_worker_setup(prepared, name)):
            errors.append(f"available_node_types.{name}: torch is not installed from a CUDA index")
    return errors


def check_cluster_security(cfg: dict[str, Any]) -> list[str]:
    """Violations of aigc_ray's cluster rules in a cluster.yaml dict (empty list = compliant).

    The rules are checked on the config as Ray prepares it, so they judge the commands Ray will
    really run (e.g. a node type's own worker_setup_commands replace the global ones).
    """
    prepared = prepare(cfg)
    errors: list[str] = []
    if not prepared.get("idle_timeout_minutes"):
        errors.append("idle_timeout_minutes must be set (> 0) so idle workers are released")
    if "max_workers" not in cfg:
        errors.append("max_workers must be set explicitly")
    for check in (
        _check_head,
        _check_start_commands,
        _check_security_group,
        _check_token,
        _check_installs,
        _check_gpu_workers,
    ):
        errors.extend(check(prepared))
    return errors


# ---------------------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_schema_validation() -> None:
    from ray.autoscaler._private.util import validate_config

    prepared = prepare(load_cluster_yaml())
    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError on a bad config

    assert prepared["cluster_name"] == "aigc-ray"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] == "us-west-2"
    assert prepared["provider"]["cache_stopped_nodes"] is False
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_rays_schema_rejects_a_misspelled_key() -> None:
    """Guard for the test above: the schema Ray uses is strict enough to catch typos."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    cfg = load_cluster_yaml()
    cfg["available_node_types"]["gpu-worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare(cfg))


def test_cluster_yaml_has_no_security_violations() -> None:
    assert check_cluster_security(load_cluster_yaml()) == []


def test_worker_pools_autoscale_from_zero() -> None:
    prepared = prepare(load_cluster_yaml())
    nodes = prepared["available_node_types"]
    assert nodes["cpu-worker"]["resources"].get("GPU", 0) == 0
    assert nodes["gpu-worker"]["resources"]["GPU"] >= 1
    for name in ("cpu-worker", "gpu-worker"):
        assert nodes[name]["min_workers"] == 0
        assert 0 < nodes[name]["max_workers"] <= prepared["max_workers"]
    assert sum(n["min_workers"] for n in nodes.values()) <= prepared["max_workers"]


def test_gpu_setup_repeats_the_shared_steps_then_installs_cuda_torch() -> None:
    """GPU worker_setup_commands replace setup_commands, so they must not drop a shared step."""
    cfg = load_cluster_yaml()
    gpu = cfg["available_node_types"]["gpu-worker"]["worker_setup_commands"]
    shared = [c for c in cfg["setup_commands"] if "download.pytorch.org/whl/cpu" not in c]
    assert [c for c in gpu if c in shared] == shared
    cuda = next(i for i, c in enumerate(gpu) if _CUDA_TORCH.search(c))
    project = next(i for i, c in enumerate(gpu) if _PROJECT_INSTALL.search(c))
    assert cuda < project, "CUDA torch must be installed before the project pulls in torch"
    assert "-c ~/aigc_ray/constraints.txt" in gpu[cuda], "torch version must come from constraints"


def test_constraints_file_pins_what_the_cluster_installs() -> None:
    from aigc_ray.doctor import pins as read_pins

    pins = read_pins(REPO_ROOT / "constraints.txt")
    assert {"torch", "ray", "transformers"} <= pins.keys()
    import ray

    assert pins["ray"] == ray.__version__, "`ray up` needs the same Ray locally and on the cluster"


def test_no_token_file_in_the_repo() -> None:
    cfg = load_cluster_yaml()
    token_name = Path(cfg["file_mounts"][RAY_DEFAULT_TOKEN_PATH]).name
    suspicious = {token_name, "auth_token"}
    found = []
    for root, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if d not in {".git", ".venv", "node_modules"}]
        found += [Path(root, f) for f in files if f in suspicious or Path(f).suffix == ".token"]
    assert found == []


def _node_config_validation_errors(node_config: dict[str, Any]) -> str:
    """botocore's offline check of RunInstances parameters (the call Ray makes per node)."""
    pytest.importorskip("botocore")
    from botocore.session import get_session
    from botocore.validate import ParamValidator

    model = get_session().get_service_model("ec2").operation_model("RunInstances")
    report = ParamValidator().validate(
        {**node_config, "MinCount": 1, "MaxCount": 1}, model.input_shape
    )
    return report.generate_report() if report.has_errors() else ""


@pytest.mark.parametrize("node_type", ["head", "cpu-worker", "gpu-worker"])
def test_node_configs_are_valid_run_instances_parameters(node_type: str) -> None:
    node_config = load_cluster_yaml()["available_node_types"][node_type]["node_config"]
    assert _node_config_validation_errors(node_config) == ""


def test_commented_spot_option_is_valid_when_uncommented() -> None:
    """The spot block is documentation; make sure uncommenting it gives a valid request."""
    lines = CLUSTER_YAML.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# InstanceMarketOptions:")
    prefix = lines[start][: lines[start].index("#")] + "# "
    block = [lines[start][len(prefix) :]]
    for line in lines[start + 1 :]:
        if not line.startswith(prefix + " "):
            break
        block.append(line[len(prefix) :])
    spot = yaml.safe_load("\n".join(block))
    assert spot["InstanceMarketOptions"]["MarketType"] == "spot"

    node_config = load_cluster_yaml()["available_node_types"]["gpu-worker"]["node_config"]
    assert _node_config_validation_errors({**node_config, **spot}) == ""


def test_botocore_validation_catches_a_bad_node_config() -> None:
    """Guard for the two tests above."""
    node_config = load_cluster_yaml()["available_node_types"]["gpu-worker"]["node_config"]
    bad = {**node_config, "InstanceMarketOptions": {"MarketType": "spot", "SpotPrice": "1"}}
    assert "SpotPrice" in _node_config_validation_errors(bad)


def _nodes(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["available_node_types"]


def _open_port_8000(cfg: dict[str, Any]) -> None:
    cfg["provider"]["security_group"]["IpPermissions"].append(
        {
            "IpProtocol": "tcp",
            "FromPort": 8000,
            "ToPort": 8000,
            "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
        }
    )


def _open_ssh_to_world(cfg: dict[str, Any]) -> None:
    cfg["provider"]["security_group"]["IpPermissions"][0]["IpRanges"] = [{"CidrIp": "0.0.0.0/0"}]


def _drop_auth_mode_on_workers(cfg: dict[str, Any]) -> None:
    cfg["worker_start_ray_commands"] = [
        c.replace("export RAY_AUTH_MODE=token ", "export ")
        for c in cfg["worker_start_ray_commands"]
    ]


def _no_umask_on_workers(cfg: dict[str, Any]) -> None:
    cfg["worker_start_ray_commands"] = [
        c.replace("umask 077;", "") for c in cfg["worker_start_ray_commands"]
    ]


def _no_tls_on_head(cfg: dict[str, Any]) -> None:
    cfg["head_start_ray_commands"] = [
        c.replace("RAY_USE_TLS=1", "RAY_USE_TLS=0") for c in cfg["head_start_ray_commands"]
    ]


def _auth_mode_after_ray_start(cfg: dict[str, Any]) -> None:
    cfg["head_start_ray_commands"] = [
        c.replace("export RAY_AUTH_MODE=token ", "export ") + "; export RAY_AUTH_MODE=token"
        for c in cfg["head_start_ray_commands"]
    ]


def _system_python_for_jobs(cfg: dict[str, Any]) -> None:
    cfg["head_start_ray_commands"] = [
        c.replace(" PATH=$HOME/venv/bin:$PATH", "") for c in cfg["head_start_ray_commands"]
    ]


def _disable_auth_in_setup(cfg: dict[str, Any]) -> None:
    cfg["setup_commands"].append("echo 'export RAY_AUTH_MODE=disabled' >> ~/.bashrc")


def _public_dashboard(cfg: dict[str, Any]) -> None:
    cfg["head_start_ray_commands"] = [
        c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
        for c in cfg["head_start_ray_commands"]
    ]


def _head_runs_work(cfg: dict[str, Any]) -> None:
    _nodes(cfg)["head"]["resources"] = {}


def _token_from_repo(cfg: dict[str, Any]) -> None:
    cfg["file_mounts"][RAY_DEFAULT_TOKEN_PATH] = "./auth_token"


def _token_not_mounted(cfg: dict[str, Any]) -> None:
    del cfg["file_mounts"][RAY_DEFAULT_TOKEN_PATH]


def _token_on_command_line(cfg: dict[str, Any]) -> None:
    cfg["worker_start_ray_commands"][-1] = (
        "export RAY_AUTH_TOKEN=abc; " + (cfg["worker_start_ray_commands"][-1])
    )


def _install_without_constraints(cfg: dict[str, Any]) -> None:
    cfg["setup_commands"] = [c.replace(" -c constraints.txt", "") for c in cfg["setup_commands"]]


def _gpu_setup_loses_project(cfg: dict[str, Any]) -> None:
    gpu = _nodes(cfg)["gpu-worker"]
    gpu["worker_setup_commands"] = [
        c for c in gpu["worker_setup_commands"] if not _PROJECT_INSTALL.search(c)
    ]


def _gpu_setup_cpu_torch(cfg: dict[str, Any]) -> None:
    gpu = _nodes(cfg)["gpu-worker"]
    gpu["worker_setup_commands"] = [
        c.replace("whl/cu128", "whl/cpu") for c in gpu["worker_setup_commands"]
    ]


def _gpu_always_on(cfg: dict[str, Any]) -> None:
    _nodes(cfg)["gpu-worker"]["min_workers"] = 2


def _gpu_type_without_gpus(cfg: dict[str, Any]) -> None:
    _nodes(cfg)["gpu-worker"]["resources"] = {"CPU": 4}


def _no_idle_timeout(cfg: dict[str, Any]) -> None:
    cfg["idle_timeout_minutes"] = 0


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_open_port_8000, "open to the internet"),
        (_open_port_8000, "only tcp 22"),
        (_open_ssh_to_world, "open to the internet"),
        (
            _drop_auth_mode_on_workers,
            "worker_start_ray_commands: `ray start` without RAY_AUTH_MODE",
        ),
        (_auth_mode_after_ray_start, "head_start_ray_commands: `ray start` without RAY_AUTH_MODE"),
        (_no_umask_on_workers, "worker_start_ray_commands: `ray start` without `umask 077`"),
        (_no_tls_on_head, "head_start_ray_commands: `ray start` without its own node certificate"),
        (_disable_auth_in_setup, "RAY_AUTH_MODE=disabled"),
        (_system_python_for_jobs, "head_start_ray_commands: `ray start` without the venv first"),
        (_public_dashboard, "dashboard host must be 127.0.0.1"),
        (_head_runs_work, "resources.CPU must be 0"),
        (_token_from_repo, "token comes from inside the repo"),
        (_token_not_mounted, "no token mounted"),
        (_token_on_command_line, "a token value on a command line"),
        (_install_without_constraints, "no `cd ~/aigc_ray && pip install -c constraints.txt"),
        (_install_without_constraints, "unpinned pip install"),
        (_gpu_setup_loses_project, "gpu-worker setup: no `cd ~/aigc_ray"),
        (_gpu_setup_cpu_torch, "not installed from a CUDA index"),
        (_gpu_always_on, "gpu-worker.min_workers must be 0"),
        (_gpu_type_without_gpus, "no node type with GPU resources"),
        (_no_idle_timeout, "idle_timeout_minutes"),
    ],
)
def test_check_cluster_security_flags_a_bad_edit(mutate, expected: str) -> None:
    cfg = load_cluster_yaml()
    mutate(cfg)
    violations = check_cluster_security(cfg)
    assert any(expected in v for v in violations), violations
