"""Control-plane benchmark: one real overlayd in a lab host, N synthetic peer
leases in a real etcd. Prints figures; asserts nothing.

    cold start     daemon started -> all N peers' entries in the kernel
    add / remove   one lease written or deleted with N present -> its route
                   appears or goes (timed from `ip monitor route`), p50 and p99
    peak RSS       VmHWM of the daemon at the end
    idle CPU       the daemon's user+system time over an idle period
    acquisition    A lease clients acquiring at once, the daemon's own code

With `dual`, the network is dual-stack and every synthetic peer has an IPv6
half: twice the entries, and "added" means both of its routes are in.
Peers' public addresses come from a pool of 508 per family (all the
documentation addresses off the lab's link), peer i getting the (i mod
508)-th of each, so that both families' VXLAN allow-lists change on the
same adds and removes: with more peers than that, neither does.

The synthetic peers' public addresses come from the documentation ranges;
no packet is ever sent to them (their entries are permanent, nothing floods).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from overlayd.config import parse_network_config
from overlayd.daemon.leasing import SubnetLeaser
from overlayd.lab import netns
from overlayd.lab.lab import PREFIX, Lab, LabSettings
from overlayd.model import Lease
from overlayd.plan.leases import lease_key, render_lease
from overlayd.store.etcd import EtcdStore

NETWORK = IPv4Network("10.128.0.0/9")  # 32,767 /24s
NETWORK6 = IPv6Network("fd00:128::/48")  # 65,535 /64s
PUBLIC_POOL = [IPv4Address("198.51.100.0") + i for i in range(1, 255)] + [
    IPv4Address("203.0.113.0") + i for i in range(1, 255)
]
# Documentation addresses too, off the lab's underlay link: never sent to.
PUBLIC_POOL6 = IPv6Address("2001:db8:cb::")
TXN_OPS = 100  # etcd allows 128 operations per transaction by default


def network_config(dual: bool) -> dict[str, object]:
    config: dict[str, object] = {"Network": str(NETWORK), "SubnetLen": 24}
    if dual:
        config |= {"EnableIPv6": True, "IPv6Network": str(NETWORK6), "IPv6SubnetLen": 64}
    return config


def synthetic_lease(index: int, *, dual: bool = False) -> Lease:
    """Peer number `index` (0-based), never the daemon's own subnet range."""
    subnet = IPv4Network((int(NETWORK.network_address) + (index + 1000) * 256, 24))
    octets = [(index >> shift) & 0xFF for shift in (24, 16, 8, 0)]
    mac = "02:" + ":".join(f"{o:02x}" for o in octets) + ":01"
    public = PUBLIC_POOL[index % len(PUBLIC_POOL)]
    if not dual:
        return Lease(subnet, public, 1, mac)
    subnet6 = IPv6Network((int(NETWORK6.network_address) + ((index + 1000) << 64), 64))
    return Lease(
        subnet,
        public,
        1,
        mac,
        ipv6_subnet=subnet6,
        public_ipv6=PUBLIC_POOL6 + index % len(PUBLIC_POOL) + 1,
        vtep_mac_v6=mac[:-2] + "06",
    )


async def _put_many(store: EtcdStore, leases: list[Lease]) -> None:
    for start in range(0, len(leases), TXN_OPS):
        await store.put_many(
            [
                (lease_key(PREFIX, lease), render_lease(lease))
                for lease in leases[start : start + TXN_OPS]
            ]
        )


async def _churn(
    watch: RouteWatch, peers: int, changes: int, dual: bool, store: EtcdStore
) -> tuple[list[list[float]], list[list[float]]]:
    """Add one peer, wait for its route (both, dual-stack), remove it, wait;
    `changes` times. One etcd connection throughout, so that only overlayd's
    latency counts. Per change, the time of each family's route (IPv4
    first), so that a dual run can say which family is the slower."""
    adds, removes = [], []
    for i in range(changes):
        lease = synthetic_lease(peers + i, dual=dual)
        key = lease_key(PREFIX, lease)
        dsts = [str(lease.subnet)] + ([str(lease.ipv6_subnet)] if dual else [])
        since = time.monotonic()
        await store.put(key, render_lease(lease))
        adds.append(await _all_seen(watch, _added, dsts, since))
        since = time.monotonic()
        await store.delete(key)
        removes.append(await _all_seen(watch, _deleted, dsts, since))
    return adds, removes


async def _all_seen(
    watch: RouteWatch, seen: Callable[[str, str], bool], dsts: list[str], since: float
) -> list[float]:
    """Until every destination's line is seen: each one's time, in order."""
    return [await asyncio.to_thread(watch.wait_for, partial(seen, dst), since) for dst in dsts]


def per_family(changes: list[list[float]]) -> dict[str, tuple[float, float]]:
    """p50 and p99 of each family's route alone (IPv4, and IPv6 when the
    changes have two times), over the changes."""
    names = ("IPv4", "IPv6")
    return {
        names[i]: (statistics.median(times), _percentile(times, 99))
        for i in range(min(len(c) for c in changes))
        if (times := [c[i] for c in changes])
    }


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
    family: str  # "v4" or "dual"
    peers: int
    cold_start: float
    add_p50: float
    add_p99: float
    remove_p50: float
    remove_p99: float
    peak_rss_mb: float
    idle_cpu_pct: float
    underlay6: str | None = None  # the daemon's IPv6 underlay address (dual runs: checked)
    # p50, p99 of each family's route alone: which family a dual change waits for
    add_by_family: dict[str, tuple[float, float]] = field(default_factory=dict)
    remove_by_family: dict[str, tuple[float, float]] = field(default_factory=dict)

    def family_line(self) -> str:
        """Each family's route alone, for a dual run: the row's add and
        remove are the slower family's."""

        def cells(found: dict[str, tuple[float, float]]) -> str:
            return ", ".join(
                f"{name} {p50 * 1000:.1f}/{p99 * 1000:.1f} ms" for name, (p50, p99) in found.items()
            )

        return (
            f"  {self.family} {self.peers} peers, each family's route alone (p50/p99):"
            f" add {cells(self.add_by_family)}; remove {cells(self.remove_by_family)}"
        )

    def row(self) -> str:
        ms = 1000
        return (
            f"| {self.family:>6} | {self.peers:>6} | {self.cold_start:6.2f} s"
            f" | {self.add_p50 * ms:6.1f} ms"
            f" | {self.add_p99 * ms:6.1f} ms | {self.remove_p50 * ms:6.1f} ms"
            f" | {self.remove_p99 * ms:6.1f} ms | {self.peak_rss_mb:5.0f} MB"
            f" | {self.idle_cpu_pct:5.2f} % |"
        )


