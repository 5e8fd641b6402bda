"""Run configuration: one pydantic model per stage, a root PipelineConfig, YAML + CLI overrides.

Configs are inert data: validators check syntax and cross-field consistency only; they never
touch the network, Ray or the file system beyond path syntax.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aigc_ray.errors import AigcRayError

STDLIB_SOURCE = "stdlib"


class ConfigError(AigcRayError, ValueError):
    """A configuration problem, with a message naming the file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PiiConfig(_Section):
    """PII redaction in the text data stage (docs/privacy.md says what counts as each kind)."""

    enabled: bool = Field(True, description="Look for personal data and secrets in every row.")
    action: Literal["replace", "drop"] = Field(
        "replace",
        description="replace: each finding becomes its placeholder; drop: rows holding any "
        "finding are left out (counted as filtered: pii).",
    )
    kinds: list[Literal["email", "phone", "ip", "credit_card", "secret", "private_key"]] = Field(
        default_factory=lambda: ["email", "phone", "ip", "credit_card", "secret", "private_key"],
        description="Kinds to find: email, phone, ip, credit_card, secret (API keys, tokens), "
        "private_key (PEM blocks).",
    )
    placeholder: str = Field(
        "<{KIND}>", description="What replaces a finding; {KIND} / {kind} name its kind."
    )
    phone_region: str = Field(
        "US",
        pattern="^[A-Z]{2}$",
        description="Region (ISO 3166) of phone numbers written without a +country code.",
    )

    @model_validator(mode="after")
    def _placeholder_formats(self) -> PiiConfig:
        try:
            self.placeholder.format(KIND="EMAIL", kind="email")
        except (KeyError, IndexError, ValueError):
            raise ValueError(
                f"data.pii.placeholder ({self.placeholder!r}) may only use {{KIND}} or {{kind}}"
            ) from None
        return self


class DataConfig(_Section):
    inputs: list[str] = Field(
        default_factory=lambda: [STDLIB_SOURCE],
        description="Input files, directories or globs (jsonl/json/parquet/csv/txt/py), local or "
        "s3:// / gs:// URIs; 'stdlib' means the running Python's standard-library source.",
    )
    include_stdlib_tests: bool = Field(
        False, description="With 'stdlib', also read the test suites (test/, tests/, idlelib/)."
    )
    text_column: str = Field(
        "text", description="Column holding the document text (jsonl/parquet/csv)."
    )
    id_column: str | None = Field(
        "id", description="Document id column, when present (kept with quarantined rows)."
    )
    text_mode: Literal["file", "line"] = Field(
        "file", description="Plain-text files: one document per file or per non-empty line."
    )
    format: Literal["pretrain", "sft"] = Field(
        "pretrain",
        description="pretrain: raw text; sft: a chat `messages` list with prompt masking.",
    )
    messages_column: str = Field(
        "messages", description="Column holding chat messages (format: sft)."
    )
    sft_packing: Literal["pack", "pad"] = Field(
        "pack",
        description="SFT examples packed into seq_len blocks, or one padded example per row.",
    )
    output_dir: str = Field(
        "runs/tiny/data", description="Where shards, manifest and tokenizer go (local or s3://)."
    )
    quarantine_dir: str | None = Field(
        None, description="Where bad rows go as parquet; empty = output_dir/quarantine."
    )
    strict: bool = Field(
        False,
        description="Fail on the first bad row (naming file and line) instead of quarantining.",
    )
    tokenizer: str | None = Field(
        None,
        description="Hugging Face tokenizer directory or hub id; empty trains a byte-level BPE "
        "on the corpus.",
    )
    vocab_size: int = Field(
        8192, ge=256, description="Vocabulary size of the trained BPE tokenizer."
    )
    tokenizer_train_mb: float = Field(
        16.0, gt=0, description="At most this many MB of text are used to train the BPE tokenizer."
    )
    seq_len: int = Field(256, ge=8, description="Tokens per packed training block.")
    val_fraction: float = Field(
        0.05, ge=0, lt=1, description="Fraction of documents (by hash) in the validation split."
    )
    min_chars: int = Field(
        1, ge=0, description="Filter: documents shorter than this (after cleaning)."
    )
    max_chars: int | None = Field(None, ge=1, description="Filter: documents longer than this.")
    max_line_length: int | None = Field(
        None, ge=1, description="Filter: any line longer than this."
    )
    min_alnum_fraction: float | None = Field(
        None, ge=0, le=1, description="Filter: fewer letters/digits among non-space characters."
    )
    max_repeated_line_fraction: float | None = Field(
        None, ge=0, le=1, description="Filter: more non-empty lines that repeat an earlier line."
    )
    blocklist: list[str] = Field(
        default_factory=list, description="Filter: regexes that reject a document."
    )
    exact_dedup: bool = Field(
        True, description="Drop exact duplicates (same cleaned text), keeping the first."
    )
    near_dedup: bool = Field(
        True, description="Drop near duplicates (MinHash + LSH), keeping the first."
    )
    near_dedup_threshold: float = Field(
        0.8, gt=0, le=1, description="Jaccard similarity that counts as near-duplicate."
    )
    minhash_num_perm: int = Field(
        256, ge=16, description="MinHash permutations (signature length)."
    )
    minhash_bands: int = Field(32, ge=1, description="LSH bands (num_perm must divide evenly).")
    shingle: Literal["word", "char"] = Field(
        "word", description="Shingles: word or character n-grams."
    )
    shingle_ngram: int = Field(5, ge=1, description="n of the n-gram shingles.")
    near_dedup_driver_max_docs: int = Field(
        200_000,
        ge=0,
        description="Near-dedup candidates up to which LSH banding runs in the driver; above, "
        "banding is a Ray Data hash shuffle on (band, key) and the driver holds only the "
        "candidate pairs (0 = always distributed).",
    )
    max_docs: int | None = Field(
        None, ge=1, description="Read at most this many documents (debugging)."
    )
    shard_rows: int = Field(4096, ge=1, description="Target packed blocks per parquet shard.")
    batch_size: int = Field(256, ge=1, description="Documents per tokenization batch.")
    num_tokenize_actors: int | None = Field(
        None,
        ge=1,
        description="Concurrent tokenize tasks (1 CPU each); empty = the cluster's CPUs.",
    )
    max_cpus: int | None = Field(
        None,
        ge=1,
        description="Most CPUs the stage uses at once (Ray Data's resource limit and the "
        "stage's own task pools); on an autoscaling cluster also the most it asks the "
        "autoscaler for. Empty = the cluster's CPUs (Ray Data may ask for more nodes).",
    )
    seed: int = Field(
        0, description="Seed of the deterministic train/validation split and MinHash."
    )
    pii: PiiConfig = Field(
        default_factory=PiiConfig, description="PII and secret redaction (before dedup)."
    )

    @model_validator(mode="after")
    def _bands_divide(self) -> DataConfig:
        if self.minhash_num_perm % self.minhash_bands:
            raise ValueError(
                f"data.minhash_num_perm ({self.minhash_num_perm}) must be divisible by "
                f"data.minhash_bands ({self.minhash_bands})"
            )
        return self


