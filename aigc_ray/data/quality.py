"""Text cleaning and quality filters: pure functions, each filter named so it can be counted."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+$", re.M)


def clean_text(text: str) -> str:
    """NFC-normalize, unify line endings, drop control characters and trailing whitespace."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub("", text)
    return text.strip("\n")


def doc_split(text: str, val_fraction: float, seed: int = 0) -> str:
    """Deterministic split of one document by hash of its text (same on every run/worker)."""
    h = hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode()
    )
    return "val" if int.from_bytes(h.digest(), "little") / 2**64 < val_fraction else "train"


@dataclass(frozen=True)
class QualityRules:
    """Thresholds of the quality filters (None disables a filter)."""

    min_chars: int = 1
    max_chars: int | None = None
    max_line_length: int | None = None
    min_alnum_fraction: float | None = None
    max_repeated_line_fraction: float | None = None
    blocklist: tuple[str, ...] = field(default_factory=tuple)


def repeated_line_fraction(text: str) -> float:
    """Fraction of non-empty lines that are copies of an earlier line."""
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if not lines:
        return 0.0
    counts = Counter(lines)
    return sum(c - 1 for c in counts.values()) / len(lines)


def alnum_fraction(text: str) -> float:
    """Fraction of non-whitespace characters that are letters or digits."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalnum() for c in chars) / len(chars) if chars else 0.0


def build_filters(rules: QualityRules) -> list[tuple[str, Callable[[str], bool]]]:
    """(name, rejects(text)) in evaluation order; a document is counted under its first failure."""
    filters: list[tuple[str, Callable[[str], bool]]] = [
        ("min_chars", lambda t: len(t) < rules.min_chars),
    ]
    if rules.max_chars is not None:
        filters.append(("max_chars", lambda t: len(t) > rules.max_chars))
    if rules.max_line_length is not None:
        filters.append(
            ("max_line_length", lambda t: max(map(len, t.split("\n"))) > rules.max_line_length)
        )
    if rules.min_alnum_fraction is not None:
        filters.append(
            ("min_alnum_fraction", lambda t: alnum_fraction(t) < rules.min_alnum_fraction)
        )
    if rules.max_repeated_line_fraction is not None:
        filters.append(
            (
                "max_repeated_line_fraction",
                lambda t: repeated_line_fraction(t) > rules.max_repeated_line_fraction,
            )
        )
    if rules.blocklist:
        pattern = re.compile("|".join(f"(?:{p})" for p in rules.blocklist))
        filters.append(("blocklist", lambda t: pattern.search(t) is not None))
    return filters


def first_failure(text: str, filters) -> str | None:
    """Name of the first filter that rejects `text`, or None when it passes them all."""
    for name, rejects in filters:
        if rejects(text):
            return name
    return None
