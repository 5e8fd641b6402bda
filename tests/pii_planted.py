"""A planted PII test set: deterministic rows of ordinary code and prose with known PII of each
kind at known spans, rows that hold none (hand-written precision hazards), and real
standard-library files as they are, with the PII they hold (reviewed by hand) as their spans.
Written independently of aigc_ray.data.pii: values come from the formats people write, not from
the detector's patterns.

``planted_set(seed)`` returns ``Row``s; each positive row lists its planted ``(kind, start, end)``.
"""

from __future__ import annotations

import base64
import ipaddress
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("email", "phone", "ip", "credit_card", "secret", "private_key")


@dataclass
class Row:
    text: str
    planted: list[tuple[str, int, int]] = field(default_factory=list)
    source: str = "planted"


# ---------------------------------------------------------------- values, one kind at a time

FIRST = [
    "alice",
    "bob",
    "carol",
    "dmitri",
    "eun-ji",
    "farah",
    "gustavo",
    "hiro",
    "ines",
    "jamal",
    "katarzyna",
    "li",
    "mateo",
    "nadia",
]
LAST = [
    "smith",
    "garcia",
    "okafor",
    "nguyen",
    "muller",
    "rossi",
    "tanaka",
    "kowalski",
    "haddad",
    "silva",
    "johansson",
]
DOMAINS = [
    "gmail.com",
    "outlook.com",
    "yahoo.co.uk",
    "proton.me",
    "acme-corp.com",
    "cs.stanford.edu",
    "mail.example.org",
    "uni-heidelberg.de",
    "startup.io",
    "agency.gov",
    "t-online.de",
    "sub.domain.co.jp",
]


def email(r: random.Random) -> str:
    first, last = r.choice(FIRST).replace("-", ""), r.choice(LAST)
    local = r.choice(
        [
            f"{first}.{last}",
            f"{first}{r.randint(1, 99)}",
            f"{first[0]}{last}",
            f"{first}_{last}",
            f"{first}+news",
            f"{last}.{first}{r.randint(70, 99)}",
        ]
    )
    return f"{local}@{r.choice(DOMAINS)}"


US_AREAS = [212, 213, 305, 312, 404, 415, 503, 512, 617, 646, 702, 713, 206, 303, 919, 858]


def phone(r: random.Random) -> str:
    def d(n: int) -> str:
        return "".join(r.choice(string.digits) for _ in range(n))

    area, exch, line = r.choice(US_AREAS), f"{r.randint(2, 9)}{d(2)}", d(4)
    return r.choice(
        [
            f"({area}) {exch}-{line}",
            f"{area}-{exch}-{line}",
            f"{area}.{exch}.{line}",
            f"+1 {area} {exch} {line}",
            f"+1-{area}-{exch}-{line}",
            f"+1 ({area}) {exch}-{line}",
            f"+44 20 7{d(3)} {d(4)}",  # London
            f"+44 7{r.choice('4579')}{d(2)} {d(6)}",  # UK mobile
            f"+49 30 {d(7)}",  # Berlin
            f"+49 151 {d(8)}",  # German mobile
            f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}",  # Paris
            f"+33 6 {d(2)} {d(2)} {d(2)} {d(2)}",  # French mobile
            f"+81 3-{r.randint(1, 9)}{d(3)}-{d(4)}",  # Tokyo
            f"+91 9{d(4)} {d(5)}",  # Indian mobile
            f"+55 11 9{d(4)}-{d(4)}",  # Sao Paulo mobile
            f"+61 2 {r.choice('89')}{d(3)} {d(4)}",  # Sydney
        ]
    )


DOC_NETS = [
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
]


def ip(r: random.Random) -> str:
    while True:
        if r.random() < 0.15:  # private networks identify hosts inside them too
            addr = ipaddress.IPv4Address(
                r.choice(["10.{}.{}.{}", "172.16.{}.{}", "192.168.{}.{}"]).format(
                    *(r.randint(1, 254) for _ in range(3))
                )
            )
        elif r.random() < 0.55:
            addr = ipaddress.IPv4Address(
                ".".join(
                    str(x)
                    for x in (
                        r.randint(11, 223),
                        r.randint(0, 255),
                        r.randint(0, 255),
                        r.randint(1, 254),
                    )
                )
            )
        else:
            prefix = r.choice([0x2001, 0x2A00, 0x2604, 0x2409, 0xFE80])
            groups = [prefix] + [r.randint(0, 0xFFFF) for _ in range(7)]
            if prefix == 0xFE80:
                groups[1:4] = [0, 0, 0]
            addr = ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups))
        if any(addr in net for net in DOC_NETS if net.version == addr.version):
            continue  # documentation examples name no one (docs/privacy.md)
        if addr.is_loopback:
            continue
        if addr.is_global or addr.is_private or addr.is_link_local:
            return addr.compressed if r.random() < 0.7 else addr.exploded


