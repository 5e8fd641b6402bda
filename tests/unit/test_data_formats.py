"""Readers with quarantine, quality filters and SFT formatting: pure functions, no Ray."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aigc_ray.data.formats import (
    IGNORE,
    FormatError,
    default_pieces,
    encode_pieces,
    parse_messages,
)
from aigc_ray.data.pack import TokenizePackUDF, pad_examples
from aigc_ray.data.quality import QualityRules, build_filters, first_failure, repeated_line_fraction
from aigc_ray.data.readers import DataError, InputFile, read_file_rows


def _rows(path, fmt, column="text", mode="file", strict=False):
    f = InputFile(str(path), fmt, path.stat().st_size, 3)
    return pa.concat_tables(list(read_file_rows(f, column, mode, strict))).to_pylist()


def test_jsonl_bad_lines_are_quarantined_with_line_numbers(tmp_path):
    p = tmp_path / "x.jsonl"
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "broken',  # malformed JSON
        json.dumps({"other": 1}).encode(),  # missing column
        b'{"text": "bad \xff byte"}',  # non-UTF-8
        json.dumps({"text": 5}).encode(),  # wrong type
        b"",
        json.dumps({"text": "good two"}).encode(),
    ]
    p.write_bytes(b"\n".join(lines))
    rows = _rows(p, "json")
    good = [r for r in rows if r["reason"] is None]
    bad = {r["line"]: r["reason"] for r in rows if r["reason"]}
    assert [r["text"] for r in good] == ["good one", "good two"]
    assert [r["line"] for r in good] == [1, 7]
    assert sorted(bad) == [2, 3, 4, 5]
    assert "malformed JSON" in bad[2] and "missing column" in bad[3]
    assert "UTF-8" in bad[4] and "not a string" in bad[5]
    assert all(r["source"] == str(p) for r in rows)
    assert good[0]["order"] == (3 << 32) | 1


def test_strict_mode_names_file_and_line(tmp_path):
    p = tmp_path / "y.jsonl"
    p.write_text('{"text": "ok"}\n{nope\n')
    with pytest.raises(DataError, match=rf"{p}:2: malformed JSON"):
        _rows(p, "json", strict=True)


def test_corrupt_parquet_and_csv_and_text_modes(tmp_path):
    bad = tmp_path / "c.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    rows = _rows(bad, "parquet")
    assert len(rows) == 1 and "unreadable parquet" in rows[0]["reason"]
    good = tmp_path / "g.parquet"
    pq.write_table(pa.table({"text": ["a", None, "b"]}), good)
    rows = _rows(good, "parquet")
    assert [r["text"] for r in rows if not r["reason"]] == ["a", "b"]
    assert [r["line"] for r in rows if r["reason"]] == [1]
    csv = tmp_path / "d.csv"
    csv.write_text('id,text\n1,"hello, world"\n2,second\n')
    assert [r["text"] for r in _rows(csv, "csv")] == ["hello, world", "second"]
    txt = tmp_path / "e.txt"
    txt.write_bytes(b"line one\n\nline \xfe two\nline three")
    rows = _rows(txt, "text", mode="line")
    assert [r["text"] for r in rows if not r["reason"]] == ["line one", "line three"]
    assert [r["line"] for r in rows if r["reason"]] == [3]


def test_quality_filters_count_first_failure():
    rules = QualityRules(
        min_chars=5,
        max_chars=100,
        max_line_length=20,
        min_alnum_fraction=0.5,
        max_repeated_line_fraction=0.3,
        blocklist=("lorem ipsum",),
    )
    f = build_filters(rules)
    assert first_failure("abc", f) == "min_chars"
    assert first_failure("x" * 101, f) == "max_chars"
    assert first_failure("short\n" + "y" * 30, f) == "max_line_length"
    assert first_failure("!!! ??? ### $$$", f) == "min_alnum_fraction"
    assert first_failure("same\nsame\nsame\nother", f) == "max_repeated_line_fraction"
    assert first_failure("lorem ipsum dolor", f) == "blocklist"
    assert first_failure("a fine document", f) is None
    assert repeated_line_fraction("a\nb\na\na") == 0.5


def test_sft_labels_mask_everything_but_assistant_content():
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    pieces = default_pieces(parse_messages(json.dumps(msgs)), "<eos>")
    ids, labels = encode_pieces(pieces, lambda t: [ord(c) for c in t])
    learned = "".join(chr(i) for i, lab in zip(ids, labels, strict=True) if lab != IGNORE)
    assert learned == "hello<eos>"
    assert len(ids) == len(labels)
    with pytest.raises(FormatError):
        parse_messages([{"role": "user", "content": "no answer"}])
    with pytest.raises(FormatError):
        parse_messages([{"role": "robot", "content": "x"}])


def test_sft_pad_mode_truncates_and_pads():
    ids, labels, truncated = pad_examples(
        [[1, 2, 3], [4, 5, 6, 7, 8]], [[-100, 2, 3], [4, 5, 6, 7, 8]], 4, 0
    )
    assert ids.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    assert labels.tolist() == [[-100, 2, 3, -100], [4, 5, 6, 7]]
    assert truncated == 1


def test_tokenize_udf_sft_pack_keeps_labels_aligned(tiny_tokenizer):
    msgs = [{"role": "user", "content": "add 2 and 2"}, {"role": "assistant", "content": "4"}]
    udf = TokenizePackUDF(
        tiny_tokenizer.backend_tokenizer.to_str(),
        tiny_tokenizer.eos_token,
        tiny_tokenizer.pad_token,
        16,
        0.0,
        0,
        fmt="sft",
    )
    out = udf(pa.table({"text": [json.dumps(msgs)] * 6}))
    ids = np.concatenate([np.asarray(x, np.int64) for x in out["input_ids"].to_pylist()])
    labels = np.concatenate([np.asarray(x, np.int64) for x in out["labels"].to_pylist()])
    assert len(ids) == len(labels) == out["tokens"].to_numpy().sum()
    learned = tiny_tokenizer.decode(ids[labels != IGNORE].tolist())
    assert learned.count("4") == 6
    assert "add" not in learned


def test_json_array_files_and_id_column(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text(
        json.dumps([{"id": "a1", "text": "first"}, {"id": "a2"}, {"id": 3, "text": "third"}])
    )
    f = InputFile(str(p), "json", p.stat().st_size, 0)
    rows = pa.concat_tables(list(read_file_rows(f, "text", "file", False, "id"))).to_pylist()
    assert [(r["line"], r["text"], r["doc_id"]) for r in rows if not r["reason"]] == [
        (0, "first", "a1"),
        (2, "third", "3"),
    ]
    bad = [r for r in rows if r["reason"]]
    assert bad[0]["doc_id"] == "a2" and "missing column" in bad[0]["reason"]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "x"},')
    f = InputFile(str(broken), "json", broken.stat().st_size, 1)
    rows = pa.concat_tables(list(read_file_rows(f, "text", "file", False))).to_pylist()
    assert len(rows) == 1 and "malformed JSON array" in rows[0]["reason"]
