"""`overlayctl lab dnsbench --passes`: whether a DNS flood from a container
delays the daemon's reconcile passes. A lab of two hosts with a
ServiceNetwork and one service; for SECONDS each, in three phases (quiet,
flood, quiet again), an endpoint's labels are changed every half second
(each change is a light pass on every host that moves the service's
backends and DNS records), and in the flood phase a container on host 1
sends queries for the service's name to its host's responder as fast as
one Python process can. Reported per phase, from host 1's debug log and
/proc: the light passes' durations (p50, p99, max), the daemon's CPU, and
the queries sent and answered (the rest dropped by the per-client rate
limit). Only lab namespaces are involved."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from ipaddress import IPv4Network
from pathlib import Path

from overlayd.lab.hosts import daemon_pids
from overlayd.lab.lab import Lab, LabSettings, default_network_config
from overlayd.lab.policycheck import OWN_PREFIX, label_endpoint
from overlayd.nsexec import netns_argv
from overlayd.plan.service import parse_service
from overlayd.store.services import create_service

SERVICE_NETWORK = IPv4Network("10.96.0.0/16")
# The flood: batches of 64 queries, each with a new id, answers read back
# without waiting; prints "sent answered".
FLOOD = """import socket, sys, time
import dns.message
query = dns.message.make_query("web.overlay.internal", "A")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
server, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
sent = answered = 0
while time.monotonic() < end:
    for _ in range(64):
        query.id = (query.id + 1) & 0xFFFF
        s.sendto(query.to_wire(), (server, 53))
        sent += 1
    try:
        while True:
            s.recv(4096)
            answered += 1
    except BlockingIOError:
        pass
    time.sleep(0.0005)
print(sent, answered)
"""
LIGHT_PASS = re.compile(r"event=pass level=light ok=True changes=\d+ seconds=([0-9.]+)")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dns_load(name: str, seconds: float) -> Iterator[str]:
    lab = Lab(name)
    lab.down()
    try:
        lab.up(
            2,
            config=default_network_config(service_network=SERVICE_NETWORK),
            settings=LabSettings(log_level="debug", resync_seconds=60.0),
        )
        client, backend = lab.container(1, 1), lab.container(2, 1)
        lab.etcd(partial(label_endpoint, address=backend.address, labels={"app": "web"}))
        service = parse_service(
            {
                "name": "web",
                "selector": {"matchLabels": {"app": "web"}},
                "ports": [{"port": 80, "targetPort": 8080}],
            },
            service_networks=[SERVICE_NETWORK],
        )
        lab.etcd(lambda store: create_service(store, OWN_PREFIX, service, [SERVICE_NETWORK]))
        time.sleep(2.0)
        gateway = str(next(iter(lab.subnet(1).hosts())))
        [pid] = daemon_pids(lab.host_ns(1))
        yield (
            f"light passes on h1 while an endpoint's labels change every 0.5 s, {seconds:g} s"
            " per phase; flood: one container on h1 asking its host for web.overlay.internal"
        )
        for phase in ("quiet", "flood", "quiet again"):
            mark = lab.daemon_log(1).stat().st_size
            cpu_before = _cpu_seconds(pid)
            flood = None
            if phase == "flood":
                argv = netns_argv(client.ns, sys.executable, "-c", FLOOD, gateway, f"{seconds:g}")
                flood = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            stop, change = time.monotonic() + seconds, 0
            while time.monotonic() < stop:
                labels = {"app": "web", "change": str(change)}
                lab.etcd(partial(label_endpoint, address=backend.address, labels=labels))
                change += 1
                time.sleep(0.5)
            counts = flood.communicate(timeout=seconds + 30)[0].split() if flood else []
            cpu = (_cpu_seconds(pid) - cpu_before) / seconds
            text = lab.daemon_log(1).read_text()[mark:]
            passes = sorted(float(s) for s in LIGHT_PASS.findall(text))
            if not passes:
                yield f"  {phase}: no light pass logged"
                continue
            p99 = passes[round(0.99 * (len(passes) - 1))]
            sent = f"; queries sent {counts[0]}, answered {counts[1]}" if len(counts) == 2 else ""
            yield (
                f"  {phase:>11}: {len(passes)} light passes, p50"
                f" {statistics.median(passes) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms,"
                f" max {passes[-1] * 1000:.1f} ms; daemon CPU {cpu:.0%}{sent}"
            )
    finally:
        lab.down()
