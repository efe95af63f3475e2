"""IPv6 really crosses: two hosts (namespaces joined by a dual-stack veth
underlay, 192.0.2.0/24 and 2001:db8::/64), each with the devices and the
peer's entries programmed by overlayd's adapters and a container-like
namespace on its bridge. ping -6 between the containers works; the outer
header on the underlay is IPv6 with the VNI; without the peer's IPv6 FDB
entry it stops (while IPv4 goes on); and host-gw's direct IPv6 route carries
it without a tunnel."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path

import pytest

from overlayd.dataplane import Dataplane
from overlayd.lab import netns as lab_netns
from overlayd.model import (
    IPV4,
    IPV6,
    BridgeFdb,
    Change,
    DeviceSpec,
    Entry,
    EntrySet,
    Family,
    Neighbour,
    Op,
    Route,
    TunnelFdb,
)
from overlayd.plan.diff import diff
from tests.conftest import capture, needs_root, unique_name

pytestmark = [needs_root, pytest.mark.root]

VNI, PORT, MTU = 1, 8472, 1500 - IPV6.vxlan_overhead  # the container MTU fits both tunnels


@dataclass
class Side:
    """One host: its namespace, its container's, its adapters and spec."""

    n: int  # 1 or 2
    host: str
    container: str
    dataplane: Dataplane
    spec: DeviceSpec

    @property
    def public(self) -> IPv4Address:
        return IPv4Address(f"192.0.2.1{self.n}")

    @property
    def public6(self) -> IPv6Address:
        return IPv6Address(f"2001:db8::1{self.n}")

    def subnet(self, family: Family) -> IPv4Network | IPv6Network:
        if family is IPV4:
            return IPv4Network(f"10.244.{self.n}.0/24")
        return IPv6Network(f"fd00:10:244:{self.n}::/64")

    def container_ip(self, family: Family) -> str:
        return str(self.subnet(family).network_address + 2)


def spec_of(n: int, underlay_ifindex: int) -> DeviceSpec:
    return DeviceSpec(
        bridge="ovl0",
        bridge_mac=f"02:00:00:00:0b:0{n}",
        gateway=IPv4Interface(f"10.244.{n}.1/24"),
        vtep=f"ovl.{VNI}",
        vtep_mac=f"02:00:00:00:04:0{n}",
        vni=VNI,
        port=PORT,
        local_ip=IPv4Address(f"192.0.2.1{n}"),
        underlay_ifindex=underlay_ifindex,
        mtu=MTU,
        underlay="eth0",
        gateway6=IPv6Interface(f"fd00:10:244:{n}::1/64"),
        vtep6=f"ovl-v6.{VNI}",
        vtep6_mac=f"02:00:00:00:06:0{n}",
        local_ip6=IPv6Address(f"2001:db8::1{n}"),
    )


def tunnel_entries(peer: Side, family: Family) -> list[Entry]:
    """What the plan gives a tunnelled peer, per family."""
    subnet = peer.subnet(family)
    hop = subnet.network_address
    mac = peer.spec.vtep6_mac if family is IPV6 else peer.spec.vtep_mac
    remote = peer.public6 if family is IPV6 else peer.public
    return [Route(subnet, hop), Neighbour(hop, mac), TunnelFdb(mac, remote), BridgeFdb(mac)]


def sh(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=check
    )


def pings(src: Side, dst: Side, family: Family, *, count: int = 3, deadline: int = 10) -> bool:
    """Every echo answered within the deadline."""
    argv = ["ping", family.iproute2_flag, "-n", "-c", str(count), "-i", "0.2"]
    argv += ["-W", "1", "-w", str(deadline), dst.container_ip(family)]
    return sh(src.container, *argv, check=False).returncode == 0


def ping_once(src: Side, dst: Side) -> None:
    sh(src.container, "ping", "-6", "-n", "-c", "1", "-W", "5", dst.container_ip(IPV6), check=False)


def redirects_sent(host: str) -> dict[str, int]:
    """ICMP redirects a host sent, per family (/proc/net/snmp and snmp6)."""
    counts = {}
    snmp6 = sh(host, "cat", "/proc/net/snmp6").stdout.split()
    counts["v6"] = int(snmp6[snmp6.index("Icmp6OutRedirects") + 1])
    lines = [line.split() for line in sh(host, "cat", "/proc/net/snmp").stdout.splitlines()]
    icmp = [line for line in lines if line[0] == "Icmp:"]
    counts["v4"] = int(icmp[1][icmp[0].index("OutRedirects")])
    return counts


async def program(side: Side, entries: list[Entry], family: Family) -> None:
    dp = side.dataplane
    actual = await dp.read_entries(side.spec, family)
    result = await dp.apply(diff(EntrySet.of(entries), actual), side.spec, family)
    assert result.failed == ()


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    names = {role: unique_name(role) for role in ("ha", "hb", "ca", "cb")}
    try:
        for ns in names.values():
            lab_netns.add_namespace(ns)
        yield names
    finally:
        for ns in names.values():
            lab_netns.delete_namespace(ns)


