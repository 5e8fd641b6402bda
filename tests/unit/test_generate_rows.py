"""Batch generation's row handling without Ray: per-row params, errors recorded, not raised."""

import json
import math

import pyarrow as pa
import pytest

from aigc_ray.config import GenerateConfig
from aigc_ray.generate import (
    OUTPUT_SCHEMA,
    GenerateError,
    GenerateUDF,
    preflight,
    read_prompt_file,
    row_params,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_row_params_override_defaults_and_skip_nulls():
    cfg = GenerateConfig(max_tokens=10, temperature=0.5, seed=1)
    p = row_params(
        {
            "prompt": "x",
            "max_tokens": 3.0,
            "top_k": 5,
            "stop": "\n",
            "seed": None,
            "temperature": math.nan,
        },
        cfg,
    )
    assert (p.max_tokens, p.top_k, p.stop, p.seed, p.temperature) == (3, 5, ["\n"], 1, 0.5)
    assert isinstance(p.max_tokens, int)
    assert row_params({"stop": ["a", "b"]}, cfg).stop == ["a", "b"]


def _row(prompt, **params) -> dict:
    params = {k: v for k, v in params.items() if v is not None}
    return {"prompt": prompt, "params": json.dumps(params), "source": "f.jsonl", "line": 1}


def test_udf_generates_and_records_bad_rows(tiny_model_dir):
    cfg = GenerateConfig(max_tokens=4, num_cpus=1, engine="builtin")
    udf = GenerateUDF(str(tiny_model_dir), cfg.model_dump())
    rows = [
        _row("def f(x):", max_tokens=6),
        _row(None),  # no prompt
        _row("x", max_tokens=-1),  # bad parameter
        _row("x " * 100),  # beyond 64-token context
        _row("import os", temperature=0.8),
        _row("y", max_tokens="ten"),  # wrong type
    ]
    out = udf(pa.Table.from_pylist(rows)).to_pylist()
    assert udf(pa.Table.from_pylist(rows)).schema == OUTPUT_SCHEMA
    assert [r["prompt"] for r in out] == [r["prompt"] for r in rows]  # order kept, none lost
    assert out[0]["error"] is None and out[0]["completion_tokens"] == 6
    assert out[4]["error"] is None and out[4]["completion_tokens"] <= 4
    assert out[0]["latency_s"] > 0 and out[0]["prompt_tokens"] > 0
    assert out[0]["source"] == "f.jsonl" and out[0]["line"] == 1
    assert "prompt" in out[1]["error"]
    assert "max_tokens" in out[2]["error"]
    assert "context length" in out[3]["error"]
    assert "max_tokens must be an integer" in out[5]["error"]
    assert all(r["completion"] == "" for r in out[1:4])
    udf.engine.close()


def test_rows_name_their_adapter_and_get_its_merged_models_text(tiny_model_dir, tmp_path):
    """A row's `adapter` column: rows of two adapters and of the model itself in one batch,
    each row's text that adapter's merged model's greedy text. One adapter slot (max_loras=1):
    a row whose adapter finds the slot held by the batch's earlier rows waits for them, none is
    lost or failed. An unknown adapter, or one that is not a name, is that row's error."""
    import torch
    from tiny import lora_adapter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    merged = {n: lora_adapter(base, tmp_path / n, seed) for n, seed in (("one", 1), ("two", 2))}
    cfg = GenerateConfig(
        max_tokens=8,
        engine="builtin",
        adapters={n: str(tmp_path / n) for n in merged},
        max_loras=1,
    )
    udf = GenerateUDF(str(tiny_model_dir), cfg.model_dump())
    names = ["one", None, "two", "one", "nope", 7]
    out = udf(pa.Table.from_pylist([_row("def main(", adapter=a) for a in names])).to_pylist()
    udf.engine.close()
    ids = tok("def main(", return_tensors="pt")["input_ids"]

    def greedy(model) -> str:
        with torch.inference_mode():
            gen = model.generate(ids, max_new_tokens=8, do_sample=False)
        return tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)

    want = {None: greedy(base), **{n: greedy(m) for n, m in merged.items()}}
    assert len(set(want.values())) == 3
    for row, name in zip(out[:4], names[:4], strict=True):
        assert row["error"] is None and row["adapter"] == name
        assert row["completion"] == want[name], name
    assert "adapter 'nope' not found" in out[4]["error"]
    assert "adapter must be a name" in out[5]["error"]
    assert udf.engine.bank.loads == 3  # one, two (evicting one), one again


def test_prompt_file_reader_quarantines_every_bad_row(tmp_path):
    lines = [
        json.dumps({"prompt": "good one", "max_tokens": 3}).encode(),
        b'{"prompt": "broken',  # malformed JSON
        json.dumps({"prompt": 5}).encode(),  # wrong type
        json.dumps({"text": "no prompt"}).encode(),  # missing column
        b"\xff\xfe not utf-8",
        json.dumps(["not", "an", "object"]).encode(),
        b"",  # blank lines are not rows
        json.dumps({"prompt": "good two", "stop": "\n"}).encode(),
    ]
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\n".join(lines))
    rows = read_prompt_file(str(path), "prompt").to_pylist()
    good = [r for r in rows if r["reason"] is None]
    bad = {r["line"]: r["reason"] for r in rows if r["reason"] is not None}
    assert [(r["prompt"], r["line"]) for r in good] == [("good one", 1), ("good two", 8)]
    assert json.loads(good[0]["params"]) == {"max_tokens": 3}
    assert set(bad) == {2, 3, 4, 5, 6}
    assert "malformed JSON" in bad[2] and "int, not a string" in bad[3]
    assert "missing column" in bad[4] and "UTF-8" in bad[5] and "JSON object" in bad[6]
    assert all(r["source"] == str(path) for r in rows)


def test_prompt_file_reader_parquet_and_unreadable(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"prompt": ["a", None, "b"], "seed": [1, 2, None]}), tmp_path / "p.parquet"
    )
    rows = read_prompt_file(str(tmp_path / "p.parquet"), "prompt").to_pylist()
    assert [r["prompt"] for r in rows if r["reason"] is None] == ["a", "b"]
    assert [r["line"] for r in rows if r["reason"]] == [1]
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    rows = read_prompt_file(str(tmp_path / "junk.parquet"), "prompt").to_pylist()
    assert len(rows) == 1 and "unreadable parquet" in rows[0]["reason"]


def test_preflight_names_the_problem(tmp_path, tiny_model_dir):
    with pytest.raises(GenerateError, match="empty"):
        preflight(GenerateConfig(), str(tiny_model_dir))
    with pytest.raises(GenerateError, match="missing.jsonl"):
        preflight(GenerateConfig(inputs=[str(tmp_path / "missing.jsonl")]), str(tiny_model_dir))
