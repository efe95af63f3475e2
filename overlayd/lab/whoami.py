"""A tiny TCP service for lab checks: the server answers every connection with
the client address it sees, so the client learns whether it was NATed.

    python -m overlayd.lab.whoami serve PORT
    python -m overlayd.lab.whoami ask HOST PORT [TIMEOUT]   prints the address seen

The server listens on both families; an IPv4 client is named by its IPv4
address (192.0.2.11, not the socket's ::ffff:192.0.2.11), an IPv6 client by
its IPv6 address.

Standard library only, so that it starts fast inside a namespace.
"""

from __future__ import annotations

import ipaddress
import socket
import sys


def _listen(port: int) -> socket.socket:
    """One socket for both families where the namespace has IPv6 (every lab
    namespace does), else IPv4 alone."""
    try:
        return socket.create_server(
            ("::", port), family=socket.AF_INET6, dualstack_ipv6=True, reuse_port=True
        )
    except OSError:
        return socket.create_server(("0.0.0.0", port), reuse_port=True)


def seen_as(address: str) -> str:
    """The client's address as the checks compare it: an IPv4 client that
    came in on the dual-stack socket by its IPv4 address."""
    parsed = ipaddress.ip_address(address.split("%")[0])
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def serve(port: int) -> None:
    with _listen(port) as server:
        while True:
            conn, peer = server.accept()
            with conn:
                conn.sendall(f"{seen_as(peer[0])}\n".encode())


def ask(host: str, port: int, timeout: float) -> str:
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.settimeout(timeout)
        return conn.makefile().readline().strip()


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        serve(int(argv[1]))
        return 0
    if len(argv) >= 3 and argv[0] == "ask":
        try:
            print(ask(argv[1], int(argv[2]), float(argv[3]) if len(argv) > 3 else 2.0))
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