@pytest.fixture
async def pair(namespaces: dict[str, str]) -> AsyncIterator[tuple[Side, Side]]:
    """Two hosts programmed by the adapters: host 1 writes its entries
    through netlink, host 2 through iproute2 batches."""
    ip = lab_netns.ip
    lab_netns.veth(namespaces["ha"], "eth0", namespaces["hb"], "eth0")
    sides = []
    for n, (host, container) in enumerate(
        ((namespaces["ha"], namespaces["ca"]), (namespaces["hb"], namespaces["cb"])), start=1
    ):
        ip(host, "addr", "add", f"192.0.2.1{n}/24", "dev", "eth0")
        ip(host, "addr", "add", f"2001:db8::1{n}/64", "dev", "eth0", "nodad")
        ip(host, "link", "set", "eth0", "up")
        dataplane = Dataplane.open(host)
        dataplane.netlink_max_changes = 1000 if n == 1 else 0
        underlay = await dataplane.netlink.find_underlay("eth0", None)
        assert underlay.address6 == IPv6Address(f"2001:db8::1{n}")
        spec = spec_of(n, underlay.ifindex)
        await dataplane.ensure_devices(spec)
        await dataplane.ensure_forwarding("ovl0", ipv6=True, underlay="eth0")
        # The container: a veth on the bridge, both families, default routes.
        lab_netns.veth(host, "veth0", container, "eth0", mtu=MTU)
        ip(host, "link", "set", "veth0", "master", "ovl0", "up")
        ip(container, "addr", "add", f"10.244.{n}.2/24", "dev", "eth0")
        ip(container, "addr", "add", f"fd00:10:244:{n}::2/64", "dev", "eth0", "nodad")
        ip(container, "link", "set", "eth0", "up")
        ip(container, "route", "add", "default", "via", f"10.244.{n}.1")
        ip(container, "-6", "route", "add", "default", "via", f"fd00:10:244:{n}::1")
        sides.append(Side(n, host, container, dataplane, spec))
    a, b = sides
    try:
        for side, peer in ((a, b), (b, a)):
            for family in (IPV4, IPV6):
                await program(side, tunnel_entries(peer, family), family)
        yield a, b
    finally:
        for side in sides:
            await side.dataplane.close()


async def test_ping6_crosses_the_ipv6_tunnel_and_stops_without_the_peers_fdb_entry(
    pair: tuple[Side, Side], tmp_path: Path
) -> None:
    a, b = pair
    # Positive: both families cross, in both directions; a full-size IPv6
    # packet too (MTU 1430 + 70 bytes of IPv6 VXLAN = the underlay's 1500).
    assert pings(a, b, IPV6) and pings(b, a, IPV6)
    assert pings(a, b, IPV4) and pings(b, a, IPV4)
    full = ["ping", "-6", "-n", "-c", "1", "-W", "5", "-M", "do", "-s", str(MTU - 48)]
    assert sh(a.container, *full, b.container_ip(IPV6), check=False).returncode == 0
    # On the wire: an IPv6 outer header between the public IPv6 addresses,
    # UDP to the port, the VNI, and inside the containers' ICMPv6, framed
    # for the receiving host's IPv6 VTEP.
    pcap = tmp_path / "underlay.pcap"
    capture(
        a.host,
        "eth0",
        f"ip6 and udp dst port {PORT}",
        2,
        pcap,
        lambda: ping_once(a, b),
    )
    from scapy.all import (  # type: ignore[attr-defined]
        UDP,
        VXLAN,
        Ether,
        ICMPv6EchoReply,
        ICMPv6EchoRequest,
        IPv6,
        bind_layers,
        rdpcap,
    )

    bind_layers(UDP, VXLAN, dport=PORT)
    packets = [p for p in rdpcap(str(pcap)) if VXLAN in p]
    request = next(p for p in packets if ICMPv6EchoRequest in p)
    reply = next(p for p in packets if ICMPv6EchoReply in p)
    for packet, src, dst in ((request, a, b), (reply, b, a)):
        outer, inner = packet[IPv6], packet[VXLAN][IPv6]
        assert (outer.src, outer.dst) == (str(src.public6), str(dst.public6))
        assert packet[UDP].dport == PORT and packet[VXLAN].vni == VNI
        assert (inner.src, inner.dst) == (src.container_ip(IPV6), dst.container_ip(IPV6))
        assert packet[VXLAN][Ether].dst == dst.spec.vtep6_mac
    # Routed out of the bridge it came in by, yet no IPv6 redirect: Linux
    # sends one only towards a link-local next hop or the destination itself.
    assert redirects_sent(a.host) == redirects_sent(b.host) == {"v6": 0, "v4": 0}
    # Negative: host 1 forgets where host 2's IPv6 VTEP is.
    gone = TunnelFdb(b.spec.vtep6_mac, b.public6)
    assert (await a.dataplane.apply([Change(Op.DELETE, gone)], a.spec, IPV6)).failed == ()
    assert not pings(a, b, IPV6, count=2, deadline=3)
    assert pings(a, b, IPV4)  # the IPv4 tunnel does not depend on it
    # Put back: crossing again.
    assert (await a.dataplane.apply([Change(Op.REPLACE, gone)], a.spec, IPV6)).failed == ()
    assert pings(a, b, IPV6)


async def test_host_gw_ipv6_routes_straight_over_the_underlay(
    pair: tuple[Side, Side], tmp_path: Path
) -> None:
    a, b = pair
    # Each host replaces its IPv6 tunnel entries by one route via the
    # peer's public IPv6 address (host-gw, or DirectRouting on one link).
    for side, peer in ((a, b), (b, a)):
        direct: list[Entry] = [Route(peer.subnet(IPV6), peer.public6, direct=True)]
        await program(side, direct, IPV6)
        assert await side.dataplane.read_entries(side.spec, IPV6) == EntrySet.of(direct)
    assert pings(a, b, IPV6) and pings(b, a, IPV6)
    pcap = tmp_path / "routed.pcap"
    capture(
        a.host,
        "eth0",
        "ip6 and icmp6 and ip6[40] == 128",  # an echo request, unencapsulated
        1,
        pcap,
        lambda: ping_once(a, b),
    )
    from scapy.all import IPv6, rdpcap  # type: ignore[attr-defined]

    seen = rdpcap(str(pcap))
    assert seen and (seen[0][IPv6].src, seen[0][IPv6].dst) == (
        a.container_ip(IPV6),
        b.container_ip(IPV6),
    )
