"""Convergence of a new dual-stack peer: `overlayctl lab converge`.

A dual-stack lab with two running hosts (the lab's defaults otherwise: TLS,
gwbridge egress, the VXLAN allow-list). Each round a new host joins from
nothing: a fresh namespace on the underlay (a new host number every round,
so no peer holds a neighbour entry or FDB entry for its MAC from an earlier
round), its daemon started, its lease acquired, a container attached
through overlay-cni as a runtime would once the subnet file is there. Time
zero is the moment the new lease appears in etcd, seen by a watch the
driver holds on the subnets prefix. Measured from there:

    ready        the new host's subnet file is written (its daemon is ready)
    container    overlay-cni's ADD for the new host's container returned
    gateway      h1's container gets a reply from the new host's bridge
                 gateway (.1 and ::1 of the subnets named in the lease key):
                 the network between the hosts, without the container's
                 own setup; probed from time zero
    containers   h1's container and the new container reach each other,
                 each pinging the other (both directions), per family, and
                 both families; probed from the container's attachment

After a round the new host is removed (namespace and container gone, as if
powered off), its lease deleted from etcd, and the round ends only when h1
and h2 hold no route to its subnets in either family: every round starts
from peers that do not know it.

Probes are iputils ping sending one echo every PROBE_INTERVAL until the first
reply (`-c 1 -i 0.01 -w ...`), restarted after PROBE_INTERVAL when it ends
without one (an ICMP error ends it); a time is when the probe process
exits, so figures resolve to about 10 to 20 ms.
"""

from __future__ import annotations

import asyncio
import json
import platform
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from overlayd.lab import netns
from overlayd.lab.allowlist import percentile
from overlayd.lab.bench import _cpu_times, _nproc
from overlayd.lab.lab import PREFIX, Container, Lab, LabSettings, default_network_config
from overlayd.model import IPV4, IPV6, Family
from overlayd.nsexec import netns_argv
from overlayd.plan.leases import subnets_prefix
from overlayd.store.etcd import EtcdStore
from overlayd.surfaces.subnetfile import read_subnet

PROBE_INTERVAL = 0.01  # between echoes, and before a probe that ended is restarted
ROUND_TIMEOUT = 60.0
BASE_HOSTS = 2
MAX_ROUNDS = 150  # host numbers stay well inside the underlay's /24

# The figures, in output order: key, what it measures.
FIGURES = (
    ("start_to_lease", "daemon started -> lease in etcd (before time zero, for context)"),
    ("ready", "new host's subnet file written (daemon ready)"),
    ("container", "new container attached (overlay-cni ADD returned)"),
    ("gateway_v4", "h1's container -> new host's bridge gateway, IPv4 reply"),
    ("gateway_v6", "h1's container -> new host's bridge gateway, IPv6 reply"),
    ("containers_v4", "h1's container <-> new container, IPv4, both directions"),
    ("containers_v6", "h1's container <-> new container, IPv6, both directions"),
    ("containers_both", "h1's container <-> new container, both families"),
    ("attached_to_both", "container attached -> both families both ways (after attaching)"),
)


def parse_lease_key(key: str) -> tuple[IPv4Network, IPv6Network | None]:
    """The subnets named by a lease key, flannel's `10.244.1.0-24` or
    `10.244.1.0-24&fd00:10:244:1::-64`, with or without the prefix."""
    tail = key.rsplit("/", 1)[-1]
    v4_part, _, v6_part = tail.partition("&")
    address, _, length = v4_part.rpartition("-")
    subnet = IPv4Network(f"{address}/{length}")
    if not v6_part:
        return subnet, None
    address6, _, length6 = v6_part.rpartition("-")
    return subnet, IPv6Network(f"{address6}/{length6}")


def gateway(subnet: IPv4Network | IPv6Network) -> IPv4Address | IPv6Address:
    """The bridge's gateway address in `subnet`: the first host address."""
    return subnet.network_address + 1


@dataclass
class Round:
    """One round's moments, CLOCK_MONOTONIC seconds (shared by every namespace)."""

    started: float  # the daemon was started
    lease: float  # the lease appeared in etcd
    ready: float
    container: float
    gateway: dict[int, float]  # by family version
    reached: dict[tuple[int, str], float]  # by (family version, "to_new" or "from_new")
    steal_pct: float = 0.0

    def figures(self) -> dict[str, float]:
        """Seconds from the lease (start_to_lease: up to it) per FIGURES key."""
        family = {v: max(t for (fv, _), t in self.reached.items() if fv == v) for v in (4, 6)}
        both = max(family.values())
        return {
            "start_to_lease": self.lease - self.started,
            "ready": self.ready - self.lease,
            "container": self.container - self.lease,
            "gateway_v4": self.gateway[4] - self.lease,
            "gateway_v6": self.gateway[6] - self.lease,
            "containers_v4": family[4] - self.lease,
            "containers_v6": family[6] - self.lease,
            "containers_both": both - self.lease,
            "attached_to_both": both - self.container,
        }


