"""Each stage on the shared local Ray: preprocess a small mixed corpus, train 2 workers with
LoRA adapters (including a resume; the merged model exported to object storage), serve the
result and call it with the official openai client."""

import json
import os
import re
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aigc_ray.config import load_config
from aigc_ray.data import stdlib_files

pytestmark = pytest.mark.integration
KEY = "test-key-1"
EXPORT = "s3://aigc-test/runs/stages/model"
STORAGE = "s3://aigc-test/runs/stages/ray"


def _write_corpus(root: Path) -> list[str]:
    """jsonl + parquet + text files; returns every document in input order."""
    docs = [Path(p).read_text() for p in stdlib_files()[:60]]
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:20]))
    pq.write_table(pa.table({"text": docs[20:40]}), root / "b.parquet")
    for i, d in enumerate(docs[40:]):
        (root / f"c{i}.txt").write_text(d)
    return docs


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, serve_port):
    root = tmp_path_factory.mktemp("stages")
    corpus = root / "corpus"
    corpus.mkdir()
    docs = _write_corpus(corpus)
    overrides = [
        f"data.inputs=[{corpus}]",
        f"data.output_dir={root / 'data'}",
        "data.vocab_size=1024",
        "data.seq_len=64",
        "data.val_fraction=0.1",
        "data.batch_size=8",
        "data.near_dedup=false",  # exact token accounting below; dedup has its own tests
        "model.hidden_size=64",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.max_position_embeddings=256",
        "model.lora_r=4",  # adapters over the seeded random-init base
        f"train.run_dir={root / 'run'}",
        f"train.export_dir={EXPORT}",
        f"train.storage_path={STORAGE}",  # checkpoints in the bucket that refuses unencrypted
        "train.seq_len=64",
        "train.batch_size=4",
        "train.max_steps=6",
        "train.lr=0.01",
        "train.warmup_steps=2",
        "train.eval_every=3",
        "train.checkpoint_every=3",
        "train.eval_batches=2",
        f"serve.port={serve_port}",
        # `auto` still takes vLLM and sizes its KV cache itself; eager spares torch.compile's
        # ~30 s of CPU (vLLM compiled, with every default, is the pipeline test's)
        "serve.vllm.engine_kwargs.enforce_eager=true",
    ]
    c = load_config("configs/tiny.yaml", overrides)
    c.__dict__["_docs"] = docs
    return c


@pytest.fixture(scope="module")
def manifest(ray_session, cfg):
    from aigc_ray.data import run_preprocess

    return run_preprocess(cfg.data)


def _cleaned(doc: str) -> str:
    """What the clean step makes of a document: cleaned, PII redacted (on by default)."""
    from aigc_ray.data import clean_text
    from aigc_ray.data.pii import PiiRules, redact_text

    return redact_text(clean_text(doc), PiiRules())[0]


def test_preprocess_counts_are_exact(manifest, cfg):
    from aigc_ray.model import load_tokenizer

    docs = cfg.__dict__["_docs"]
    tok = load_tokenizer(manifest["tokenizer_dir"])
    kept = list(dict.fromkeys(_cleaned(d) for d in docs if _cleaned(d)))  # exact dedup
    expected_tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in kept)
    assert manifest["docs_read"] == len(docs)
    assert manifest["docs_kept"] == len(kept)
    assert manifest["malformed"] == 0
    assert manifest["exact_duplicates"] == len(docs) - len(kept)
    assert manifest["tokens"] == expected_tokens
    for split in ("train", "val"):
        s = manifest["splits"][split]
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in s["shards"])
        assert rows == s["blocks"] > 0
        assert s["dropped_tail_tokens"] < cfg.data.seq_len
        n = manifest["tokens_per_split"][split]
        assert s["blocks"] * cfg.data.seq_len + s["dropped_tail_tokens"] == n
    assert (Path(cfg.data.output_dir) / "manifest.json").is_file()
    assert (Path(cfg.data.output_dir) / "config.resolved.json").is_file()


def test_preprocess_blocks_hold_the_documents(manifest, cfg):
    """A block decodes to real text: the start of one of the input documents."""
    from aigc_ray.model import load_tokenizer

    tok = load_tokenizer(manifest["tokenizer_dir"])
    table = pq.read_table(manifest["splits"]["train"]["shards"][0])
    block = table.column("input_ids")[0].as_py()
    assert len(block) == cfg.data.seq_len
    text = tok.decode(block)
    starts = [_cleaned(d)[:80] for d in cfg.__dict__["_docs"]]
    assert text[:80] in starts


