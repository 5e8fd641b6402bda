"""Settings of the S3-compatible server (moto) the data-stage tests start on loopback, and free
ports for the servers the tests start (a fixed port may be taken on a shared machine).

Ray's workers get the endpoint through the runtime env, as they would get real AWS settings.
"""

import socket


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MOTO_PORT = free_port()
S3_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{MOTO_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
