"""Unit tests for aigc_ray.data's pure functions and the tokenize UDF (no Ray)."""

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aigc_ray.config import DataConfig
from aigc_ray.data import (
    DataError,
    InputFile,
    TokenizePackUDF,
    clean_text,
    doc_split,
    pack_tokens,
    read_manifest,
    resolve_inputs,
    stdlib_files,
)
from aigc_ray.data.pack import list_column, split_blocks
from aigc_ray.data.quality import QualityRules
from aigc_ray.data.readers import read_file_rows
from aigc_ray.data.stage import _counts, clean_batch, keep_rows, select_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------- clean_text


def test_clean_text_nfc():
    assert clean_text("e\u0301") == "\u00e9"
    assert len(clean_text("cafe\u0301")) == 4


def test_clean_text_line_endings():
    assert clean_text("a\r\nb\rc\n") == "a\nb\nc"


def test_clean_text_drops_control_characters_but_keeps_tabs_and_newlines():
    assert clean_text("a\x00b\x07c\x1bd\x7fe") == "abcde"
    assert clean_text("x\ty\nz") == "x\ty\nz"


def test_clean_text_trailing_whitespace_and_blank_edges():
    assert clean_text("\n\ndef f():   \n    return 1\t \n\n") == "def f():\n    return 1"
    # leading indentation is preserved
    assert clean_text("    x") == "    x"


def test_clean_text_idempotent():
    s = "  a\r\n\x00b  \n\u0041\u030a"
    assert clean_text(clean_text(s)) == clean_text(s)


# ---------------------------------------------------------------- doc_split


@pytest.fixture(scope="module")
def synthetic_docs():
    rng = random.Random(1)
    return [f"doc {i} " + "".join(rng.choices("abcdef ", k=20)) for i in range(2000)]


def test_doc_split_is_deterministic(synthetic_docs):
    a = [doc_split(d, 0.1, seed=0) for d in synthetic_docs]
    b = [doc_split(d, 0.1, seed=0) for d in synthetic_docs]
    assert a == b
    assert set(a) == {"train", "val"}


def test_doc_split_fraction_is_respected(synthetic_docs):
    for frac in (0.1, 0.3):
        n_val = sum(doc_split(d, frac) == "val" for d in synthetic_docs)
        assert abs(n_val / len(synthetic_docs) - frac) < 0.03


def test_doc_split_edges(synthetic_docs):
    assert all(doc_split(d, 0.0) == "train" for d in synthetic_docs[:200])
    assert all(doc_split(d, 0.9999999) == "val" for d in synthetic_docs[:200])


def test_doc_split_seed_changes_assignment(synthetic_docs):
    a = [doc_split(d, 0.1, seed=0) for d in synthetic_docs]
    b = [doc_split(d, 0.1, seed=1) for d in synthetic_docs]
    assert a != b
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 50


def test_doc_split_handles_lone_surrogates():
    assert doc_split("bad \ud800 text", 0.5) in ("train", "val")


# ---------------------------------------------------------------- pack_tokens


def test_pack_tokens_exact():
    docs = [[1, 2, 3], [4], [], [5, 6, 7, 8, 9]]
    eos = 0
    full, rest = pack_tokens(docs, eos, 4)
    flat = [1, 2, 3, 0, 4, 0, 0, 5, 6, 7, 8, 9, 0]
    assert full.shape == (3, 4)
    assert full.dtype == np.int32
    assert full.flatten().tolist() == flat[:12]
    assert rest.tolist() == flat[12:]


def test_pack_tokens_exact_multiple_has_no_leftover():
    full, rest = pack_tokens([[1, 2, 3], [4, 5, 6]], 9, 4)
    assert full.tolist() == [[1, 2, 3, 9], [4, 5, 6, 9]]
    assert rest.size == 0


def test_pack_tokens_short_input_is_all_leftover():
    full, rest = pack_tokens([[7, 7]], 1, 16)
    assert full.shape == (0, 16)
    assert rest.tolist() == [7, 7, 1]


def test_pack_tokens_empty():
    full, rest = pack_tokens([], 0, 8)
    assert full.shape == (0, 8)
    assert rest.shape == (0,)