# (prefix, length) of common card brands
BRANDS = [("4", 16), ("4", 13), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15)]
BRANDS += [("6011", 16), ("65", 16), ("3530", 16), ("36", 14), ("62", 16)]


def _luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        v = int(ch)
        if i % 2 == 0:  # doubled: the check digit will sit to the right
            v = v * 2 - 9 if v * 2 > 9 else v * 2
        total += v
    return str((10 - total % 10) % 10)


def credit_card(r: random.Random) -> str:
    prefix, length = r.choice(BRANDS)
    body = prefix + "".join(r.choice(string.digits) for _ in range(length - len(prefix) - 1))
    num = body + _luhn_digit(body)
    style = r.choice(["plain", "space", "dash"])
    if style == "plain" or length == 13:  # 13-digit Visa numbers are written in one run
        return num
    sep = " " if style == "space" else "-"
    if length in (14, 15):  # Diners 4-6-4, American Express 4-6-5
        return sep.join([num[:4], num[4:10], num[10:]])
    return sep.join(num[i : i + 4] for i in range(0, length, 4))


def _rand(r: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    """Random characters, with a digit and a letter when the alphabet has both (as generated
    credentials do)."""
    both = any(c.isdigit() for c in alphabet) and any(c.isalpha() for c in alphabet)
    while True:
        s = "".join(r.choice(alphabet) for _ in range(n))
        if not both or (any(c.isdigit() for c in s) and any(c.isalpha() for c in s)):
            return s


def secret(r: random.Random) -> str:
    up = string.ascii_uppercase + string.digits
    return r.choice(
        [
            lambda: "sk-" + _rand(r, 48),
            lambda: "sk-proj-" + _rand(r, 64, string.ascii_letters + string.digits + "_-"),
            lambda: "AKIA" + _rand(r, 16, up),
            lambda: "ghp_" + _rand(r, 36),
            lambda: "github_pat_" + _rand(r, 22) + "_" + _rand(r, 59),
            lambda: "xoxb-" + "-".join([_rand(r, 12, string.digits), _rand(r, 13), _rand(r, 24)]),
            lambda: "AIza" + _rand(r, 35, string.ascii_letters + string.digits + "_-"),
            lambda: "sk_live_" + _rand(r, 24),
            lambda: "hf_" + _rand(r, 34),
            lambda: "glpat-" + _rand(r, 20),
            lambda: ".".join(
                [
                    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9",
                    "eyJ" + _rand(r, 40, string.ascii_letters + string.digits + "_-"),
                    _rand(r, 43, string.ascii_letters + string.digits + "_-"),
                ]
            ),
        ]
    )()


def private_key(r: random.Random) -> str:
    label = r.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"])
    raw = bytes(r.getrandbits(8) for _ in range(r.randint(120, 900)))
    b64 = base64.b64encode(raw).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])


MAKERS = {
    "email": email,
    "phone": phone,
    "ip": ip,
    "credit_card": credit_card,
    "secret": secret,
    "private_key": private_key,
}

# ---------------------------------------------------------------- where people write them

