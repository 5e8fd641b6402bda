"""Batch generation's row handling without Ray: per-row params, errors recorded, not raised."""

import math

import pyarrow as pa
import pytest

from aigc_ray.config import GenerateConfig
from aigc_ray.generate import OUTPUT_SCHEMA, GenerateError, GenerateUDF, preflight, row_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_row_params_override_defaults_and_skip_nulls():
    cfg = GenerateConfig(max_tokens=10, temperature=0.5, seed=1)
    p = row_params({"prompt": "x", "max_tokens": 3.0, "top_k": 5, "stop": "\n", "seed": None,
                    "temperature": math.nan}, cfg)  # fmt: skip
    assert (p.max_tokens, p.top_k, p.stop, p.seed, p.temperature) == (3, 5, ["\n"], 1, 0.5)
    assert isinstance(p.max_tokens, int)
    assert row_params({"stop": ["a", "b"]}, cfg).stop == ["a", "b"]


def test_udf_generates_and_records_bad_rows(tiny_model_dir):
    cfg = GenerateConfig(max_tokens=4, num_cpus=1)
    udf = GenerateUDF(str(tiny_model_dir), cfg.model_dump())
    rows = [
        {"prompt": "def f(x):", "max_tokens": 6, "temperature": None},
        {"prompt": None, "max_tokens": None, "temperature": None},  # no prompt
        {"prompt": "x", "max_tokens": -1, "temperature": None},  # bad parameter
        {"prompt": "x " * 100, "max_tokens": None, "temperature": None},  # beyond 64-token context
        {"prompt": "import os", "max_tokens": None, "temperature": 0.8},
    ]
    out = udf(pa.Table.from_pylist(rows)).to_pylist()
    assert udf(pa.Table.from_pylist(rows)).schema == OUTPUT_SCHEMA
    assert [r["prompt"] for r in out] == [r["prompt"] for r in rows]  # order kept, none lost
    assert out[0]["error"] is None and out[0]["completion_tokens"] == 6
    assert out[4]["error"] is None and out[4]["completion_tokens"] <= 4
    assert out[0]["latency_s"] > 0 and out[0]["prompt_tokens"] > 0
    assert "prompt" in out[1]["error"]
    assert "max_tokens" in out[2]["error"]
    assert "context length" in out[3]["error"]
    assert all(r["completion"] == "" for r in out[1:4])
    udf.engine.close()


def test_preflight_names_the_problem(tmp_path, tiny_model_dir):
    with pytest.raises(GenerateError, match="empty"):
        preflight(GenerateConfig(), str(tiny_model_dir))
    with pytest.raises(GenerateError, match="missing.jsonl"):
        preflight(GenerateConfig(inputs=[str(tmp_path / "missing.jsonl")]), str(tiny_model_dir))
