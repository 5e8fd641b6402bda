"""The port helpers of every tier: the one free-port helper, and whether a port is in use. Call
free_port where a server is about to start (in a fixture), never at import time: a port picked
at collection may be taken 40 minutes later."""

import random
import socket

# Ray's workers take ports 10002-19999 by default; every port-0 bind (Ray's raylets, object
# managers and agents, gloo, vLLM, the OS's choice) comes from the ephemeral range
# (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 on Linux). A port picked between the two
# is one none of them will take between the moment a test picks it and its server binds it.
OURS = (20000, 32767)
_rng = random.SystemRandom()  # whatever a test seeds


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port nothing listens on right now, outside the range the OS and Ray hand out."""
    high = min(OURS[1], _ephemeral_low() - 1)
    for _ in range(200):
        port = _rng.randint(OURS[0], high) if high > OURS[0] else 0
        if port and _bindable(port):
            return port
    with socket.socket() as s:  # no room below the ephemeral range: the OS picks
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port` now."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0