CONTEXTS = {
    "email": [
        "# Maintainer: {name} <{v}>\n",
        '    """Report bugs to {v}."""\n',
        'ADMINS = [("{name}", "{v}")]\n',
        "Please write to {v} if the build breaks.\n",
        "From: {name} <{v}>\nSubject: re: the release\n",
        'send_mail(to="{v}", subject=subject)\n',
        '<a href="mailto:{v}">contact</a>\n',
    ],
    "phone": [
        "Call me at {v} after 5pm.\n",
        '    "phone": "{v}",\n',
        "# on-call: {name}, {v}\n",
        "Tel.: {v}\n",
        "support hotline {v} (24/7)\n",
    ],
    "ip": [
        "    conn = connect('{v}', 5432)\n",
        "Failed password for root from {v} port 22 ssh2\n",
        'ALLOWED_HOSTS = ["{v}"]\n',
        '{v} - - [10/Oct/2023:13:55:36 +0000] "GET /index.html HTTP/1.1" 200 2326\n',
        "the client at {v} kept retrying\n",
        "    upstream = 'http://[{v}]:8080/'\n",
    ],
    "credit_card": [
        "card_number = '{v}'\n",
        "Paid with card {v}, exp 04/27.\n",
        '    {{"card": "{v}", "cvv": "123"}},\n',
        "# test charge on {v}\n",
    ],
    "secret": [
        'OPENAI_API_KEY = "{v}"\n',
        "export GITHUB_TOKEN={v}\n",
        "    headers = {{'Authorization': 'Bearer {v}'}}\n",
        "client = Client(api_key='{v}')\n",
        "token: {v}\n",
        "Here is my key {v} please don't share\n",
    ],
    "private_key": [
        'KEY = """{v}"""\n',
        "{v}\n",
        "# deploy key, do not commit\n{v}\n",
    ],
}

# generic assignments: the value alone is the secret (a high-entropy string under a telling name)
ASSIGNMENTS = [
    'API_KEY = "{v}"\n',
    "db_password = '{v}'\n",
    "SECRET_KEY={v}\n",
    '    "client_secret": "{v}",\n',
    "auth_token: {v}\n",
]

FILLER = [
    "def area(r):\n    return math.pi * r ** 2\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "for i, line in enumerate(fh, 1):\n    if not line.strip():\n        continue\n",
    "The quick brown fox jumps over the lazy dog.\n",
    "    logger.info('retrying in %d s', delay)\n",
    "import os\nimport sys\n\n",
    "    if version >= (3, 11):\n        return tomllib.loads(text)\n",
    "Meeting notes: ship the 2.4.1 release on 2024-03-15, then freeze.\n",
    "    return {k: v for k, v in sorted(d.items())}\n",
    "# TODO: handle the empty case\n",
]


def _planted_row(r: random.Random, kinds: list[str]) -> Row:
    parts, planted, at = [], [], 0
    for kind in kinds:
        filler = r.choice(FILLER)
        parts.append(filler)
        at += len(filler)
        value = MAKERS[kind](r)
        if kind == "secret" and r.random() < 0.3:
            value = _rand(r, r.randint(24, 40), string.ascii_letters + string.digits + "/+")
            ctx = r.choice(ASSIGNMENTS)
        else:
            ctx = r.choice(CONTEXTS[kind])
        name = f"{r.choice(FIRST).title()} {r.choice(LAST).title()}"
        before, after = ctx.split("{v}")
        before, after = before.format(name=name), after.format(name=name)
        parts.append(before + value + after)
        planted.append((kind, at + len(before), at + len(before) + len(value)))
        at += len(before) + len(value) + len(after)
    tail = r.choice(FILLER)
    parts.append(tail)
    return Row("".join(parts), planted)


# ---------------------------------------------------------------- rows that hold none