HEADER = (
    "| family |  peers | cold start | add p50 | add p99 | remove p50 | remove p99 | peak RSS"
    " | idle CPU |\n|---|---|---|---|---|---|---|---|---|"
)


def _figures(result: CpResult) -> list[float]:
    return [
        result.cold_start,
        result.add_p50,
        result.add_p99,
        result.remove_p50,
        result.remove_p99,
        result.peak_rss_mb,
        result.idle_cpu_pct,
    ]


def ratios(dual: CpResult, v4: CpResult) -> list[float]:
    """Dual-stack's figures over IPv4-only's, in the table's column order
    (NaN where IPv4's figure is 0)."""
    return [a / b if b > 0 else math.nan for a, b in zip(_figures(dual), _figures(v4), strict=True)]


def _ratio_cells(values: list[float]) -> str:
    return " | ".join("  n/a" if math.isnan(v) else f"{v:5.2f}x" for v in values)


def ratio_row(dual: CpResult, v4: CpResult) -> str:
    """Dual-stack's figures over IPv4-only's, measured in the same run."""
    return f"| dual/v4 | {dual.peers:>6} | {_ratio_cells(ratios(dual, v4))} |"


def median_ratio_row(peers: int, rounds: list[list[float]]) -> str:
    """The median, per column, of the ratios of interleaved rounds."""
    columns = zip(*rounds, strict=True)
    medians = [
        statistics.median(known)
        if (known := [v for v in column if not math.isnan(v)])
        else math.nan
        for column in columns
    ]
    return f"| median of {len(rounds)} | {peers:>6} | {_ratio_cells(medians)} |"


def logged_underlay6(log: str) -> str | None:
    """The IPv6 underlay address the daemon's log says it found
    (`event=underlay ... address6=...`), None if it found none or did not
    say. The last such line counts: the log is appended to across runs."""
    found: str | None = None
    for line in log.splitlines():
        if "event=underlay " not in line:
            continue
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        value = fields.get("address6")
        found = value if value not in (None, "None") else None
    return found


def logged_lease_key(log: str) -> str | None:
    """The key of the lease the daemon's log says it acquired (the last)."""
    found: str | None = None
    for line in log.splitlines():
        if "event=lease_acquired " in line:
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            found = fields.get("key", found)
    return found


def check_dual(log: str) -> str:
    """A dual run must be dual: the daemon found an IPv6 underlay address
    and leased an IPv6 subnet (its key has flannel's `&` half). Returns the
    address; raises, naming what is missing, otherwise."""
    address6 = logged_underlay6(log)
    if address6 is None:
        raise RuntimeError("dual run, but the daemon found no IPv6 underlay address (address6)")
    key = logged_lease_key(log)
    if key is None or "&" not in key:
        raise RuntimeError(f"dual run, but the daemon's lease has no IPv6 subnet: {key}")
    return address6


def run_one(
    name: str,
    peers: int,
    changes: int,
    idle_seconds: float,
    *,
    resync_seconds: float = 60.0,
    dual: bool = False,
) -> CpResult:
    lab = Lab(name)
    lab.down()
    config = parse_network_config(json.dumps(network_config(dual)))
    try:
        lab.up(
            0,
            config=config,
            settings=LabSettings(egress="none", resync_seconds=resync_seconds, lease_ttl=300),
        )
        leases = [synthetic_lease(i, dual=dual) for i in range(peers)]
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
        underlay6 = check_dual(lab.daemon_log(1).read_text()) if dual else None
        count = len(netns.ip(ns, "route", "show", "proto", "77").splitlines())
        if dual:
            count += len(netns.ip(ns, "-6", "route", "show", "proto", "77").splitlines())
        expected = peers * (2 if dual else 1)
        if count != expected:
            raise RuntimeError(f"{count} routes after ready, expected {expected}")
        watch = RouteWatch(ns)
        try:
            time.sleep(1.0)
            adds, removes = lab.etcd(partial(_churn, watch, peers, changes, dual))
        finally:
            watch.close()
        # A change is done when its last route is: the slower family's.
        slowest_add, slowest_remove = [max(c) for c in adds], [max(c) for c in removes]
        cpu_before = _cpu_seconds(proc.pid)
        time.sleep(idle_seconds)
        idle = (_cpu_seconds(proc.pid) - cpu_before) / idle_seconds * 100
        return CpResult(
            family="dual" if dual else "v4",
            peers=peers,
            cold_start=cold,
            add_p50=statistics.median(slowest_add),
            add_p99=_percentile(slowest_add, 99),
            remove_p50=statistics.median(slowest_remove),
            remove_p99=_percentile(slowest_remove, 99),
            peak_rss_mb=_peak_rss_mb(proc.pid),
            idle_cpu_pct=idle,
            underlay6=underlay6,
            add_by_family=per_family(adds),
            remove_by_family=per_family(removes),
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
