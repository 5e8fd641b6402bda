"""Preprocess stage (Ray Data): read -> clean -> split -> tokenize -> pack -> parquet shards.

Pure row/batch functions first (testable without Ray), then the callable-class UDF, then
`run_preprocess(cfg)` which wires them into one Ray Data pipeline.

Packing is exact: each tokenize batch packs its documents (EOS after each) into full
`seq_len` blocks and emits the leftover as one "tail" row carrying the batch's counts. The
driver concatenates all tails in order and packs them too, so across the whole corpus only
the final partial block (< seq_len tokens per split) is dropped, and it is counted.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import re
import sysconfig
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aigc_ray.config import STDLIB_SOURCE, DataConfig, write_resolved

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".text"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
SPLITS = ("train", "val")
_STDLIB_SKIP = re.compile(r"/(test|tests|idlelib|site-packages|lib2to3/tests)/")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class DataError(ValueError):
    """Bad data-stage input, with a message naming the path or key."""


@dataclass(frozen=True)
class InputFile:
    path: str
    fmt: str  # "text" | "json" | "parquet"
    size: int


# ---------------------------------------------------------------- input discovery (preflight)


def stdlib_files(include_tests: bool = False) -> list[str]:
    """The running interpreter's standard-library .py files, sorted (the embedded corpus)."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(f"{root}/**/*.py", recursive=True))
    if include_tests:
        return [f for f in files if "/site-packages/" not in f]
    return [f for f in files if not _STDLIB_SKIP.search(f)]


def _fmt_of(path: str) -> str | None:
    suffix = Path(path).suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return None


def _expand_local(spec: str) -> list[str]:
    if any(c in spec for c in "*?["):
        matches = sorted(glob.glob(spec, recursive=True))
        if not matches:
            raise DataError(f"data.inputs: no file matches {spec!r}")
        return [m for m in matches if Path(m).is_file()]
    p = Path(spec)
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if f.is_file() and _fmt_of(str(f)))
    if p.is_file():
        return [str(p)]
    raise DataError(f"data.inputs: input path does not exist: {spec}")


def resolve_inputs(cfg: DataConfig) -> list[InputFile]:
    """Expand `cfg.inputs` into files; fail fast on a missing path or an empty corpus."""
    paths: list[str] = []
    for spec in cfg.inputs:
        if spec == STDLIB_SOURCE:
            paths += stdlib_files(cfg.include_stdlib_tests)
        elif "://" in spec:
            raise DataError(
                f"data.inputs: {spec}: object-store inputs arrive with the data-stage issue"
            )
        else:
            paths += _expand_local(spec)
    files = []
    for path in paths:
        fmt = _fmt_of(path)
        if fmt is None:
            raise DataError(
                f"data.inputs: unsupported file type {path} (use jsonl/json/parquet/txt/py)"
            )
        files.append(InputFile(path, fmt, Path(path).stat().st_size))
    if not files or sum(f.size for f in files) == 0:
        raise DataError(f"data.inputs: empty corpus: no non-empty files in {cfg.inputs}")
    return files


# ---------------------------------------------------------------- pure row/batch functions


def clean_text(text: str) -> str:
    """NFC-normalize, unify line endings, drop control characters and trailing whitespace."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return text.strip("\n")


def doc_split(text: str, val_fraction: float, seed: int = 0) -> str:
    """Deterministic split of one document by hash of its text (same on every run/worker)."""
    h = hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode()
    )
    return "val" if int.from_bytes(h.digest(), "little") / 2**64 < val_fraction else "train"


def pack_tokens(docs: list[list[int]], eos_id: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents with EOS after each; return (full blocks [n, seq_len], leftover)."""
    if not docs:
        return np.zeros((0, seq_len), np.int32), np.zeros(0, np.int32)
    flat = np.fromiter(
        (t for d in docs for t in (*d, eos_id)), dtype=np.int32, count=sum(len(d) + 1 for d in docs)
    )
    n_full = len(flat) // seq_len
    return flat[: n_full * seq_len].reshape(n_full, seq_len), flat[n_full * seq_len :]


def _list_column(rows: list[np.ndarray]) -> pa.Array:
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    values = np.concatenate(rows) if rows else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


def blocks_table(blocks: np.ndarray, split: str) -> pa.Table:
    """A pyarrow table of full blocks with the output schema of the tokenize UDF."""
    n = len(blocks)
    return _output_table(list(blocks), [split] * n, [False] * n, [{}] * n)


def _output_table(ids: list, splits: list, tails: list, stats: list[dict]) -> pa.Table:
    keys = ("docs_read", "docs_kept", "tokens")
    return pa.table(
        {
            "input_ids": _list_column(ids),
            "split": pa.array(splits, pa.string()),
            "is_tail": pa.array(tails, pa.bool_()),
            **{k: pa.array([s.get(k, 0) for s in stats], pa.int64()) for k in keys},
        }
    )


