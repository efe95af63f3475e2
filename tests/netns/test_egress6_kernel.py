"""IPv6 egress on the real kernel, in throwaway namespaces: the rendered ip6
table (and, under a FORWARD drop policy, the ip6tables exception) masquerade
containers to the host's IPv6 address, never NAT traffic between containers,
keep connections from outside out, and in gwbridge mode keep containers on
the gwbridge apart while a published port still gets in.

The namespaces, all made here:

    container C1 ── ovl0 (fd00:10:244:1::1/64) ─┐
    container C2 ── routed (fd00:10:244:2::1/64) ┤ host H ── eth0 2001:db8::11 ══ outside O
    gwbridge containers G1, G2 ── ovl_gwbridge ──┘           (2001:db8::1, answers on
                                                              2001:db8:ffff::10)

C2 stands for a container on another host: its subnet is in the cluster's
IPv6 network and H routes to it, as it routes to a peer's subnet.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network

import pytest

from overlayd.dataplane import sysctl
from overlayd.dataplane.iptables import ForwardAccept
from overlayd.dataplane.netlink import Netlink
from overlayd.dataplane.nft import NftTable
from overlayd.lab import netns as lab_netns
from overlayd.plan.egress import EgressSpec
from tests.conftest import needs_root, unique_name, wait_until

pytestmark = [needs_root, pytest.mark.root]

CLUSTER = IPv4Network("10.244.0.0/16")
CLUSTER6 = IPv6Network("fd00:10:244::/48")
GW6 = IPv6Network("fd4a:4eae:8d08::/64")
HOST = "2001:db8::11"
OUTSIDE = "2001:db8:ffff::10"
PORT = 8080

# Answers every connection with the client address it sees (IPv6).
SERVER = """
import socket, sys
with socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6) as s:
    while True:
        c, a = s.accept()
        with c:
            c.sendall(a[0].encode() + b"\\n")
"""
ASK = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as c:
        c.settimeout(2)
        print(c.makefile().readline().strip())
except OSError as exc:
    print(f"error: {exc}")
"""


@dataclass
class Site:
    host: str
    outside: str
    namespaces: list[str] = field(default_factory=list)
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def add(self, kind: str) -> str:
        ns = unique_name(kind)
        lab_netns.add_namespace(ns)
        self.namespaces.append(ns)
        return ns

    def serve(self, ns: str, port: int = PORT) -> None:
        self.servers.append(
            subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, str(port)])
        )

    def plug(self, ns: str, ifname: str, bridge: str, address: str) -> None:
        """A container interface on one of H's bridges."""
        host_end = f"v{len(self.namespaces)}{ifname}"
        lab_netns.veth(self.host, host_end, ns, ifname)
        lab_netns.ip(self.host, "link", "set", host_end, "master", bridge, "up")
        lab_netns.ip(ns, "addr", "add", address, "dev", ifname, "nodad")
        lab_netns.ip(ns, "link", "set", ifname, "up")


def ask(ns: str, address: str, port: int = PORT) -> str:
    """The address the server at `address` saw us as, or "error: ..."."""
    argv = ["ip", "netns", "exec", ns, sys.executable, "-c", ASK, address, str(port)]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def load_nft(ns: str, ruleset: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset.encode(), check=True
    )


def answers_as(ns: str, address: str, seen: str) -> None:
    """Wait until the server answers (servers and neighbours take a moment)."""
    wait_until(lambda: ask(ns, address) == seen)


