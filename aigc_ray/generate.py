"""Offline batch generation: Ray Data reads a prompts dataset, an actor pool runs a generation
engine (the built-in one or vLLM, chosen as for serving: ``generate.engine``) and parquet comes
out with one row per prompt: prompt, completion, token counts, finish reason, latency, an error
column, and the prompt's source file and line.

Nothing is fatal to the job and nothing is lost:
- a row that cannot be read (malformed JSON, invalid UTF-8, not an object, no prompt or a prompt
  that is not a string, an unreadable parquet file) goes to ``quarantine_dir`` (default
  ``<output_dir>_quarantine``) with its file, line and reason, and is counted in the summary;
- a row that is read but cannot be generated (a bad parameter, a prompt beyond the context
  window) gets its error recorded in the output and an empty completion.
Per-row sampling: columns named max_tokens, temperature, top_p, top_k, seed, stop or ignore_eos
override the config's defaults; a row's ``adapter`` column names one of ``generate.adapters``
(LoRA over the model: rows of different adapters decode in the same batch).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from aigc_ray.config import GenerateConfig
from aigc_ray.data.readers import table_records
from aigc_ray.engine import InvalidParamError, SamplingParams, load_engine
from aigc_ray.engine.loader import cpu_threads, placed_device
from aigc_ray.engine.lora import AdaptersBusyError
from aigc_ray.engine.params import usable_device
from aigc_ray.errors import AigcRayError, StorageError
from aigc_ray.progress import Progress, Watch, post
from aigc_ray.storage import (
    is_uri,
    list_files,
    portable_location,
    read_bytes,
    writer_filesystem,
)

log = logging.getLogger(__name__)

ROW_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
ROW_COLUMNS = (*ROW_PARAMS, "adapter")  # a row's own settings, kept as its params JSON
PROMPT_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("params", pa.string()),  # the row's parameter columns as JSON
        ("source", pa.string()),
        ("line", pa.int64()),
        ("reason", pa.string()),  # set: the row could not be read (quarantined)
        ("raw", pa.string()),
    ]
)
OUTPUT_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("finish_reason", pa.string()),
        ("latency_s", pa.float64()),
        ("error", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("adapter", pa.string()),  # the row's LoRA adapter, null for the model itself
    ]
)
PROMPT_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet")


class GenerateError(AigcRayError, ValueError):
    """Batch generation cannot start (missing inputs or model)."""


def row_params(row: dict, cfg: GenerateConfig) -> SamplingParams:
    """The config's defaults overridden by the row's own (non-null) parameter columns."""
    values = {k: getattr(cfg, k) for k in ("max_tokens", "temperature", "top_p", "top_k", "seed")}
    values["stop"], values["ignore_eos"] = [], False
    for key in ROW_PARAMS:
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        values[key] = [value] if key == "stop" and isinstance(value, str) else value
    for key in ("max_tokens", "top_k"):
        if not isinstance(values[key], int) or isinstance(values[key], bool):
            values[key] = _as_int(key, values[key])
    for key in ("temperature", "top_p"):
        if not isinstance(values[key], int | float) or isinstance(values[key], bool):
            raise InvalidParamError(f"{key} must be a number, got {values[key]!r}", key)
    if not isinstance(values["stop"], list):
        raise InvalidParamError(f"stop must be a string or a list, got {values['stop']!r}", "stop")
    if values["seed"] is not None:
        values["seed"] = _as_int("seed", values["seed"])
    return SamplingParams(**values)


def _as_int(key: str, value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise InvalidParamError(f"{key} must be an integer, got {value!r}", key)


# ---------------------------------------------------------------- reading prompt files


def prompt_files(inputs: list[str]) -> list[dict]:
    """The prompt files of ``generate.inputs`` (files, directories or globs; local or s3://)."""
    files = []
    for spec in inputs:
        try:
            found = list_files(spec)
        except StorageError as e:
            raise GenerateError(f"generate.inputs: {e}") from None
        for path, size in found:
            if not path.endswith(PROMPT_SUFFIXES):
                raise GenerateError(
                    f"generate.inputs: {path} is not a prompts file ({', '.join(PROMPT_SUFFIXES)})"
                )
            files.append({"path": path, "size": size})
        if not found:
            raise GenerateError(f"generate.inputs: no prompts file under {spec}")
    return files


class _PromptRows:
    def __init__(self, path: str, column: str):
        self.path, self.column = path, column
        self.rows: list[dict] = []

    def bad(self, line: int, reason: str, raw="") -> None:
        if isinstance(raw, bytes):
            raw = raw[:2000].decode("utf-8", "backslashreplace")
        self.rows.append(
            {
                "prompt": None,
                "params": None,
                "source": self.path,
                "line": line,
                "reason": reason,
                "raw": str(raw)[:2000],
            }
        )

    def record(self, line: int, obj, raw: str) -> None:
        if not isinstance(obj, dict):
            self.bad(line, f"expected a JSON object, got {type(obj).__name__}", raw)
        elif obj.get(self.column) is None:
            self.bad(line, f"missing column {self.column!r}", raw)
        elif not isinstance(obj[self.column], str):
            kind = type(obj[self.column]).__name__
            self.bad(line, f"column {self.column!r} is {kind}, not a string", raw)
        else:
            params = {k: obj[k] for k in ROW_COLUMNS if obj.get(k) is not None}
            self.rows.append(
                {
                    "prompt": obj[self.column],
                    "params": json.dumps(params),
                    "source": self.path,
                    "line": line,
                    "reason": None,
                    "raw": None,
                }
            )

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=PROMPT_SCHEMA)