HAZARDS = [
    # versions, sections, dates, times
    "__version__ = '3.11.7'\nsys.version_info >= (3, 10)\n",
    "Requires: numpy>=1.26.4, torch==2.13.0, ray[serve]==2.60.0\n",
    "distutils accepts 1.0.4a3, 2.7.2.2 and 3.1.1.6 as version numbers\n",
    "See the HTML5 spec, section 8.2.4.44, and RFC 7231 section 7.1.1.1.\n",
    "Windows build 10.0.19041.1415 and Chrome 120.0.6099.109\n",
    "__version__ = '2.10.1.0'\n",
    "release 0.5.1.2 of the logging package\n",
    "Released 2024-01-15 at 12:30:45 UTC; next on 15/01/2025.\n",
    "timestamp = 1700000000000  # ms since the epoch\nns = 1700000000123456789\n",
    # numbers
    "MASK = 0xDEADBEEF\nMAX = 0x7FFFFFFFFFFFFFFF\nPRIME = 2305843009213693951\n",
    "sizes = [256, 512, 1024, 2048, 4096]\nsizes 256 512 1024\n",
    "x = 100 + 200 - 3000\ny = 1e+10 + 2.5e-3\nz = x +1 -2 +3\n",
    "ISBN 978-3-16-148410-0, order #4111 2222 33, invoice 2023-000123\n",
    "assert 2**64 == 18446744073709551616\nassert 10**15 == 1000000000000000\n",
    "points = [(1, 2), (3, 4)]\nmatrix = [[1, 2, 3, 4], [5, 6, 7, 8]]\n",
    "digits = '1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6'\n",
    "call(555, 1234)\nrange(100)\nprint('%(count)d items')\n",
    # identifiers and syntax
    "@dataclass\nclass Point:\n    x: int\n\n@functools.wraps(fn)\ndef g(): ...\n",
    "y = x @ W.T + b\nz = a@b\nloss = (pred @ target.T).mean()\n",
    "path = os.path.join(base, 'lib', 'python3.11', 'site-packages')\n",
    "name = '%s@%s' % (user, host)\nurl = f'{scheme}://{user}@{host}/'\n",
    "evens, odds = a[::2], a[1::2]\nrev = s[::-1]\nb = a[10::3]\ndel a[::1000]\n",
    "d = {1: 2, 3: 4}\nlambda: None\nx = y if z else w\n",
    "uuid = '123e4567-e89b-12d3-a456-426614174000'\n",
    "sha1 = 'da39a3ee5e6b4b0d3255bfef95601890afd80709'\n",
    "mac = '00:1a:2b:3c:4d:5e'\ntime = '12:30:45'\n",
    "std::vector<int> v; std::map::find\n",
    # addresses that identify no one (the policy in docs/privacy.md)
    "sock.bind(('0.0.0.0', 8080))\nconnect('127.0.0.1', 6379)\nhost = '::1'\n",
    "netmask = '255.255.255.0'\nhostmask = '0.0.0.255'\nbcast = '255.255.255.255'\n",
    "PRIVATE = [ip_network('10.0.0.0/8'), ip_network('192.168.0.0/16'), ip_network('fe80::/10')]\n",
    "example: IPv4Address('192.0.2.1'), 198.51.100.7, 203.0.113.5, 2001:db8::1\n",
    # secrets that are not
    "token = get_token()\npassword = getpass.getpass()\nSECRET_KEY = os.environ['SECRET_KEY']\n",
    "auth = base64.encodebytes(auth).decode('ascii')\napi_key = None\n",
    "password = 'xxxxxxxxxxxxxxxx'\ntoken = 'REPLACE_WITH_YOUR_TOKEN'\n",
    "pip install scikit-learn\nimport sklearn  # sk-learn\nrisk-free rate\n",
    "    access_token_url = self.base_url + '/oauth/access_token'\n",
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ\n-----END CERTIFICATE-----\n",
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n",
    "Load the key with serialization.load_pem_private_key(data, password=None).\n",
]