@dataclass
class Summary:
    rounds: list[Round] = field(default_factory=list)

    def table(self) -> list[str]:
        """p50, p99 (nearest rank), max and min per figure, in ms."""
        per = [r.figures() for r in self.rounds]
        lines = [
            "| from the lease in etcd to | p50 | p99 | max | min |",
            "|---|---|---|---|---|",
        ]
        for key, label in FIGURES:
            values = [f[key] for f in per]
            cells = [percentile(values, 50), percentile(values, 99), max(values), min(values)]
            lines.append(f"| {label} | " + " | ".join(f"{v * 1000:.0f} ms" for v in cells) + " |")
        return lines


class LeaseWatch:
    """A watch on the subnets prefix, in a thread with its own event loop:
    the first put of a lease whose PublicIP is `public_ip`, and when the
    driver saw it."""

    def __init__(self, lab: Lab, public_ip: IPv4Address, timeout: float = ROUND_TIMEOUT) -> None:
        self._lab = lab
        self._public_ip = str(public_ip)
        self._timeout = timeout
        self._watching = threading.Event()
        self.seen: tuple[float, str] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._watching.wait(30) and self.error is None:
            raise RuntimeError("the etcd watch did not start")
        if self.error is not None:
            raise RuntimeError(f"the etcd watch failed: {self.error}") from self.error

    def _run(self) -> None:
        try:
            asyncio.run(asyncio.wait_for(self._watch(), self._timeout))
        except BaseException as exc:  # handed to the driver's thread
            self.error = exc
            self._watching.set()

    async def _watch(self) -> None:
        prefix = subnets_prefix(PREFIX)
        async with EtcdStore(self._lab.etcd_access) as store:
            _, revision = await store.get_prefix(prefix)
            events = store.watch_prefix(prefix, revision + 1)
            self._watching.set()
            async for event in events:
                if event.value is None:
                    continue
                try:
                    public = json.loads(event.value).get("PublicIP")
                except ValueError:
                    continue
                if public == self._public_ip:
                    self.seen = (time.monotonic(), event.key)
                    return

    def wait(self) -> tuple[float, str]:
        self._thread.join(self._timeout + 5)
        if self.seen is None:
            raise RuntimeError(f"no lease for {self._public_ip} appeared in etcd: {self.error}")
        return self.seen