def read_prompt_file(path: str, column: str) -> pa.Table:
    """Every row of one prompts file, good (prompt + params) or quarantined (reason + raw),
    parsed by the data stage's table reader (data.readers.table_records)."""
    rows = _PromptRows(path, column)
    try:
        data = read_bytes(path)
    except OSError as e:
        rows.bad(-1, f"cannot read file: {e}")
        return rows.table()
    fmt = "parquet" if path.endswith(".parquet") else "json"
    for line, value, problem, raw in table_records(path, data, fmt, [column, *ROW_COLUMNS]):
        if problem:
            rows.bad(line, problem, raw)
        else:
            rows.record(line, value, raw)
    return rows.table()


def read_prompt_files(batch: pa.Table, column: str) -> Iterator[pa.Table]:
    """Ray Data batch fn (tasks): file descriptors -> prompt rows (good and quarantined)."""
    for path in batch.column("path").to_pylist():
        yield read_prompt_file(path, column)


# ---------------------------------------------------------------- generation


class GenerateUDF:
    """Ray Data callable: one engine per actor; each batch is submitted at once so its rows (and
    the rows of the next call) share the engine's continuous batch."""

    def __init__(self, model_dir: str, cfg: dict, progress=None):
        import torch

        self.cfg, self.board = GenerateConfig(**cfg), progress
        threads = cpu_threads(self.cfg.num_cpus, self.cfg.num_gpus)
        if threads:
            torch.set_num_threads(threads)
        self.engine, self.choice = load_engine(
            model_dir,
            engine=self.cfg.engine,
            device=usable_device(placed_device("auto", self.cfg.num_gpus), "generate actor"),
            dtype=self.cfg.dtype,
            max_batch_size=self.cfg.max_batch_size,
            max_model_len=self.cfg.max_model_len,
            vllm=self.cfg.vllm.model_dump(),
            own_cores=True,
            adapters=self.cfg.adapters,
            max_loras=self.cfg.max_loras,
            max_lora_rank=self.cfg.max_lora_rank,
        )
        log.info("batch generation engine: %s (%s)", self.choice.name, self.choice.reason)

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        pending, out = [], []
        for row in batch.to_pylist():
            record = {
                "prompt": row["prompt"],
                "completion": "",
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "finish_reason": None,
                "latency_s": 0.0,
                "error": None,
                "source": row.get("source"),
                "line": row.get("line"),
                "adapter": None,
            }
            out.append(record)
            try:
                if not isinstance(row["prompt"], str):
                    raise InvalidParamError("prompt must be a string", "prompt")
                columns = json.loads(row.get("params") or "{}")
                adapter = columns.pop("adapter", None)
                if adapter is not None and not isinstance(adapter, str):
                    raise InvalidParamError(f"adapter must be a name, got {adapter!r}", "adapter")
                record["adapter"] = adapter
                params = row_params(columns, self.cfg)
                try:
                    req = self.engine.submit(row["prompt"], params, adapter=adapter)
                except AdaptersBusyError:  # every adapter slot is held by this batch's rows
                    self._finish(pending, started)
                    req = self.engine.submit(row["prompt"], params, adapter=adapter)
                pending.append((record, req))
            except (InvalidParamError, TypeError, ValueError) as e:
                record["error"] = f"{type(e).__name__}: {e}"
        self._finish(pending, started)
        errors = sum(r["error"] is not None for r in out)
        post(self.board, {"rows": len(out), "errors": errors})
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    @staticmethod
    def _finish(pending: list, started: float) -> None:
        """Wait for the submitted rows and record their results (or errors); empties it."""
        for record, req in pending:
            try:
                result = req.result()
            except Exception as e:  # noqa: BLE001 - a failed row is recorded, never fatal
                record["error"] = f"{type(e).__name__}: {e}"
                continue
            record.update(
                completion=result.text,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                finish_reason=result.finish_reason,
                latency_s=(req.finished_at or started) - req.submitted_at,
            )
        pending.clear()


