"""The data stage on the shared Ray: bad input never loses good rows, strict mode, SFT, and
a real S3-compatible server (moto) for s3:// inputs and outputs."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aigc_ray.config import load_config
from aigc_ray.data import DataError, run_preprocess

pytestmark = pytest.mark.integration
BASE = [
    "data.vocab_size=512",
    "data.seq_len=32",
    "data.val_fraction=0.2",
    "data.batch_size=16",
    "train.seq_len=32",
    "data.near_dedup=false",
    "data.tokenizer_train_mb=0.2",
]


def _cfg(tmp, inputs, *extra):
    return load_config(
        "configs/tiny.yaml",
        [f"data.inputs={json.dumps(inputs)}", f"data.output_dir={tmp}/out", *BASE, *extra],
    ).data


def _plant(root: Path) -> int:
    """A corpus with every kind of bad input; returns the number of good documents."""
    good = [f"def f{i}(x):\n    return x * {i} + {i * i}  # document {i}\n" for i in range(120)]
    lines = [json.dumps({"text": t}).encode() for t in good[:60]]
    lines[5:5] = [
        b'{"text": "unterminated',
        json.dumps({"body": "no text"}).encode(),
        b'{"text": "latin-1 \xe9 byte"}',
        b"[1, 2, 3]",
    ]
    (root / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (root / "empty.jsonl").write_bytes(b"")
    (root / "corrupt.parquet").write_bytes(b"PAR1 garbage that is not parquet")
    pq.write_table(pa.table({"text": good[60:100] + [None]}), root / "b.parquet")
    for i, t in enumerate(good[100:]):
        (root / f"c{i:02d}.txt").write_text(t)
    (root / "bad.txt").write_bytes(b"valid start \xff\xfe invalid")
    return len(good)


def test_bad_input_is_quarantined_and_no_good_row_is_lost(ray_session, tmp_path):
    (tmp_path / "in").mkdir()
    n_good = _plant(tmp_path / "in")
    m = run_preprocess(_cfg(tmp_path, [str(tmp_path / "in")]))
    assert m["docs_kept"] == n_good
    assert (
        m["malformed"] == 4 + 1 + 1 + 1
    )  # 4 bad json lines, corrupt parquet, null, bad utf-8 file
    assert m["docs_read"] == n_good + m["malformed"]
    q = pq.read_table(m["quarantine_dir"]).to_pylist()
    assert len(q) == m["malformed"]
    by_source = {(Path(r["source"]).name, r["line"]): r["reason"] for r in q}
    assert "malformed JSON" in by_source[("a.jsonl", 6)]
    assert "missing column" in by_source[("a.jsonl", 7)]
    assert "UTF-8" in by_source[("a.jsonl", 8)]
    assert "unreadable parquet" in by_source[("corrupt.parquet", -1)]
    assert "UTF-8" in by_source[("bad.txt", -1)]


def test_strict_mode_fails_naming_file_and_line(ray_session, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: malformed JSON"):
        run_preprocess(_cfg(tmp_path, [str(tmp_path / "in")], "data.strict=true"))


def test_sft_shards_carry_masked_labels(ray_session, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"what is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}"},
            ]
        }
        for i in range(200)
    ]
    rows.append({"messages": [{"role": "user", "content": "no assistant"}]})
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = run_preprocess(_cfg(tmp_path, [str(tmp_path / "chat.jsonl")], "data.format=sft"))
    assert m["docs_kept"] == 200 and m["malformed"] == 1
    t = pq.read_table(m["splits"]["train"]["shards"][0])
    ids, labels = t["input_ids"][0].as_py(), t["labels"][0].as_py()
    assert len(ids) == len(labels) == 32
    assert -100 in labels and any(x != -100 for x in labels)


def test_s3_input_and_output(ray_session, s3_server, tmp_path):
    docs = [f"class C{i}:\n    value = {i}\n" * 3 for i in range(80)]
    body = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    # the bucket refuses unencrypted writes (conftest's s3_server): the inputs carry the header
    put = {"Bucket": "aigc-test", "ServerSideEncryption": "AES256"}
    s3_server.put_object(**put, Key="raw/part-0.jsonl", Body=body.encode())
    s3_server.put_object(**put, Key="raw/part-1.jsonl", Body=b'{"text": "x\n{bad\n')
    cfg = load_config(
        "configs/tiny.yaml",
        ['data.inputs=["s3://aigc-test/raw/"]', "data.output_dir=s3://aigc-test/shards", *BASE],
    ).data
    m = run_preprocess(cfg)
    assert m["docs_kept"] == 80 and m["malformed"] == 2
    keys = [
        o["Key"]
        for o in s3_server.list_objects_v2(Bucket="aigc-test", Prefix="shards/")["Contents"]
    ]
    assert "shards/manifest.json" in keys
    assert any(k.startswith("shards/train/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith("shards/quarantine/") for k in keys)
    assert any(k.startswith("shards/tokenizer/") for k in keys)
    manifest = json.loads(
        s3_server.get_object(Bucket="aigc-test", Key="shards/manifest.json")["Body"].read()
    )
    assert manifest["splits"]["train"]["blocks"] == m["splits"]["train"]["blocks"] > 0
    # Ray Data's workers, the tokenizer upload and the manifest: every object sent the header
    sse = {
        k: s3_server.head_object(Bucket="aigc-test", Key=k).get("ServerSideEncryption")
        for k in keys
    }
    assert set(sse.values()) == {"AES256"}, sse


def test_output_is_identical_for_any_pool_size(ray_session, tmp_path):
    """Same shards (token for token) and counts with 1 or 2 tokenize workers, near-dedup on,
    and with LSH banding distributed (a Ray Data hash shuffle) instead of in the driver."""
    from aigc_ray.data import stdlib_files

    docs = [Path(p).read_text() for p in stdlib_files()[:40]]
    docs += [d.replace("def ", "def  ", 1) for d in docs[:10]]  # near duplicates
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    streams, counts = [], []
    for n, banding in ((1, 10**6), (2, 10**6), (2, 0)):
        out = tmp_path / f"o{n}-{banding}"
        cfg = load_config(
            "configs/tiny.yaml",
            [
                f'data.inputs=["{tmp_path}/in.jsonl"]',
                f"data.output_dir={out}",
                *BASE,
                "data.near_dedup=true",
                f"data.num_tokenize_actors={n}",
                f"data.near_dedup_driver_max_docs={banding}",
            ],
        ).data
        m = run_preprocess(cfg)
        counts.append(
            {k: m[k] for k in ("docs_kept", "exact_duplicates", "near_duplicates", "tokens")}
        )
        streams.append(
            [pq.read_table(s)["input_ids"].to_pylist() for s in m["splits"]["train"]["shards"]]
        )
    assert counts[0] == counts[1] == counts[2]
    assert counts[0]["near_duplicates"] + counts[0]["exact_duplicates"] >= 10
    assert counts[0]["near_duplicates"] >= 5
    assert streams[0] == streams[1] == streams[2]
