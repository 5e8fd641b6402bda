"""Offline batch generation on the shared local Ray instance."""

import re

import pytest
from waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_gen_model_dir(tmp_path_factory) -> str:
    from tiny import tiny_model_dir, tiny_tokenizer

    root = tmp_path_factory.mktemp("gen-model")
    tok = tiny_tokenizer(root / "tok", vocab=400, files=30)
    arch = dict(hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=128)
    return tiny_model_dir(root / "model", tok, seed=0, **arch)


@pytest.fixture(scope="module")
def gen_adapter(tiny_gen_model_dir, tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A random PEFT adapter of the model (tiny.lora_adapter) and the greedy 6-token texts of
    ADAPTER_PROMPT from transformers: {"base": ..., "merged": the adapter merged in}."""
    import torch
    from tiny import lora_adapter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_gen_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gen_model_dir)
    path = tmp_path_factory.mktemp("gen-adapter") / "one"
    merged = lora_adapter(base, path, seed=1)
    ids = tok(ADAPTER_PROMPT, return_tensors="pt")["input_ids"]
    texts = {}
    for name, model in (("base", base), ("merged", merged)):
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        texts[name] = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert texts["base"] != texts["merged"]
    return str(path), texts


ADAPTER_PROMPT = "class Stack:"


# Both engines: which parameters a row may carry and how a bad one is refused are the engine's
# (its own request checks), so the bad-rows contract is checked on each; so is a row's LoRA
# adapter (vLLM: its enable_lora, a LoRARequest per row).
@pytest.mark.parametrize("engine", ["builtin", "vllm"])
def test_batch_generation_survives_bad_rows_and_loses_none(
    ray_session, tmp_path, engine, tiny_gen_model_dir, gen_adapter, capsys
):
    """Ray Data + an engine in an actor pool: per-row params; unreadable rows quarantined with
    file and line, rows with bad parameters recorded in the output; never fatal. The driver
    shows the rows done, their rate and the errors so far (a plain line: not a terminal). A
    row naming adapter `one` gets the adapter's merged model's greedy text; one naming an
    unknown adapter gets that as its error."""
    import json

    import pyarrow.parquet as pq

    from aigc_ray.config import GenerateConfig
    from aigc_ray.generate import run_generate

    src = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"def f{i}(x):", "max_tokens": 3 + i % 4} for i in range(20)]
    lines = [json.dumps(r).encode() for r in rows]
    lines[3:3] = [b'{"prompt": "broken', json.dumps({"prompt": 5}).encode(), b"\xff\xfe"]
    lines += [json.dumps({"prompt": "x", "max_tokens": 0}).encode(), b"[1, 2]"]
    adapter_row = {"prompt": ADAPTER_PROMPT, "adapter": "one", "max_tokens": 6, "ignore_eos": True}
    lines += [json.dumps(r).encode() for r in (adapter_row, {"prompt": "y", "adapter": "nope"})]
    src.write_bytes(b"\n".join(lines) + b"\n")
    second = tmp_path / "more.parquet"
    pq.write_table(
        pa_table([{"prompt": "import os", "seed": 1}, {"prompt": None, "seed": 2}]), second
    )
    adapter_dir, adapter_texts = gen_adapter
    settings = {"engine": engine, "adapters": {"one": adapter_dir}}
    if engine == "vllm":
        settings["vllm"] = {"kv_cache_memory_gb": 0.25, "engine_kwargs": {"enforce_eager": True}}
    cfg = GenerateConfig(
        inputs=[str(src), str(second)],
        output_dir=str(tmp_path / "out"),
        batch_size=8,
        max_tokens=5,
        num_cpus=0.5,
        **settings,
    )
    ops_lines = _lora_ops_lines(ray_session)
    summary = run_generate(cfg, tiny_gen_model_dir)
    if engine == "vllm":  # the adapter row below ran on aigc_ray's LoRA ops in vLLM's worker
        wait_until(lambda: _lora_ops_lines(ray_session) > ops_lines, 30, "vLLM's LoRA ops line")
    table = pq.read_table(
        tmp_path / "out", columns=["prompt", "completion_tokens", "error", "source", "line"]
    )
    quarantine = pq.read_table(tmp_path / "out_quarantine").to_pylist()
    assert summary["quarantine_dir"] == str(tmp_path / "out_quarantine")
    # 20 good + 1 bad max_tokens + "import os" + 2 of adapters: generated or recorded; 5
    # unreadable: quarantined
    assert summary["rows"] == table.num_rows == 24 and summary["errors"] == 2
    assert summary["quarantined"] == len(quarantine) == 5
    got = {r["prompt"]: r for r in table.to_pylist()}
    for r in rows:
        assert got[r["prompt"]]["error"] is None
        assert 1 <= got[r["prompt"]]["completion_tokens"] <= r["max_tokens"]
    assert "max_tokens" in got["x"]["error"]
    assert "adapter 'nope' not found" in got["y"]["error"]
    adapted = pq.read_table(tmp_path / "out", filters=[("adapter", "=", "one")]).to_pylist()
    assert [(r["error"], r["completion"]) for r in adapted] == [(None, adapter_texts["merged"])]
    assert got["import os"]["source"] == str(second)
    where = sorted((q["source"].rsplit("/", 1)[1], q["line"]) for q in quarantine)
    assert where == [
        ("more.parquet", 1),
        ("prompts.jsonl", 4),
        ("prompts.jsonl", 5),
        ("prompts.jsonl", 6),
        ("prompts.jsonl", 25),
    ]
    assert all(q["reason"] for q in quarantine)
    shown = [x for x in capsys.readouterr().out.splitlines() if x.startswith("generate ")]
    assert shown and re.match(
        r"generate 24/24 rows \(100%\)  rows/s [\d.,]+  errors 2  elapsed \d+:\d\d  left 0:00$",
        shown[-1],
    ), shown


def _lora_ops_lines(ray) -> int:
    """Lines in this Ray session's logs where a vLLM process said it runs aigc_ray's LoRA ops
    (aigc_ray/engine/vllm_lora_ops.py logs it through vLLM's logger)."""
    from pathlib import Path

    from aigc_ray.engine.vllm_lora_ops import ACTIVE

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    line = ACTIVE.encode()
    return sum(f.read_bytes().count(line) for f in logs.glob("worker-*") if f.is_file())


def pa_table(rows):
    import pyarrow as pa

    return pa.Table.from_pylist(rows)


def test_batch_generation_from_a_model_in_object_storage(
    ray_session, s3_server, tmp_path, tiny_gen_model_dir
):
    """model_dir s3://...: each actor copies the model to its node's cache, then generates."""
    import json

    import pyarrow.parquet as pq

    from aigc_ray.config import GenerateConfig
    from aigc_ray.generate import run_generate
    from aigc_ray.model import copy_model_dir

    uri = copy_model_dir(tiny_gen_model_dir, "s3://aigc-test/models/gen")
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"x{i} ="}) + "\n" for i in range(4)))
    cfg = GenerateConfig(
        inputs=[str(src)],
        output_dir=str(tmp_path / "out"),
        max_tokens=3,
        num_cpus=0.5,
        # `auto` still takes vLLM, its KV cache sized by aigc_ray; eager spares torch.compile's
        # ~30 s of CPU (vLLM compiled, with every default, is the pipeline test's)
        vllm={"engine_kwargs": {"enforce_eager": True}},
    )
    summary = run_generate(cfg, uri)
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert summary["errors"] == 0 and len(rows) == 4
    assert all(r["error"] is None and r["completion_tokens"] >= 1 for r in rows)


def test_doctor_on_a_connected_cluster(ray_session):
    from aigc_ray.doctor import report

    text, warnings = report(connect=True)
    assert "CPU=2" in text and "1 alive" in text
    assert not warnings, warnings  # the node runs the driver's own versions
