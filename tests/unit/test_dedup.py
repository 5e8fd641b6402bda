"""MinHash + LSH near-dedup and exact dedup: quality against the true Jaccard, determinism."""

import numpy as np
import pytest
from dedup_planted import planted_near_duplicates

from aigc_ray.data.dedup import (
    MinHashParams,
    band_rows,
    bucket_pairs,
    candidate_pairs,
    exact_duplicates,
    near_duplicates,
    near_duplicates_from_pairs,
    shingle_hashes,
    signatures,
    true_jaccard,
)


@pytest.fixture(scope="module")
def planted_set():
    return planted_near_duplicates(MinHashParams().threshold)


@pytest.fixture(scope="module")
def planted(planted_set):
    return planted_set[0]


def test_near_dedup_recall_and_precision_against_true_jaccard(planted_set):
    planted, truth = planted_set
    params = MinHashParams()
    drop = near_duplicates(signatures(planted, params), np.arange(len(planted)), params)
    n_base = 300
    predicted = set(np.flatnonzero(drop).tolist())
    assert len(truth) > 100, "the planted corpus must contain many true near-duplicates"
    tp = len(predicted & truth)
    recall, precision = tp / len(truth), tp / max(1, len(predicted))
    assert recall >= 0.95, (recall, precision)
    assert precision >= 0.95, (recall, precision)
    assert not drop[:n_base].any(), "an original (smaller order key) must always be kept"


def test_near_dedup_keeps_smallest_order_whatever_the_row_order(planted):
    params = MinHashParams()
    sigs = signatures(planted, params)
    order = np.arange(len(planted)) * 3 + 11
    drop_a = near_duplicates(sigs, order, params)
    perm = np.random.default_rng(0).permutation(len(planted))
    drop_b = near_duplicates(sigs[perm], order[perm], params)
    assert set(order[drop_a]) == set(order[perm][drop_b])


def test_exact_duplicates_keep_first_by_order():
    hashes = np.array([5, 7, 5, 9, 7, 5])
    order = np.array([10, 11, 3, 12, 20, 4])
    drop = exact_duplicates(hashes, order)
    # hash 5: orders 10, 3, 4 -> keep 3; hash 7: 11, 20 -> keep 11
    assert drop.tolist() == [True, False, False, False, True, True]


def test_shingles_char_and_word():
    assert len(shingle_hashes("a b c d e f", 2, "word")) == 5
    assert len(shingle_hashes("abcabc", 3, "char")) == 3  # abc, bca, cab
    assert len(shingle_hashes("", 5)) == 0
    assert true_jaccard("x y z w v", "x y z w v") == 1.0


def test_candidate_pairs_link_every_bucket_member():
    keys = np.array([[1, 9], [1, 8], [2, 8], [3, 7]], np.uint64)
    pairs = {tuple(p) for p in candidate_pairs(keys).tolist()}
    assert pairs == {(0, 1), (1, 2)}


def _partitioned_drops(sigs, order, params, partitions=3):
    """The distributed path without Ray: band rows hash-partitioned on (band, key), buckets
    paired per partition, then verification with only the paired documents' signatures."""
    rows = band_rows(order, sigs, params.bands)
    part = (rows["band"].astype(np.int64) * 1_000_003 + rows["key"]) % partitions
    pairs = np.concatenate(
        [
            bucket_pairs(rows["band"][part == k], rows["key"][part == k], rows["order"][part == k])
            for k in range(partitions)
        ]
    )
    need = np.isin(order, pairs)
    return set(near_duplicates_from_pairs(pairs, order[need], sigs[need], params).tolist())


def test_distributed_banding_finds_the_driver_result_with_planted_recall_and_precision(
    planted_set,
):
    planted, planted_truth = planted_set
    params = MinHashParams()
    sigs = signatures(planted, params)
    order = np.arange(len(planted)) * 5 + 3
    perm = np.random.default_rng(1).permutation(len(planted))  # blocks arrive in any order
    dropped = _partitioned_drops(sigs[perm], order[perm], params)
    assert dropped == set(order[near_duplicates(sigs, order, params)].tolist())
    truth = {int(order[i]) for i in planted_truth}
    tp = len(dropped & truth)
    assert tp / len(truth) >= 0.95 and tp / max(1, len(dropped)) >= 0.95


def test_bucket_pairs_star_from_smallest_order():
    band = np.array([0, 0, 0, 1, 1, 0], np.int32)
    key = np.array([7, 7, 7, 7, 8, 9], np.int64)
    order = np.array([30, 10, 20, 10, 30, 40], np.int64)
    assert bucket_pairs(band, key, order).tolist() == [[10, 20], [10, 30]]


def test_candidate_signature_batch_hashes_only_near_dedup_candidates():
    import pyarrow as pa

    from aigc_ray.data.stage import candidate_signature_batch

    params = MinHashParams(num_perm=32, bands=8)
    texts = ["a b c d e f", "x y z", "bad", "a b c d e g"]
    batch = pa.table(
        {
            "text": texts,
            "status": ["ok", "ok", "filtered:min_chars", "ok"],
            "order": np.array([4, 9, 12, 20], np.int64),
        }
    )
    out = candidate_signature_batch(batch, np.array([9], np.int64), params)
    assert out["order"].to_pylist() == [4, 20]  # not the exact duplicate, not the filtered row
    sigs = np.array(out["sig"].to_pylist(), np.int32).view(np.uint32)
    assert (sigs == signatures([texts[0], texts[3]], params)).all()
