"""Data stage (Ray Data): read -> clean/redact -> deduplicate -> tokenize -> pack -> parquet shards.

Modules: readers (discovery, fault-tolerant parsing, quarantine rows), quality (cleaning and
filters), pii (PII and secret redaction), dedup (exact hash, MinHash + LSH), formats (SFT chat
rendering and label masks), pack (tokenize/pack UDF), stage (the Ray Data wiring and the manifest).
"""

from aigc_ray.data.dedup import MinHashParams, exact_duplicates, near_duplicates, true_jaccard
from aigc_ray.data.pack import SPLITS, TokenizePackUDF, pack_tokens, pad_examples
from aigc_ray.data.quality import clean_text, doc_split
from aigc_ray.data.readers import DataError, InputFile, resolve_inputs, stdlib_files
from aigc_ray.data.stage import format_report, read_manifest, run_preprocess, tokenize_pool_size

__all__ = [
    "SPLITS",
    "DataError",
    "InputFile",
    "MinHashParams",
    "TokenizePackUDF",
    "clean_text",
    "doc_split",
    "exact_duplicates",
    "format_report",
    "near_duplicates",
    "pack_tokens",
    "pad_examples",
    "read_manifest",
    "resolve_inputs",
    "run_preprocess",
    "stdlib_files",
    "tokenize_pool_size",
    "true_jaccard",
]
