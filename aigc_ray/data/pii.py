"""PII redaction for the text data stage: pure functions (no Ray), run per batch by the clean step.

Kinds, and what counts as one (the precision policy; docs/privacy.md explains why):

- ``email``: ``local@domain.tld`` with a two-letter or a known generic top-level domain (so
  ``x@self.weight`` in matrix code is not one). The standard library's own author and
  mailing-list addresses count: they are real addresses.
- ``phone``: a candidate shaped like a phone number (``+`` and a country code with grouped
  digits, or a North-American ``(415) 555-0132`` / ``415-555-0132`` / ``415.555.0132``),
  validated by Google's libphonenumber metadata (the ``phonenumbers`` package). Bare digit
  runs are not phone numbers: in code they are constants and timestamps.
- ``ip``: IPv4 dotted quads (no leading zeros, not part of a longer dotted number, so
  ``3.11.7`` and ``1.2.3.4.5`` are not) and IPv6 addresses, both checked by ``ipaddress``.
  Kept as they are: addresses that identify no one (unspecified, loopback, 0.x.x.x, netmasks,
  hostmasks and broadcast, the RFC 5737 / RFC 3849 documentation ranges, IETF-reserved space
  where no host gets an address: 240.0.0.0/4 and most IPv6 outside 2000::/3, where code's
  ``1:2:3:4:5:6:7:8`` and ``dead:beef::1`` fall, network addresses written with their
  prefix such as ``10.0.0.0/8``, IPv6 subnet prefixes), version and section numbers
  (``3.1.1.6``, ``__version__ = '2.10.1.0'``, ``section 8.2.4.44``) and Python slices
  (``a[1::2]``, ``a[::1000]``).
- ``credit_card``: 13-19 digits, plain or grouped by single spaces or dashes, with a card
  brand's prefix and length, passing the Luhn check.
- ``secret``: API keys and tokens of known formats (OpenAI ``sk-``, AWS ``AKIA``/``ASIA``,
  GitHub ``ghp_``/``github_pat_``, Slack ``xox*-``, Google ``AIza``, Stripe, Hugging Face
  ``hf_``, GitLab ``glpat-``, npm, JWTs) and high-entropy values assigned to names such as
  ``api_key``, ``secret``, ``token`` or ``password``.
- ``private_key``: PEM / OpenSSH / PGP ``-----BEGIN ... PRIVATE KEY-----`` blocks (to their END
  line, or to the end of the base64 when the END line is missing).

Findings of different kinds never overlap: the earliest, then the longest, wins.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

PII_KINDS = ("email", "phone", "ip", "credit_card", "secret", "private_key")


class Finding(NamedTuple):
    kind: str
    start: int
    end: int


@dataclass(frozen=True)
class PiiRules:
    """What to look for and what to do with a row that holds some."""

    kinds: tuple[str, ...] = PII_KINDS
    action: str = "replace"  # replace | drop
    placeholder: str = "<{KIND}>"
    phone_region: str = "US"

    def mark(self, kind: str) -> str:
        return self.placeholder.format(KIND=kind.upper(), kind=kind)


# ---------------------------------------------------------------- email

_GENERIC_TLD_NAMES = (
    "com org net edu gov mil int info biz name pro aero coop museum mobi jobs travel tel asia "
    "cat post app dev page cloud online site tech store shop blog email mail club live news xyz "
    "top group agency company solutions systems network digital media design software studio "
    "academy center global world today services consulting science example"
)
_GENERIC_TLDS = frozenset(_GENERIC_TLD_NAMES.split())
_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24}))(?![\w-])"
)


def _emails(text: str) -> Iterable[tuple[int, int]]:
    if "@" not in text:
        return
    for m in _EMAIL.finditer(text):
        tld = m.group(2).lower()
        if len(tld) == 2 or tld in _GENERIC_TLDS:
            yield m.span()


# ---------------------------------------------------------------- IP addresses

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
# hex groups and colons with a '::' or eight groups; an IPv4 tail is allowed
_IPV6 = re.compile(
    r"(?<![\w:.])(?=[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7})"
    r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])"
)
_DOC_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)
_PREFIX = re.compile(r"/(\d{1,3})(?!\d)")
_VERSION_CONTEXT = re.compile(
    r"(?i)(?:version|release|section|§|\bver\.?|\bv)\w*\s*[:=]?\s*[\"']?$"
)


def _names_no_one(ip, text: str, start: int, end: int) -> bool:
    """Addresses that identify no host or person: unspecified, loopback, 0.x.x.x, netmasks and
    hostmasks (255.255.255.0, 0.0.0.255), the documentation ranges (RFC 5737, RFC 3849),
    IETF-reserved space (ipaddress' is_reserved: 240.0.0.0/4 and most IPv6 outside 2000::/3,
    where '1:2:3:4:5:6:7:8' and 'dead:beef::1' fall; IPv4-mapped addresses are not), network
    addresses written with their prefix (10.0.0.0/8) and IPv6 subnet prefixes (2001:db8:1::)."""
    n, bits = int(ip), ip.max_prefixlen
    inverted = ~n & ((1 << bits) - 1)
    if (
        ip.is_loopback
        or ip.is_unspecified
        or (ip.is_reserved and not (ip.version == 6 and ip.ipv4_mapped))
        or (n & (n + 1)) == 0
        or (inverted & (inverted + 1)) == 0
    ):
        return True
    if any(ip in net for net in _DOC_NETS if net.version == ip.version):
        return True
    if ip.version == 4 and n >> 24 == 0:
        return True
    if ip.version == 6 and n & ((1 << 64) - 1) == 0:
        return True
    prefix = _PREFIX.match(text, end)
    if prefix and int(prefix.group(1)) < bits:
        host_bits = bits - int(prefix.group(1))
        return n & ((1 << host_bits) - 1) == 0
    return False


def _version_like(s: str, text: str, start: int) -> bool:
    """3.1.1.6, 8.2.4.44, 'version 2.10.1.0': version and section numbers, not addresses (a
    real address with three one-digit leading parts is one of 10^-4 of the space; 1.1.1.1 and
    8.8.8.8 are public resolvers that name no one)."""
    if all(len(p) == 1 for p in s.split(".")[:3]):
        return True
    line_start = text.rfind("\n", max(0, start - 40), start) + 1
    return _VERSION_CONTEXT.search(text, max(line_start, start - 40), start) is not None


def _ipv4s(text: str) -> Iterable[tuple[int, int]]:
    for m in _IPV4.finditer(text):
        s, (start, end) = m.group(), m.span()
        ip = ipaddress.IPv4Address(s)
        if _version_like(s, text, start) or _names_no_one(ip, text, start, end):
            continue
        yield start, end


def _ipv6s(text: str) -> Iterable[tuple[int, int]]:
    for m in _IPV6.finditer(text):
        s, (start, end) = m.group(), m.span()
        try:
            ip = ipaddress.IPv6Address(s)
        except ValueError:
            continue
        groups = [g for g in re.split(r"[:.]", s) if g]
        # 'a[1::2]', 'a[::1000]' are slices in Python: an address written with '::' has two
        # groups, one of 3+ digits (fe80::1), or more; and a subscript is no URL's '[...]'
        if len(groups) < 2 or (len(groups) == 2 and max(map(len, groups)) < 3):
            continue
        if start >= 2 and text[start - 1] == "[" and re.match(r"[\w)\]]", text[start - 2]):
            continue
        if _names_no_one(ip, text, start, end):
            continue
        yield start, end


def _ips(text: str) -> Iterable[tuple[int, int]]:
    yield from _ipv4s(text)
    yield from _ipv6s(text)


# ---------------------------------------------------------------- credit cards

_CARD = re.compile(r"(?<![\w.+/-])\d{4}(?:[ -]?\d){9,15}(?![\w]|[ -]\d|[.,]\d)")
# (prefixes, lengths) of the brands' IIN ranges
_BRANDS: list[tuple[tuple[str, ...], tuple[int, ...]]] = [
    (("4",), (13, 16, 19)),  # Visa
    (("51", "52", "53", "54", "55"), (16,)),  # Mastercard
    (tuple(str(p) for p in range(2221, 2721)), (16,)),  # Mastercard 2-series
    (("34", "37"), (15,)),  # American Express
    (("6011", "65", *(str(p) for p in range(644, 650))), (16, 17, 18, 19)),  # Discover
    (tuple(str(p) for p in range(3528, 3590)), (16, 17, 18, 19)),  # JCB
    (("36", "38", "39", *(str(p) for p in range(300, 306))), (14, 15, 16, 17, 18, 19)),  # Diners
    (("62",), (16, 17, 18, 19)),  # UnionPay
]


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_brand_ok(digits: str) -> bool:
    return any(
        len(digits) in lengths and digits.startswith(prefixes) for prefixes, lengths in _BRANDS
    )


def _cards(text: str) -> Iterable[tuple[int, int]]:
    for m in _CARD.finditer(text):
        s = m.group()
        seps = set(re.findall(r"[ -]", s))
        if len(seps) > 1:
            continue
        if seps and min(map(len, re.split(r"[ -]", s))) < 3:
            continue  # '1 2 3 4 ...' is a list of numbers, cards come in groups of 3-6
        digits = re.sub(r"[ -]", "", s)
        if 13 <= len(digits) <= 19 and _card_brand_ok(digits) and luhn_ok(digits):
            yield m.span()


# ---------------------------------------------------------------- phone numbers

_INTL = re.compile(
    r"(?<![\w+])\+[1-9]\d{0,2}(?:(?:[ .-]?\(\d{1,5}\)|[ .-]\d{1,8}){1,6}|\d{7,12})"
    r"(?![\w]|[-.]\d)"
)
_NANP = re.compile(
    r"(?<![\w+.-])(?:\(\d{3}\)[ ]?\d{3}[-. ]|\d{3}-\d{3}-|\d{3}\.\d{3}\.)\d{4}(?![\w]|[-.]\d)"
)


def _phones(text: str, region: str) -> Iterable[tuple[int, int]]:
    import phonenumbers

    def valid(s: str, where: str | None) -> bool:
        try:
            return phonenumbers.is_valid_number(phonenumbers.parse(s, where))
        except phonenumbers.NumberParseException:
            return False

    if "+" in text:
        for m in _INTL.finditer(text):
            s, end = m.group(), m.end()
            # a number followed by other digits ('+44 20 7946 0958 2019'): drop trailing groups
            for _ in range(3):
                if valid(s, None):
                    yield m.start(), end
                    break
                cut = max(s.rfind(" "), s.rfind("-"), s.rfind("."))
                if cut <= 3:
                    break
                s, end = s[:cut], m.start() + cut
    for m in _NANP.finditer(text):
        if valid(m.group(), region):
            yield m.span()


# ---------------------------------------------------------------- secrets and private keys

_TOKEN = re.compile(
    r"(?<![\w-])(?:"
    r"sk-(?:proj-|ant-(?:api\d\d-)?|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"
    r"|(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{36,255}"
    r"|github_pat_[A-Za-z0-9_]{22,255}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|AIza[0-9A-Za-z_-]{35}"
    r"|(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,}"
    r"|hf_[A-Za-z0-9]{30,}"
    r"|glpat-[A-Za-z0-9_-]{20,}"
    r"|npm_[A-Za-z0-9]{36}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r")(?![\w-])"
)
_ASSIGNED = re.compile(
    r"(?i)(?:api[_-]?key|secret|token|passw(?:or)?d|access[_-]?key|auth)[\w-]*[\"']?\s*[:=]\s*"
    r"(?:([\"'])([A-Za-z0-9+/_.=-]{16,})\1|([A-Za-z0-9+/_=-]{16,})(?![\w.(]))"
)
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*|[A-Z_][A-Z0-9_]*")


def _entropy(s: str) -> float:
    counts = Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


def _looks_random(s: str) -> bool:
    """A generated credential: mixed letters and digits with high per-character entropy (not an
    identifier such as 'password_reset_url' nor a placeholder such as 'xxxxxxxxxxxxxxxx')."""
    classes = sum(bool(re.search(p, s)) for p in ("[a-z]", "[A-Z]", "[0-9]"))
    return classes >= 2 and re.search("[0-9]", s) is not None and _entropy(s) >= 3.5


def _secrets(text: str) -> Iterable[tuple[int, int]]:
    for m in _TOKEN.finditer(text):
        s = m.group()
        if s.startswith("sk-") and not _looks_random(s[3:]):
            continue  # 'sk-learn-...'-like words are not keys
        yield m.span()
    for m in _ASSIGNED.finditer(text):
        quoted = m.group(2) is not None
        value = m.group(2) if quoted else m.group(3)
        if not quoted and _IDENTIFIER.fullmatch(value):
            continue  # 'token = SOME_CONSTANT_NAME' is code
        if _looks_random(value):
            yield m.span(2 if quoted else 3)


_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r"|(?:\n[ \t]*(?:[A-Za-z0-9+/=]+|[\w-]+: [^\n]*)?[ \t]*(?=\n|$))*)",
    re.S,
)


def _private_keys(text: str) -> Iterable[tuple[int, int]]:
    if "PRIVATE KEY" not in text:
        return
    for m in _PRIVATE_KEY.finditer(text):
        yield m.span()


# ---------------------------------------------------------------- finding and redacting

# Per kind, a cheap superset of what its finder accepts, in the syntax both RE2 (Arrow's
# vectorized match over a whole batch) and Python's re understand: only the rows it matches are
# scanned in Python, by that kind's finder.
PREFILTERS = {
    "email": r"[A-Za-z0-9._%+-]@[A-Za-z0-9-]+\.[A-Za-z0-9-]",
    "phone": r"\+\d{1,3}(?:[ .-]?\(\d|[ .-]\d)|\+\d{8}|\(\d{3}\) ?\d{3}[-. ]\d{4}"
    r"|\d{3}[-.]\d{3}[-.]\d{4}",
    "ip": r"\d\.\d{1,3}\.\d{1,3}\.\d|::|(?:[0-9A-Fa-f]{1,4}:){7}",
    "credit_card": r"\d{4}[ -]?\d{4}[ -]?\d{2}",
    "secret": r"sk-|AKIA|ASIA|ABIA|ACCA|gh[pousr]_|github_pat_|xox[abprs]-|AIza|_live_|_test_"
    r"|hf_|glpat-|npm_|eyJ|(?i:api.?key|secret|token|passw|access.?key|auth)[\w-]*[\"']?\s*"
    r"[:=]\s*[\"']?[A-Za-z0-9+/_.=-]{16}",
    "private_key": r"PRIVATE KEY",
}
_PREFILTERS = {k: re.compile(v) for k, v in PREFILTERS.items()}
_FINDERS = {
    "private_key": _private_keys,
    "secret": _secrets,
    "email": _emails,
    "credit_card": _cards,
    "ip": _ips,
}


def find_pii(text: str, kinds: Iterable[str] = PII_KINDS, region: str = "US") -> list[Finding]:
    """Non-overlapping findings in ``text``, in order (the earliest, then the longest, wins)."""
    found = []
    for kind in kinds:
        if not _PREFILTERS[kind].search(text):
            continue
        spans = _phones(text, region) if kind == "phone" else _FINDERS[kind](text)
        found += [Finding(kind, s, e) for s, e in spans]
    found.sort(key=lambda f: (f.start, -f.end))
    out: list[Finding] = []
    for f in found:
        if not out or f.start >= out[-1].end:
            out.append(f)
    return out


def redact(text: str, findings: list[Finding], rules: PiiRules) -> str:
    """``text`` with each finding replaced by its kind's placeholder."""
    parts, at = [], 0
    for f in findings:
        parts += [text[at : f.start], rules.mark(f.kind)]
        at = f.end
    parts.append(text[at:])
    return "".join(parts)


