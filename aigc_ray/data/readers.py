"""Input discovery and fault-tolerant readers (local paths and object-store URIs).

Every input row becomes either a document (`text` set, `reason` null) or a quarantine row
(`reason` set) carrying its source file and line/row number. Nothing is dropped silently:
malformed JSON, non-UTF-8 bytes, a missing text column, an unreadable parquet file each
become quarantine rows; in strict mode the first one raises DataError naming file and line.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from aigc_ray.config import STDLIB_SOURCE, DataConfig
from aigc_ray.errors import AigcRayError, StorageError
from aigc_ray.storage import is_uri, list_files, read_bytes

TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".text"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
CSV_SUFFIXES = {".csv", ".tsv"}
_STDLIB_SKIP = re.compile(r"/(test|tests|idlelib|site-packages)/")
ROW_BATCH = 4096  # rows per yielded block: large files stream instead of making one huge block


class DataError(AigcRayError, ValueError):
    """Bad data-stage input, with a message naming the path, line or key."""


@dataclass(frozen=True)
class InputFile:
    path: str  # local path or URI
    fmt: str  # "text" | "json" | "parquet" | "csv"
    size: int
    index: int = 0  # position in the sorted input list: the high bits of each row's order key


# ---------------------------------------------------------------- discovery


def stdlib_files(include_tests: bool = False) -> list[str]:
    """The running interpreter's standard-library .py files, sorted (the embedded corpus)."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(f"{root}/**/*.py", recursive=True))
    if include_tests:
        return [f for f in files if "/site-packages/" not in f]
    return [f for f in files if not _STDLIB_SKIP.search(f)]


def file_format(path: str) -> str | None:
    suffix = Path(path.split("?")[0]).suffix.lower()
    for fmt, suffixes in (
        ("text", TEXT_SUFFIXES),
        ("json", JSON_SUFFIXES),
        ("parquet", PARQUET_SUFFIXES),
        ("csv", CSV_SUFFIXES),
    ):
        if suffix in suffixes:
            return fmt
    return None


def _expand_uri(spec: str) -> list[tuple[str, int]]:
    try:
        found = list_files(spec, keep=lambda p: file_format(p) is not None)
    except StorageError as e:
        raise DataError(f"data.inputs: {e}") from None
    if not found:
        raise DataError(f"data.inputs: no readable file (jsonl/json/parquet/csv/txt) under {spec}")
    return found


def resolve_inputs(cfg: DataConfig) -> list[InputFile]:
    """Expand `cfg.inputs` into files; fail fast on a missing path or an empty corpus."""
    found: list[tuple[str, int]] = []
    for spec in cfg.inputs:
        if spec == STDLIB_SOURCE:
            found += [(p, Path(p).stat().st_size) for p in stdlib_files(cfg.include_stdlib_tests)]
        elif not is_uri(spec) and any(c in spec for c in "*?["):
            matches = sorted(m for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"data.inputs: no file matches {spec!r}")
            found += [(m, Path(m).stat().st_size) for m in matches]
        else:
            found += _expand_uri(spec)
    files = []
    for path, size in found:
        fmt = file_format(path)
        if fmt is None:
            raise DataError(
                f"data.inputs: unsupported file type {path} (use jsonl/json/parquet/csv/txt/py)"
            )
        files.append(InputFile(path, fmt, size, len(files)))
    if not files or sum(f.size for f in files) == 0:
        raise DataError(f"data.inputs: empty corpus: no non-empty files in {cfg.inputs}")
    return files


# ---------------------------------------------------------------- row builders


