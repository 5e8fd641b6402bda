"""The one free-port helper for every tier. Call it where a server is about to start (in a
fixture), never at import time: a port picked at collection may be taken 40 minutes later."""

import socket


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
