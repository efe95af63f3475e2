"""Fault injection for the lab, shared by the resilience tests and by
`overlayctl lab faults`, which prints the figures: packets lost while a
daemon restarts, repair time for each kind of hand-made drift, and time to
re-converge after an etcd outage.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from overlayd.lab import netns
from overlayd.lab.lab import Container, Lab, LabSettings
from overlayd.model import IPV4, IPV6, ROUTE_PROTOCOL, Family
from overlayd.plan.desired import vtep6_name
from overlayd.store.etcd import EtcdStore

POLL = 0.005


@dataclass(frozen=True, slots=True)
class PingCount:
    sent: int
    received: int

    @property
    def lost(self) -> int:
        return self.sent - self.received


class ContinuousPing:
    """`ping -i 0.01` from one container to another until stopped: 100
    packets a second, so a gap of 10 ms shows as a lost packet."""

    def __init__(self, src: Container, dst: Container, *, interval: float = 0.01) -> None:
        self._proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                src.ns,
                "ping",
                "-n",
                "-q",
                "-i",
                f"{interval:g}",
                "-W",
                "1",
                str(dst.address),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stop(self) -> PingCount:
        time.sleep(1.2)  # let the last packets' replies arrive (ping waits -W 1)
        self._proc.send_signal(signal.SIGINT)
        out, _ = self._proc.communicate(timeout=10)
        for line in out.splitlines():
            if "packets transmitted" in line:
                parts = line.split(",")
                return PingCount(int(parts[0].split()[0]), int(parts[1].split()[0]))
        raise RuntimeError(f"ping printed no summary: {out[-500:]}")

    def __enter__(self) -> ContinuousPing:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def vtep_of(lab: Lab, family: Family) -> str:
    """The VTEP that carries `family`'s traffic: ovl.<VNI>, ovl-v6.<VNI>."""
    vni = lab_vni(lab)
    return vtep6_name(vni) if family.version == 6 else f"ovl.{vni}"


def owned_state(lab: Lab, host: int) -> tuple[str, ...]:
    """Everything overlayd owns on a host, as a comparable snapshot: both
    families' routes, neighbours, VTEP FDB entries and bridge addresses
    (the IPv6 ones are empty in an IPv4-only lab)."""
    ns = lab.host_ns(host)

    def canon(text: str, keep: Callable[[dict[str, Any]], object]) -> str:
        items = json.loads(text) if text.strip() else []
        return json.dumps(sorted((keep(i) for i in items), key=json.dumps))

    per_family: list[str] = []
    for family in (IPV4, IPV6):
        flag = family.iproute2_flag
        routes = netns.ip(
            ns, "-j", flag, "route", "show", "proto", str(ROUTE_PROTOCOL), check=False
        )
        neigh = netns.ip(
            ns, "-j", flag, "neigh", "show", "dev", "ovl0", "nud", "permanent", check=False
        )
        fdb = netns.sh(
            ["bridge", "-n", ns, "-j", "fdb", "show", "dev", vtep_of(lab, family)], check=False
        )
        # Global addresses only: the kernel's IPv6 link-local is not ours.
        addrs = netns.ip(
            ns, "-j", flag, "addr", "show", "dev", "ovl0", "scope", "global", check=False
        )
        per_family += [
            canon(routes, lambda r: [r.get("dst"), r.get("gateway"), r.get("dev")]),
            canon(neigh, lambda n: [n.get("dst"), n.get("lladdr")]),
            canon(fdb, lambda f: [f.get("mac"), f.get("dst"), f.get("state"), f.get("master")]),
            canon(
                addrs,
                # iproute2's JSON keeps an empty item for each address the
                # scope filter dropped (the link-local one): not an address.
                lambda a: [
                    (i["local"], i.get("prefixlen")) for i in a.get("addr_info", []) if "local" in i
                ],
            ),
        ]
    links = netns.ip(ns, "-j", "-d", "link", "show", check=False)
    return (
        *per_family,
        canon(
            links,
            lambda link: (
                [link.get("ifname"), link.get("address"), link.get("mtu"), link.get("master")]
                if str(link.get("ifname", "")).startswith("ovl")
                else None
            ),
        ),
    )


def lab_vni(lab: Lab) -> int:
    vtep = [
        line
        for line in netns.ip(lab.host_ns(lab.hosts()[0]), "-o", "link").splitlines()
        if ": ovl." in line
    ]
    return int(vtep[0].split(": ovl.")[1].split("@")[0].split(":")[0]) if vtep else 1


def _first(lab: Lab, host: int, argv: list[str], key: str) -> str:
    items = json.loads(netns.sh(argv) or "[]")
    if not items:
        raise RuntimeError(f"h{host}: nothing to break ({' '.join(argv)})")
    return str(items[0][key])