def redact_text(
    text: str, rules: PiiRules, kinds: Iterable[str] | None = None
) -> tuple[str, Counter]:
    """(redacted text, findings per kind) of one document."""
    findings = find_pii(text, rules.kinds if kinds is None else kinds, rules.phone_region)
    counts = Counter(f.kind for f in findings)
    return (redact(text, findings, rules) if findings else text), counts


def redact_messages(
    raw: str, rules: PiiRules, kinds: Iterable[str] | None = None
) -> tuple[str, Counter]:
    """An SFT row (a JSON list of {role, content}) with each message's content redacted, so the
    placeholders never break the JSON and JSON escapes never hide a finding."""
    msgs = json.loads(raw)
    counts: Counter = Counter()
    for m in msgs:
        m["content"], found = redact_text(m["content"], rules, kinds)
        counts += found
    return (json.dumps(msgs, ensure_ascii=False) if counts else raw), counts


def candidate_masks(texts: pa.Array, kinds: Iterable[str]) -> dict[str, np.ndarray]:
    """Per kind, which rows may hold one: Arrow's RE2 over the whole batch at once."""
    import pyarrow.compute as pc

    return {
        k: pc.match_substring_regex(texts, PREFILTERS[k])
        .fill_null(False)
        .to_numpy(zero_copy_only=False)
        for k in kinds
    }


def redact_batch(
    texts: pa.Array, rules: PiiRules, messages: bool = False
) -> tuple[list[str | None], dict[str, np.ndarray]]:
    """Redact a batch of documents (null stays null): the new texts, and per kind the number of
    findings in each row. Only rows a kind's prefilter matches are scanned for that kind; with
    ``messages``, rows are SFT message lists (JSON) and each message is redacted."""
    masks = candidate_masks(texts, rules.kinds)
    counts = {k: np.zeros(len(texts), np.int32) for k in rules.kinds}
    out = texts.to_pylist()
    rows = np.zeros(len(texts), bool)
    for m in masks.values():
        rows |= m
    for i in np.flatnonzero(rows):
        kinds = [k for k in rules.kinds if masks[k][i]]
        fn = redact_messages if messages else redact_text
        out[i], found = fn(out[i], rules, kinds)
        for k, n in found.items():
            counts[k][i] = n
    return out, counts