@pytest.fixture
def site() -> Iterator[Site]:
    s = Site("", "")
    try:
        s.host, s.outside = s.add("h"), s.add("o")
        host, outside = s.host, s.outside
        lab_netns.veth(host, "eth0", outside, "eth0")
        lab_netns.ip(host, "addr", "add", f"{HOST}/64", "dev", "eth0", "nodad")
        lab_netns.ip(outside, "addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad")
        lab_netns.ip(outside, "addr", "add", f"{OUTSIDE}/128", "dev", "lo")
        for ns in (host, outside):
            lab_netns.ip(ns, "link", "set", "eth0", "up")
        lab_netns.ip(host, "-6", "route", "add", "default", "via", "2001:db8::1")
        lab_netns.in_ns(host, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
        # The overlay bridge with the host's IPv6 gateway, and a container on it.
        lab_netns.ip(host, "link", "add", "ovl0", "type", "bridge")
        lab_netns.ip(host, "addr", "add", "fd00:10:244:1::1/64", "dev", "ovl0", "nodad")
        lab_netns.ip(host, "link", "set", "ovl0", "up")
        c1 = s.add("c")
        s.plug(c1, "eth0", "ovl0", "fd00:10:244:1::2/64")
        # A container "on another host": routed by H, inside the cluster's network.
        c2 = s.add("c")
        lab_netns.veth(host, "c2h", c2, "eth0")
        lab_netns.ip(host, "addr", "add", "fd00:10:244:2::1/64", "dev", "c2h", "nodad")
        lab_netns.ip(c2, "addr", "add", "fd00:10:244:2::2/64", "dev", "eth0", "nodad")
        lab_netns.ip(host, "link", "set", "c2h", "up")
        lab_netns.ip(c2, "link", "set", "eth0", "up")
        lab_netns.ip(c2, "-6", "route", "add", "default", "via", "fd00:10:244:2::1")
        s.serve(outside)
        s.serve(c2)
        yield s
    finally:
        for server in s.servers:
            server.kill()
            server.wait()
        for ns in s.namespaces:
            lab_netns.delete_namespace(ns)


def containers(site: Site) -> tuple[str, str]:
    return site.namespaces[2], site.namespaces[3]  # C1 on ovl0, C2 routed


async def test_masquerade_shows_the_host_address_outside_and_never_nats_the_overlay(
    site: Site,
) -> None:
    host, outside = site.host, site.outside
    c1, c2 = containers(site)
    lab_netns.ip(c1, "-6", "route", "add", "default", "via", "fd00:10:244:1::1")
    # Somebody outside knows the way to the cluster's network through H.
    lab_netns.ip(outside, "-6", "route", "add", str(CLUSTER6), "via", HOST)
    site.serve(c1)
    # Before any rule: nothing is NATed, and the outside opens connections to C1.
    answers_as(c1, OUTSIDE, "fd00:10:244:1::2")
    answers_as(outside, "fd00:10:244:1::2", "2001:db8::1")
    # A FORWARD drop policy, as Docker sets it: nothing is forwarded...
    lab_netns.in_ns(host, "ip6tables", "-P", "FORWARD", "DROP")
    assert ask(c1, OUTSIDE).startswith("error")
    # ...until our rules and our ip6tables exception are in place.
    spec = EgressSpec("masquerade", CLUSTER, "ovl0", "ovl_gwbridge", cluster6=CLUSTER6)
    assert await NftTable(host).ensure(spec) is not None
    done = await ForwardAccept(host).ensure(spec)
    assert "wrote ip6tables chain OVERLAYD-FORWARD (2 rules)" in done
    assert "-A OVERLAYD-FORWARD -s fd00:10:244::/48 -j ACCEPT" in lab_netns.in_ns(
        host, "ip6tables", "-S", "OVERLAYD-FORWARD"
    )
    # Outside, C1 is seen as the host's IPv6 address.
    answers_as(c1, OUTSIDE, HOST)
    # Between containers, no NAT, either way.
    assert ask(c1, "fd00:10:244:2::2") == "fd00:10:244:1::2"
    assert ask(c2, "fd00:10:244:1::2") == "fd00:10:244:2::2"
    # Nobody outside the cluster opens a connection to a container any more.
    assert ask(outside, "fd00:10:244:1::2").startswith("error")
    # ...while C1's own connection outwards (above) and its replies pass.
    assert ask(c1, OUTSIDE) == HOST


async def test_gwbridge_masquerades_isolates_and_lets_a_published_port_in(site: Site) -> None:
    host, outside = site.host, site.outside
    c1, _ = containers(site)
    # The gwbridge as the daemon makes it, with its IPv6 gateway.
    spec = EgressSpec(
        "gwbridge",
        CLUSTER,
        "ovl0",
        "ovl_gwbridge",
        IPv4Network("172.18.0.0/16"),
        cluster6=CLUSTER6,
        gwbridge_subnet6=GW6,
    )
    assert spec.gwbridge_gateway6 == IPv6Interface("fd4a:4eae:8d08::1/64")
    assert spec.gwbridge_gateway is not None
    netlink = Netlink(host)
    try:
        made = await netlink.ensure_gwbridge(
            "ovl_gwbridge",
            spec.gwbridge_gateway,
            spec.gwbridge_mac,
            gateway6=spec.gwbridge_gateway6,
        )
        assert "added fd4a:4eae:8d08::1/64 to ovl_gwbridge" in made
        assert (
            await netlink.ensure_gwbridge(
                "ovl_gwbridge",
                spec.gwbridge_gateway,
                spec.gwbridge_mac,
                gateway6=spec.gwbridge_gateway6,
            )
            == []
        )
    finally:
        await netlink.close()
    shown = lab_netns.ip(host, "-6", "addr", "show", "dev", "ovl_gwbridge", "scope", "global")
    assert "fd4a:4eae:8d08::1/64" in shown and "nodad" in shown and "tentative" not in shown
    # C1: cluster routes on ovl0, its default route through the gwbridge.
    lab_netns.ip(c1, "-6", "route", "add", str(CLUSTER6), "via", "fd00:10:244:1::1")
    site.plug(c1, "eth1", "ovl_gwbridge", "fd4a:4eae:8d08::2/64")
    lab_netns.ip(c1, "-6", "route", "add", "default", "via", "fd4a:4eae:8d08::1")
    g2 = site.add("g")
    site.plug(g2, "eth0", "ovl_gwbridge", "fd4a:4eae:8d08::3/64")
    site.serve(c1)
    site.serve(g2)
    lab_netns.ip(outside, "-6", "route", "add", str(GW6), "via", HOST)
    # Before our rules: containers on the gwbridge reach each other, and the
    # outside reaches them (the positive controls of what the rules stop).
    answers_as(c1, "fd4a:4eae:8d08::3", "fd4a:4eae:8d08::2")
    answers_as(outside, "fd4a:4eae:8d08::2", "2001:db8::1")
    assert await sysctl.ensure_bridge_netfilter(netns=host, ipv6=True) == []  # already on
    assert await NftTable(host).ensure(spec) is not None
    # Out through the gwbridge: seen as the host's address.
    answers_as(c1, OUTSIDE, HOST)
    # To another container through the overlay: not NATed.
    assert ask(c1, "fd00:10:244:2::2") == "fd00:10:244:1::2"
    # No container-to-container traffic through the gwbridge.
    assert ask(c1, "fd4a:4eae:8d08::3").startswith("error")
    assert ask(g2, "fd4a:4eae:8d08::2").startswith("error")
    # Nothing outside opens a connection to a container on the gwbridge...
    assert ask(outside, "fd4a:4eae:8d08::2").startswith("error")
    # ...except through a port the host publishes (a DNAT, as portmap makes).
    published = (
        "table ip6 portmap {\n chain pre {\n  type nat hook prerouting priority dstnat;\n"
        f"  ip6 daddr {HOST} tcp dport 9090 dnat to [fd4a:4eae:8d08::2]:{PORT}\n }}\n}}\n"
    )
    load_nft(host, published)
    assert ask(outside, HOST, 9090) == "2001:db8::1"


async def test_the_gwbridge_keeps_one_nodad_ipv6_gateway_and_the_kernels_link_local(
    netns: str,
) -> None:
    netlink = Netlink(netns)
    v4 = IPv4Interface("172.18.0.1/16")
    gw6 = IPv6Interface("fd4a:4eae:8d08::1/64")
    mac = "02:42:ac:12:00:01"

    def globals_() -> str:
        return lab_netns.ip(netns, "-6", "addr", "show", "dev", "gw0", "scope", "global")

    try:
        assert "added fd4a:4eae:8d08::1/64 to gw0" in await netlink.ensure_gwbridge(
            "gw0", v4, mac, gateway6=gw6
        )
        assert "nodad" in globals_() and "tentative" not in globals_()
        # A link-local address (the kernel's kind: not ours to remove) and a
        # stray global one added by hand.
        lab_netns.ip(netns, "addr", "add", "fe80::1234/64", "dev", "gw0")
        lab_netns.ip(netns, "addr", "add", "fd00:99::1/64", "dev", "gw0")
        assert await netlink.ensure_gwbridge("gw0", v4, mac, gateway6=gw6) == [
            "removed fd00:99::1/64 from gw0"
        ]
        assert "fd00:99" not in globals_() and "fd4a:4eae:8d08::1/64" in globals_()
        link_local = lab_netns.ip(netns, "-6", "addr", "show", "dev", "gw0", "scope", "link")
        assert "fe80::1234/64" in link_local
        # IPv6 gone from the cluster: the gateway goes too, IPv4 stays.
        assert await netlink.ensure_gwbridge("gw0", v4, mac) == [
            "removed fd4a:4eae:8d08::1/64 from gw0"
        ]
        assert globals_().strip() == ""
        assert "172.18.0.1/16" in lab_netns.ip(netns, "-4", "addr", "show", "dev", "gw0")
    finally:
        await netlink.close()
