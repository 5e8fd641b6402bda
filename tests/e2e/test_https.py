"""HTTPS on the endpoint, as a user sets it up: `aigc-ray tls make` writes a private CA and a
certificate, `aigc-ray serve` runs with serve.tls_certfile/keyfile (Serve's proxy terminates
TLS; its own sample requests trust serve.tls_ca_file), and the openai client trusting the CA
gets its completion. A client without the CA fails verification, and plain HTTP to the TLS
port gets no HTTP answer. Ctrl-C stops it and frees the port.

Runs its own local Ray (the e2e tier runs before the integration tier's shared instance)."""

import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from ports import free_port, listening
from tiny import tiny_model_dir, tiny_tokenizer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _until(proc: subprocess.Popen, text: str, timeout_s: float) -> str:
    """The command's output up to the line holding `text` (fails if it exits first)."""
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if text in line:
            return "".join(seen)
    pytest.fail(f"{text!r} not printed (exit {proc.poll()}):\n{''.join(seen)[-4000:]}")


def test_https_endpoint_trusted_through_our_ca_only(tmp_path):
    from openai import OpenAI

    from aigc_ray.tls import ssl_context

    made = subprocess.run(
        [str(BIN / "aigc-ray"), "tls", "make", "--host", "127.0.0.1", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    ca, cert, key = (tmp_path / n for n in ("ca.crt", "server.crt", "server.key"))
    model = tiny_model_dir(
        tmp_path / "model",
        tiny_tokenizer(tmp_path / "tok", files=10),
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        max_position_embeddings=128,
    )
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    for var in ("RAY_ADDRESS", "AIGC_RAY_API_KEYS", "AIGC_RAY_API_KEYS_FILE"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [
            str(BIN / "aigc-ray"),
            "serve",
            "--config",
            "configs/tiny.yaml",
            "--keep-serving",
            f"serve.model_dir={model}",
            f"serve.port={port}",
            "serve.engine=builtin",
            "serve.sample_max_tokens=4",
            f"serve.tls_certfile={cert}",
            f"serve.tls_keyfile={key}",
            f"serve.tls_ca_file={ca}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out = _until(proc, "serving at https://", 300)
        # the command's own sample requests went over HTTPS, trusting the CA it was given
        assert f"at https://127.0.0.1:{port}/v1 (3 sample requests ok)" in out, out[-3000:]
        base = f"https://127.0.0.1:{port}/v1"
        trusted = httpx.Client(verify=ssl_context(ca))
        client = OpenAI(base_url=base, api_key="none", http_client=trusted, max_retries=0)
        done = client.completions.create(
            model="aigc-tiny", prompt="def f(x):", max_tokens=4, extra_body={"ignore_eos": True}
        )
        assert done.usage.completion_tokens == 4
        # a client that does not trust our CA (the system's CAs) is refused by itself
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{base}/models", timeout=30)
        # plain HTTP to the TLS port: no HTTP answer at all
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/v1/models")
            plain.getresponse()
        plain.close()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the app deleted, the local Ray stopped
        t_stop = time.monotonic()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
        rest = proc.communicate(timeout=30)[0]  # what the command said while stopping
        stopped_s = time.monotonic() - t_stop
    assert proc.returncode in (0, 130, -signal.SIGINT), (
        f"not stopped {stopped_s:.0f} s after Ctrl-C (rc {proc.returncode}): {rest[-3000:]}"
    )
    deadline = time.monotonic() + 30
    while listening(port) and time.monotonic() < deadline:
        time.sleep(1)
    assert not listening(port), "the HTTPS endpoint outlived the command"
