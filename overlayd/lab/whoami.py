"""A tiny TCP service for lab checks: the server answers every connection with
the client address it sees, so the client learns whether it was NATed.

    python -m overlayd.lab.whoami serve PORT
    python -m overlayd.lab.whoami ask HOST PORT [TIMEOUT]   prints the address seen

Standard library only, so that it starts fast inside a namespace.
"""

from __future__ import annotations

import socket
import sys


def serve(port: int) -> None:
    with socket.create_server(("0.0.0.0", port), reuse_port=True) as server:
        while True:
            conn, (address, _) = server.accept()
            with conn:
                conn.sendall(f"{address}\n".encode())


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