def test_pack_tokens_random_preserves_every_token():
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 500, rng.integers(0, 50)).tolist() for _ in range(100)]
    full, rest = pack_tokens(docs, 1, 32)
    expected = [t for d in docs for t in (*d, 1)]
    assert full.shape[1] == 32
    assert len(rest) < 32
    assert np.concatenate([full.ravel(), rest]).tolist() == expected


def test_split_blocks():
    full, rest = split_blocks(np.arange(10, dtype=np.int32), 4)
    assert full.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rest.tolist() == [8, 9]


def test_list_column_variable_lengths():
    col = list_column([np.array([1, 2], np.int32), np.zeros(0, np.int32), np.array([3], np.int64)])
    assert col.type == pa.list_(pa.int32())
    assert col.to_pylist() == [[1, 2], [], [3]]
    assert list_column([]).to_pylist() == []


# ------------------------------------------------------- readers: documents or quarantine rows


def only(cfg_inputs: list[str]) -> InputFile:
    (f,) = resolve_inputs(DataConfig(inputs=cfg_inputs))
    return f


def read_all(f: InputFile, column: str = "text", text_mode: str = "file", strict: bool = False):
    tables = list(read_file_rows(f, column, text_mode, strict))
    return pa.concat_tables(tables).to_pydict() if tables else {}


def test_read_jsonl_quarantines_bad_lines_with_file_and_line(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text(
        '{"text": "a"}\n{"text": broken\n\n[1, 2]\n{"other": 1}\n{"text": 5}\n{"text": "f"}\n'
    )
    rows = read_all(only([str(p)]))
    assert rows["text"] == ["a", None, None, None, None, "f"]
    assert rows["line"] == [1, 2, 4, 5, 6, 7]  # the blank line 3 is not a row
    assert set(rows["source"]) == {str(p)}
    reasons = rows["reason"]
    assert reasons[0] is None and reasons[-1] is None
    assert "malformed JSON" in reasons[1]
    assert "JSON object" in reasons[2]
    assert "missing column 'text'" in reasons[3]
    assert "not a string" in reasons[4]
    assert rows["raw"][1] == '{"text": broken'
    assert rows["order"] == sorted(rows["order"])


def test_read_jsonl_strict_names_file_and_line(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text('{"text": "a"}\n{"text": broken\n')
    with pytest.raises(DataError) as ei:
        read_all(only([str(p)]), strict=True)
    assert f"{p}:2" in str(ei.value)
    assert "data.strict" in str(ei.value)


def test_read_text_lines_and_invalid_utf8(tmp_path):
    p = tmp_path / "lines.txt"
    p.write_bytes(b"first\n\nthird \xff\nfourth\n")
    rows = read_all(only([str(p)]), text_mode="line")
    assert rows["line"] == [1, 3, 4]
    assert rows["text"] == ["first", None, "fourth"]
    assert "invalid UTF-8" in rows["reason"][1]
    whole = read_all(only([str(tmp_path / "lines.txt")]), text_mode="file")
    assert len(whole["text"]) == 1 and whole["text"][0] is None  # one bad file, one bad row


def test_read_parquet_column(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["x", None, "z"]}), p)
    rows = read_all(only([str(p)]), column="body")
    assert rows["text"] == ["x", None, "z"]
    assert "null" in rows["reason"][1]
    missing = read_all(only([str(p)]), column="text")
    assert "missing column 'text'" in missing["reason"][0]


# ------------------------------------------------- clean -> keep -> tokenize/pack (no Ray)


SEQ_LEN = 32
VAL = 0.3


def make_udf(tok) -> TokenizePackUDF:
    return TokenizePackUDF(
        tokenizer_json=tok.backend_tokenizer.to_str(),
        eos_token=tok.eos_token,
        pad_token=tok.pad_token,
        seq_len=SEQ_LEN,
        val_fraction=VAL,
        seed=0,
    )


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, corpus_docs):
    """20 real documents, one CRLF document, an empty, a whitespace-only and a too-short
    document (dropped by min_chars=3) and two malformed lines."""
    chunks = [d[i : i + 600] for d in corpus_docs for i in range(0, len(d), 600)]
    good = [c for c in chunks if len(clean_text(c)) >= 3][:20] + ["x = 1\r\ny = 2\r\n"]
    assert len(good) == 21
    lines = [json.dumps({"text": d}) for d in good[:10]]
    lines += [json.dumps({"text": ""}), json.dumps({"text": "   \n\t  "}), "{not json"]
    lines += [json.dumps({"text": d}) for d in good[10:]]
    lines += [json.dumps({"text": "ab"}), json.dumps({"body": "no text column"})]
    p = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p, [clean_text(d) for d in good]


