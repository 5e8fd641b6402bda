"""Exact and near-duplicate detection: pure numpy, no Ray (the stage wires it into Ray Data).

Exact: a 64-bit blake2b of the cleaned text. Near: MinHash over word or character n-gram
shingles, LSH banding to find candidate pairs, verification of each candidate pair by the
signature-estimated Jaccard, then connected components. In every group of duplicates the
document with the smallest `order` key (file index, row) is kept, so the result is the same
on every run and for any number of workers.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)
_MERSENNE = np.uint64((1 << 61) - 1)
_P = np.uint64(1099511628211)  # FNV prime, combines shingle parts


def text_hash(text: str) -> int:
    """64-bit hash of a document's (already cleaned) text, as a signed int64 for arrow."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclass(frozen=True)
class MinHashParams:
    num_perm: int = 256
    bands: int = 32
    ngram: int = 5
    shingle: str = "word"  # "word" | "char"
    threshold: float = 0.8
    seed: int = 0

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        a = rng.integers(1, (1 << 61) - 1, self.num_perm, dtype=np.uint64) | np.uint64(1)
        b = rng.integers(0, (1 << 61) - 1, self.num_perm, dtype=np.uint64)
        return a, b


def shingle_hashes(text: str, ngram: int, shingle: str = "word") -> np.ndarray:
    """Distinct 64-bit hashes of the document's n-gram shingles (word or character)."""
    if shingle == "char":
        units = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8).astype(
            np.uint64
        )
    else:
        words = _WORD.findall(text.lower())
        units = np.fromiter((zlib.crc32(w.encode()) for w in words), np.uint64, len(words))
    if len(units) == 0:
        return np.zeros(0, np.uint64)
    n = min(ngram, len(units))
    h = np.zeros(len(units) - n + 1, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _P + units[j : len(units) - n + 1 + j] + np.uint64(1)
    return np.unique(h)


def minhash_signature(
    hashes: np.ndarray, a: np.ndarray, b: np.ndarray, rows: int = 256
) -> np.ndarray:
    """MinHash signature (num_perm uint32 values) of a set of shingle hashes.

    Shingles are processed `rows` at a time so the [rows, num_perm] temporaries stay in cache
    (one [n_shingles, num_perm] product was memory-bound: 1.9x slower).
    """
    out = np.full(len(a), np.iinfo(np.uint64).max, np.uint64)
    with np.errstate(over="ignore"):
        for i in range(0, len(hashes), rows):
            # multiply-shift universal hashing: the high 32 bits of (a*x + b) mod 2^64
            mixed = (hashes[i : i + rows, None] * a[None, :] + b[None, :]) >> np.uint64(32)
            np.minimum(out, mixed.min(axis=0), out=out)
    return np.minimum(out, np.iinfo(np.uint32).max).astype(np.uint32)


def signatures(texts: list[str], params: MinHashParams) -> np.ndarray:
    """[len(texts), num_perm] uint32 MinHash signatures."""
    a, b = params.coefficients()
    out = np.empty((len(texts), params.num_perm), np.uint32)
    for i, t in enumerate(texts):
        out[i] = minhash_signature(shingle_hashes(t, params.ngram, params.shingle), a, b)
    return out


def band_keys(sigs: np.ndarray, bands: int) -> np.ndarray:
    """[n, bands] uint64 keys: a hash of each band's rows (equal key = candidate pair)."""
    n, perms = sigs.shape
    rows = perms // bands
    view = np.ascontiguousarray(sigs[:, : rows * bands]).reshape(n, bands, rows).astype(np.uint64)
    key = np.zeros((n, bands), np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            key = key * _P + view[:, :, r] + np.uint64(r + 1)
    return key


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """Unique index pairs (i < j) sharing at least one band key; [m, 2] int64: `bucket_pairs`
    with the row index as the order key (each bucket a star from its first member, which keeps
    the pair count linear in bucket size while preserving connected components)."""
    rows = _key_rows(np.arange(len(keys), dtype=np.int64), keys)
    return bucket_pairs(rows["band"], rows["key"], rows["order"])


def estimated_jaccard(sigs: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Fraction of equal MinHash values for each pair (an unbiased Jaccard estimate)."""
    if len(pairs) == 0:
        return np.zeros(0)
    return (sigs[pairs[:, 0]] == sigs[pairs[:, 1]]).mean(axis=1)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Union-find: a component label (smallest member index) for each of n items."""
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for i, j in pairs:
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)])