def preflight(cfg: GenerateConfig, model_dir: str) -> None:
    """Fail before Ray starts on missing inputs or a model directory that is not a model."""
    from aigc_ray.model import check_model_dir

    if not cfg.inputs:
        raise GenerateError("generate.inputs is empty: give jsonl/parquet files of prompts")
    for path in cfg.inputs:
        if not is_uri(path):
            prompt_files([path])
    check_model_dir(model_dir)


def _reason_is(null: bool):
    def keep(t: pa.Table) -> pa.Table:
        return t.filter(pc.is_null(t["reason"]) if null else pc.is_valid(t["reason"]))

    return keep


def read_prompts(inputs: list[str], column: str, quarantine_dir: str):
    """(dataset of readable prompt rows, count of unreadable rows): Ray Data reads the prompt
    files row by row; unreadable rows are written to ``quarantine_dir`` (file, line, reason)."""
    import ray.data

    read = (
        ray.data.from_items(prompt_files(inputs))
        .map_batches(
            read_prompt_files,
            fn_kwargs={"column": column},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=0.25,
        )
        .materialize()
    )
    # A quarter CPU: a full-CPU filter task never scheduled beside Serve replicas and an actor
    # pool on 2 CPUs.
    bad = read.map_batches(
        _reason_is(null=False), batch_format="pyarrow", num_cpus=0.25
    ).materialize()
    quarantined = bad.count()
    if quarantined:
        bad.drop_columns(["prompt", "params"]).write_parquet(
            quarantine_dir, filesystem=writer_filesystem(quarantine_dir)
        )
    good = read.map_batches(
        _reason_is(null=True), batch_format="pyarrow", num_cpus=0.25
    ).materialize()  # prompts only (small): counted without running anything again
    return good, quarantined


def show_generated(progress: Progress, batch: dict) -> None:
    """One generated batch (rows, errors) on the driver's progress line (text or images)."""
    now = time.monotonic()
    errors = progress.fields.get("errors", 0) + batch["errors"]
    done = progress.done + batch["rows"]
    rate = done / max(now - progress.started, 1e-9)
    progress.update(done, {"rows/s": round(rate, 1), "errors": errors}, now=now)


def run_generate(cfg: GenerateConfig, model_dir: str) -> dict:
    """Generate for every readable row of cfg.inputs into cfg.output_dir (unreadable rows into
    the quarantine directory); return a summary."""
    from ray.data import ActorPoolStrategy

    preflight(cfg, model_dir)
    t0 = time.perf_counter()
    quarantine_dir = cfg.quarantine_dir or f"{cfg.output_dir.rstrip('/')}_quarantine"
    good, quarantined = read_prompts(cfg.inputs, cfg.prompt_column, quarantine_dir)
    resources = {"num_cpus": cfg.num_cpus}
    if cfg.num_gpus:
        resources["num_gpus"] = cfg.num_gpus  # one model copy per GPU share
    # Exact-size blocks: reads cut files into uneven blocks, and each block's remainder would
    # become an underfull batch (measured: 11-row batches between the 32-row ones).
    total = good.count()
    good = good.repartition(target_num_rows_per_block=cfg.batch_size, strict=True)
    with Watch(Progress("generate", total, "rows"), show_generated) as watch:
        out = good.map_batches(
            GenerateUDF,
            fn_constructor_kwargs={
                "model_dir": portable_location(model_dir),
                "cfg": cfg.model_dump(),
                "progress": watch.board,
            },
            # Two calls in flight per actor (threads): the next batch's rows wait in the engine
            # and join its continuous batch as rows of the current one finish.
            compute=ActorPoolStrategy(
                size=cfg.num_actors,
                max_concurrent_calls_per_actor=2,
                enable_true_multi_threading=True,
            ),
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            **resources,
        ).materialize()
    out.write_parquet(cfg.output_dir, filesystem=writer_filesystem(cfg.output_dir))
    rows = errors = tokens = 0  # summed block by block: the output never gathers on the driver
    for block in out.iter_batches(batch_format="pyarrow", batch_size=None):
        rows += block.num_rows
        errors += block.num_rows - block.column("error").null_count
        tokens += pc.sum(block.column("completion_tokens")).as_py() or 0
    seconds = time.perf_counter() - t0
    return {
        "rows": rows,
        "errors": errors,
        "quarantined": quarantined,
        "completion_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "output_dir": cfg.output_dir,
        "quarantine_dir": quarantine_dir if quarantined else None,
    }