@pytest.fixture(scope="module")
def cleaned(corpus_file):
    p, _ = corpus_file
    (table,) = list(read_file_rows(only([str(p)]), "text", "file", False))
    return clean_batch(table, QualityRules(min_chars=3), sft=False)


def test_clean_batch_statuses(cleaned, corpus_file):
    _, kept = corpus_file
    status = cleaned.column("status").to_pylist()
    assert len(status) == 26  # every input row is accounted for
    assert status.count("ok") == len(kept) == 21
    assert status.count("filtered:min_chars") == 3
    assert status.count("malformed") == 2
    ok_texts = [t for t, s in zip(cleaned["text"].to_pylist(), status, strict=True) if s == "ok"]
    assert ok_texts == kept  # cleaned (CRLF -> LF), in input order
    assert "\r" not in "".join(ok_texts)
    hashes = cleaned.column("hash").to_pylist()
    assert all(h != 0 for h, s in zip(hashes, status, strict=True) if s == "ok")
    # the manifest's accounting: read = malformed + filtered + kept
    assert _counts(cleaned) == {"docs_read": 26, "malformed": 2, "filtered": {"min_chars": 3}}
    reasons = cleaned.column("reason").to_pylist()
    assert sum(r is not None for r in reasons) == 2


def test_keep_rows_drops_filtered_malformed_and_duplicates(cleaned, corpus_file):
    _, kept = corpus_file
    assert keep_rows(cleaned, np.zeros(0, np.int64)).column("text").to_pylist() == kept
    ok_orders = [
        o
        for o, s in zip(cleaned["order"].to_pylist(), cleaned["status"].to_pylist(), strict=True)
        if s == "ok"
    ]
    out = keep_rows(cleaned, np.array(ok_orders[:2], np.int64))
    assert out.column_names == ["text"]
    assert out.column("text").to_pylist() == kept[2:]


def test_tokenize_pack_udf_preserves_every_token(cleaned, corpus_file, tiny_tokenizer):
    _, kept = corpus_file
    batch = keep_rows(cleaned, np.zeros(0, np.int64))
    out = make_udf(tiny_tokenizer)(batch).to_pydict()
    ids, splits, tails = out["input_ids"], out["split"], out["is_tail"]
    assert set(splits) == {"train", "val"}
    for row, tail in zip(ids, tails, strict=True):
        assert len(row) < SEQ_LEN if tail else len(row) == SEQ_LEN
    assert sorted(s for s, t in zip(splits, tails, strict=True) if t) == ["train", "val"]

    def enc(d):
        return tiny_tokenizer.encode(d, add_special_tokens=False)

    expected_total = sum(len(enc(d)) + 1 for d in kept)
    assert sum(len(r) for r in ids) == expected_total
    assert sum(out["tokens"]) == expected_total
    assert sum(out["docs_kept"]) == len(kept)

    eos = tiny_tokenizer.eos_token_id
    for split in ("train", "val"):
        got = [t for r, s in zip(ids, splits, strict=True) if s == split for t in r]
        docs = [d for d in kept if doc_split(d, VAL, 0) == split]
        assert docs, f"no {split} documents: pick other test data"
        assert got == [t for d in docs for t in (*enc(d), eos)]
        (stat_row,) = [
            i for i, (s, t) in enumerate(zip(splits, tails, strict=True)) if s == split and t
        ]
        assert out["docs_kept"][stat_row] == len(docs)
        assert out["tokens"][stat_row] == len(got)
    # counts live on tail rows only
    for i, tail in enumerate(tails):
        if not tail:
            assert out["docs_kept"][i] == out["tokens"][i] == 0


def test_tokenize_pack_udf_empty_batch(tiny_tokenizer):
    out = make_udf(tiny_tokenizer)(pa.table({"text": pa.array([], pa.string())})).to_pydict()
    assert out["split"] == ["train", "val"]
    assert out["is_tail"] == [True, True]
    assert out["input_ids"] == [[], []]
    assert out["tokens"] == [0, 0]