def ping_until_reply(
    src_ns: str,
    dst: IPv4Address | IPv6Address,
    deadline: float,
    *,
    interval: float = PROBE_INTERVAL,
) -> float:
    """The moment `src_ns` first gets an echo reply from `dst`: one ping
    process sends an echo every `interval` until a reply; one that ends
    without one (deadline, or an ICMP error) is restarted after `interval`."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"{src_ns} got no reply from {dst} in time")
        argv = [
            "ping",
            f"-{dst.version}",
            "-n",
            "-q",
            "-c",
            "1",
            "-i",
            f"{interval:g}",
            "-w",
            f"{max(1, int(remaining))}",
            str(dst),
        ]
        done = subprocess.run(netns_argv(src_ns, *argv), capture_output=True, check=False)
        if done.returncode == 0:
            return time.monotonic()
        time.sleep(interval)


def _wait_subnet_file(lab: Lab, host: int, deadline: float) -> float:
    """The moment the new host's subnet file holds its subnet, polled every
    5 ms (a daemon that died is reported at once)."""
    path = lab.subnet_file(host)
    while time.monotonic() < deadline:
        if read_subnet(path) is not None:
            return time.monotonic()
        if not lab.daemon_running(host):
            break
        time.sleep(0.005)
    raise RuntimeError(f"h{host} did not become ready:\n{lab.files(host).log_tail()}")


def _peers_forgot(lab: Lab, subnets: Sequence[IPv4Network | IPv6Network]) -> bool:
    for host in range(1, BASE_HOSTS + 1):
        for subnet in subnets:
            flag = f"-{subnet.version}"
            if netns.ip(lab.host_ns(host), flag, "route", "show", str(subnet)).strip():
                return False
    return True


def one_round(lab: Lab, host: int, old: Container) -> Round:
    """A new host from nothing, timed (see the module's docstring); it is
    removed again by `forget`."""
    lab.attach_host_namespace(host)
    watch = LeaseWatch(lab, lab.host_address(host))
    started = time.monotonic()
    deadline = started + ROUND_TIMEOUT
    lab.start_daemon(host)
    with ThreadPoolExecutor(max_workers=6) as pool:
        lease, key = watch.wait()
        subnet, subnet6 = parse_lease_key(key)
        if subnet6 is None:
            raise RuntimeError(f"h{host}'s lease {key} has no IPv6 subnet: not dual-stack")
        gateways: dict[int, Future[float]] = {
            s.version: pool.submit(ping_until_reply, old.ns, gateway(s), deadline)
            for s in (subnet, subnet6)
        }
        ready = _wait_subnet_file(lab, host, deadline)
        new = lab.add_container(host, 1)
        attached = time.monotonic()
        if new.address6 is None:
            raise RuntimeError(f"h{host}'s container has no IPv6 address")
        probes: dict[tuple[int, str], Future[float]] = {}
        for family in (IPV4, IPV6):
            probes[(family.version, "to_new")] = pool.submit(
                ping_until_reply, old.ns, _address(new, family), deadline
            )
            probes[(family.version, "from_new")] = pool.submit(
                ping_until_reply, new.ns, _address(old, family), deadline
            )
        return Round(
            started=started,
            lease=lease,
            ready=ready,
            container=attached,
            gateway={v: f.result() for v, f in gateways.items()},
            reached={k: f.result() for k, f in probes.items()},
        )


def _address(c: Container, family: Family) -> IPv4Address | IPv6Address:
    address = c.address_of(family)
    if address is None:
        raise RuntimeError(f"{c.title} has no IPv{family.version} address")
    return address


def forget(lab: Lab, host: int) -> None:
    """The host gone, its lease deleted, and the peers' routes to its
    subnets gone, before the next round."""
    key = lab.lease_key(host)
    subnets = [s for s in parse_lease_key(key) if s is not None]  # both families
    lab.remove_host(host)
    lab.etcd(lambda store: store.delete(key))
    deadline = time.monotonic() + ROUND_TIMEOUT
    while not _peers_forgot(lab, subnets):
        if time.monotonic() > deadline:
            raise RuntimeError(f"h1/h2 still route to h{host}'s subnets {subnets}")
        time.sleep(0.05)


def converge(name: str, rounds: int, progress: Callable[[str], None]) -> Iterator[str]:
    if not 1 <= rounds <= MAX_ROUNDS:
        raise ValueError(f"--rounds must be between 1 and {MAX_ROUNDS}")
    lab = Lab(name)
    lab.down()
    summary = Summary()
    try:
        lab.up(BASE_HOSTS, config=default_network_config(ipv6=True), settings=LabSettings())
        old = lab.container(1)
        for n in range(rounds):
            host = BASE_HOSTS + 1 + n
            total0, steal0 = _cpu_times()
            result = one_round(lab, host, old)
            forget(lab, host)
            total1, steal1 = _cpu_times()
            result.steal_pct = 100.0 * (steal1 - steal0) / max(1, total1 - total0)
            summary.rounds.append(result)
            f = result.figures()
            progress(
                f"round {n + 1}/{rounds} (h{host}): lease->ready {f['ready'] * 1000:.0f} ms,"
                f" ->container {f['container'] * 1000:.0f}, ->gateway v4"
                f" {f['gateway_v4'] * 1000:.0f} v6 {f['gateway_v6'] * 1000:.0f}, ->containers"
                f" v4 {f['containers_v4'] * 1000:.0f} v6 {f['containers_v6'] * 1000:.0f} ms,"
                f" steal {result.steal_pct:.1f} %"
            )
    finally:
        lab.down()
    yield from report(summary, rounds)


def report(summary: Summary, rounds: int) -> list[str]:
    steal = [r.steal_pct for r in summary.rounds]
    return [
        f"Convergence of a new dual-stack peer, {time.strftime('%Y-%m-%d')},"
        f" {platform.machine()}, {_nproc()} vCPUs, kernel {platform.release()}: {rounds}"
        f" rounds, {BASE_HOSTS} running hosts, each round a new host from nothing (namespace,"
        " daemon, lease, a container through overlay-cni), removed with its lease"
        " afterwards; lab defaults (mutual TLS, gwbridge egress, VXLAN allow-list);"
        f" hypervisor steal {min(steal):.1f} to {max(steal):.1f} % per round.",
        "Time zero: the new lease seen by the driver's etcd watch. Probes: ping sending one"
        f" echo every {PROBE_INTERVAL * 1000:.0f} ms until the first reply, restarted after"
        f" {PROBE_INTERVAL * 1000:.0f} ms when it ends without one; a time is the probe's"
        f" exit (about 10 to 20 ms granularity). p99 is nearest-rank: with {rounds} rounds"
        f" it is the {_rank_name(rounds)} sample.",
        "",
        *summary.table(),
    ]


def _rank_name(n: int) -> str:
    """Which sample nearest-rank p99 picks out of n, in words."""
    rank = max(1, -(-99 * n // 100))
    return "largest" if rank == n else f"{rank}th smallest of {n}"