# The PII in the standard library's own sources (CPython 3.11), reviewed by hand: every finding
# of the detector in every file and every candidate of a loose screen wider than any detector
# (an "x@y.z", a dotted quad, a "::" with hex digits: 349 in 144 files) were read in context.
# Listed is what is PII under the policy of docs/privacy.md: authors' and mailing lists'
# addresses, example addresses outside the documentation ranges. The rest of the screen's
# candidates are not (versions, OIDs, networks written with their prefix, the documentation
# ranges, reST's "::"), nor is "123:2:3:4:5:6:7:8" in uuid.py (reserved IPv6 space).
# Lines: "<path under the stdlib> <kind> <value> [<value> ...]".
STDLIB_PII = """
argparse.py email steven.bethard@gmail.com raymond.hettinger@gmail.com
asynchat.py email rushing@nightmare.com
asyncore.py email rushing@nightmare.com
bz2.py email nadeem.vawda@gmail.com
codecs.py email mal@lemburg.com
concurrent/futures/__init__.py email brian@sweetapp.com
concurrent/futures/_base.py email brian@sweetapp.com
concurrent/futures/process.py email brian@sweetapp.com
concurrent/futures/thread.py email brian@sweetapp.com
ctypes/_aix.py email aixtools@felt.demon.nl
distutils/command/bdist_rpm.py email joe@example.com jane@example.net
distutils/command/clean.py email calvin@cs.uni-sb.de
distutils/file_util.py email da@ski.org
distutils/sysconfig.py email fdrake@acm.org
doctest.py email tim@python.org
email/__init__.py email email-sig@python.org
email/_parseaddr.py email email-sig@python.org a@malicious.org
email/base64mime.py email email-sig@python.org
email/charset.py email email-sig@python.org
email/encoders.py email email-sig@python.org
email/errors.py email email-sig@python.org
email/feedparser.py email email-sig@python.org
email/generator.py email email-sig@python.org
email/header.py email email-sig@python.org
email/iterators.py email email-sig@python.org
email/message.py email email-sig@python.org
email/mime/application.py email email-sig@python.org
email/mime/audio.py email email-sig@python.org
email/mime/base.py email email-sig@python.org
email/mime/image.py email email-sig@python.org
email/mime/message.py email email-sig@python.org
email/mime/multipart.py email email-sig@python.org
email/mime/nonmultipart.py email email-sig@python.org
email/mime/text.py email email-sig@python.org
email/parser.py email email-sig@python.org
email/quoprimime.py email email-sig@python.org
email/utils.py email email-sig@python.org
email/utils.py email 142480216486.20800.16526388040877946887@nightshade.la.mastaler.com
encodings/__init__.py email mal@lemburg.com
encodings/ascii.py email mal@lemburg.com
encodings/base64_codec.py email mal@lemburg.com
encodings/big5.py email perky@FreeBSD.org
encodings/big5hkscs.py email perky@FreeBSD.org
encodings/bz2_codec.py email mal@lemburg.com
encodings/charmap.py email mal@lemburg.com
encodings/cp932.py email perky@FreeBSD.org
encodings/cp949.py email perky@FreeBSD.org
encodings/cp950.py email perky@FreeBSD.org
encodings/euc_jis_2004.py email perky@FreeBSD.org
encodings/euc_jisx0213.py email perky@FreeBSD.org
encodings/euc_jp.py email perky@FreeBSD.org
encodings/euc_kr.py email perky@FreeBSD.org
encodings/gb18030.py email perky@FreeBSD.org
encodings/gb2312.py email perky@FreeBSD.org
encodings/gbk.py email perky@FreeBSD.org
encodings/hex_codec.py email mal@lemburg.com
encodings/hz.py email perky@FreeBSD.org
encodings/iso2022_jp.py email perky@FreeBSD.org
encodings/iso2022_jp_1.py email perky@FreeBSD.org
encodings/iso2022_jp_2.py email perky@FreeBSD.org
encodings/iso2022_jp_2004.py email perky@FreeBSD.org
encodings/iso2022_jp_3.py email perky@FreeBSD.org
encodings/iso2022_jp_ext.py email perky@FreeBSD.org
encodings/iso2022_kr.py email perky@FreeBSD.org
encodings/johab.py email perky@FreeBSD.org
encodings/latin_1.py email mal@lemburg.com
encodings/mac_latin2.py email mal@lemburg.com
encodings/mbcs.py email mhammond@skippinet.com.au mal@lemburg.com
encodings/palmos.py email sjoerd@acm.org
encodings/ptcp154.py email mal@lemburg.com
encodings/raw_unicode_escape.py email mal@lemburg.com
encodings/rot_13.py email mal@lemburg.com
encodings/shift_jis.py email perky@FreeBSD.org
encodings/shift_jis_2004.py email perky@FreeBSD.org
encodings/shift_jisx0213.py email perky@FreeBSD.org
encodings/undefined.py email mal@lemburg.com
encodings/unicode_escape.py email mal@lemburg.com
encodings/utf_16.py email mal@lemburg.com
encodings/utf_16_be.py email mal@lemburg.com
encodings/utf_16_le.py email mal@lemburg.com
encodings/utf_7.py email brian@sweetapp.com
encodings/utf_8.py email mal@lemburg.com
encodings/uu_codec.py email mal@lemburg.com
encodings/zlib_codec.py email mal@lemburg.com
getopt.py email liw@iki.fi gerrit@nl.linux.org astrand@lysator.liu.se
hashlib.py email greg@krypto.org
http/cookies.py email timo@alum.mit.edu davem@magnet.com
imaplib.py email piers@cs.su.oz.au donn@u.washington.edu anthony@interlink.com.au
imaplib.py email Tino.Lange@isg.de az@kreativkombinat.de holbert.13@osu.edu skitta@abo.fi
inspect.py email ping@lfw.org yselivanov@sprymix.com
io.py email guido@python.org mike.verdone@gmail.com mark.russell@zen.co.uk solipsis@pitrou.net
io.py email amauryfa@gmail.com benjamin@python.org
json/__init__.py email bob@redivi.com
lib2to3/btm_matcher.py email gboutsioukis@gmail.com
lib2to3/patcomp.py email guido@python.org
lib2to3/pgen2/driver.py email guido@python.org
lib2to3/pgen2/tokenize.py email ping@lfw.org
lib2to3/pytree.py email guido@python.org
lib2to3/refactor.py email guido@python.org
locale.py email mal@lemburg.com fredrik@pythonware.com
logging/__init__.py email vinay_sajip@red-dove.com
optparse.py email gward@python.net optik-users@lists.sourceforge.net
platform.py email mal@egenix.com mal@lemburg.com info@egenix.com
poplib.py email david_ascher@brown.edu piers@cs.su.oz.au urtubia@mrbook.org
pprint.py email fdrake@acm.org
pydoc.py email ping@lfw.org
re/__init__.py email info@pythonware.com
smtpd.py email barry@python.org
smtplib.py email sendmail-bugs@sendmail.org somebody@here.my.org dragondm@integral.org
smtplib.py email esr@thyrsus.com c.evans@clear.net.nz gerhard@bigfoot.de one@one.org two@two.org
smtplib.py email three@three.org four@four.org Me@my.org me@my.org
socket.py ip 123.45.67.89
socketserver.py email lkcl@samba.org
sqlite3/__init__.py email gh@ghaering.de
sqlite3/dbapi2.py email gh@ghaering.de
sqlite3/dump.py email kippesp@gmail.com
subprocess.py email astrand@lysator.liu.se
tarfile.py email lars@gustaebel.de
textwrap.py email gward@python.net
tkinter/__init__.py email yosikawa@isi.edu
tkinter/simpledialog.py email fredrik@pythonware.com
tkinter/tix.py email sshenoy@gol.com lugrin@ms.com
tkinter/ttk.py email ggpolo@gmail.com
tokenize.py email ping@lfw.org
trace.py email zooko@zooko.com
turtle.py email glingl@aon.at
urllib/parse.py ip fe80::822a:a8ff:fe49:470c
uuid.py email ping@zesty.ca
uuid.py ip fe80::5054:ff:fe9
xml/dom/domreg.py email xml-sig@python.org
xml/etree/ElementInclude.py email fredrik@pythonware.com
xml/etree/ElementPath.py email fredrik@pythonware.com
xml/etree/ElementTree.py email fredrik@pythonware.com
xmlrpc/client.py email info@pythonware.com
xmlrpc/server.py email brian@sweetapp.com
"""


