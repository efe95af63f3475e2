"""Control-plane benchmark: one real overlayd in a lab host, N synthetic peer
leases in a real etcd. Prints figures; asserts nothing.

    cold start     daemon started -> all N peers' entries in the kernel
    add / remove   one lease written or deleted with N present -> its route
                   appears or goes (timed from `ip monitor route`), p50 and p99
    peak RSS       VmHWM of the daemon at the end
    idle CPU       the daemon's user+system time over an idle period
    acquisition    A lease clients acquiring at once, the daemon's own code

The synthetic peers' public addresses come from the documentation ranges;
no packet is ever sent to them (their entries are permanent, nothing floods).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from overlayd.config import parse_network_config
from overlayd.daemon.leasing import SubnetLeaser
from overlayd.lab import netns
from overlayd.lab.lab import PREFIX, Lab, LabSettings
from overlayd.model import Lease
from overlayd.plan.leases import render_lease, subnet_key
from overlayd.store.etcd import EtcdStore

NETWORK = IPv4Network("10.128.0.0/9")  # 32,767 /24s
PUBLIC_POOL = [IPv4Address("198.51.100.0") + i for i in range(1, 255)] + [
    IPv4Address("203.0.113.0") + i for i in range(1, 255)
]
TXN_OPS = 100  # etcd allows 128 operations per transaction by default


def synthetic_lease(index: int) -> Lease:
    """Peer number `index` (0-based), never the daemon's own subnet range."""
    subnet = IPv4Network((int(NETWORK.network_address) + (index + 1000) * 256, 24))
    octets = [(index >> shift) & 0xFF for shift in (24, 16, 8, 0)]
    mac = "02:" + ":".join(f"{o:02x}" for o in octets) + ":01"
    return Lease(subnet, PUBLIC_POOL[index % len(PUBLIC_POOL)], 1, mac)


async def _put_many(store: EtcdStore, leases: list[Lease]) -> None:
    for start in range(0, len(leases), TXN_OPS):
        await store.put_many(
            [
                (subnet_key(PREFIX, lease.subnet), render_lease(lease))
                for lease in leases[start : start + TXN_OPS]
            ]
        )


async def _churn(
    watch: RouteWatch, peers: int, changes: int, store: EtcdStore
) -> tuple[list[float], list[float]]:
    """Add one peer, wait for its route, remove it, wait; `changes` times.
    One etcd connection throughout, so that only overlayd's latency counts."""
    adds, removes = [], []
    for i in range(changes):
        lease = synthetic_lease(peers + i)
        key, dst = subnet_key(PREFIX, lease.subnet), str(lease.subnet)
        since = time.monotonic()
        await store.put(key, render_lease(lease))
        adds.append(await asyncio.to_thread(watch.wait_for, partial(_added, dst), since))
        since = time.monotonic()
        await store.delete(key)
        removes.append(await asyncio.to_thread(watch.wait_for, partial(_deleted, dst), since))
    return adds, removes


def _added(dst: str, line: str) -> bool:
    return line.startswith(dst + " ")


def _deleted(dst: str, line: str) -> bool:
    return line.startswith(f"Deleted {dst} ")


class RouteWatch:
    """Timestamps of `ip monitor route` lines, read in a thread."""

    def __init__(self, ns: str) -> None:
        self._proc = subprocess.Popen(
            ["ip", "-n", ns, "monitor", "route"], stdout=subprocess.PIPE, text=True
        )
        self._lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._cond:
                self._lines.append((time.monotonic(), line))
                self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[str], bool], since: float, timeout: float = 10.0
    ) -> float:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for stamp, line in self._lines:
                    if stamp >= since and predicate(line):
                        return stamp - since
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("route change not seen")
                self._cond.wait(remaining)

    def clear(self) -> None:
        with self._cond:
            self._lines.clear()

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait()