DRIFT_KINDS = (
    "route",
    "neighbour",
    "fdb-tunnel",
    "fdb-bridge",
    "vtep",
    "bridge-address",
    "bridge",
    "stray-route",
    "stray-fdb",
)
# The same drift, of the IPv6 entries of a dual-stack host: its route, its
# neighbour, both FDB entries on the IPv6 VTEP, the IPv6 VTEP itself, and
# strays of our kind.
DRIFT_KINDS_V6 = (
    "route6",
    "neighbour6",
    "fdb-tunnel6",
    "fdb-bridge6",
    "vtep6",
    "stray-route6",
    "stray-fdb6",
)
# Strays: a subnet no host holds (the test networks keep it free), a
# tunnel endpoint no host has.
STRAY = {
    4: ("10.244.250.0/24", "10.244.250.0", "192.0.2.99"),
    6: ("fd00:10:244:fa::/64", "fd00:10:244:fa::", "2001:db8::99"),
}


def drift_kinds(lab: Lab) -> tuple[str, ...]:
    """The drift kinds a lab's hosts have: the IPv6 ones in a dual-stack lab."""
    return DRIFT_KINDS + (DRIFT_KINDS_V6 if lab.dual_stack else ())


def inject(lab: Lab, host: int, kind: str) -> None:
    """Change by hand one thing overlayd owns on the host (a kind ending in
    6: the IPv6 one of its kind)."""
    family = IPV6 if kind.endswith("6") else IPV4
    kind = kind.removesuffix("6")
    ns, vtep = lab.host_ns(host), vtep_of(lab, family)
    ip = ["ip", "-n", ns, family.iproute2_flag]
    stray_dst, stray_hop, stray_public = STRAY[family.version]
    if kind == "route":
        dst = _first(lab, host, [*ip, "-j", "route", "show", "proto", "77"], "dst")
        netns.ip(ns, family.iproute2_flag, "route", "del", dst)
    elif kind == "neighbour":
        dst = _first(
            lab, host, [*ip, "-j", "neigh", "show", "dev", "ovl0", "nud", "permanent"], "dst"
        )
        netns.ip(ns, family.iproute2_flag, "neigh", "del", dst, "dev", "ovl0")
    elif kind in ("fdb-tunnel", "fdb-bridge"):
        entries = json.loads(netns.sh(["bridge", "-n", ns, "-j", "fdb", "show", "dev", vtep]))
        if kind == "fdb-tunnel":
            entry = next(e for e in entries if e.get("dst"))
            netns.sh(
                [
                    "bridge",
                    "-n",
                    ns,
                    "fdb",
                    "del",
                    entry["mac"],
                    "dev",
                    vtep,
                    "dst",
                    entry["dst"],
                    "self",
                ]
            )
        else:
            entry = next(e for e in entries if e.get("state") == "static")
            netns.sh(["bridge", "-n", ns, "fdb", "del", entry["mac"], "dev", vtep, "master"])
    elif kind == "vtep":
        netns.ip(ns, "link", "del", vtep)
    elif kind == "bridge-address":
        netns.ip(ns, "addr", "flush", "dev", "ovl0")
    elif kind == "bridge":
        netns.ip(ns, "link", "del", "ovl0")
    elif kind == "stray-route":
        netns.ip(
            ns,
            family.iproute2_flag,
            "route",
            "add",
            stray_dst,
            "via",
            stray_hop,
            "dev",
            "ovl0",
            "onlink",
            "proto",
            "77",
        )
    elif kind == "stray-fdb":
        netns.sh(
            [
                "bridge",
                "-n",
                ns,
                "fdb",
                "add",
                "02:00:00:00:99:99",
                "dev",
                vtep,
                "dst",
                stray_public,
                "self",
                "permanent",
            ]
        )
    else:
        raise ValueError(f"unknown drift kind {kind!r}")


def reattach_containers(lab: Lab, host: int) -> None:
    """After the bridge itself was deleted, the containers' host-side veths
    hang loose: attaching them is the runtime's job (the lab's here), not
    overlayd's, which only owns the bridge."""
    ns = lab.host_ns(host)
    for link in json.loads(netns.ip(ns, "-j", "-d", "link", "show", "type", "veth")):
        # The underlay's eth0 is a veth too, but it has a peer in the switch.
        if "master" not in link and link["ifname"] != "eth0":
            netns.ip(ns, "link", "set", link["ifname"], "master", "ovl0")


def repair_seconds(lab: Lab, host: int, kind: str, *, timeout: float = 30.0) -> float:
    """Break one thing by hand and time until the host's owned state is back."""
    baseline = owned_state(lab, host)
    started = time.monotonic()
    inject(lab, host, kind)
    while time.monotonic() - started < timeout:
        if owned_state(lab, host) == baseline:
            elapsed = time.monotonic() - started
            if kind == "bridge":
                reattach_containers(lab, host)
            return elapsed
        time.sleep(POLL)
    raise RuntimeError(f"h{host}: {kind} not repaired within {timeout:g} s")