@pytest.fixture(scope="module")
def trained(manifest, cfg, s3_server):
    from aigc_ray.train import fit

    return fit(cfg.train, cfg.model, cfg.resolved_data_dir())


@pytest.mark.slow
def test_train_two_workers_exports_a_plain_transformers_model(trained, cfg, s3_server):
    """LoRA through the real TorchTrainer: the adapters train, the export is a plain merged
    model (no adapter files or weights), also copied to train.export_dir in object storage
    (moto S3) for other nodes to serve."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aigc_ray.model import check_model_dir

    assert trained.steps == cfg.train.max_steps
    assert trained.tokens == cfg.train.max_steps * 2 * cfg.train.batch_size * cfg.train.seq_len
    model = AutoModelForCausalLM.from_pretrained(trained.model_dir)
    tok = AutoTokenizer.from_pretrained(trained.model_dir)
    ids = torch.tensor([tok("def f(x):")["input_ids"]])
    assert model(input_ids=ids).logits.shape[-1] == len(tok)
    run = Path(cfg.train.run_dir)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["val_loss"] > 0
    assert [r["step"] for r in rows if "val_loss" in r and r["step"]] == [3, 6]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in rows[1:])
    assert (run / "loss.png").stat().st_size > 1000
    assert trained.val_loss_final < trained.val_loss_initial
    files = {p.name for p in Path(trained.model_dir).iterdir()}
    assert "config.json" in files and not any("adapter" in f for f in files)
    assert not any("lora" in n for n, _ in model.named_parameters())
    # the adapter, as PEFT saves it, over the base it trained on (the seeded random init,
    # saved beside it): loaded by PEFT alone and merged, it is the exported model
    from peft import PeftModel

    adapter = json.loads((Path(trained.adapter_dir) / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(run / "base")
    assert f"adapter    {trained.adapter_dir}" in trained.summary()
    base = AutoModelForCausalLM.from_pretrained(adapter["base_model_name_or_path"])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        merged = PeftModel.from_pretrained(base, trained.adapter_dir).merge_and_unload()
        assert torch.allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)
        assert not torch.allclose(base_logits, model(input_ids=ids).logits, atol=1e-3)
    assert trained.exported_to == trained.serving_dir == EXPORT
    assert f"exported   {EXPORT}" in trained.summary()
    prefix = EXPORT.removeprefix("s3://aigc-test/") + "/"
    listed = s3_server.list_objects_v2(Bucket="aigc-test", Prefix=prefix)["Contents"]
    keys = {o["Key"] for o in listed} - {prefix}  # (pyarrow may leave a directory marker)
    assert keys == {prefix + name for name in files}
    check_model_dir(EXPORT)
    # Ray Train's checkpoints and the export went through a bucket whose policy refuses any
    # object written without the encryption header (conftest's s3_server): all carry it
    stored = s3_server.list_objects_v2(Bucket="aigc-test", Prefix="runs/stages/")["Contents"]
    checkpoints = [o["Key"] for o in stored if "/checkpoint_" in o["Key"]]
    assert checkpoints, [o["Key"] for o in stored]
    sse = {
        o["Key"]: s3_server.head_object(Bucket="aigc-test", Key=o["Key"]).get(
            "ServerSideEncryption"
        )
        for o in stored
    }
    assert set(sse.values()) == {"AES256"}, sse


@pytest.mark.slow
def test_train_rerun_with_same_name_resumes(trained, cfg, capsys):
    """Same name + storage: the run continues from step 6 (adapters restored over the same
    base) instead of starting over. The driver shows rank 0's rows as they come (plain lines:
    pytest's stdout is not a terminal), from the restored step to the last."""
    from aigc_ray.train import fit

    more = cfg.train.model_copy(update={"max_steps": 8})
    again = fit(more, cfg.model, cfg.resolved_data_dir())
    rows = [
        json.loads(x) for x in (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r["step"] for r in rows]
    assert again.steps == 8
    assert steps.count(0) == 1, "resumed run must not re-evaluate step 0"
    assert steps[-1] == 8 and 6 in steps
    shown = [x for x in capsys.readouterr().out.splitlines() if x.startswith("train ")]
    assert re.match(r"train\s+6/8 steps \(75%\)  .*elapsed \d+:\d\d", shown[0]), shown
    assert re.match(
        r"train\s+8/8 steps \(100%\)  loss \d+\.\d{3}  tokens/s [\d.,]+  "
        r"(val loss \d+\.\d{3}  )?elapsed \d+:\d\d  left 0:00$",
        shown[-1],
    ), shown


def _dp_accounting(cfg, data_dir):
    """(epsilon after `steps` by Opacus' own accountant, the run's noise) for a run of `cfg`'s
    batch size on the data in `data_dir`."""
    from opacus.accountants import RDPAccountant

    n = json.loads((Path(data_dir) / "manifest.json").read_text())["splits"]["train"]["blocks"]
    q, sigma = 2 * cfg.train.batch_size / n, 1.0

    def eps(steps):
        acc = RDPAccountant()
        acc.history = [(sigma, q, steps)]
        return acc.get_epsilon(delta=1 / n)

    return eps, sigma


@pytest.fixture(scope="module")
def dp_run(trained, cfg, s3_server):
    """A second LoRA run over the same seeded base, on other data: standard-library files the
    first run never saw, preprocessed with the first run's tokenizer (data.tokenizer). DP-SGD on
    the two DDP workers, with a fixed noise and a budget that 8 steps would exceed (its own data,
    run dir and export). Returns (run, its train config, its epsilon target, its data dir)."""
    from aigc_ray.config import DPConfig
    from aigc_ray.data import run_preprocess
    from aigc_ray.train import fit

    root = Path(cfg.data.output_dir).parent
    corpus = root / "corpus-dp"
    corpus.mkdir()
    for i, f in enumerate(stdlib_files()[60:120]):
        (corpus / f"d{i}.txt").write_text(Path(f).read_text())
    data = cfg.data.model_copy(
        update={
            "inputs": [str(corpus)],
            "output_dir": str(root / "data-dp"),
            "tokenizer": f"{cfg.data.output_dir}/tokenizer",
        }
    )
    run_preprocess(data)
    data_dir = data.output_dir
    eps, sigma = _dp_accounting(cfg, data_dir)
    target = (eps(4) + eps(5)) / 2  # step 5 would exceed it
    dp_cfg = cfg.train.model_copy(
        update={
            "name": "dp-lora",
            "run_dir": str(Path(cfg.train.run_dir).parent / "dp-run"),
            "export_dir": "s3://aigc-test/runs/stages-dp/model",
            "max_steps": 8,
            "privacy": DPConfig(enabled=True, noise_multiplier=sigma, target_epsilon=target),
        }
    )
    return fit(dp_cfg, cfg.model, data_dir), dp_cfg, target, data_dir


@pytest.mark.slow
def test_dp_lora_run_stops_before_its_budget_and_says_so_in_the_exported_card(
    dp_run, cfg, s3_server
):
    """train.privacy over LoRA adapters: the run stops after the last step within its budget
    (computed here with Opacus' own accountant), says why in the last metrics row, the summary
    and the model card, and still exports the model of that step (card included) to object
    storage."""
    run, dp_cfg, target, data_dir = dp_run
    eps, _ = _dp_accounting(cfg, data_dir)
    assert run.steps == 4 and run.privacy["steps"] == 4
    assert run.privacy["epsilon"] == pytest.approx(eps(4), rel=0.01) and eps(4) <= target
    stopped = run.privacy["stopped"]
    assert "step 5 would spend epsilon" in stopped and "target_epsilon" in stopped
    rows = [
        json.loads(x) for x in (Path(dp_cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["stopped"] == stopped and rows[-1]["val_loss"] > 0
    assert f"stopped    {stopped}" in run.summary()
    card = s3_server.get_object(Bucket="aigc-test", Key="runs/stages-dp/model/README.md")
    text = card["Body"].read().decode()
    assert "DP-SGD" in text and f"Stopped early: {stopped}" in text
    assert not any("lora" in f.name for f in Path(run.model_dir).iterdir())


@pytest.mark.slow
def test_two_trained_adapters_are_served_over_their_base_each_as_its_merged_model(
    trained, dp_run, cfg
):
    """The adapters of the two runs (plain LoRA, then DP-SGD LoRA on other files), served
    unmerged over the base they were trained on (serve.adapters, built-in engine): a request
    naming each gets the greedy text of that run's exported merged model, the two differ, and
    /v1/models lists both with the base as parent."""
    from ray import serve
    from serving import greedy_text

    from aigc_ray.serve import run_serve

    run = dp_run[0]
    base = json.loads((Path(trained.adapter_dir) / "adapter_config.json").read_text())
    other = json.loads((Path(run.adapter_dir) / "adapter_config.json").read_text())
    base_dir = base["base_model_name_or_path"]
    same = [
        (Path(d) / "model.safetensors").read_bytes()
        for d in (base_dir, other["base_model_name_or_path"])
    ]
    assert same[0] == same[1], "the two runs' seeded bases differ"
    adapters = {"plain": trained.adapter_dir, "dp": run.adapter_dir}
    served = cfg.serve.model_copy(
        update={"model_name": "base", "engine": "builtin", "adapters": adapters}
    )
    url = run_serve(served, base_dir, app_name="stages-lora")
    try:
        headers = {"Authorization": f"Bearer {KEY}"}
        cards = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]
        assert {c["id"]: c.get("parent") for c in cards} == {
            "base": None,
            "plain": "base",
            "dp": "base",
        }
        texts = {}
        for name, merged in (("plain", trained.model_dir), ("dp", run.model_dir)):
            for prompt in ("def add(a, b):", "import os\n"):
                body = {"model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0}
                r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
                assert r.status_code == 200, r.text
                texts[name, prompt] = r.json()["choices"][0]["text"]
                assert texts[name, prompt] == greedy_text(merged, prompt, 12), (name, prompt)
        assert any(texts["plain", p] != texts["dp", p] for p in ("def add(a, b):", "import os\n"))
    finally:
        serve.delete("stages-lora")


@pytest.fixture(scope="module")
def endpoint(trained, cfg):
    from ray import serve

    from aigc_ray.serve import run_serve

    yield run_serve(cfg.serve, trained.model_dir, app_name="stages")
    serve.delete("stages")  # frees the replica's CPU; the session's Serve controller stays


@pytest.mark.slow
def test_serve_openai_client_completion(endpoint, cfg):
    from openai import OpenAI

    client = OpenAI(base_url=f"{endpoint}/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == [cfg.serve.model_name]
    out = client.completions.create(
        model=cfg.serve.model_name,
        prompt="def add(a, b):",
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage.completion_tokens == 8 and out.choices[0].text
    assert out.usage.prompt_tokens > 0
    assert out.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_serve_errors_use_openai_shape_and_server_stays_up(endpoint, cfg):
    from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI

    client = OpenAI(base_url=f"{endpoint}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=4)
    with pytest.raises(BadRequestError) as e:
        client.completions.create(model=cfg.serve.model_name, prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(BadRequestError) as e:
        client.completions.create(
            model=cfg.serve.model_name, prompt="x " * 300, max_tokens=cfg.serve.max_tokens_limit
        )
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{endpoint}/v1", api_key="wrong", max_retries=0).models.list()
    raw = httpx.post(
        f"{endpoint}/v1/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert raw.status_code == 400 and set(raw.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    ok = client.completions.create(
        model=cfg.serve.model_name, prompt="x", max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert ok.usage.completion_tokens == 2


@pytest.mark.slow
def test_serve_concurrent_requests_are_batched(endpoint, cfg):
    """Eight concurrent requests all succeed and share decode steps (the engine's own step
    counter grows by far less than the 8 x 24 tokens they made)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI
    from ray import serve

    client = OpenAI(base_url=f"{endpoint}/v1", api_key=KEY)
    name = f"model-{cfg.serve.model_name}"

    def steps() -> int:
        async def ask():
            return await serve.get_deployment_handle(name, "stages").stats.remote()

        return asyncio.run(ask())["steps"]

    def one(i):
        return client.completions.create(
            model=cfg.serve.model_name,
            prompt=f"x = {i}",
            max_tokens=24,
            temperature=0.8,
            seed=i,
            extra_body={"ignore_eos": True},
        )

    before = steps()
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(one, range(8)))
    assert all(o.usage.completion_tokens == 24 for o in outs)
    assert steps() - before < 8 * 24 * 0.75, "the requests did not share decode steps"
    assert os.environ.get("AIGC_RAY_API_KEYS") is None  # keys reached the replica via runtime_env