def _cpu_seconds(pid: int) -> float:
    """User and system time of the daemon and of the children it waited for
    (the ip and bridge processes of its passes count too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


@dataclass
class CpResult:
    peers: int
    cold_start: float
    add_p50: float
    add_p99: float
    remove_p50: float
    remove_p99: float
    peak_rss_mb: float
    idle_cpu_pct: float

    def row(self) -> str:
        ms = 1000
        return (
            f"| {self.peers:>6} | {self.cold_start:6.2f} s | {self.add_p50 * ms:6.1f} ms"
            f" | {self.add_p99 * ms:6.1f} ms | {self.remove_p50 * ms:6.1f} ms"
            f" | {self.remove_p99 * ms:6.1f} ms | {self.peak_rss_mb:5.0f} MB"
            f" | {self.idle_cpu_pct:5.2f} % |"
        )


HEADER = (
    "|  peers | cold start | add p50 | add p99 | remove p50 | remove p99 | peak RSS"
    " | idle CPU |\n|---|---|---|---|---|---|---|---|"
)


def run_one(
    name: str,
    peers: int,
    changes: int,
    idle_seconds: float,
    *,
    resync_seconds: float = 60.0,
) -> CpResult:
    lab = Lab(name)
    lab.down()
    config = parse_network_config(json.dumps({"Network": str(NETWORK), "SubnetLen": 24}))
    try:
        lab.up(
            0,
            config=config,
            settings=LabSettings(egress="none", resync_seconds=resync_seconds, lease_ttl=300),
        )
        leases = [synthetic_lease(i) for i in range(peers)]
        lab.etcd(lambda store: _put_many(store, leases))
        lab.attach_host_namespace(1)
        ns = lab.host_ns(1)
        started = time.monotonic()
        proc = lab.start_daemon(1)
        while "event=ready" not in lab.daemon_log(1).read_text():
            if proc.poll() is not None:
                raise RuntimeError(lab.daemon_log(1).read_text()[-2000:])
            time.sleep(0.005)
        cold = time.monotonic() - started
        count = len(netns.ip(ns, "route", "show", "proto", "77").splitlines())
        if count != peers:
            raise RuntimeError(f"{count} routes after ready, expected {peers}")
        watch = RouteWatch(ns)
        try:
            time.sleep(1.0)
            adds, removes = lab.etcd(partial(_churn, watch, peers, changes))
        finally:
            watch.close()
        cpu_before = _cpu_seconds(proc.pid)
        time.sleep(idle_seconds)
        idle = (_cpu_seconds(proc.pid) - cpu_before) / idle_seconds * 100
        return CpResult(
            peers=peers,
            cold_start=cold,
            add_p50=statistics.median(adds),
            add_p99=_percentile(adds, 99),
            remove_p50=statistics.median(removes),
            remove_p99=_percentile(removes, 99),
            peak_rss_mb=_peak_rss_mb(proc.pid),
            idle_cpu_pct=idle,
        )
    finally:
        lab.down()


def acquisition(name: str, acquirers: int) -> tuple[float, int]:
    """Seconds for `acquirers` lease clients starting at once, and how many
    distinct subnets they ended with."""
    lab = Lab(name)
    lab.down()
    config = parse_network_config(json.dumps({"Network": str(NETWORK), "SubnetLen": 24}))
    try:
        lab.up(0, config=config, settings=LabSettings(egress="none"))

        async def race(store: EtcdStore) -> tuple[float, int]:
            clients = [
                SubnetLeaser(
                    store,
                    etcd_prefix=PREFIX,
                    public_ip=PUBLIC_POOL[i],
                    ttl=60,
                    rng=random.Random(i),
                )
                for i in range(acquirers)
            ]
            started = time.monotonic()
            held = await asyncio.gather(*(c.acquire(config) for c in clients))
            return time.monotonic() - started, len({h.lease.subnet for h in held})

        return lab.etcd(race)
    finally:
        lab.down()
