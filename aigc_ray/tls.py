"""TLS material for the endpoint (HTTPS) and for Ray's traffic between nodes: a private CA and a
certificate signed by it (`aigc-ray tls make`), and the checks run before a server starts with
them, so a missing, expired or mismatched file is an error naming it, never a hang or a
handshake failure later. The `cryptography` library; Ray only to learn a node's address."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from aigc_ray.errors import AigcRayError


class TLSError(AigcRayError, ValueError):
    """A certificate or key that cannot be used: missing, unreadable, expired, not matching."""


CA_CERT, CA_KEY, CERT, KEY = "ca.crt", "ca.key", "server.crt", "server.key"


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool) -> None:
    path.write_bytes(data)
    path.chmod(0o600 if private else 0o644)


def make_certs(out_dir: str | Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """A private CA and one certificate for `hosts` (names or IPs, the first is its common
    name) signed by it, written to `out_dir` (ca.crt, ca.key, server.crt, server.key; the keys
    0600). The certificate serves both ends (serverAuth and clientAuth), as Ray's mutual TLS
    between nodes needs. Returns {what: path}."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not hosts:
        raise TLSError("tls make: name at least one host (a DNS name or an IP address)")
    out = Path(out_dir)
    if not out.exists():  # a directory of the user's (`--dir .`) keeps its mode
        out.mkdir(parents=True)
        out.chmod(0o700)
    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("aigc_ray private CA"))
        .issuer_name(_name("aigc_ray private CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key, cert = _issue(ca, ca_key, hosts, start, end)
    pem = serialization.Encoding.PEM
    paths = {
        k: out / v for k, v in {"ca": CA_CERT, "ca_key": CA_KEY, "cert": CERT, "key": KEY}.items()
    }
    _write(paths["ca"], ca.public_bytes(pem), private=False)
    _write(paths["ca_key"], _pem_key(ca_key), private=True)
    _write(paths["cert"], cert.public_bytes(pem), private=False)
    _write(paths["key"], _pem_key(key), private=True)
    return paths


def _issue(ca, ca_key, hosts: list[str], start, end):
    """A key and a certificate for `hosts` signed by the CA: serverAuth and clientAuth (Ray's
    mutual TLS between nodes uses one certificate for both ends)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


NODE_CERT, NODE_KEY = "node.crt", "node.key"


def node_hosts() -> list[str]:
    """What other nodes reach this one by: its IP (as Ray picks it), its name, and loopback."""
    import socket

    import ray._private.services as services  # Ray's own choice of the node's address

    hosts = [services.get_node_ip_address(), socket.gethostname(), "127.0.0.1", "localhost"]
    return list(dict.fromkeys(h for h in hosts if h))


def make_node_cert(ca_dir: str | Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """This node's certificate (node.crt, node.key 0600 in `ca_dir`) for `hosts`, signed by the
    CA there (ca.crt, ca.key: what `aigc-ray tls make` wrote and cluster.yaml ships to every
    node). Ray's TLS needs each node's address in its certificate: each node makes its own at
    start. Returns {what: path}."""
    from cryptography.hazmat.primitives import serialization

    d = Path(ca_dir)
    ca = _certificate(d / CA_CERT, "tls node")
    ca_key = serialization.load_pem_private_key(_read(d / CA_KEY, "tls node"), password=None)
    now = dt.datetime.now(dt.timezone.utc)
    key, cert = _issue(
        ca, ca_key, hosts, now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    )
    paths = {"ca": d / CA_CERT, "cert": d / NODE_CERT, "key": d / NODE_KEY}
    _write(paths["cert"], cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths["key"], _pem_key(key), private=True)
    return paths


def ray_tls_env(cert: str | Path, key: str | Path, ca: str | Path) -> dict[str, str]:
    """The environment that turns on Ray's TLS (gRPC between every Ray process, mutual) with
    these files, checked first (TLSError naming a bad one)."""
    check_tls_files(cert, key, ca, what="ray tls")
    return {
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": str(cert),
        "RAY_TLS_SERVER_KEY": str(key),
        "RAY_TLS_CA_CERT": str(ca),
    }


def _read(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise TLSError(f"{what}: {p}: no such file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise TLSError(f"{what}: {p}: cannot be read ({e.strerror})") from None


def _certificate(path: str | Path, what: str):
    from cryptography import x509

    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise TLSError(f"{what}: {path}: not a PEM certificate") from None


def check_tls_files(
    certfile: str | Path, keyfile: str | Path, cafile: str | Path | None = None, what: str = "tls"
) -> None:
    """Raise TLSError naming the file unless `certfile` is a PEM certificate valid now,
    `keyfile` its unencrypted private key and, with `cafile`, the certificate is signed by that
    CA (itself valid now)."""
    from cryptography.hazmat.primitives import serialization

    now = dt.datetime.now(dt.timezone.utc)
    cert = _certificate(certfile, what)
    if now > cert.not_valid_after_utc:
        raise TLSError(
            f"{what}: {certfile}: the certificate expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; make a new one (aigc-ray tls make)"
        )
    if now < cert.not_valid_before_utc:
        raise TLSError(
            f"{what}: {certfile}: the certificate is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check this machine's clock)"
        )
    data = _read(keyfile, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise TLSError(f"{what}: {keyfile}: not an unencrypted PEM private key") from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise TLSError(f"{what}: the key {keyfile} does not match the certificate {certfile}")
    if cafile is not None:
        ca = _certificate(cafile, what)
        if now > ca.not_valid_after_utc:
            raise TLSError(f"{what}: {cafile}: the CA certificate expired")
        try:
            cert.verify_directly_issued_by(ca)
        except Exception as e:  # noqa: BLE001 - InvalidSignature, or a ValueError/TypeError
            raise TLSError(
                f"{what}: {certfile} is not signed by the CA {cafile} ({type(e).__name__})"
            ) from None


def ssl_context(cafile: str | Path | None):
    """A client SSL context that trusts `cafile` (else the system's CAs)."""
    import ssl

    return ssl.create_default_context(cafile=os.fspath(cafile) if cafile else None)