def test_select_rows_filters(cleaned, tiny_tokenizer):
    out = make_udf(tiny_tokenizer)(keep_rows(cleaned, np.zeros(0, np.int64)))
    d = out.to_pydict()
    for split in ("train", "val"):
        for tail in (True, False):
            sel = select_rows(out, split, tail, ["input_ids"])
            assert sel.column_names == ["input_ids"]
            want = [
                r
                for r, s, t in zip(d["input_ids"], d["split"], d["is_tail"], strict=True)
                if s == split and t == tail
            ]
            assert sel.column("input_ids").to_pylist() == want
    assert select_rows(out, "train", True, ["input_ids"]).num_rows == 1
    assert select_rows(out, "train", False, ["input_ids"]).num_rows > 0


# ---------------------------------------------------------------- resolve_inputs


def cfg_for(*inputs, **kw) -> DataConfig:
    return DataConfig(inputs=list(inputs), **kw)


def test_resolve_inputs_missing_path(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(DataError) as ei:
        resolve_inputs(cfg_for(str(missing)))
    assert str(missing) in str(ei.value)
    assert "does not exist" in str(ei.value)


def test_resolve_inputs_empty_directory(tmp_path):
    with pytest.raises(DataError) as ei:
        resolve_inputs(cfg_for(str(tmp_path)))
    assert str(tmp_path) in str(ei.value)


def test_resolve_inputs_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(DataError, match="empty corpus"):
        resolve_inputs(cfg_for(str(tmp_path)))
    with pytest.raises(DataError, match="empty corpus"):
        resolve_inputs(cfg_for(str(tmp_path / "a.txt")))


def test_resolve_inputs_glob_without_match(tmp_path):
    spec = str(tmp_path / "*.jsonl")
    with pytest.raises(DataError, match="no file matches") as ei:
        resolve_inputs(cfg_for(spec))
    assert spec in str(ei.value)


def test_resolve_inputs_unsupported_suffix(tmp_path):
    p = tmp_path / "data.xlsx"
    p.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported") as ei:
        resolve_inputs(cfg_for(str(p)))
    assert str(p) in str(ei.value)


def test_resolve_inputs_directory_glob_and_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    pq.write_table(pa.table({"text": ["p"]}), tmp_path / "sub" / "c.parquet")
    (tmp_path / "sub" / "d.csv").write_text("text\nq\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")  # directories skip unknown suffixes
    files = resolve_inputs(cfg_for(str(tmp_path)))
    assert [(f.path.rsplit("/", 1)[-1], f.fmt) for f in files] == [
        ("a.txt", "text"),
        ("b.jsonl", "json"),
        ("c.parquet", "parquet"),
        ("d.csv", "csv"),
    ]
    assert files[0].size == 5
    assert [f.index for f in files] == [0, 1, 2, 3]
    files = resolve_inputs(cfg_for(str(tmp_path / "**" / "*.jsonl"), str(tmp_path / "a.txt")))
    assert [f.fmt for f in files] == ["json", "text"]
    assert [f.index for f in files] == [0, 1]


def test_resolve_inputs_stdlib():
    files = resolve_inputs(cfg_for("stdlib"))
    assert len(files) > 300
    assert all(f.path.endswith(".py") and f.fmt == "text" for f in files)
    assert not any("/test/" in f.path or "/tests/" in f.path for f in files)
    assert not any("/idlelib/" in f.path for f in files)
    assert any(f.path.endswith("/json/__init__.py") for f in files)


def test_stdlib_files_with_tests_is_a_superset():
    plain = stdlib_files(False)
    with_tests = stdlib_files(True)
    assert set(plain) <= set(with_tests)
    if any("/test/" in f for f in with_tests):  # some distributions strip the test suite
        assert len(with_tests) > len(plain)


# ---------------------------------------------------------------- manifest


def test_read_manifest_missing_names_dir(tmp_path):
    with pytest.raises(DataError) as ei:
        read_manifest(str(tmp_path / "shards"))
    assert str(tmp_path / "shards") in str(ei.value)
    assert "preprocess" in str(ei.value)


def test_read_manifest_reads(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"seq_len": 64}))
    assert read_manifest(str(tmp_path)) == {"seq_len": 64}
