"""A TCP and UDP echo of the client's address, and a prober for it, for the
policy checks (the lab's policy tests and the kernel tests): a connection
that passes is answered with the address the server saw, one that does not
gets no answer within the wait.

    python -m overlayd.lab.echo serve ADDRESS[,ADDRESS...] PORT...
        listens on TCP and UDP on every address and port ("::" is both
        families' any) and prints "ready" once it does
    python -m overlayd.lab.echo probe WAIT '[["tcp", HOST, PORT], ...]'
        tries every probe at once, each waiting up to WAIT seconds for an
        answer, and prints a JSON list: the address each server saw, or
        null for no answer
    python -m overlayd.lab.echo watch WAIT PAUSE '[["tcp", HOST, PORT], ...]'
        the same probes again and again, PAUSE seconds apart, one JSON list
        per round, until killed

A host with several addresses binds each: an unbound UDP socket would
answer from the address its route picks, which is no reply to conntrack.
Probes run in parallel (one thread each), so a batch of refusals costs one
WAIT, not one each. `serve_in` and `probe_from` run these inside a network
namespace (a lab namespace's name, or a container's /proc/PID/ns/net).

Standard library only, so that it starts fast inside a namespace.
"""

from __future__ import annotations

import json
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

READY = "ready"
# (protocol "tcp" or "udp", address, port)
Probe = tuple[str, str, int]


def _seen(address: str) -> str:
    """The client's address as the checks compare it: an IPv4 client that
    came in on a dual-stack socket by its IPv4 address."""
    return address.removeprefix("::ffff:")


def serve(addresses: Sequence[str], ports: Sequence[int]) -> None:
    """Answer every TCP connection and UDP datagram with the client's
    address, forever."""
    sel = selectors.DefaultSelector()
    for port in ports:
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                s = socket.socket(family, kind)
                if address == "::":
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((address, port))
                if kind == socket.SOCK_STREAM:
                    s.listen(64)
                sel.register(s, selectors.EVENT_READ, kind)
    print(READY, flush=True)
    while True:
        for key, _ in sel.select():
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            if key.data == socket.SOCK_STREAM:
                conn, peer = ready.accept()
                with conn:
                    conn.sendall(_seen(peer[0]).encode())
            else:
                _, peer = ready.recvfrom(2048)
                ready.sendto(_seen(peer[0]).encode(), peer)


def _one(wait: float, proto: str, host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        if proto == "tcp":
            with socket.create_connection((host, port), timeout=wait) as conn:
                conn.settimeout(wait)
                return conn.recv(100).decode()
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.settimeout(wait)
            udp.sendto(b"?", (host, port))
            return udp.recv(100).decode()
    except OSError:
        return None


def probe(wait: float, probes: Sequence[Probe]) -> list[str | None]:
    """Every probe at once: what each server answered, None for nothing
    (refused, dropped, or no answer within `wait` seconds)."""
    answers: list[str | None] = [None] * len(probes)

    def run(index: int, item: Probe) -> None:
        answers[index] = _one(wait, *item)

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(probes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def watch(wait: float, pause: float, probes: Sequence[Probe]) -> None:
    """`probe` in rounds, forever: one JSON line per round."""
    while True:
        print(json.dumps(probe(wait, probes)), flush=True)
        time.sleep(pause)


# --- from the test process ------------------------------------------------------


def _argv(ns: str, *args: str) -> list[str]:
    from overlayd.lab import netns  # the lab's namespace rules (never the root one)

    return netns.module_argv(ns, __name__, *args)


def serve_in(
    ns: str, ports: Sequence[int], addresses: Sequence[str] = ("::",)
) -> subprocess.Popen[bytes]:
    """The server in namespace `ns`, returned once it listens; the caller
    kills it."""
    server = subprocess.Popen(
        _argv(ns, "serve", ",".join(addresses), *map(str, ports)), stdout=subprocess.PIPE
    )
    assert server.stdout is not None
    said = server.stdout.readline()
    if said != f"{READY}\n".encode():
        server.kill()
        server.wait()
        raise RuntimeError(f"echo server in {ns} did not start: {said!r}")
    return server


def start_probing(ns: str, wait: float, probes: Sequence[Probe]) -> subprocess.Popen[str]:
    """`probe` started inside namespace `ns`; `answers` collects it (so
    that probes from several namespaces run at the same time)."""
    return subprocess.Popen(
        _argv(ns, "probe", str(wait), json.dumps([list(p) for p in probes])),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def answers(prober: subprocess.Popen[str], wait: float) -> list[str | None]:
    """What a `start_probing` prober found, once it is done."""
    out, err = prober.communicate(timeout=wait + 60)
    if prober.returncode != 0:
        raise RuntimeError(f"probes failed (exit {prober.returncode}): {err.strip()}")
    found: list[str | None] = json.loads(out)
    return found


def probe_from(ns: str, wait: float, probes: Sequence[Probe]) -> list[str | None]:
    """`probe` run inside namespace `ns`."""
    return answers(start_probing(ns, wait, probes), wait)


def watch_from(
    ns: str, wait: float, pause: float, probes: Sequence[Probe]
) -> subprocess.Popen[str]:
    """`watch` running inside namespace `ns`; stop it with `stop_watching`."""
    return subprocess.Popen(
        _argv(ns, "watch", str(wait), str(pause), json.dumps([list(p) for p in probes])),
        stdout=subprocess.PIPE,
        text=True,
    )


def stop_watching(watcher: subprocess.Popen[str]) -> list[list[str | None]]:
    """Stop a `watch_from` prober; every round it completed, in order."""
    watcher.kill()
    out, _ = watcher.communicate()
    rounds = []
    for line in out.splitlines():
        try:
            rounds.append(json.loads(line))
        except ValueError:  # the last line, cut short by the kill
            continue
    return rounds


def _probes(text: str) -> list[Probe]:
    return [(str(p), str(h), int(n)) for p, h, n in json.loads(text)]


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "serve":
        serve(argv[1].split(","), [int(p) for p in argv[2:]])
        return 0
    if len(argv) == 3 and argv[0] == "probe":
        print(json.dumps(probe(float(argv[1]), _probes(argv[2]))))
        return 0
    if len(argv) == 4 and argv[0] == "watch":
        watch(float(argv[1]), float(argv[2]), _probes(argv[3]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
