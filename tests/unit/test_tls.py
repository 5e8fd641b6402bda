"""TLS material (aigc_ray.tls, `aigc-ray tls make`): a private CA and a certificate that a real
handshake accepts only with that CA; the checks a server runs before it starts name the file
that is missing, expired, not matching its key or not signed by the CA."""

import datetime as dt
import os
import ssl
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aigc_ray.config import ConfigError, load_config
from aigc_ray.tls import TLSError, check_tls_files, make_certs, ssl_context


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("tls"), ["127.0.0.1", "localhost"])


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("tls_other"), ["127.0.0.1"])


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def _https_server(certs):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs["cert"], certs["key"])
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_made_certificates_pass_the_checks_and_keys_are_owner_only(certs):
    check_tls_files(certs["cert"], certs["key"], certs["ca"])
    for k in ("key", "ca_key"):
        assert stat.S_IMODE(os.stat(certs[k]).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(certs["cert"].parent).st_mode) == 0o700


def test_a_handshake_succeeds_with_our_ca_and_fails_without_it(certs, other):
    import urllib.error
    import urllib.request

    server = _https_server(certs)
    url = f"https://127.0.0.1:{server.server_address[1]}/"
    try:
        with urllib.request.urlopen(url, context=ssl_context(certs["ca"]), timeout=10) as r:
            assert r.read() == b"ok"
        for untrusted in (ssl_context(None), ssl_context(other["ca"])):  # system CAs, another CA
            with pytest.raises(urllib.error.URLError) as e:
                urllib.request.urlopen(url, context=untrusted, timeout=10)
            assert isinstance(e.value.reason, ssl.SSLCertVerificationError)
    finally:
        server.shutdown()


def test_missing_files_are_named(certs, tmp_path):
    with pytest.raises(TLSError, match=f"serve: {tmp_path}/none.crt: no such file"):
        check_tls_files(tmp_path / "none.crt", certs["key"], what="serve")
    with pytest.raises(TLSError, match=f"{tmp_path}/none.key: no such file"):
        check_tls_files(certs["cert"], tmp_path / "none.key")
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(TLSError, match="junk.crt: not a PEM certificate"):
        check_tls_files(tmp_path / "junk.crt", certs["key"])


def test_a_key_that_does_not_match_is_refused(certs, other):
    with pytest.raises(TLSError, match=f"the key {other['key']} does not match the certificate"):
        check_tls_files(certs["cert"], other["key"])


def test_a_certificate_of_another_ca_is_refused(certs, other):
    with pytest.raises(TLSError, match=f"{certs['cert']} is not signed by the CA {other['ca']}"):
        check_tls_files(certs["cert"], certs["key"], other["ca"])


def test_an_expired_certificate_is_refused(certs, tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_key = serialization.load_pem_private_key(certs["ca_key"].read_bytes(), None)
    key = serialization.load_pem_private_key(certs["key"].read_bytes(), None)
    ca = x509.load_pem_x509_certificate(certs["ca"].read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    old = (
        x509.CertificateBuilder()
        .subject_name(ca.subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    path = tmp_path / "old.crt"
    path.write_bytes(old.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(TLSError, match=f"{path}: the certificate expired on"):
        check_tls_files(path, certs["key"], certs["ca"])


def test_serve_tls_settings_are_checked_with_the_config(certs):
    with pytest.raises(ConfigError, match="tls_certfile and serve.tls_keyfile go together"):
        load_config("configs/tiny.yaml", [f"serve.tls_certfile={certs['cert']}"])
    with pytest.raises(ConfigError, match="haproxy is HTTP only"):
        load_config(
            "configs/tiny.yaml",
            [
                "serve.ingress=haproxy",
                f"serve.tls_certfile={certs['cert']}",
                f"serve.tls_keyfile={certs['key']}",
            ],
        )
    cfg = load_config(
        "configs/tiny.yaml",
        [f"serve.tls_certfile={certs['cert']}", f"serve.tls_keyfile={certs['key']}"],
    )
    assert cfg.serve.scheme == "https"


def test_serve_refuses_a_bad_key_before_anything_starts(certs, other, monkeypatch):
    """run_serve checks the files first: the error names the key and Serve is never started
    (serve.start replaced by one that fails the test; Ray may be up: the suite's shared one)."""
    from aigc_ray.config import ServeConfig
    from aigc_ray.serve import app, run_serve

    def started(*args, **kwargs):
        raise AssertionError("serve.start was called with a key that does not match")

    monkeypatch.setattr(app.serve, "start", started)
    monkeypatch.delenv("AIGC_RAY_API_KEYS", raising=False)
    monkeypatch.delenv("AIGC_RAY_API_KEYS_FILE", raising=False)
    cfg = ServeConfig(tls_certfile=str(certs["cert"]), tls_keyfile=str(other["key"]))
    with pytest.raises(TLSError, match="does not match"):
        run_serve(cfg, model_dir="/nonexistent")


def test_tls_make_command(tmp_path, capsys):
    from aigc_ray.cli import main

    assert main(["tls", "make", "--host", "127.0.0.1", "--dir", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert f"serve.tls_certfile={tmp_path / 't' / 'server.crt'}" in out
    assert main(["tls", "node", "--dir", str(tmp_path / "t")]) == 0
    assert f"node certificate {tmp_path / 't' / 'node.crt'} for " in capsys.readouterr().out
    check_tls_files(
        tmp_path / "t" / "node.crt", tmp_path / "t" / "node.key", tmp_path / "t" / "ca.crt"
    )
    assert main(["tls", "make", "--dir", str(tmp_path / "u")]) == 2  # no --host
    assert "name at least one --host" in capsys.readouterr().err
    check_tls_files(
        tmp_path / "t" / "server.crt", tmp_path / "t" / "server.key", tmp_path / "t" / "ca.crt"
    )


def test_a_node_certificate_from_the_shipped_ca_turns_on_rays_tls(certs, tmp_path):
    """What cluster.yaml's start commands do on each node: the CA (ca.crt, ca.key) shipped by
    file_mounts signs the node's own certificate for its addresses; ray_tls_env checks it and
    names Ray's variables."""
    import shutil

    from aigc_ray.tls import make_node_cert, node_hosts, ray_tls_env

    d = tmp_path / "node"
    d.mkdir()
    for name in ("ca.crt", "ca.key"):
        shutil.copy(certs["ca"].parent / name, d / name)
    hosts = node_hosts()
    assert "127.0.0.1" in hosts and len(hosts) >= 2
    paths = make_node_cert(d, hosts)
    env = ray_tls_env(paths["cert"], paths["key"], paths["ca"])
    assert env == {
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": str(d / "node.crt"),
        "RAY_TLS_SERVER_KEY": str(d / "node.key"),
        "RAY_TLS_CA_CERT": str(d / "ca.crt"),
    }
    assert stat.S_IMODE(os.stat(d / "node.key").st_mode) == 0o600
    with pytest.raises(TLSError, match="ray tls: .* does not match"):
        ray_tls_env(paths["cert"], certs["key"], paths["ca"])
    with pytest.raises(TLSError, match=f"tls node: {tmp_path}/empty/ca.crt: no such file"):
        make_node_cert(tmp_path / "empty", hosts)
