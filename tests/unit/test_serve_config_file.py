"""configs/serve.yaml: a valid Ray Serve config whose args build our app (no Ray instance).

Ray's ServeDeploySchema ignores unknown keys (forward compatibility), so the tests also check
every key against the schema's fields: a misspelled option would otherwise be dropped silently.
"""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from aigc_ray.config import ServeConfig, load_config

REPO = Path(__file__).resolve().parents[2]
SERVE_YAML = REPO / "configs" / "serve.yaml"
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(SERVE_YAML.read_text())


@pytest.fixture(scope="module")
def app(raw) -> dict:
    assert len(raw["applications"]) == 1
    return raw["applications"][0]


def test_serve_yaml_passes_rays_schema_with_no_unknown_keys(raw):
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    schema = ServeDeploySchema.model_validate(raw)
    assert set(raw) <= set(ServeDeploySchema.model_fields)
    assert set(raw["http_options"]) <= set(HTTPOptionsSchema.model_fields)
    for app in raw["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields)
    assert schema.http_options.host == "127.0.0.1"
    assert schema.http_options.port == 8000
    assert schema.applications[0].import_path == "aigc_ray.serve:build_app"


def test_serve_yaml_args_are_serve_config_fields_matching_tiny_yaml(app):
    cfg = ServeConfig(**app["args"])  # extra="forbid": a typo raises here
    tiny = load_config(TINY)
    assert cfg.model_dir == tiny.serve_model_dir()
    assert cfg.model_name == tiny.serve.model_name
    assert cfg.max_tokens_limit == tiny.serve.max_tokens_limit


def test_import_path_builds_an_application_from_the_args(app, tiny_model_dir):
    from ray import serve
    from ray._common.utils import import_attr

    builder = import_attr(app["import_path"])
    built = builder({**app["args"], "model_dir": str(tiny_model_dir)})
    assert isinstance(built, serve.Application)


def test_builder_rejects_a_misspelled_arg(app, tiny_model_dir):
    from aigc_ray.serve import build_app

    args = {**app["args"], "model_dir": str(tiny_model_dir), "max_token_limit": 10}
    with pytest.raises(ValidationError, match="max_token_limit"):
        build_app(args)