class ModelConfig(_Section):
    pretrained: str | None = Field(
        None, description="Hugging Face model directory to start from; empty builds a new model."
    )
    hidden_size: int = Field(256, ge=8, description="Width of the Llama-style model.")
    num_layers: int = Field(4, ge=1, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    num_kv_heads: int | None = Field(None, ge=1, description="KV heads (GQA); empty = num_heads.")
    intermediate_size: int | None = Field(None, ge=8, description="MLP width; empty = ~8/3 hidden.")
    max_position_embeddings: int = Field(1024, ge=8, description="Context window of the model.")
    tie_word_embeddings: bool = Field(True, description="Share input and output embeddings.")
    lora_r: int | None = Field(
        None, ge=1, description="LoRA rank (peft); empty = full fine-tuning."
    )
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    lora_targets: list[str] | None = Field(
        None, description="Modules to adapt; empty = all Llama projections."
    )

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_heads ({self.num_heads})"
            )
        return self


class _TrainRun(_Section):
    """What text and image training share: where the run lives, its workers and its recovery
    (both run on train.fit.run_trainer). Each stage sets its own defaults for run_dir and name."""

    run_dir: str = Field("runs/train", description="Run directory: metrics, loss plot, model.")
    storage_path: str | None = Field(
        None,
        description="Ray Train storage (local dir or s3://) for checkpoints; empty = run_dir/ray.",
    )
    name: str = Field("run", description="Run name; re-running with the same name resumes.")
    num_workers: int = Field(2, ge=1, description="Training worker processes.")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL) instead of CPU (gloo).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps before the decay.")
    eval_every: int = Field(50, ge=1, description="Validation loss every N steps.")
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint every N steps.")
    num_to_keep: int = Field(2, ge=1, description="Checkpoints kept.")
    max_failures: int = Field(2, ge=0, description="Worker-group failures to recover from.")
    seed: int = Field(0, description="Seed for init and data order.")