# ---------------------------------------------------------------- Ray Data UDFs


def read_text_files(batch: pa.Table) -> pa.Table:
    """Ray Data batch fn: a table of paths -> a table of documents (one per file)."""
    texts, sources = [], []
    for path in batch.column("path").to_pylist():
        with open(path, "rb") as f:
            texts.append(f.read().decode("utf-8", errors="replace"))
        sources.append(path)
    return pa.table({"text": texts, "source": sources})


class TokenizePackUDF:
    """Callable-class UDF: clean, split, tokenize and pack a batch of documents.

    Output rows: full blocks (is_tail=False), plus per split one tail row holding the leftover
    tokens and the batch's counts (docs_read, docs_kept, tokens) for the manifest.
    """

    def __init__(self, tokenizer_json: str, eos_id: int, seq_len: int, val_fraction: float,
                 seed: int, min_chars: int):  # fmt: skip
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.eos_id, self.seq_len = eos_id, seq_len
        self.val_fraction, self.seed, self.min_chars = val_fraction, seed, min_chars

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [clean_text(t or "") for t in batch.column("text").to_pylist()]
        kept = [t for t in texts if len(t) >= self.min_chars]
        by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
        for t in kept:
            by_split[doc_split(t, self.val_fraction, self.seed)].append(t)
        ids, splits, tails, stats = [], [], [], []
        for split, docs in by_split.items():
            encoded = [e.ids for e in self.tok.encode_batch(docs, add_special_tokens=False)]
            full, rest = pack_tokens(encoded, self.eos_id, self.seq_len)
            ids += list(full) + [rest]
            splits += [split] * (len(full) + 1)
            tails += [False] * len(full) + [True]
            stat = {"tokens": sum(len(e) + 1 for e in encoded), "docs_kept": len(docs)}
            if split == "train":
                stat["docs_read"] = len(texts)
            stats += [{}] * len(full) + [stat]
        return _output_table(ids, splits, tails, stats)


def select_rows(batch: pa.Table, split: str, is_tail: bool) -> pa.Table:
    """Ray Data batch fn: keep the rows of one split that are (not) tails; drop bookkeeping."""
    import pyarrow.compute as pc

    mask = pc.and_(pc.equal(batch["split"], split), pc.equal(batch["is_tail"], is_tail))
    return batch.filter(mask).select(["input_ids"])


# ---------------------------------------------------------------- the stage


def _tokenizer_corpus(files: list[InputFile], text_column: str, max_bytes: float) -> Iterator[str]:
    """Documents for tokenizer training, read in the driver up to `max_bytes` of text."""
    seen = 0
    for f in files:
        for text in _read_docs_local(f, text_column):
            yield text
            seen += len(text)
            if seen >= max_bytes:
                return


def _read_docs_local(f: InputFile, text_column: str) -> Iterator[str]:
    if f.fmt == "text":
        yield Path(f.path).read_bytes().decode("utf-8", errors="replace")
    elif f.fmt == "json":
        with open(f.path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                row = json.loads(line) if line.strip() else {}
                if isinstance(row, dict) and isinstance(row.get(text_column), str):
                    yield row[text_column]
    else:
        yield from pq.read_table(f.path, columns=[text_column]).column(0).to_pylist()


def prepare_tokenizer(cfg: DataConfig, files: list[InputFile]):
    """Load the configured tokenizer, or train a byte-level BPE on the corpus; save it."""
    from aigc_ray.model import load_tokenizer, train_tokenizer

    out = Path(cfg.output_dir) / "tokenizer"
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        tok.save_pretrained(str(out))
        return tok
    corpus = _tokenizer_corpus(files, cfg.text_column, cfg.tokenizer_train_mb * 1e6)
    return train_tokenizer(corpus, cfg.vocab_size, out)


def text_only(batch: pa.Table, column: str) -> pa.Table:
    """Ray Data batch fn: normalize any input's batch to a single arrow `text` column."""
    return pa.table({"text": batch.column(column).cast(pa.string())})


def build_dataset(files: list[InputFile], cfg: DataConfig):
    """A Ray Dataset with one `text` column (arrow blocks) over every input file."""
    import ray.data

    parts = []
    text = [f.path for f in files if f.fmt == "text"]
    if text:
        ds = ray.data.from_items([{"path": p} for p in text], override_num_blocks=min(len(text), 64))
        parts.append(ds.map_batches(read_text_files, batch_format="pyarrow", batch_size=16))
    json_files = [f.path for f in files if f.fmt == "json"]
    if json_files:
        parts.append(_as_text(ray.data.read_json(json_files, lines=True), cfg.text_column))
    pq_files = [f.path for f in files if f.fmt == "parquet"]
    if pq_files:
        parts.append(_as_text(ray.data.read_parquet(pq_files, columns=[cfg.text_column]), cfg.text_column))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _as_text(ds, column: str):
    return ds.map_batches(text_only, fn_kwargs={"column": column}, batch_format="pyarrow",
                          batch_size=None)  # fmt: skip


def tokenize_pool_size(cfg: DataConfig) -> int:
    """Actor-pool size: leave one CPU for read tasks so the pool never starves its input."""
    import ray

    if cfg.num_tokenize_actors:
        return cfg.num_tokenize_actors
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(8, cpus - 1))


