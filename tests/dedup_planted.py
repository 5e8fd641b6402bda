"""The corpus near-dedup is measured on (tests/unit/test_dedup.py and benchmarks/bench_data.py):
random documents and planted variants whose true Jaccard is known."""

from aigc_ray.data.dedup import true_jaccard


def planted_near_duplicates(
    threshold: float = 0.8, n_base: int = 300, n_variants: int = 200, seed: int = 7
) -> tuple[list[str], set[int]]:
    """A corpus to measure near-dedup on: `n_base` random 250-word documents, then a variant of
    each of the first `n_variants` (a few substitutions, a short insertion, a rotation, or a
    heavy rewrite that must not match), and the indices of the variants whose true word-5-gram
    Jaccard with their original reaches `threshold` (the near-duplicates to find)."""
    import random

    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(4000)]
    base = [" ".join(rng.choice(vocab) for _ in range(250)) for _ in range(n_base)]
    variants = []
    for text in base[:n_variants]:
        w = text.split()
        kind = rng.choice(["edit", "insert", "reorder", "far"])
        if kind == "edit":  # a few substitutions: J ~ 0.9
            for _ in range(len(w) // 80):
                w[rng.randrange(len(w))] = rng.choice(vocab)
        elif kind == "insert":  # a short inserted passage
            i = rng.randrange(len(w))
            w[i:i] = [rng.choice(vocab) for _ in range(len(w) // 50)]
        elif kind == "reorder":  # paragraphs swapped: only shingles at the cut change
            w = w[len(w) // 3 :] + w[: len(w) // 3]
        else:  # heavy rewrite: J well below 0.8
            for _ in range(len(w) // 5):
                w[rng.randrange(len(w))] = rng.choice(vocab)
        variants.append(" ".join(w))
    truth = {
        n_base + k for k in range(n_variants) if true_jaccard(base[k], variants[k]) >= threshold
    }
    return base + variants, truth