class DPConfig(_Section):
    """Differentially private training (DP-SGD with Opacus): per-sample gradients clipped to
    max_grad_norm, Gaussian noise added once per step, rows sampled by Poisson sampling, and
    the privacy spent tracked by Opacus' accountant (docs/privacy.md)."""

    enabled: bool = Field(False, description="Train with DP-SGD.")
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="Privacy budget: without noise_multiplier the noise is chosen so that "
        "train.max_steps spend at most this; with it, training stops before exceeding it.",
    )
    noise_multiplier: float | None = Field(
        None, gt=0, description="Noise std / max_grad_norm; empty = from target_epsilon."
    )
    delta: float | None = Field(
        None, gt=0, lt=1, description="The delta of (epsilon, delta)-DP; empty = 1 / training rows."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Each row's gradient is clipped to this.")
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="Opacus accountant: rdp (Renyi DP) or prv (privacy random variables)."
    )

    @model_validator(mode="after")
    def _check_budget(self) -> DPConfig:
        if self.enabled and self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError(
                "train.privacy.enabled needs train.privacy.target_epsilon or "
                "train.privacy.noise_multiplier"
            )
        return self


class TrainConfig(_TrainRun):
    run_dir: str = Field("runs/tiny/train", description="Run directory: metrics, loss plot, model.")
    export_dir: str | None = Field(
        None,
        description="Also copy the final model here (s3:// on clusters); serve/generate default "
        "to it.",
    )
    name: str = Field("tiny", description="Run name; re-running with the same name resumes.")
    data_dir: str | None = Field(
        None, description="Shard directory from preprocess; empty = data.output_dir."
    )
    num_workers: int = Field(
        2, ge=1, description="Training worker processes (the maximum when elastic)."
    )
    min_workers: int | None = Field(
        None,
        ge=1,
        description="Elastic training: run with any count in [min_workers, num_workers].",
    )
    elastic_resize_interval_s: float = Field(
        60.0,
        gt=0,
        description="Elastic training: how often a healthy run checks whether more workers fit "
        "(it then restarts from its latest checkpoint at the larger size).",
    )
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom resources each worker also reserves (e.g. {trainer: 1} to place "
        "workers only on nodes that declare it).",
    )
    batch_size: int = Field(16, ge=1, description="Blocks per worker per step.")
    seq_len: int | None = Field(
        None, ge=8, description="Tokens per block; empty = the shards' (data.seq_len)."
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of peak.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norms/biases).")
    schedule: Literal["cosine", "linear"] = Field("cosine", description="LR decay after warmup.")
    grad_accum: int = Field(
        1, ge=1, description="Micro-batches per optimizer step (gradient accumulation)."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "bf16", description="Autocast dtype on GPU (fp16 adds a GradScaler); CPU always runs fp32."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="DDP, or FSDP2 (fully_shard per block; CPU/gloo or GPU/NCCL) for models "
        "that do not fit one device.",
    )
    ledger: bool = Field(
        False,
        description="Record every consumed (epoch, position) in the checkpoints (tests/audits).",
    )
    grad_clip: float = Field(1.0, gt=0, description="Max gradient norm.")
    eval_batches: int = Field(8, ge=1, description="Validation batches per worker per evaluation.")
    shuffle_buffer: int = Field(
        2048,
        ge=0,
        description="Rows shuffled together within each epoch, after a seeded shuffle of the "
        "shards' row groups (0 = corpus order).",
    )
    step_delay_s: float = Field(
        0.0,
        ge=0,
        description="Seconds each worker waits after every optimizer step: pacing for tests and "
        "demos (e.g. to resize a cluster mid-run); 0 for real runs.",
    )
    privacy: DPConfig = Field(
        default_factory=DPConfig, description="Differentially private training (DP-SGD)."
    )

    @model_validator(mode="after")
    def _check_workers(self) -> TrainConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(
                f"train.min_workers ({self.min_workers}) must be <= train.num_workers "
                f"({self.num_workers})"
            )
        return self