def _tokenized(ds, cfg: DataConfig, tok):
    from ray.data import ActorPoolStrategy

    size = tokenize_pool_size(cfg)
    return ds.map_batches(
        TokenizePackUDF,
        fn_constructor_kwargs=dict(
            tokenizer_json=tok.backend_tokenizer.to_str(),
            eos_id=tok.eos_token_id,
            seq_len=cfg.seq_len,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            min_chars=cfg.min_chars,
        ),  # fmt: skip
        compute=ActorPoolStrategy(min_size=1, max_size=size),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=1,
    )


def _write_split(packed, split: str, cfg: DataConfig, eos_id: int) -> dict:
    """Write one split's full blocks, then pack the tails in the driver and write them too."""
    out = f"{cfg.output_dir}/{split}"
    tails = packed.map_batches(select_rows, fn_kwargs={"split": split, "is_tail": True},
                               batch_format="pyarrow").take_all()  # fmt: skip
    flat = [np.asarray(r["input_ids"], np.int32) for r in tails]
    flat = np.concatenate(flat) if flat else np.zeros(0, np.int32)
    n_full = len(flat) // cfg.seq_len
    full = packed.map_batches(select_rows, fn_kwargs={"split": split, "is_tail": False},
                              batch_format="pyarrow")  # fmt: skip
    full.write_parquet(out, min_rows_per_file=cfg.shard_rows)
    if n_full:
        tail_blocks = flat[: n_full * cfg.seq_len].reshape(n_full, cfg.seq_len)
        pq.write_table(
            blocks_table(tail_blocks, split).select(["input_ids"]), f"{out}/tail-blocks.parquet"
        )
    shards = sorted(str(p) for p in Path(out).glob("*.parquet"))
    blocks = sum(pq.ParquetFile(s).metadata.num_rows for s in shards)
    return {
        "blocks": blocks,
        "shards": shards,
        "dropped_tail_tokens": int(len(flat) - n_full * cfg.seq_len),
    }


def run_preprocess(cfg: DataConfig) -> dict:
    """Run the whole data stage; write shards, tokenizer and manifest.json; return the manifest."""
    import ray.data

    t0 = time.time()
    files = resolve_inputs(cfg)
    if cfg.max_docs and all(f.fmt == "text" for f in files):
        files = files[: cfg.max_docs]
    out = Path(cfg.output_dir)
    for split in SPLITS:  # a re-run replaces the previous shards instead of mixing with them
        for old in (out / split).glob("*.parquet"):
            old.unlink()
    tok = prepare_tokenizer(cfg, files)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = build_dataset(files, cfg)
    if cfg.max_docs:
        ds = ds.limit(cfg.max_docs)
    packed = _tokenized(ds, cfg, tok).materialize()
    stats = packed.map_batches(lambda b: b.filter(b["is_tail"]).drop(["input_ids"]),
                               batch_format="pyarrow").to_pandas()  # fmt: skip
    manifest = {
        "inputs": [f.path for f in files][:50] + (["..."] if len(files) > 50 else []),
        "input_files": len(files),
        "input_bytes": sum(f.size for f in files),
        "docs_read": int(stats["docs_read"].sum()),
        "docs_kept": int(stats["docs_kept"].sum()),
        "tokens": int(stats["tokens"].sum()),
        "seq_len": cfg.seq_len,
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "tokenizer_dir": str(out / "tokenizer"),
        "splits": {s: _write_split(packed, s, cfg, tok.eos_token_id) for s in SPLITS},
    }
    manifest["tokens_per_split"] = {
        s: int(stats[stats["split"] == s]["tokens"].sum()) for s in SPLITS
    }
    manifest["seconds"] = round(time.time() - t0, 2)
    manifest["config"] = cfg.model_dump(mode="json")
    write_resolved(cfg, out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(data_dir: str | Path) -> dict:
    """Load a shard directory's manifest.json, with a clear error when it is missing."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(
            f"no manifest.json in {data_dir}: run `aigc-ray preprocess` first or set train.data_dir"
        )
    return json.loads(path.read_text())