class _Rows:
    """Accumulates output rows of the reader schema and flushes them as arrow tables."""

    def __init__(self, f: InputFile, strict: bool, id_column: str | None = None):
        self.f, self.strict, self.id_column = f, strict, id_column
        self.cols: dict[str, list] = {
            k: [] for k in ("text", "source", "line", "order", "reason", "raw", "doc_id")
        }
        self.doc_id = None  # the current row's id (from id_column), set by the parser

    def good(self, line: int, text: str) -> None:
        self._add(line, text, None, None)

    def bad(self, line: int, reason: str, raw: str | bytes = "") -> None:
        where = f"{self.f.path}:{line}" if line >= 0 else self.f.path
        if self.strict:
            raise DataError(
                f"{where}: {reason} (set data.strict=false to quarantine bad rows instead)"
            )
        if isinstance(raw, bytes):
            raw = raw[:2000].decode("utf-8", "backslashreplace")
        self._add(line, None, reason, raw[:2000])

    def _add(self, line, text, reason, raw) -> None:
        c = self.cols
        c["text"].append(text)
        c["source"].append(self.f.path)
        c["line"].append(line)
        c["order"].append((self.f.index << 32) | max(line, 0))
        c["reason"].append(reason)
        c["raw"].append(raw)
        c["doc_id"].append(None if self.doc_id is None else str(self.doc_id))
        self.doc_id = None

    def __len__(self) -> int:
        return len(self.cols["text"])

    def flush(self) -> pa.Table:
        t = pa.table(
            {
                "text": pa.array(self.cols["text"], pa.string()),
                "source": pa.array(self.cols["source"], pa.string()),
                "line": pa.array(self.cols["line"], pa.int64()),
                "order": pa.array(self.cols["order"], pa.int64()),
                "reason": pa.array(self.cols["reason"], pa.string()),
                "raw": pa.array(self.cols["raw"], pa.string()),
                "doc_id": pa.array(self.cols["doc_id"], pa.string()),
            }
        )
        self.cols = {k: [] for k in self.cols}
        return t


def _decode(data: bytes) -> tuple[str | None, str | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start}"


def _read_bytes(path: str) -> bytes:
    return read_bytes(path)


def _text_rows(f: InputFile, data: bytes, rows: _Rows, per_line: bool) -> Iterator[None]:
    chunks = data.split(b"\n") if per_line else [data]
    for i, chunk in enumerate(chunks, start=1):
        text, err = _decode(chunk)
        if err:
            rows.bad(i if per_line else -1, err, chunk)
        elif not per_line or text.strip():
            rows.good(i if per_line else 0, text)
        yield


# ---------------------------------------------------------------- table records
# The one parser of table files with per-row faults, used by the text data stage (here), batch
# generation's prompt files (generate.py) and the image tables (images/data.py). Each caller
# applies its own column rules to the records and quarantines what it cannot use.


def table_records(
    path: str, data: bytes, fmt: str | None = None, columns: list[str] | None = None
) -> Iterator[tuple[int, object, str | None, str | bytes]]:
    """Every row of one table file as (line, value, problem, raw).

    Formats: json (JSON lines, or one array in a .json file), csv/tsv, parquet (`fmt`, or from
    the suffix). `value` is the parsed row (any JSON value; a dict for csv and parquet), or
    None with `problem` saying why the row cannot be read: invalid UTF-8, malformed JSON, an
    unreadable parquet file. Line -1 is the whole file. Rows are numbered as a user finds them:
    1-based lines of JSON lines and csv, 0-based indices of a JSON array and of parquet rows.
    `columns` (parquet, csv): the first is required (a file without it is one problem row);
    parquet reads only these, the others where present; None reads every column."""
    fmt = fmt or file_format(path)
    if fmt == "parquet":
        yield from _parquet_records(data, columns)
    elif fmt == "csv":
        yield from _csv_records(path, data, columns)
    elif path.endswith(".json") and data.lstrip()[:1] == b"[":
        yield from _json_array_records(data)
    else:
        yield from _json_line_records(data)


def _json_line_records(data: bytes):
    for i, chunk in enumerate(data.split(b"\n"), start=1):
        if not chunk.strip():
            continue
        text, err = _decode(chunk)
        if err:
            yield i, None, err, chunk
            continue
        try:
            yield i, json.loads(text), None, text
        except json.JSONDecodeError as e:
            yield i, None, f"malformed JSON: {e.msg} at column {e.colno}", text


def _json_array_records(data: bytes):
    """A .json file holding one array of objects; row numbers are array indices."""
    text, err = _decode(data)
    try:
        items = json.loads(text) if text is not None else None
    except json.JSONDecodeError as e:
        err = f"malformed JSON array: {e.msg} at line {e.lineno} column {e.colno}"
    if err:
        yield -1, None, err, data[:200]
        return
    for i, obj in enumerate(items):
        yield i, obj, None, json.dumps(obj)[:2000]


