"""Model directories in object storage: check, export (train.export_dir) and a per-node cached
copy for serving and batch generation. file:// URIs take the same pyarrow code path as s3://
(which the integration tier runs against a real S3-compatible server)."""

import os
import shutil
from pathlib import Path

import pytest

from aigc_ray.config import PipelineConfig
from aigc_ray.engine import GenerationEngine, SamplingParams
from aigc_ray.model import ModelDirError, check_model_dir, copy_model_dir, local_model_dir


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AIGC_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def test_export_check_fetch_and_generate(tiny_model_dir, tmp_path, cache):
    uri = copy_model_dir(tiny_model_dir, f"file://{tmp_path}/bucket/run/model")
    assert sorted(os.listdir(tmp_path / "bucket/run/model")) == sorted(os.listdir(tiny_model_dir))
    check_model_dir(uri)
    local = local_model_dir(uri)
    assert Path(local).parent == cache and (Path(local) / "config.json").is_file()
    assert local_model_dir(uri + "/") == local  # cached: same copy, no refetch
    engine = GenerationEngine.from_pretrained(uri, device="cpu")
    try:
        out = engine.generate(["def f(x):"], [SamplingParams(max_tokens=4, ignore_eos=True)])[0]
        assert out.completion_tokens == 4
    finally:
        engine.close()
    assert [p for p in cache.iterdir() if p.is_dir()] == [Path(local)]  # one copy, no .partial


def test_a_re_export_to_the_same_uri_is_fetched_again(tiny_model_dir, tmp_path, cache):
    remote = tmp_path / "bucket" / "model"
    uri = copy_model_dir(tiny_model_dir, f"file://{remote}")
    first = local_model_dir(uri)
    (remote / "generation_config.json").write_text('{"max_new_tokens": 7}')
    second = local_model_dir(uri)
    assert second != first and (Path(second) / "generation_config.json").is_file()


def test_local_export_replaces_what_was_there(tiny_model_dir, tmp_path):
    dest = tmp_path / "exported"
    dest.mkdir()
    (dest / "stale.bin").write_text("old")
    copy_model_dir(tiny_model_dir, str(dest))
    assert not (dest / "stale.bin").exists()
    check_model_dir(dest)


def test_bad_remote_model_dirs_are_clear_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ModelDirError, match="not found"):
        check_model_dir(f"file://{tmp_path}/nothing-here")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_model_dir, no_weights)
    for w in no_weights.glob("*.safetensors"):
        w.unlink()
    with pytest.raises(ModelDirError, match="no weights"):
        check_model_dir(f"file://{no_weights}")
    (no_weights / "config.json").unlink()
    with pytest.raises(ModelDirError, match="no config.json"):
        check_model_dir(f"file://{no_weights}")


def test_export_dir_is_the_default_for_serve_and_generate():
    cfg = PipelineConfig(train={"export_dir": "s3://bucket/aigc/model"})
    assert cfg.serve_model_dir() == cfg.generate_model_dir() == "s3://bucket/aigc/model"
    assert PipelineConfig().serve_model_dir().endswith("train/model")


def test_an_export_dir_overlapping_the_model_is_refused(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    for dest in (run / "model", run, run / "model" / "export"):
        with pytest.raises(ModelDirError, match="overlaps"):
            copy_model_dir(run / "model", str(dest))
    check_model_dir(run / "model")  # untouched


def test_train_preflight_refuses_an_overlapping_export_dir(tmp_path):
    from aigc_ray.config import ModelConfig, TrainConfig
    from aigc_ray.train import TrainError, preflight

    cfg = TrainConfig(run_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "run"))
    with pytest.raises(TrainError, match="overlaps"):
        preflight(cfg, ModelConfig(), str(tmp_path / "no-data"))  # before it reads any data


def test_a_remote_re_export_leaves_no_stale_files(tiny_model_dir, tmp_path):
    remote = tmp_path / "bucket" / "model"
    remote.mkdir(parents=True)
    (remote / "model-00001-of-00002.safetensors").write_text("old shard")
    copy_model_dir(tiny_model_dir, f"file://{remote}")
    assert sorted(os.listdir(remote)) == sorted(os.listdir(tiny_model_dir))


def test_processes_fetching_together_share_one_complete_copy(tiny_model_dir, tmp_path, cache):
    from concurrent.futures import ThreadPoolExecutor

    uri = copy_model_dir(tiny_model_dir, f"file://{tmp_path}/bucket/model")
    with ThreadPoolExecutor(4) as pool:
        dirs = set(pool.map(lambda _: local_model_dir(uri), range(4)))
    assert len(dirs) == 1 and (Path(dirs.pop()) / "config.json").is_file()
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1  # one copy, no .partial left
