"""Unit tests for aigc_ray.cli: parsing, fail-fast preflight (before Ray), result checks."""

import json
from pathlib import Path

import pytest
import ray

from aigc_ray import cli
from aigc_ray.cli import PipelineError, build_parser, check_learned, format_summary, main
from aigc_ray.train import TrainResult

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Any path that would start Ray in these tests is a failure, not a cluster start.

    Yields whether Ray was already up (`make test` runs the integration tier's shared Ray in
    the same process), so "Ray is still not initialized" is only asserted when it was not.
    """

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started: the error should have been caught before Ray")

    monkeypatch.setattr(cli, "init_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)
    was_up = ray.is_initialized()
    yield was_up
    if not was_up:
        assert not ray.is_initialized()


# ---------------------------------------------------------------- parser


def test_build_parser_pipeline():
    args = build_parser().parse_args(["pipeline", "--config", "x", "a.b=1", "c.d=[1, 2]"])
    assert args.command == "pipeline"
    assert args.config == "x"
    assert args.overrides == ["a.b=1", "c.d=[1, 2]"]
    assert args.keep_serving is False
    assert args.verbose is False


def test_build_parser_defaults_and_flags():
    args = build_parser().parse_args(["serve", "--keep-serving", "--verbose"])
    assert args.config == "configs/tiny.yaml"
    assert args.overrides == []
    assert args.keep_serving is True and args.verbose is True
    assert not hasattr(build_parser().parse_args(["train"]), "keep_serving")


def test_build_parser_rejects_unknown_command(capsys):
    with pytest.raises(SystemExit) as ei:
        build_parser().parse_args(["fly"])
    assert ei.value.code == 2
    assert "fly" in capsys.readouterr().err


def test_build_parser_requires_a_command():
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


# ---------------------------------------------------------------- main fails fast, before Ray


def test_main_missing_input_path(tmp_path, capsys, no_ray):
    missing = tmp_path / "corpus_that_does_not_exist"
    rc = main(["preprocess", "--config", TINY, f"data.inputs=[{missing}]"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "aigc-ray: error:" in err
    assert str(missing) in err
    if not no_ray:
        assert ray.is_initialized() is False


def test_main_pipeline_missing_input_path(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["pipeline", "--config", TINY, f"data.inputs=[{missing}]"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_main_unknown_config_key(capsys):
    rc = main(["preprocess", "--config", TINY, "train.max_stpes=5"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train.max_stpes" in err
    assert "unknown key" in err


def test_main_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_main_serve_with_a_non_model_dir(tmp_path, capsys):
    (tmp_path / "readme.txt").write_text("not a model")
    rc = main(["serve", "--config", TINY, f"serve.model_dir={tmp_path}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err
    assert "config.json" in err


def test_main_train_without_shards(tmp_path, capsys):
    rc = main(["train", "--config", TINY, f"train.data_dir={tmp_path}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and str(tmp_path) in err


def write_manifest(d: Path, seq_len: int = 128, blocks: int = 100) -> None:
    manifest = {
        "seq_len": seq_len,
        "tokenizer_dir": str(d / "tok"),
        "splits": {"train": {"blocks": blocks}, "val": {"blocks": 1}},
    }
    (d / "manifest.json").write_text(json.dumps(manifest))


def test_main_train_with_bad_pretrained(tmp_path, capsys):
    write_manifest(tmp_path)
    bad = tmp_path / "no-model"
    rc = main(["train", "--config", TINY, f"train.data_dir={tmp_path}", f"model.pretrained={bad}"])
    assert rc == 2
    assert str(bad) in capsys.readouterr().err


def test_main_train_seq_len_mismatch_fails_before_ray(tmp_path, capsys):
    write_manifest(
        tmp_path, seq_len=64
    )  # train.seq_len unset means "the shards'"; set, it must agree
    rc = main(["train", "--config", TINY, f"train.data_dir={tmp_path}", "train.seq_len=128"])
    assert rc == 2
    assert "train.seq_len" in capsys.readouterr().err


def test_main_train_too_few_blocks_fails_before_ray(tmp_path, capsys):
    write_manifest(tmp_path, blocks=3)
    rc = main(["train", "--config", TINY, f"train.data_dir={tmp_path}", "train.batch_size=8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train.batch_size" in err and "3 training blocks" in err


def test_preflight_public_host_with_keys_passes(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("AIGC_RAY_API_KEYS", "k1")
    cfg = cli.load_config(TINY, [f"serve.model_dir={tiny_model_dir}", "serve.host=0.0.0.0"])
    cli.preflight(cfg, {"serve"})  # no exception


def test_main_serve_public_host_without_keys_fails_before_ray(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.delenv("AIGC_RAY_API_KEYS", raising=False)
    monkeypatch.delenv("AIGC_RAY_API_KEYS_FILE", raising=False)
    rc = main(
        ["serve", "--config", TINY, f"serve.model_dir={tiny_model_dir}", "serve.host=0.0.0.0"]
    )
    assert rc == 2
    assert "AIGC_RAY_API_KEYS" in capsys.readouterr().err


def test_preflight_serve_with_a_model_dir_passes(tiny_model_dir):
    cfg = cli.load_config(TINY, [f"serve.model_dir={tiny_model_dir}"])
    cli.preflight(cfg, {"serve"})  # no exception


def test_preflight_pipeline_does_not_require_a_model_yet(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    cfg = cli.load_config(
        TINY, [f"data.inputs=[{tmp_path / 'a.txt'}]", f"serve.model_dir={tmp_path / 'later'}"]
    )
    cli.preflight(cfg, cli.STAGES["pipeline"])  # the model is produced by the train stage
    optimized = cfg.model_copy(
        update={"optimize": cfg.optimize.model_copy(update={"enabled": True})}
    )
    cli.preflight(optimized, cli.stages_of("pipeline", optimized))  # nor the optimized one


def test_pipeline_with_a_bad_optimize_destination_fails_before_training(
    tmp_path, monkeypatch, capsys
):
    """optimize.output_dir=s3://...: exit 2 before Ray starts (it used to train for minutes,
    then write a local folder named `s3:`). The autouse no_ray fixture fails the test if Ray
    is started."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("some text")
    rc = main(
        [
            "pipeline",
            "--config",
            TINY,
            f"data.inputs=[{tmp_path / 'a.txt'}]",
            "optimize.enabled=true",
            "optimize.quantization=w8a8",
            "optimize.output_dir=s3://bucket/optimized",
        ]
    )
    assert rc == 2
    assert "optimize.output_dir must be a local directory" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists()


