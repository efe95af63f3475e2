"""TCP request/response latency for both address families: `lab bench`'s
pinned round-trip measurement where sockperf cannot go.

Debian 12's sockperf (3.7) takes IPv4 addresses only, so the bench runs this
beside it on every path, IPv4 and IPv6 alike: one byte each way over one
TCP connection with Nagle off, the client timing each round trip with the
monotonic clock. Both ends are pinned to one CPU by the caller (taskset), as
sockperf's are. The interpreter's own time per message is in the figure,
the same for every path: compare paths with it, not with sockperf's.

    python -m overlayd.lab.rr serve PORT
    python -m overlayd.lab.rr ping ADDRESS PORT SECONDS   -> p50 in us
"""

from __future__ import annotations

import socket
import statistics
import sys
import time
from ipaddress import ip_address

WARMUP = 200  # round trips not counted: connection and caches settling


def serve(port: int) -> None:
    """Answer each byte with one byte, one connection after another, on
    both families (one dual-stack socket)."""
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", port))
    listener.listen(4)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(1):
                conn.sendall(data)


def round_trips(address: str, port: int, seconds: float) -> list[int]:
    """Round trips in ns for `seconds`, after the warm-up."""
    family = socket.AF_INET6 if ip_address(address).version == 6 else socket.AF_INET
    with socket.create_connection((address, port), timeout=10) as conn:
        if conn.family != family:
            raise RuntimeError(f"connected over {conn.family}, wanted {family}")
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples: list[int] = []
        clock = time.monotonic_ns
        deadline = clock() + int(seconds * 1e9)
        sent = 0
        while True:
            start = clock()
            conn.sendall(b"x")
            if not conn.recv(1):
                raise RuntimeError("the server closed the connection")
            end = clock()
            sent += 1
            if sent > WARMUP:
                samples.append(end - start)
                if end > deadline:
                    return samples


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"] and len(argv) == 2:
        serve(int(argv[1]))
        return 0
    if argv[:1] == ["ping"] and len(argv) == 4:
        samples = round_trips(argv[1], int(argv[2]), float(argv[3]))
        print(f"{statistics.median(samples) / 1000:.2f} {len(samples)}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