def stdlib_pii() -> dict[str, list[tuple[str, str]]]:
    """STDLIB_PII as {path under the standard library: [(kind, value), ...]}."""
    out: dict[str, list[tuple[str, str]]] = {}
    for line in STDLIB_PII.strip().splitlines():
        path, kind, *values = line.split()
        out.setdefault(path, []).extend((kind, v) for v in values)
    return out


def stdlib_rows(max_files: int, max_chars: int = 20_000) -> list[Row]:
    """``max_files`` standard-library files spread over the sorted list, each as it is (none
    screened out), cut at a line end before ``max_chars``; its reviewed PII (STDLIB_PII) are
    its planted spans, so anything else a detector reports in it is a false positive."""
    import sysconfig

    from aigc_ray.data import stdlib_files

    if max_files <= 0:
        return []
    root = Path(sysconfig.get_paths()["stdlib"])
    reviewed = stdlib_pii()
    files = stdlib_files()
    step = max(1, len(files) // max_files)
    rows = []
    for path in files[::step][:max_files]:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if len(text) > max_chars:
            text = text[: text.rfind("\n", 0, max_chars) + 1]
        rel = Path(path).relative_to(root).as_posix()
        planted = []
        for kind, value in reviewed.get(rel, []):
            at = text.find(value)
            while at >= 0:
                planted.append((kind, at, at + len(value)))
                at = text.find(value, at + len(value))
        rows.append(Row(text, sorted(planted), f"stdlib:{rel}"))
    return rows


def planted_set(seed: int = 0, per_kind: int = 200, stdlib: int = 150) -> list[Row]:
    """Rows with known PII (``per_kind`` items of each kind, 1-3 per row, mixed into code and
    prose), the hazard rows, and ``stdlib`` real standard-library files with their reviewed
    PII."""
    r = random.Random(seed)
    todo = [k for k in KINDS for _ in range(per_kind)]
    r.shuffle(todo)
    rows = []
    while todo:
        n = min(len(todo), r.randint(1, 3))
        rows.append(_planted_row(r, todo[:n]))
        del todo[:n]
    rows += [Row(h, [], "hazard") for h in HAZARDS]
    rows += stdlib_rows(stdlib)
    r.shuffle(rows)
    return rows
