"""Unit tests for aigc_ray.config: YAML loading, overrides, error messages, references."""

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from aigc_ray.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    PipelineConfig,
    ServeConfig,
    TrainConfig,
    apply_overrides,
    config_reference,
    load_config,
    write_resolved,
)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def write_yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_tiny_yaml_loads_with_its_values():
    cfg = load_config(TINY)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.data.inputs == ["stdlib"]
    assert cfg.data.seq_len == 128 and cfg.train.seq_len is None  # the shards' own
    assert cfg.train.max_steps == 300
    assert cfg.train.lr == pytest.approx(0.002)
    assert cfg.model.hidden_size == 256
    assert cfg.serve.host == "127.0.0.1"


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg.train.max_steps == TrainConfig().max_steps
    assert cfg.data.inputs == ["stdlib"]


def test_override_sets_a_scalar():
    cfg = load_config(TINY, ["train.max_steps=5"])
    assert cfg.train.max_steps == 5
    assert isinstance(cfg.train.max_steps, int)
    # the rest of the file is untouched
    assert cfg.train.lr == pytest.approx(0.002)


def test_override_values_are_parsed_as_yaml():
    cfg = load_config(
        TINY,
        [
            "train.lr=3e-4",
            "train.use_gpu=true",
            "data.inputs=[a.txt, b.jsonl]",
            "serve.sample_prompts=['x', 'y z']",
            "data.max_docs=7",
            "data.tokenizer=",  # empty -> None
            "model.num_kv_heads=2",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert isinstance(cfg.train.lr, float)
    assert cfg.train.use_gpu is True
    assert cfg.data.inputs == ["a.txt", "b.jsonl"]
    assert cfg.serve.sample_prompts == ["x", "y z"]
    assert cfg.data.max_docs == 7
    assert cfg.data.tokenizer is None
    assert cfg.model.num_kv_heads == 2


def test_override_creates_missing_section():
    raw = apply_overrides({}, ["train.max_steps=3", "model.hidden_size=64"])
    assert raw == {"train": {"max_steps": 3}, "model": {"hidden_size": 64}}


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(TINY, ["train.max_steps"])


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": 5}, ["train.max_steps=3"])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = write_yaml(tmp_path, "data:\n  inptus: [a.txt]\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert "data.inptus" in msg
    assert "unknown key" in msg


def test_unknown_section_names_the_section(tmp_path):
    p = write_yaml(tmp_path, "trian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="trian"):
        load_config(p)


def test_unknown_key_in_override_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.max_stpes"):
        load_config(TINY, ["train.max_stpes=3"])


def test_wrong_type_names_key_and_file(tmp_path):
    p = write_yaml(tmp_path, "train:\n  max_steps: many\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "train.max_steps" in msg
    assert str(p) in msg


def test_every_bad_key_is_reported(tmp_path):
    p = write_yaml(tmp_path, "train:\n  max_steps: many\n  lr: -1\ndata:\n  inptus: []\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    for key in ("train.max_steps", "train.lr", "data.inptus"):
        assert key in msg


def test_out_of_range_value(tmp_path):
    p = write_yaml(tmp_path, "data:\n  val_fraction: 1.5\n")
    with pytest.raises(ConfigError, match=r"data\.val_fraction"):
        load_config(p)


def test_seq_len_mismatch_names_both_keys(tmp_path):
    p = write_yaml(tmp_path, "data:\n  seq_len: 64\ntrain:\n  seq_len: 128\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "train.seq_len" in msg
    assert "data.seq_len" in msg
    assert "64" in msg and "128" in msg


def test_context_window_smaller_than_seq_len(tmp_path):
    p = write_yaml(
        tmp_path,
        "data:\n  seq_len: 128\ntrain:\n  seq_len: 128\nmodel:\n  max_position_embeddings: 64\n",
    )
    with pytest.raises(ConfigError, match=r"model\.max_position_embeddings"):
        load_config(p)


def test_heads_must_divide_hidden():
    with pytest.raises(ConfigError, match=r"model\.num_heads"):
        load_config(None, ["model.hidden_size=30", "model.num_heads=4"])


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as ei:
        load_config(missing)
    assert str(missing) in str(ei.value)


def test_invalid_yaml(tmp_path):
    p = write_yaml(tmp_path, "train: [unclosed\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML") as ei:
        load_config(p)
    assert str(p) in str(ei.value)


def test_yaml_that_is_not_a_mapping(tmp_path):
    p = write_yaml(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_empty_yaml_gives_defaults(tmp_path):
    p = write_yaml(tmp_path, "")
    assert load_config(p) == PipelineConfig()


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_validate_assignment_rejects_bad_type():
    cfg = TrainConfig()
    with pytest.raises(ValueError):
        cfg.max_steps = "many"


def test_write_resolved_round_trips(tmp_path):
    cfg = load_config(TINY, ["train.max_steps=5", "data.inputs=[x.txt]", "serve.port=9001"])
    out = write_resolved(cfg, tmp_path / "nested" / "dir")
    assert out == tmp_path / "nested" / "dir" / "config.resolved.json"
    raw = json.loads(out.read_text())
    assert raw["train"]["max_steps"] == 5
    assert PipelineConfig.model_validate(raw) == cfg
    # also as a YAML file (JSON is YAML) through load_config
    assert load_config(out) == cfg


def test_write_resolved_section_with_name(tmp_path):
    out = write_resolved(TrainConfig(max_steps=9), tmp_path, "train.json")
    assert out.name == "train.json"
    assert TrainConfig.model_validate_json(out.read_text()).max_steps == 9


def test_resolved_dirs():
    cfg = load_config(None, ["train.run_dir=r/train", "data.output_dir=d"])
    assert cfg.resolved_data_dir() == "d"
    assert cfg.serve_model_dir() == str(Path("r/train") / "model")
    cfg = load_config(None, ["train.data_dir=other", "serve.model_dir=m"])
    assert cfg.resolved_data_dir() == "other"
    assert cfg.serve_model_dir() == "m"


@pytest.mark.parametrize(
    "section", [PipelineConfig, DataConfig, ModelConfig, TrainConfig, ServeConfig]
)
def test_every_field_has_a_description(section: type[BaseModel]):
    missing = [n for n, f in section.model_fields.items() if not (f.description or "").strip()]
    assert not missing, f"{section.__name__} fields without description: {missing}"


def test_config_reference_covers_every_leaf_key():
    """Every key, the keys inside optional sections and list items included; the expected set
    comes from pydantic's JSON schema, not from the code that writes the reference."""
    rows = config_reference()
    keys = {r.split("`")[1] for r in rows}
    schema = PipelineConfig.model_json_schema()

    def section(prop: dict) -> tuple[dict, str] | None:
        for option in [prop, *prop.get("anyOf", [])]:
            if "$ref" in option:
                return schema["$defs"][option["$ref"].split("/")[-1]], ""
            if option.get("type") == "array" and "$ref" in option.get("items", {}):
                return schema["$defs"][option["items"]["$ref"].split("/")[-1]], "[]"
        return None

    def leaves(model: dict, prefix: str) -> set[str]:
        out = set()
        for name, prop in model["properties"].items():
            inner = section(prop)
            if inner is None:
                out.add(f"{prefix}{name}")
                continue
            if inner[1] or prop.get("default", "required") is None:
                out.add(f"{prefix}{name}")  # an optional section or a list has its own row
            out |= leaves(inner[0], f"{prefix}{name}{inner[1]}.")
        return out

    assert keys == leaves(schema, "")
    assert "serve.vllm.tensor_parallel_size" in keys and "generate.engine" in keys
    assert {"serve.autoscaling.min_replicas", "serve.models[].engine"} <= keys
    assert {"serve.models[].autoscaling.max_replicas", "serve.models[].vllm.engine_kwargs"} <= keys
    assert all(r.count("|") >= 4 and not r.endswith("| None |") for r in rows)


MODELS_YAML = """
serve:
  models:
    - {name: a, model_dir: /models/a}
    - {name: b, model_dir: /models/b, num_cpus: 2}
"""


def test_override_addresses_a_list_item(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(MODELS_YAML)
    cfg = load_config(path, ["serve.models[1].engine=builtin", "serve.models[0].num_cpus=0.5"])
    a, b = cfg.serve.models
    assert (a.name, a.num_cpus, a.engine) == ("a", 0.5, "auto")
    assert (b.name, b.num_cpus, b.engine) == ("b", 2, "builtin")


def test_override_adds_the_next_list_item():
    cfg = load_config(None, ["serve.models[0].name=x", "serve.models[0].model_dir=/m/x"])
    assert [(m.name, m.model_dir) for m in cfg.serve.models] == [("x", "/m/x")]
    cfg = load_config(None, ["data.inputs[0]=/corpus/a", "data.inputs[1]=/corpus/b"])
    assert cfg.data.inputs == ["/corpus/a", "/corpus/b"]


def test_override_past_the_end_of_a_list_names_the_count(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(MODELS_YAML)
    with pytest.raises(ConfigError, match=r"models has 2 items; index 5"):
        load_config(path, ["serve.models[5].engine=vllm"])
    with pytest.raises(ConfigError, match="'model_name' is not a list"):
        apply_overrides({"serve": {"model_name": "x"}}, ["serve.model_name[0]=y"])


def test_unknown_key_in_a_list_item_names_the_item(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(MODELS_YAML)
    with pytest.raises(ConfigError, match=r"serve\.models\[1\]\.engien: unknown key"):
        load_config(path, ["serve.models[1].engien=vllm"])


@pytest.mark.parametrize("item", ["data.inputs=[a", "data.inputs=*.jsonl"])
def test_override_with_invalid_yaml_value_is_a_config_error(item):
    with pytest.raises(ConfigError, match="data.inputs"):
        load_config(None, [item])
