"""DNS throughput (`overlayctl lab dnsbench`): how many queries
a second the responder (surfaces/dns.py) answers for one cached name from
one client, and the CPU the responder's process spends on them.

The responder runs in a process of its own (`python -m
overlayd.lab.dnsbench serve`), as it would inside overlayd, with records
for a cluster of the given size, on a loopback address; the client is this
process, a plain blocking UDP socket that keeps `window` queries in flight
(each answer sends the next). Only loopback traffic. Figures:

    answered/s    answers received per second of the timed phase
    server CPU    the responder process's user+system seconds in that
                  phase, and per 1,000 answers (so that a figure holds on
                  another machine's clock too)
    latency       one query in flight at a time: p50 and p99 round trip

Two phases: the rate limit off (what the responder can do) and the
default limit (what one container gets: 200/s, bursts of 400).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import ip_address

import dns.message
import dns.rdatatype

from overlayd.plan.dns_records import DnsRecords, build_records
from overlayd.plan.policy_model import Endpoint, LabelSelector, Protocol
from overlayd.plan.service_model import Service, ServicePort
from overlayd.surfaces.dns import DEFAULT_BURST, DEFAULT_RATE, DnsServer

HOST = "127.0.0.1"
NAME = "svc0.overlay.internal"
TICKS = os.sysconf("SC_CLK_TCK")


def synthetic_records(endpoints: int, services: int) -> DnsRecords:
    """`endpoints` containers, spread over `services` services."""
    services = max(1, services)
    eps = [
        Endpoint(
            key=f"/overlayd/endpoints/h{i // 250}/c{i}",
            id=f"c{i}",
            host=f"h{i // 250}",
            name=f"c{i}",
            addresses=(ip_address(f"10.{128 + i // 62500}.{i // 250 % 250}.{i % 250 + 2}"),),
            labels={"app": f"svc{i % services}"},
        )
        for i in range(endpoints)
    ]
    svcs = [
        Service(
            name=f"svc{j}",
            selector=LabelSelector(match_labels=(("app", f"svc{j}"),)),
            ports=(ServicePort("http", Protocol.TCP, 80, 8080),),
            vips=(ip_address(f"10.96.{j // 250}.{j % 250 + 1}"),),
        )
        for j in range(services)
    ]
    backends: dict[str, list[Endpoint]] = {s.name: [] for s in svcs}
    for e in eps:
        backends[e.labels["app"]].append(e)
    return build_records(svcs, backends, eps)


async def _serve(port: int, endpoints: int, services: int, rate: float) -> None:
    records = synthetic_records(endpoints, services)
    server = DnsServer(records, upstreams=[], rate=rate, burst=max(rate * 2, 1.0))
    address = await server.start(HOST, port, tcp=False)
    print(f"ready {address[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.close()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


@contextlib.contextmanager
def _server(endpoints: int, services: int, rate: float) -> Iterator[tuple[int, int]]:
    """A responder process; yields its pid and port."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "overlayd.lab.dnsbench",
            "serve",
            f"--endpoints={endpoints}",
            f"--services={services}",
            f"--rate={rate}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().split()
        if len(line) != 2 or line[0] != "ready":
            raise RuntimeError(f"the DNS responder did not start: {line}")
        yield process.pid, int(line[1])
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _queries(name: str) -> list[bytes]:
    """One wire per query id, so that answers can be told apart."""
    wire = bytearray(dns.message.make_query(name, dns.rdatatype.A).to_wire())
    queries = []
    for qid in range(65536):
        wire[0:2] = qid.to_bytes(2, "big")
        queries.append(bytes(wire))
    return queries


@dataclass(frozen=True)
class Phase:
    answered: int
    sent: int
    seconds: float
    server_cpu: float
    client_cpu: float

    @property
    def rate(self) -> float:
        return self.answered / self.seconds


def _flood(port: int, pid: int, queries: Sequence[bytes], seconds: float, window: int) -> Phase:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((HOST, port))
    sock.settimeout(0.2)
    sent = answered = 0
    cpu0, client0 = _cpu_seconds(pid), time.process_time()
    start = time.monotonic()
    deadline = start + seconds
    try:
        for _ in range(window):
            sock.send(queries[sent & 0xFFFF])
            sent += 1
        while time.monotonic() < deadline:
            try:
                sock.recv(4096)
            except TimeoutError:
                # Answers lost or refused by the limit: fill the window again.
                for _ in range(window):
                    sock.send(queries[sent & 0xFFFF])
                    sent += 1
                continue
            answered += 1
            sock.send(queries[sent & 0xFFFF])
            sent += 1
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    return Phase(answered, sent, elapsed, _cpu_seconds(pid) - cpu0, time.process_time() - client0)


def _latencies(port: int, queries: Sequence[bytes], count: int) -> list[float]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((HOST, port))
        sock.settimeout(1.0)
        found = []
        for i in range(count):
            begin = time.perf_counter()
            sock.send(queries[i & 0xFFFF])
            sock.recv(4096)
            found.append(time.perf_counter() - begin)
    return found


def dnsbench(
    *, seconds: float = 5.0, window: int = 32, endpoints: int = 10000, services: int = 1000
) -> list[str]:
    """Runs both phases; the figures as lines of text."""
    queries = _queries(NAME)
    lines = [
        f"DNS responder, records for {endpoints} endpoints and {services} services;"
        f" {NAME} A from one client on {HOST}, {window} in flight, {seconds:g} s per phase",
    ]
    for label, rate in (("limit off", 0.0), (f"limit {DEFAULT_RATE:g}/s", DEFAULT_RATE)):
        with _server(endpoints, services, rate) as (pid, port):
            _latencies(port, queries, 200)  # warm the answer cache and the sockets
            latencies = _latencies(port, queries, 2000) if rate == 0 else []
            if rate:
                time.sleep(DEFAULT_BURST / DEFAULT_RATE)  # a full bucket to start from
            phase = _flood(port, pid, queries, seconds, window)
        per_k = phase.server_cpu / max(phase.answered, 1) * 1000
        lines.append(
            f"  {label:>14}: {phase.rate:8.0f} answered/s ({phase.answered} of {phase.sent} sent)"
            f"  server CPU {phase.server_cpu:.2f} s ({phase.server_cpu / phase.seconds:.0%}"
            f" of a core, {per_k * 1000:.0f} ms per 1,000 answers)"
            f"  client CPU {phase.client_cpu:.2f} s"
        )
        if latencies:
            ordered = sorted(latencies)
            p99 = ordered[int(len(ordered) * 0.99)]
            lines.append(
                f"  {'latency':>14}: p50 {statistics.median(ordered) * 1e6:.0f} us,"
                f" p99 {p99 * 1e6:.0f} us (one query in flight, {len(ordered)} queries)"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m overlayd.lab.dnsbench")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a responder (the benchmark starts it)")
    serve.add_argument("--port", type=int, default=0)
    run = sub.add_parser("run", help="measure (the default)")
    run.add_argument("--seconds", type=float, default=5.0)
    run.add_argument("--window", type=int, default=32)
    for each in (serve, run):
        each.add_argument("--endpoints", type=int, default=10000)
        each.add_argument("--services", type=int, default=1000)
    serve.add_argument("--rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(_serve(args.port, args.endpoints, args.services, args.rate))
        return 0
    for line in dnsbench(
        seconds=args.seconds, window=args.window, endpoints=args.endpoints, services=args.services
    ):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