class AutoscalingSettings(_Section):
    """Ray Serve autoscaling of one model's replicas (replaces a fixed num_replicas)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas; 0 scales to zero when idle.")
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time.")
    target_ongoing_requests: float = Field(
        16, gt=0, description="Requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="Sustained load before adding.")
    downscale_delay_s: float = Field(300.0, ge=0, description="Sustained idle before removing.")
    look_back_period_s: float = Field(
        30.0, gt=0, description="Window over which ongoing requests are averaged."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        return self


class VllmSettings(_Section):
    """vLLM engine settings (engine: vllm, or auto when vLLM is chosen), for AsyncEngineArgs."""

    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="GPUs one replica spans (vLLM's workers in the replica's placement group).",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of each GPU's memory vLLM may use (GPUs only)."
    )
    quantization: str | None = Field(
        None, description="vLLM quantization method; empty = what the model directory says."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV cache of shared prefixes.")
    kv_cache_memory_gb: float | None = Field(
        None,
        gt=0,
        description="KV-cache size per replica in GiB; empty = on GPUs vLLM sizes it from "
        "gpu_memory_utilization, on CPUs room for 64 full-context sequences, at most 25% of the "
        "memory free when the engine starts.",
    )
    cpu_isolation: bool = Field(
        True,
        description="CPU build, serving: once vLLM's worker binds itself to cores, keep this "
        "node's other Ray processes (daemons, Serve's controller and proxies, HAProxy, the "
        "replica, vLLM's scheduler) on the cores it left free; given back when the engine "
        "closes. Batch generation never does (its pipeline's tasks share the node).",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Any other AsyncEngineArgs, passed through."
    )


class EngineSettings(_Section):
    """Which generation engine runs a model, in what precision and context (serve and generate)."""

    engine: Literal["auto", "vllm", "builtin"] = Field(
        "auto",
        description="auto: vLLM when installed and it supports the model, else builtin "
        "(torch + transformers).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto (the model dir's half dtype, else bf16/fp16 on cuda, fp32 on cpu) or "
        "float32 / bfloat16 / float16.",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Longest prompt + completion; empty = the model's context window."
    )
    vllm: VllmSettings = Field(default_factory=VllmSettings, description="vLLM engine settings.")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters over this model, unmerged: name -> PEFT adapter directory "
        "(local or s3://, as train.lora exports it). Serving: a request names one as its "
        "`model`; batch generation: a row's `adapter` column. Loaded on first use.",
    )
    max_loras: int = Field(
        4,
        ge=1,
        description="Adapters one engine holds at once; beyond, the least recently used "
        "idle one is evicted (vLLM: max_loras).",
    )
    max_lora_rank: int = Field(
        16, ge=1, description="Largest adapter rank accepted (vLLM: max_lora_rank)."
    )


class ReplicaSettings(EngineSettings):
    """How one model is deployed: replicas, resources, engine, batching and queue limits."""

    num_replicas: int = Field(1, ge=1, description="Replicas when autoscaling is off.")
    autoscaling: AutoscalingSettings | None = Field(
        None, description="Autoscale replicas (min/max_replicas, target_ongoing_requests, delays)."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (also its torch threads).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (>0 loads on CUDA).")
    device: str = Field("auto", description="auto (cuda if the replica has a GPU), cpu or cuda.")
    max_batch_size: int | None = Field(
        None,
        ge=1,
        description="Rows decoded together (continuous batching); empty = the engine's default "
        "(32 builtin, vLLM's max_num_seqs).",
    )
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica accepts at once.")
    max_queued_requests: int = Field(
        128, ge=-1, description="Requests queued for the replicas before 503s; -1 = no limit."
    )
    rollout_surge_percent: int = Field(
        100,
        ge=0,
        le=100,
        description="Extra replicas (percent of the count) while a new model version rolls out: "
        "replacements start before old replicas stop, so no request waits for a load; 0 = "
        "stop, then start (no spare capacity needed).",
    )
    num_inference_steps: int = Field(
        25, ge=1, le=1000, description="Image models: denoising steps when a request names none."
    )
    guidance_scale: float = Field(
        3.0, ge=0, description="Image models: classifier-free guidance when a request names none."
    )
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, description="Image models: wait this long to batch concurrent requests."
    )
    stream_chunks_per_s: float | None = Field(
        None,
        ge=0,
        description="Streamed chunks/s per replica before chunks carry several tokens (each "
        "chunk costs CPU in the replica, and in the Router and Serve's proxy where they are in "
        "front); 0 = one chunk per token always. Unset: 0 where the replica takes HTTP itself "
        "(serve.ingress direct, one model), 330 behind the Router.",
    )
    stream_max_interval_s: float = Field(
        0.09,
        gt=0,
        description="Under load, a stream still gets a chunk at least this often (smoothness "
        "bound on the coalescing above).",
    )


class ServedModel(ReplicaSettings):
    """One entry of serve.models: a name, its model directory, and replica settings."""

    name: str = Field(description="Name clients pass as `model`.")
    model_dir: str = Field(description="Hugging Face model directory (ours or any other).")
    version: str | None = Field(
        None,
        description="Label of this model's version, shown in /v1/models and as each response's "
        "system_fingerprint; empty = a fingerprint of the model directory's files.",
    )


class ServeConfig(ReplicaSettings):
    model_dir: str | None = Field(
        None,
        description="Model directory to serve (local or s3://); empty = train.export_dir, else "
        "train.run_dir/model.",
    )
    model_name: str = Field("aigc-tiny", description="Name clients pass as `model`.")
    model_version: str | None = Field(
        None,
        description="Version label of model_dir (see serve.models[].version); empty = a "
        "fingerprint of its files.",
    )
    models: list[ServedModel] = Field(
        default_factory=list,
        description="Several models in one app: entries of {name, model_dir, replica settings}; "
        "empty = just model_name/model_dir. Replica settings left out come from this section.",
    )
    host: str = Field("127.0.0.1", description="HTTP bind address.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    proxy_location: Literal["HeadOnly", "EveryNode", "Disabled"] = Field(
        "HeadOnly",
        description="Where Serve's HTTP proxies run: HeadOnly (the endpoint is the head's "
        "host:port, what cluster.yaml's SSH tunnel reaches) or EveryNode (one per node with a "
        "replica, behind your load balancer).",
    )
    ingress: Literal["direct", "haproxy", "proxy"] = Field(
        "direct",
        description="How HTTP reaches the engine. direct (the default): an app of one text "
        "model has no Router, the model's replicas serve the OpenAI API themselves, behind "
        "Ray's HAProxy ingress (no Python hop between client and engine); apps of several "
        "models, or image models, keep the Router behind HAProxy. haproxy: HAProxy, then the "
        "Router, then the model replicas. proxy: Serve's Python proxy actor, then the Router "
        "(the path before HAProxy). HAProxy is HTTP only: with TLS, direct uses Serve's proxy "
        "(which terminates TLS) in front of the model replicas. Applies when this command "
        "starts Serve; when HAProxy is not usable here Serve's proxy is used and the reason "
        "logged.",
    )
    request_timeout_s: float = Field(300.0, gt=0, description="Past this a request gets a 408.")
    max_tokens_limit: int = Field(512, ge=1, description="Largest max_tokens a request may ask.")
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["def fibonacci(n):", "import os\n", "class Stack:"],
        description="Prompts the pipeline sends after deploying.",
    )
    sample_max_tokens: int = Field(48, ge=1, description="max_tokens of the sample requests.")
    max_images_per_request: int = Field(
        10, ge=1, description="Largest `n` an image request may ask."
    )
    log_prompts: bool = Field(
        False,
        description="Log each request's prompt and completion text (debugging only); off, no "
        "log line or error message holds them.",
    )
    tls_certfile: str | None = Field(
        None,
        description="HTTPS: the endpoint's PEM certificate (with tls_keyfile; `aigc-ray tls "
        "make` writes a private CA and one); empty = plain HTTP. Checked before Serve starts.",
    )
    tls_keyfile: str | None = Field(None, description="HTTPS: the certificate's PEM private key.")
    tls_ca_file: str | None = Field(
        None,
        description="The CA the command's own requests to the endpoint trust (the sample "
        "completions); empty = the system's CAs.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> ServeConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"serve.models names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _adapter_names(self) -> ServeConfig:
        if self.models and self.adapters:
            raise ValueError(
                "serve.adapters are model_name's; with serve.models, give each model its own "
                "(serve.models[].adapters)"
            )
        names = [m.name for m in self.models] or [self.model_name]
        adapters = [a for m in self.models for a in m.adapters] or list(self.adapters)
        clash = sorted({a for a in adapters if a in names or adapters.count(a) > 1})
        if clash:
            raise ValueError(
                f"adapter names must differ from every model's and each other's: {clash}"
            )
        return self

    @model_validator(mode="after")
    def _tls(self) -> ServeConfig:
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            raise ValueError("serve.tls_certfile and serve.tls_keyfile go together (HTTPS)")
        if self.tls_certfile and self.ingress == "haproxy":
            raise ValueError(
                "serve.ingress haproxy is HTTP only (Ray's HAProxy ingress does not terminate "
                "TLS): use ingress: proxy for HTTPS, or terminate TLS at a load balancer in "
                "front of HAProxy (docs/security.md)"
            )
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.tls_certfile else "http"

    def served_models(self, default_model_dir: str | None = None) -> list[ServedModel]:
        """Every model of the app, with replica settings inherited from this section."""
        if not self.models:
            model_dir = self.model_dir or default_model_dir
            if not model_dir:
                raise ValueError("serve.model_dir (or serve.models) is required")
            fields = {"name": self.model_name, "model_dir": model_dir}
            return [self._inherit({**fields, "version": self.model_version})]
        return [self._inherit(m.model_dump(exclude_unset=True)) for m in self.models]

    def _inherit(self, fields: dict) -> ServedModel:
        base = {k: getattr(self, k) for k in ReplicaSettings.model_fields}
        if self.models:  # adapters belong to one base model: serve.models[].adapters
            base.pop("adapters")
        return ServedModel(**{**base, **fields})


class GenerateConfig(EngineSettings):
    inputs: list[str] = Field(
        default_factory=list, description="Prompt files (jsonl or parquet), local or s3://."
    )
    output_dir: str = Field("runs/tiny/generate", description="Parquet output directory.")
    quarantine_dir: str | None = Field(
        None,
        description="Where unreadable prompt rows go (with file, line, reason); empty = "
        "<output_dir>_quarantine.",
    )
    model_dir: str | None = Field(
        None,
        description="Model directory (local or s3://); empty = train.export_dir, else "
        "train.run_dir/model.",
    )
    prompt_column: str = Field("prompt", description="Column holding the prompt text.")
    max_tokens: int = Field(64, ge=1, description="Default max_tokens (a row's column overrides).")
    temperature: float = Field(0.0, ge=0, le=2, description="Default temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Default top_p.")
    top_k: int = Field(0, ge=0, description="Default top_k; 0 = off.")
    seed: int | None = Field(None, description="Default seed.")
    num_actors: int = Field(1, ge=1, description="Engine actors (one model copy each).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per actor (also its torch threads).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (>0 loads on CUDA).")
    batch_size: int = Field(64, ge=1, description="Rows handed to an actor per call.")
    max_batch_size: int | None = Field(
        None, ge=1, description="Rows decoded together; empty = the engine's default."
    )


class OptimizeConfig(_Section):
    """Model optimization between training and serving: prune, convert, quantize, compile."""

    enabled: bool = Field(
        False, description="Run this stage in `aigc-ray pipeline` (between train and serve)."
    )
    model_dir: str | None = Field(
        None, description="Model directory to optimize; empty = the trained model."
    )
    output_dir: str = Field(
        "runs/tiny/optimized", description="The optimized model directory (plus report.json)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Precision of what is not quantized: auto = bfloat16 with a quantization "
        "method (vLLM's CPU int4 kernel needs it), else the source's dtype.",
    )
    quantization: Literal["none", "int8_weight_only", "w8a8", "int4_weight_only"] = Field(
        "none",
        description="Linear weights to int8 (optionally with dynamic int8 activations) or int4 "
        "(groups), written in the compressed-tensors format vLLM and transformers read.",
    )
    int4_group_size: int | None = Field(
        None, ge=16, description="int4 group size; empty = the largest of 128/64/32 that fits."
    )
    pruning: Literal["none", "magnitude", "2of4", "mlp_channels"] = Field(
        "none",
        description="magnitude: zero the smallest weights; 2of4: two of every four (sparse "
        "tensor cores on GPUs); mlp_channels: drop MLP channels (a smaller dense model).",
    )
    sparsity: float = Field(0.5, gt=0, lt=1, description="Fraction pruned (magnitude, mlp).")
    recovery_steps: int = Field(
        0, ge=0, description="Fine-tune steps after pruning, through the trainer (0 = none)."
    )
    compile: bool = Field(
        False,
        description="Record that engines should torch.compile the decode step (the report "
        "measures it; only worth it where it is faster).",
    )
    max_perplexity_increase: float = Field(
        0.05,
        ge=0,
        description="Fail the stage (no serving of it) when validation perplexity rises more.",
    )
    eval_blocks: int = Field(64, ge=1, description="Validation blocks for perplexity.")
    benchmark: bool = Field(
        True, description="Measure engine tok/s at batch 1 and 32 for the report."
    )
    held_prompts: int = Field(16, ge=1, description="Prompts for greedy token agreement.")
    agreement_tokens: int = Field(32, ge=1, description="Greedy tokens compared per prompt.")


class ImageDataConfig(_Section):
    inputs: list[str] = Field(
        ["digits"],
        description="'digits' (scikit-learn's bundled 8x8 digits), image folders (one "
        "sub-folder per class), or .jsonl/.parquet files of image path or bytes + label/caption.",
    )
    image_column: str = Field("image", description="jsonl/parquet: image path or bytes column.")
    label_column: str = Field("label", description="jsonl/parquet: class label column.")
    caption_column: str = Field("caption", description="jsonl/parquet: caption column (kept).")
    image_size: int = Field(16, ge=8, le=1024, description="Square training size (resize+crop).")
    channels: Literal[1, 3] = Field(1, description="1 = grayscale, 3 = RGB.")
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="Share of images held out.")
    output_dir: str = Field("runs/digits/data", description="Parquet shards + manifest.json.")
    quarantine_dir: str | None = Field(
        None, description="Unreadable images (file and reason); empty = <output_dir>/quarantine."
    )
    seed: int = Field(0, description="Seed of the train/val split.")


class ImageModelConfig(_Section):
    block_out_channels: list[int] = Field(
        [32, 64], min_length=1, description="UNet width per resolution level."
    )
    layers_per_block: int = Field(1, ge=1, description="ResNet blocks per UNet level.")
    attention: bool = Field(True, description="Self-attention at the lowest resolution.")
    num_train_timesteps: int = Field(1000, ge=10, description="DDPM noise steps.")


class ImageTrainConfig(_TrainRun):
    run_dir: str = Field(
        "runs/digits/train", description="Metrics, loss plot, sample grids, model."
    )
    name: str = Field("digits", description="Run name; re-running with the same name resumes.")
    batch_size: int = Field(32, ge=1, description="Images per worker per step.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    cond_dropout: float = Field(
        0.1, ge=0, lt=1, description="Share of labels dropped (classifier-free guidance)."
    )
    eval_every: int = Field(250, ge=1, description="Validation loss + sample grid every N steps.")
    checkpoint_every: int = Field(250, ge=1, description="Checkpoint every N steps.")
    sample_steps: int = Field(25, ge=1, description="DDIM steps of the sample grids.")
    guidance_scale: float = Field(3.0, ge=0, description="Guidance of the sample grids.")
    seed: int = Field(0, description="Seed for init, noise and sampling.")


class ImageGenerateConfig(_Section):
    inputs: list[str] = Field(
        [], description="jsonl/csv/parquet prompt files (a prompt per row, optional seed)."
    )
    output_dir: str = Field("runs/digits/generate", description="PNG files + index.parquet.")
    model_dir: str | None = Field(None, description="Pipeline directory; empty = the trained one.")
    prompt_column: str = Field("prompt", description="Column holding the prompt (or class).")
    num_inference_steps: int = Field(25, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(3.0, ge=0, description="Classifier-free guidance.")
    seed: int = Field(0, description="Seed of rows without one (row i gets seed + i).")
    num_actors: int = Field(1, ge=1, description="Pipeline actors (one model copy each).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per actor (also its torch threads).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (>0 runs on CUDA).")
    batch_size: int = Field(16, ge=1, description="Rows per pipeline call.")


class ImagesConfig(_Section):
    data: ImageDataConfig = Field(default_factory=ImageDataConfig, description="Image data.")
    model: ImageModelConfig = Field(default_factory=ImageModelConfig, description="UNet.")
    train: ImageTrainConfig = Field(default_factory=ImageTrainConfig, description="Diffusion.")
    generate: ImageGenerateConfig = Field(
        default_factory=ImageGenerateConfig, description="Batch image generation."
    )
    sample_images: int = Field(
        100, ge=10, description="Images the pipeline requests over HTTP for its grid and score."
    )


class StorageSettings(_Section):
    """Encryption at rest of what the stages write (shards, checkpoints, models, generations)."""

    encryption: Literal["sse-s3", "sse-kms", "none"] = Field(
        "sse-s3",
        description="s3:// outputs: server-side encryption asked on every object written "
        "(the x-amz-server-side-encryption header) and set as the bucket's default when "
        "missing: sse-s3 (S3-managed keys), sse-kms (the kms_key_id key), none (no header, "
        "the bucket left as it is). Local outputs are owner-only (directories 0700, files "
        "0600) whatever this says.",
    )
    kms_key_id: str | None = Field(
        None, description="KMS key id, ARN or alias of sse-kms (required with it)."
    )

    @model_validator(mode="after")
    def _kms_key(self) -> StorageSettings:
        if self.encryption == "sse-kms" and not self.kms_key_id:
            raise ValueError("storage.encryption sse-kms needs storage.kms_key_id")
        if self.kms_key_id and self.encryption != "sse-kms":
            raise ValueError("storage.kms_key_id is used only with storage.encryption: sse-kms")
        return self


class PipelineConfig(_Section):
    task: Literal["text", "image"] = Field(
        "text", description="text: the language-model flow; image: the `images` section's."
    )
    images: ImagesConfig = Field(
        default_factory=ImagesConfig, description="Image generation (task: image)."
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Preprocess stage.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model architecture.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training stage.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving stage.")
    generate: GenerateConfig = Field(
        default_factory=GenerateConfig, description="Offline batch generation."
    )
    optimize: OptimizeConfig = Field(
        default_factory=OptimizeConfig, description="Quantize / prune / compile a model."
    )
    storage: StorageSettings = Field(
        default_factory=StorageSettings,
        description="Encryption at rest (s3:// outputs) and owner-only local outputs.",
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        if self.train.seq_len is not None and self.train.seq_len != self.data.seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) must equal "
                f"data.seq_len ({self.data.seq_len})"
            )
        if self.model.max_position_embeddings < self.data.seq_len:
            raise ValueError(
                f"model.max_position_embeddings ({self.model.max_position_embeddings}) must be "
                f">= data.seq_len ({self.data.seq_len})"
            )
        return self

    def resolved_data_dir(self) -> str:
        return self.train.data_dir or self.data.output_dir

    def output_locations(self, stages: set[str]) -> list[str]:
        """Where `stages` write (local paths and URIs; storage.protect_outputs)."""
        out: list[str | None] = []
        if self.task == "image":
            im = self.images
            if "preprocess" in stages:
                out += [im.data.output_dir, im.data.quarantine_dir]
            if "train" in stages:
                out += [im.train.run_dir, im.train.storage_path]
            if "generate" in stages:
                out += [im.generate.output_dir]
            return [o for o in dict.fromkeys(out) if o]
        if "preprocess" in stages:
            out += [self.data.output_dir, self.data.quarantine_dir]
        if "train" in stages:
            out += [self.train.run_dir, self.train.storage_path, self.train.export_dir]
        if "optimize" in stages:
            out += [self.optimize.output_dir]
        if "generate" in stages:
            out += [self.generate.output_dir, self.generate.quarantine_dir]
        return [o for o in dict.fromkeys(out) if o]

    def trained_model_dir(self) -> str:
        """Where `train` exports its model (the optimize stage's source; what serve and generate
        use unless the optimize stage is enabled)."""
        return self.train.export_dir or str(Path(self.train.run_dir) / "model")

    def optimize_source_dir(self) -> str:
        return self.optimize.model_dir or self.trained_model_dir()

    def default_model_dir(self) -> str:
        """What serve and generate use by default: the optimized model when the optimize stage
        is enabled, else the trained one."""
        if self.task == "image":
            return str(Path(self.images.train.run_dir) / "model")
        return self.optimize.output_dir if self.optimize.enabled else self.trained_model_dir()

    def serve_model_dir(self) -> str:
        return self.serve.model_dir or self.default_model_dir()

    def generate_model_dir(self) -> str:
        return self.generate.model_dir or self.default_model_dir()


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e.problem})") from None


_ITEM = re.compile(r"^(\w+)\[(\d+)\]$")  # models[0]


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set `section.key=value` items (values parsed as YAML) into a raw config dict. A list item
    is addressed by its index, `serve.models[0].engine=vllm`; the index one past the end adds
    an item (`serve.models[0].name=a` on a config without models)."""
    for item in overrides:
        path, value = _parse_override(item)
        node = raw
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            m = _ITEM.match(part)
            key, index = (m.group(1), int(m.group(2))) if m else (part, None)
            if not isinstance(node, dict):
                where = ".".join(path[:depth])
                raise ConfigError(f"override {item!r}: {where!r} is not a section")
            if index is None:
                if last:
                    node[key] = value
                else:
                    node = node.setdefault(key, {})
                continue
            items = node.setdefault(key, [])
            if not isinstance(items, list):
                raise ConfigError(f"override {item!r}: {key!r} is not a list")
            if index > len(items):
                raise ConfigError(
                    f"override {item!r}: {key} has {len(items)} items; index {index} is "
                    f"neither one of them nor the next ({len(items)})"
                )
            if index == len(items):
                items.append({})
            if last:
                items[index] = value
            else:
                node = items[index]
    return raw


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])
        key = key.lstrip(".") or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the config reference in README.md)"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Load a YAML config (or defaults when path is None) and apply overrides.

    Raises ConfigError whose message names the file and every bad key.
    """
    raw: dict = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    if overrides:
        source += " with overrides " + " ".join(overrides)
        raw = apply_overrides(raw, overrides)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def write_resolved(
    cfg: BaseModel, directory: str | Path, name: str = "config.resolved.json"
) -> Path:
    """Write a config (any section or the root) as JSON next to an output."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = d / name
    out.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
    return out