# ---------------------------------------------------------------- results


def test_check_learned_raises_when_loss_did_not_drop():
    with pytest.raises(PipelineError, match="did not learn"):
        check_learned(5.0, 5.0)
    with pytest.raises(PipelineError, match="did not learn"):
        check_learned(5.0, 4.6)  # only 8% lower
    with pytest.raises(PipelineError, match="did not learn"):
        check_learned(5.0, 6.0)


def test_check_learned_passes_when_loss_dropped():
    check_learned(5.0, 4.4)
    check_learned(8.9, 3.0)
    check_learned(5.0, 4.9, min_gain=0.01)


def test_check_learned_without_validation():
    with pytest.raises(PipelineError, match="val_fraction"):
        check_learned(None, None)
    with pytest.raises(PipelineError, match="val_fraction"):
        check_learned(5.0, None)


def make_result(**kw) -> TrainResult:
    base = dict(
        model_dir="runs/x/train/model",
        run_dir="runs/x/train",
        steps=300,
        tokens=1234567,
        first_loss=9.01,
        last_loss=3.21,
        val_loss_initial=9.05,
        val_loss_final=3.5,
        seconds=61.2,
        params=4_980_000,
    )
    return TrainResult(**{**base, **kw})


MANIFEST = {
    "docs_read": 674,
    "docs_kept": 660,
    "tokens": 2345678,
    "vocab_size": 8192,
    "seq_len": 128,
    "splits": {
        "train": {"blocks": 17500, "shards": ["a", "b"]},
        "val": {"blocks": 812, "shards": ["c"]},
    },
}


def test_format_summary_contains_the_counts():
    text = format_summary(
        MANIFEST, make_result(), "http://127.0.0.1:8000", [("def f():", " return 1\n")], 95.4
    )
    for part in (
        "674 read",
        "660 kept",
        "2,345,678",
        "8192",
        "17500 train",
        "812 val",
        "of 128",
        "3 parquet files",
        "300 steps",
        "1,234,567",
        "5.0M params",
        "9.010 -> 3.210",
        "9.050 untrained -> 3.500 trained",
        "runs/x/train/model",
        "http://127.0.0.1:8000/v1",
        "'def f():'",
        "def f(): return 1",
        "wall time      95 s",
    ):
        assert part in text, part


def test_cmd_train_prints_a_summary_line(monkeypatch, capsys):
    import aigc_ray.train

    monkeypatch.setattr(aigc_ray.train, "fit", lambda *a: make_result())
    cfg = cli.load_config(TINY)
    r = cli.cmd_train(cfg)
    assert r.steps == 300
    out = capsys.readouterr().out
    assert "300 steps" in out and "9.050" in out and "3.500" in out


def test_cmd_train_without_validation_does_not_crash(monkeypatch, capsys):
    import aigc_ray.train

    monkeypatch.setattr(
        aigc_ray.train, "fit", lambda *a: make_result(val_loss_initial=None, val_loss_final=None)
    )
    cli.cmd_train(cli.load_config(TINY))
    out = capsys.readouterr().out
    assert "300 steps" in out and "n/a" in out


def test_main_serve_missing_keys_file_is_an_error(tiny_model_dir, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "keys.txt"
    monkeypatch.setenv("AIGC_RAY_API_KEYS_FILE", str(missing))
    rc = main(["serve", "--config", TINY, f"serve.model_dir={tiny_model_dir}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "AIGC_RAY_API_KEYS_FILE" in err and str(missing) in err


def test_main_train_incomplete_manifest_is_an_error(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{}")
    rc = main(["train", "--config", TINY, f"train.data_dir={tmp_path}"])
    assert rc == 2
    assert "manifest.json" in capsys.readouterr().err


def test_main_generate_fails_fast_without_inputs_or_model(tmp_path, capsys, no_ray):
    rc = main(["generate", "--config", TINY])
    assert rc == 2 and "generate.inputs is empty" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    rc = main(
        [
            "generate",
            "--config",
            TINY,
            f"generate.inputs=[{prompts}]",
            f"generate.model_dir={tmp_path}",
        ]
    )
    assert rc == 2 and str(tmp_path) in capsys.readouterr().err
    if not no_ray:
        assert ray.is_initialized() is False