def _csv_records(path: str, data: bytes, columns: list[str] | None):
    text, err = _decode(data)
    if err:
        yield -1, None, err, data[:200]
        return
    delimiter = "\t" if path.endswith(".tsv") else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if columns and (reader.fieldnames is None or columns[0] not in reader.fieldnames):
        yield -1, None, f"missing column {columns[0]!r} (header: {reader.fieldnames})", ""
        return
    for row in reader:
        yield reader.line_num, row, None, json.dumps(row)


def _parquet_records(data: bytes, columns: list[str] | None):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(io.BytesIO(data))
        names = pf.schema_arrow.names
        if columns and columns[0] not in names:
            yield -1, None, f"missing column {columns[0]!r} (columns: {names})", ""
            return
        read = list(dict.fromkeys(c for c in columns if c in names)) if columns else None
        base = 0
        for batch in pf.iter_batches(columns=read, batch_size=ROW_BATCH):
            for i, row in enumerate(batch.to_pylist()):
                yield base + i, row, None, json.dumps(row, default=str)[:2000]
            base += batch.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        yield -1, None, f"unreadable parquet file: {e}", ""


def _table_rows(f: InputFile, data: bytes, rows: _Rows, column: str) -> Iterator[None]:
    """The text stage's rule for table rows: `column` holds the document (a string, or chat
    messages kept as JSON for the SFT formatter); `id_column` its id."""
    columns = [column, rows.id_column] if rows.id_column else [column]
    for line, value, problem, raw in table_records(f.path, data, f.fmt, columns):
        if problem:
            rows.bad(line, problem, raw)
        elif f.fmt == "parquet":
            rows.doc_id = value.get(rows.id_column) if rows.id_column else None
            _parquet_value(rows, line, value[column], column)
        elif f.fmt == "csv":
            rows.doc_id = value.get(rows.id_column) if rows.id_column else None
            if value.get(column) is None:
                rows.bad(line, f"row has no value for column {column!r}", raw)
            else:
                rows.good(line, value[column])
        else:
            _record(rows, line, value, column, raw)
        yield


def _record(rows: _Rows, i: int, obj, column: str, raw: str) -> None:
    if isinstance(obj, dict) and rows.id_column:
        rows.doc_id = obj.get(rows.id_column)
    if not isinstance(obj, dict):
        rows.bad(i, f"expected a JSON object, got {type(obj).__name__}", raw)
    elif column not in obj or obj[column] is None:
        rows.bad(i, f"missing column {column!r}", raw)
    elif isinstance(obj[column], list):  # chat messages are kept as JSON for the SFT formatter
        rows.good(i, json.dumps(obj[column], ensure_ascii=False))
    elif not isinstance(obj[column], str):
        rows.bad(i, f"column {column!r} is {type(obj[column]).__name__}, not a string", raw)
    else:
        rows.good(i, obj[column])


def _parquet_value(rows: _Rows, i: int, value, column: str) -> None:
    if value is None:
        rows.bad(i, f"null {column!r}")
    elif isinstance(value, list):
        rows.good(i, json.dumps(value, ensure_ascii=False))
    elif not isinstance(value, str):
        rows.bad(i, f"column {column!r} is {type(value).__name__}, not a string", str(value))
    else:
        rows.good(i, value)


def read_file_rows(
    f: InputFile, cfg_column: str, text_mode: str, strict: bool, id_column: str | None = None
) -> Iterator[pa.Table]:
    """Stream one file as reader-schema tables of at most ROW_BATCH rows."""
    rows = _Rows(f, strict, id_column)
    try:
        data = _read_bytes(f.path)
    except OSError as e:
        rows.bad(-1, f"cannot read file: {e}")
        yield rows.flush()
        return
    if f.fmt == "text":
        gen = _text_rows(f, data, rows, text_mode == "line")
    else:
        gen = _table_rows(f, data, rows, cfg_column)
    for _ in gen:
        if len(rows) >= ROW_BATCH:
            yield rows.flush()
    if len(rows):
        yield rows.flush()


def read_files(
    batch: pa.Table, column: str, text_mode: str, strict: bool, id_column: str | None = None
) -> Iterator[pa.Table]:
    """Ray Data batch fn (tasks): file descriptors -> a stream of reader-schema tables."""
    for d in batch.to_pylist():
        f = InputFile(d["path"], d["fmt"], d["size"], d["index"])
        yield from read_file_rows(f, column, text_mode, strict, id_column)