def _section_in(annotation) -> tuple[type[BaseModel], str] | None:
    """(section model, how its keys are written) of a field holding a section: `X` -> "",
    `X | None` -> "" (optional), `list[X]` -> "[]" (a list of such sections)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    if origin is list and models:
        return models[0], "[]"
    if len(models) == 1 and type(None) in args:
        return models[0], ""
    return None


def config_reference(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[str]:
    """Markdown table rows `| key | default | description |`: every key, the keys of optional
    sections (`serve.autoscaling.min_replicas`) and of list items (`serve.models[].engine`)
    included, each under a row for the section itself."""
    rows = []
    for name, field in model.model_fields.items():
        section = _section_in(field.annotation)
        default = field.get_default(call_default_factory=True)
        if section is not None:
            inner, items = section
            if items or default is None:  # the section's own row: what leaving it out means
                kind = "list of sections" if items else "optional section"
                rows.append(f"| `{prefix}{name}` | `{default!r}` | ({kind}) {field.description} |")
            rows += config_reference(inner, f"{prefix}{name}{items}.")
            continue
        shown = "(required)" if field.is_required() else f"`{default!r}`"
        rows.append(f"| `{prefix}{name}` | {shown} | {field.description} |")
    return rows


def reference_markdown() -> str:
    """docs/configuration.md: every key, its default and description (generated, tested)."""
    head = [
        "# Configuration reference",
        "",
        "Defaults of every key when a config file leaves it out (`configs/tiny.yaml` sets several",
        "of them). Generated from the pydantic models in `aigc_ray/config.py`:",
        "`python -m aigc_ray.config > docs/configuration.md` (a test fails when it drifts).",
        "",
        "Override any key on the command line as `section.key=value` (the value is YAML). A list",
        "item is addressed by its index: `serve.models[0].engine=vllm`; the index one past the",
        "end adds an item. Keys of an optional section (`serve.autoscaling`) and of list items",
        "(`serve.models[]`) are listed under them; an item of `serve.models` takes the replica",
        "settings it leaves out from the `serve` section, not the defaults shown for it here.",
        "",
        "| key | default | description |",
        "| --- | --- | --- |",
    ]
    return "\n".join([*head, *config_reference()]) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
