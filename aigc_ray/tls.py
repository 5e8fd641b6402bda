"""TLS material for the endpoint (HTTPS) and for Ray's traffic between nodes: a private CA and a
certificate signed by it (`aigc-ray tls make`), and the checks run before a server starts with
them, so a missing, expired or mismatched file is an error naming it, never a hang or a
handshake failure later. The `cryptography` library; never imports Ray."""

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
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if not hosts:
        raise TLSError("tls make: name at least one host (a DNS name or an IP address)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    pem = serialization.Encoding.PEM
    no_pass = serialization.NoEncryption()
    pkcs8 = serialization.PrivateFormat.PKCS8
    paths = {
        k: out / v for k, v in {"ca": CA_CERT, "ca_key": CA_KEY, "cert": CERT, "key": KEY}.items()
    }
    _write(paths["ca"], ca.public_bytes(pem), private=False)
    _write(paths["ca_key"], ca_key.private_bytes(pem, pkcs8, no_pass), private=True)
    _write(paths["cert"], cert.public_bytes(pem), private=False)
    _write(paths["key"], key.private_bytes(pem, pkcs8, no_pass), private=True)
    return paths


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

    try:
        return x509.load_pem_x509_certificate(_read(path, what))
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
    try:
        key = serialization.load_pem_private_key(_read(keyfile, what), password=None)
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
        except (ValueError, TypeError, Exception) as e:  # InvalidSignature is not a ValueError
            raise TLSError(
                f"{what}: {certfile} is not signed by the CA {cafile} ({type(e).__name__})"
            ) from None


def ssl_context(cafile: str | Path | None):
    """A client SSL context that trusts `cafile` (else the system's CAs)."""
    import ssl

    return ssl.create_default_context(cafile=os.fspath(cafile) if cafile else None)
