"""TCP connect time, for `overlayctl lab svcbench --latency`: a server that
accepts and drops connections, and a client that times many fresh
connects to several targets, interleaved.

    python -m overlayd.lab.conntime serve PORT
        accepts every connection and closes it; prints "ready" once it listens
    python -m overlayd.lab.conntime time COUNT WARMUP HOST:PORT...
        WARMUP untimed connects to each target, then COUNT rounds of one
        connect to each (the targets' order alternates round by round);
        prints a JSON object: target -> the COUNT connect times in ns

A connect is timed with perf_counter_ns around `connect()` alone (the
socket is made before, closed after): SYN out to SYN-ACK back, which is
the first packet's trip through the services table and the reply's.
Each connection is closed with a reset (SO_LINGER 0), so that thousands
of them leave no TIME_WAIT sockets or long-lived conntrack entries that
would load later rounds. Any failed connect fails the run: a figure from
connects that did not all land means nothing.

Standard library only, so that it starts fast inside a namespace.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from collections.abc import Sequence

READY = "ready"
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


def serve(port: int) -> None:
    with socket.create_server(("0.0.0.0", port), backlog=1024, reuse_port=True) as server:
        print(READY, flush=True)
        while True:
            conn, _ = server.accept()
            conn.close()


def connect_ns(host: str, port: int, timeout: float = 2.0) -> int:
    """One connect's time in ns; raises OSError when it fails."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        sock.settimeout(timeout)
        started = time.perf_counter_ns()
        sock.connect((host, port))
        return time.perf_counter_ns() - started
    finally:
        sock.close()


def parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def time_targets(targets: Sequence[str], count: int, warmup: int) -> dict[str, list[int]]:
    parsed = [(t, *parse_target(t)) for t in targets]
    for _ in range(warmup):
        for _, host, port in parsed:
            connect_ns(host, port)
    times: dict[str, list[int]] = {t: [] for t in targets}
    for i in range(count):
        # Alternate the order so that neither target always follows the other.
        for name, host, port in parsed if i % 2 == 0 else reversed(parsed):
            times[name].append(connect_ns(host, port))
    return times


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "serve":
        serve(int(argv[1]))
        return 0
    if len(argv) >= 4 and argv[0] == "time":
        print(json.dumps(time_targets(argv[3:], int(argv[1]), int(argv[2]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
