"""`aigc-ray cluster local`'s config is derived from cluster.yaml, never hand-copied: these fail
when cluster.yaml gains a node type or resource the derivation drops, or something it cannot map
goes through silently. Also the GPU-fit preflight (doctor --config, submit) and the one CPU
fallback fake GPU nodes allow."""

import copy
from pathlib import Path

import pytest
import torch
import yaml

from aigc_ray.cluster import (
    FAKE_HEAD_TYPE,
    ClusterError,
    derive_local_config,
    fit_problems,
    load_cluster_yaml,
    node_types,
)
from aigc_ray.config import load_config
from aigc_ray.engine.params import GpuUnavailableError, usable_device

ROOT = Path(__file__).resolve().parents[2]
RAW = yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _derive(spec, **kw):
    return derive_local_config(spec, "127.0.0.1:6379", "/tmp/x", **kw)


def test_every_node_type_and_resource_of_cluster_yaml_is_in_the_local_config():
    spec = load_cluster_yaml(ROOT / "cluster.yaml")
    local = _derive(spec, object_store_bytes=2**28)
    head = RAW["head_node_type"]
    want_names = {FAKE_HEAD_TYPE if n == head else n for n in RAW["available_node_types"]}
    assert set(local["available_node_types"]) == want_names
    assert local["head_node_type"] == FAKE_HEAD_TYPE
    for name, t in RAW["available_node_types"].items():
        got = local["available_node_types"][FAKE_HEAD_TYPE if name == head else name]
        res = dict(got["resources"])
        assert res.pop("object_store_memory") == 2**28  # local only: nodes share this machine
        assert res == t["resources"], name  # GPU included, nothing dropped or added
        if name != head:
            assert got["min_workers"] == t["min_workers"]
            assert got["max_workers"] == t["max_workers"]
        assert got["node_config"] == {}  # cloud only
    for key in ("max_workers", "upscaling_speed", "idle_timeout_minutes"):
        assert local[key] == RAW[key], key
    # what only a cloud needs is gone
    assert local["provider"]["module"] == "aigc_ray.local_provider.LocalNodeProvider"
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert local[key] == []
    assert local["file_mounts"] == {} and local["auth"] == {}
    assert "gpu-worker" in RAW["available_node_types"]  # the GPU pool the design is named after


def test_idle_timeout_is_overridable_and_a_type_without_gpu_keeps_none():
    local = _derive(load_cluster_yaml(ROOT / "cluster.yaml"), idle_timeout_minutes=0.1)
    assert local["idle_timeout_minutes"] == 0.1
    assert "GPU" not in local["available_node_types"]["cpu-worker"]["resources"]


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda t: t["gpu-worker"].update(spot_price=1), "gpu-worker: spot_price"),
        (lambda t: t["gpu-worker"]["resources"].update(GPU=0.5), "resources.GPU"),
        (lambda t: t["cpu-worker"]["resources"].update(CPU="16"), "cpu-worker.resources.CPU"),
        (lambda t: t["cpu-worker"].pop("resources"), "cpu-worker: no `resources`"),
        (lambda t: t["cpu-worker"].update(min_workers=5), "cpu-worker: min_workers 5"),
    ],
)
def test_what_cannot_be_mapped_is_an_error_naming_it(tmp_path, edit, named):
    spec = copy.deepcopy(RAW)
    edit(spec["available_node_types"])
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ClusterError, match=named.replace(".", r"\.").replace("`", ".")):
        node_types(load_cluster_yaml(path))


def test_a_head_type_not_among_the_node_types_is_refused(tmp_path):
    spec = {**copy.deepcopy(RAW), "head_node_type": "nope"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ClusterError, match="head_node_type 'nope'"):
        load_cluster_yaml(path)


def test_gpu_demands_that_no_node_type_can_hold_are_named_before_launch():
    spec = load_cluster_yaml(ROOT / "cluster.yaml")
    fits = load_config("configs/tiny.yaml", ["train.use_gpu=true", "serve.num_gpus=1"])
    assert fit_problems(fits, spec) == []
    assert fit_problems(load_config("configs/tiny.yaml"), spec) == []  # CPU only
    too_many = load_config("configs/tiny.yaml", ["serve.num_gpus=2"])
    (problem,) = fit_problems(too_many, spec)
    assert "serve: a replica needs GPU 2" in problem and "gpu-worker" in problem
    cpus = load_config("configs/tiny.yaml", ["train.use_gpu=true", "train.cpus_per_worker=8"])
    assert "train: 2 workers x needs GPU 1, CPU 8" in fit_problems(cpus, spec)[0]
    no_gpu = copy.deepcopy(spec)
    del no_gpu["available_node_types"]["gpu-worker"]
    (problem,) = fit_problems(load_config("configs/tiny.yaml", ["train.use_gpu=true"]), no_gpu)
    assert "no node type with a GPU" in problem


def test_submit_refuses_a_job_that_asks_more_gpus_than_any_node_holds(tmp_path, capsys):
    from aigc_ray.cli import main

    (tmp_path / "cluster.yaml").write_text((ROOT / "cluster.yaml").read_text())
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "serve.py").write_text("")
    rc = main(
        [
            "submit",
            "--working-dir",
            str(tmp_path),
            "--",
            "python",
            "jobs/serve.py",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "serve.num_gpus=4",
        ]
    )
    assert rc == 2
    assert "does not fit" in capsys.readouterr().err


def test_doctor_says_when_a_config_does_not_fit(capsys):
    from aigc_ray.cli import main

    rc = main(["doctor", "--config", "configs/tiny.yaml", "train.use_gpu=true", "serve.num_gpus=3"])
    out = capsys.readouterr().out
    assert rc == 1 and "WARNING: serve: a replica needs GPU 3" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_a_gpu_torch_cannot_see_fails_loudly_except_on_fake_nodes(monkeypatch, caplog):
    assert usable_device("cpu", "x") == "cpu"
    monkeypatch.delenv("RAY_FAKE_CLUSTER", raising=False)
    with pytest.raises(GpuUnavailableError, match="replica of m: Ray reserved a GPU"):
        usable_device("cuda", "replica of m")
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")
    assert usable_device("cuda:0", "training worker 0") == "cpu"
    assert "fake GPU node" in caplog.text


def test_up_refuses_an_unmappable_cluster_yaml_before_starting_anything(tmp_path, capsys):
    from aigc_ray.cli import main

    spec = copy.deepcopy(RAW)
    spec["available_node_types"]["gpu-worker"]["resources"]["GPU"] = "one"
    bad = tmp_path / "cluster.yaml"
    bad.write_text(yaml.safe_dump(spec))
    state = tmp_path / "state"
    rc = main(["cluster", "local", "up", "--cluster-yaml", str(bad), "--dir", str(state)])
    assert rc == 2
    assert "gpu-worker.resources.GPU: 'one' is not a non-negative number" in capsys.readouterr().err
    assert not state.exists()  # nothing written, nothing started
