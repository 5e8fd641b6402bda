"""PII redaction through the real data stage on the shared Ray: counts per kind in the manifest,
nothing planted left in the shards (nor in the trained tokenizer's vocabulary), replace and drop."""

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
from pii_planted import planted_set

from aigc_ray.config import load_config
from aigc_ray.data import clean_text, run_preprocess
from aigc_ray.data.pii import find_pii

pytestmark = pytest.mark.integration
KINDS = ("email", "phone", "ip", "credit_card", "secret", "private_key")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Planted rows (10 of each kind) and look-alike rows holding none, as jsonl."""
    rows = planted_set(seed=7, per_kind=10, stdlib=0)
    path = tmp_path_factory.mktemp("pii") / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": r.text}) + "\n" for r in rows))
    return path, rows


def _run(tmp, path, *extra):
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f'data.inputs=["{path}"]',
            f"data.output_dir={tmp}/out",
            "data.vocab_size=512",
            "data.seq_len=32",
            "data.val_fraction=0.2",
            "data.near_dedup=false",
            "train.seq_len=32",
            *extra,
        ],
    ).data
    return run_preprocess(cfg)


def _shard_text(m) -> str:
    from aigc_ray.model import load_tokenizer

    tok = load_tokenizer(m["tokenizer_dir"])
    out = []
    for split in ("train", "val"):
        for shard in m["splits"][split]["shards"]:
            for block in pq.read_table(shard)["input_ids"].to_pylist():
                out.append(tok.decode(block))
    return "".join(out)


def _planted_values(rows) -> list[str]:
    return [r.text[s:e] for r in rows for _, s, e in r.planted]


def test_replace_counts_every_kind_and_leaves_no_value_in_the_shards(ray_session, tmp_path, corpus):
    path, rows = corpus
    m = _run(tmp_path, path)
    expected = Counter(f.kind for r in rows for f in find_pii(clean_text(r.text)))
    planted = Counter(k for r in rows for k, _, _ in r.planted)
    pii = m["pii"]
    assert pii["enabled"] and pii["action"] == "replace"
    assert pii["found"] == {k: expected[k] for k in KINDS}
    assert planted == {k: 10 for k in KINDS} and pii["found"] == planted  # all, nothing else
    assert pii["rows"] == sum(bool(r.planted) for r in rows)
    assert m["docs_kept"] == len(rows) and "pii" not in m["filtered"]
    saved = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert saved["pii"] == pii
    text = _shard_text(m)
    assert "<EMAIL>" in text and "<PRIVATE_KEY>" in text and "<CREDIT_CARD>" in text
    assert [v for v in _planted_values(rows) if len(v) > 8 and v in text] == []
    vocab = (tmp_path / "out" / "tokenizer" / "tokenizer.json").read_text()
    assert not [v for v in _planted_values(rows) if len(v) > 12 and v in vocab]


def test_drop_leaves_out_rows_holding_pii(ray_session, tmp_path, corpus):
    path, rows = corpus
    m = _run(tmp_path, path, "data.pii.action=drop", "data.pii.kinds=[email, secret]")
    holding = [r for r in rows if find_pii(clean_text(r.text), ("email", "secret"))]
    assert m["pii"]["action"] == "drop" and set(m["pii"]["found"]) == {"email", "secret"}
    assert m["filtered"] == {"pii": len(holding)} and m["pii"]["rows"] == len(holding)
    assert m["docs_kept"] == len(rows) - len(holding)
    assert m["docs_read"] == m["docs_kept"] + sum(m["filtered"].values())
    text = _shard_text(m)
    assert "<EMAIL>" not in text and "<SECRET>" not in text
    emails = [r.text[s:e] for r in rows for k, s, e in r.planted if k == "email"]
    assert not [v for v in emails if v in text]
    assert "pii email" in _report(m) and "rows dropped" in _report(m)


def _report(m) -> str:
    from aigc_ray.data import format_report

    return format_report(m)