@dataclass(frozen=True, slots=True)
class Figures:
    what: str
    samples: tuple[float, ...]
    unit: str = "s"

    def line(self) -> str:
        s = sorted(self.samples)
        return (
            f"{self.what:<34} median {statistics.median(s):8.3f} {self.unit}"
            f"  min {s[0]:.3f}  max {s[-1]:.3f}  (n={len(s)})"
        )


def _ping_both_ways_during(lab: Lab, a: int, b: int, action: Callable[[], None]) -> int:
    src, dst = (next(c for c in lab.containers() if c.host == h) for h in (a, b))
    with ContinuousPing(src, dst) as there, ContinuousPing(dst, src) as back:
        time.sleep(0.5)
        action()
        time.sleep(0.5)
        return there.stop().lost + back.stop().lost


def _wait(predicate: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"not converged within {timeout:g} s")
        time.sleep(POLL * 4)
    return time.monotonic() - started


def _has_route(lab: Lab, host: int, dst: str) -> bool:
    return dst in netns.ip(lab.host_ns(host), "route", "show", "proto", "77")


def fault_figures(name: str, runs: int, outage: float, ttl: int = 10) -> Iterator[str]:
    """Every fault of the resilience suite once more, with figures."""
    lab = Lab(name)
    lab.down()
    try:
        lab.up(3, settings=LabSettings(lease_ttl=ttl, resync_seconds=5.0))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            restart_lost = tuple(
                float(_ping_both_ways_during(lab, 1, 2, partial(lab.restart_daemon, 1, sig)))
                for _ in range(runs)
            )
            yield Figures(f"packets lost, restart ({sig.name})", restart_lost, "pkts").line()
        for kind in drift_kinds(lab):
            samples = tuple(repair_seconds(lab, 1, kind) for _ in range(runs))
            yield Figures(f"repair: {kind}", samples).line()
        ns = lab.host_ns(2)
        samples_sysctl = []
        for _ in range(runs):
            netns.in_ns(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
            samples_sysctl.append(
                _wait(
                    lambda: netns.in_ns(ns, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1",
                    30,
                )
            )
        yield Figures("repair: ip_forward (resync 5 s)", tuple(samples_sysctl)).line()

        gone = str(lab.subnet(3))
        lab.stop_daemon(3, signal.SIGKILL)
        expired = _wait(lambda: not _has_route(lab, 1, gone), ttl + 30)
        yield Figures(f"dead host removed (TTL {ttl} s)", (expired,)).line()
        lab.start_daemon(3)
        lab.wait_ready(3)
        back = _wait(lambda: _has_route(lab, 1, gone), 30)
        yield Figures("returning host re-added", (back,)).line()

        def outage_with_joiner() -> None:
            lab.stop_etcd()
            lab.attach_host_namespace(4)
            lab.start_daemon(4)
            time.sleep(outage)
            lab.start_etcd()

        outage_lost = _ping_both_ways_during(lab, 1, 2, outage_with_joiner)
        returned = time.monotonic()
        lab.wait_ready(4, timeout=60)
        subnet4 = str(lab.subnet(4))
        for host in (1, 2, 3):
            _wait(partial(_has_route, lab, host, subnet4), 60)
        converged = time.monotonic() - returned
        yield Figures(
            f"packets lost, etcd outage {outage:g} s", (float(outage_lost),), "pkts"
        ).line()
        yield Figures("re-converged after etcd returned", (converged,)).line()
    finally:
        lab.down()

    lab = Lab(f"{name}3")
    lab.down()
    try:
        lab.up(2, settings=LabSettings(lease_ttl=ttl, etcd_members=3))
        samples_failover = []
        for run in range(runs):
            index = lab.etcd_member_in_use(1)
            lab.stop_etcd(index)
            key = f"/coreos.com/network/subnets/10.244.{220 + run}.0-24"
            value = json.dumps(
                {
                    "PublicIP": f"198.51.100.{20 + run}",
                    "BackendType": "vxlan",
                    "BackendData": {"VNI": 1, "VtepMAC": f"02:00:00:00:02:{run:02x}"},
                }
            )
            started = time.monotonic()
            lab.etcd(partial(_put, key, value))
            _wait(partial(_has_route, lab, 1, f"10.244.{220 + run}.0/24"), 60)
            samples_failover.append(time.monotonic() - started)
            lab.start_etcd(index)
        yield Figures(
            "3-member etcd: new lease seen after member stop", tuple(samples_failover)
        ).line()
    finally:
        lab.down()


async def _put(key: str, value: str, store: EtcdStore) -> None:
    await store.put(key, value)