def near_duplicates(sigs: np.ndarray, order: np.ndarray, params: MinHashParams) -> np.ndarray:
    """Boolean mask of documents to drop: every near-duplicate but the smallest `order`.

    `sigs` rows and the unique `order` keys align; the result does not depend on the row order
    given. The driver's path through the same steps as the distributed one: band rows, bucket
    pairs, verification and union-find (`near_duplicates_from_pairs`).
    """
    if len(order) == 0:
        return np.zeros(0, bool)
    rows = band_rows(order, sigs, params.bands)
    pairs = bucket_pairs(rows["band"], rows["key"], rows["order"])
    return np.isin(order, near_duplicates_from_pairs(pairs, order, sigs, params))


def exact_duplicates(hashes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Boolean mask of documents whose hash was already seen at a smaller `order`."""
    if len(hashes) == 0:
        return np.zeros(0, bool)
    idx = np.lexsort((order, hashes))
    h = hashes[idx]
    first = np.r_[True, h[1:] != h[:-1]]
    drop = np.zeros(len(hashes), bool)
    drop[idx[~first]] = True
    return drop


def true_jaccard(a: str, b: str, ngram: int = 5, shingle: str = "word") -> float:
    """Exact Jaccard of two documents' shingle sets (what MinHash estimates)."""
    sa, sb = set(shingle_hashes(a, ngram, shingle)), set(shingle_hashes(b, ngram, shingle))
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


# ---------------------------------------------------------------- distributed banding
# The same candidate pairs as `near_duplicates`, computed without the driver holding every
# signature: band rows (band, key, order) are hash-shuffled by (band, key) so each bucket
# lands in one block; each block yields its buckets' star pairs (smallest order first); the
# driver then verifies only the candidates' signatures and runs union-find on the pairs.


def band_rows(order: np.ndarray, sigs: np.ndarray, bands: int) -> dict[str, np.ndarray]:
    """One row per (document, band): the band index, its key (as int64) and the order key."""
    keys = band_keys(sigs, bands) if len(order) else np.zeros((0, bands), np.uint64)
    return _key_rows(np.asarray(order, np.int64), keys)


def _key_rows(order: np.ndarray, keys: np.ndarray) -> dict[str, np.ndarray]:
    n, bands = keys.shape
    return {
        "band": np.tile(np.arange(bands, dtype=np.int32), n),
        "key": np.ascontiguousarray(keys).reshape(-1).view(np.int64),
        "order": np.repeat(order, bands),
    }


def bucket_pairs(band: np.ndarray, key: np.ndarray, order: np.ndarray) -> np.ndarray:
    """[m, 2] (smallest order of the bucket, other member's order) for every bucket of equal
    (band, key) with two or more members; the rows of a bucket must all be in the arrays."""
    if len(order) == 0:
        return np.zeros((0, 2), np.int64)
    idx = np.lexsort((order, key, band))
    b, k, o = band[idx], key[idx], order[idx]
    starts = np.r_[True, (b[1:] != b[:-1]) | (k[1:] != k[:-1])]
    head = np.maximum.accumulate(np.where(starts, np.arange(len(o)), 0))
    members = ~starts
    pairs = np.stack([o[head[members]], o[members]], axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


def near_duplicates_from_pairs(
    pairs: np.ndarray, order: np.ndarray, sigs: np.ndarray, params: MinHashParams
) -> np.ndarray:
    """Order keys to drop, given candidate pairs of order keys and the signatures (rows
    aligned with `order`) of at least every document named in a pair."""
    if len(pairs) == 0:
        return np.zeros(0, np.int64)
    pairs = np.unique(np.sort(pairs, axis=1), axis=0)
    by_order = np.argsort(order, kind="stable")
    o, s = order[by_order], sigs[by_order]
    idx = np.searchsorted(o, pairs)  # order -> row in the sorted arrays
    idx = idx[estimated_jaccard(s, idx) >= params.threshold]
    labels = _components(len(o), idx)
    return o[labels != np.arange(len(o))]
