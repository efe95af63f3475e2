"""A TCP server that tells who answered and whom it saw, and a client that
connects many times and says what each connect got, for the services
kernel test (which backend a VIP chose, whether the client's address
survived, whether a refusal was fast).

    python -m tests.netns.svc_whoami serve PORT
        answers every connection with "<its own address> <client address>"
        and prints "ready" once it listens
    python -m tests.netns.svc_whoami connect HOST PORT COUNT WAIT
        COUNT connects one after another, each waiting up to WAIT seconds;
        prints a JSON list of [answer or "refused"/"timeout"/errno name,
        seconds taken]

    python -m tests.netns.svc_whoami echo PORT
        echoes every connection's bytes back (a thread each), prints "ready"
    python -m tests.netns.svc_whoami hold HOST PORT PAUSE...
        one connection; one exchange, then after each PAUSE seconds of
        silence another; prints a JSON list of "ok" or what went wrong

Standard library only, so that it starts fast inside a namespace.
"""

from __future__ import annotations

import errno
import json
import socket
import sys
import threading
import time


def serve(port: int) -> None:
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("::", port))
    listener.listen(128)
    print("ready", flush=True)
    while True:
        conn, peer = listener.accept()
        with conn:
            me = conn.getsockname()[0].removeprefix("::ffff:")
            conn.sendall(f"{me} {peer[0].removeprefix('::ffff:')}".encode())


def connect(host: str, port: int, count: int, wait: float) -> list[tuple[str, float]]:
    found = []
    for _ in range(count):
        started = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=wait) as conn:
                conn.settimeout(wait)
                answer = conn.recv(200).decode()
        except ConnectionRefusedError:
            answer = "refused"
        except TimeoutError:
            answer = "timeout"
        except OSError as e:
            answer = errno.errorcode.get(e.errno or 0, str(e))
        found.append((answer, round(time.monotonic() - started, 3)))
    return found


def echo(port: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(16)
    print("ready", flush=True)

    def answer(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(200):
                conn.sendall(data)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


def hold(host: str, port: int, pauses: list[float]) -> list[str]:
    found = []
    with socket.create_connection((host, port), timeout=3) as conn:
        conn.settimeout(3)
        for pause in [0.0, *pauses]:
            time.sleep(pause)
            try:
                conn.sendall(b"ping")
                found.append("ok" if conn.recv(200) == b"ping" else "wrong answer")
            except TimeoutError:
                found.append("timeout")
            except OSError as e:
                found.append(errno.errorcode.get(e.errno or 0, str(e)))
    return found


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "serve":
        serve(int(argv[1]))
        return 0
    if len(argv) == 2 and argv[0] == "echo":
        echo(int(argv[1]))
        return 0
    if len(argv) >= 3 and argv[0] == "hold":
        print(json.dumps(hold(argv[1], int(argv[2]), [float(p) for p in argv[3:]])))
        return 0
    if len(argv) == 5 and argv[0] == "connect":
        print(json.dumps(connect(argv[1], int(argv[2]), int(argv[3]), float(argv[4]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
