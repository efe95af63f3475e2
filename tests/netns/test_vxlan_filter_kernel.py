"""The VXLAN allow-list on the real kernel, in a throwaway namespace: nft
lists our objects exactly as rendered; egress rewrites and rule rewrites
keep the set's elements and the drop count; edits by hand are undone; a
reconcile pass allows exactly the tunnelled peers, and a check pass repairs
the set and the rule. The IPv6 filter lives beside the IPv4 one, in table
ip6 overlayd, and stops VXLAN over IPv6 from anyone but a peer."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from overlayd.config import parse_network_config
from overlayd.daemon.loop import Knowledge, Reconciler, standard_managers
from overlayd.daemon.managers import Level
from overlayd.dataplane import Dataplane
from overlayd.dataplane.nft import Nft, NftTable, NftVxlanFilter
from overlayd.lab import netns as lab_netns
from overlayd.model import IPV6, Lease
from overlayd.plan.desired import device_spec, stable_mac
from overlayd.plan.egress import EgressSpec
from overlayd.plan.leases import render_lease, subnet_key
from overlayd.plan.vxlan_filter import ElementChanges, FilterSpec, render_objects
from overlayd.surfaces.telemetry import Telemetry
from tests.conftest import needs_root, unique_name, wait_until

pytestmark = [needs_root, pytest.mark.root]

CLUSTER = IPv4Network("10.244.0.0/16")
F = FilterSpec(IPv4Address("192.0.2.11"), 8472, 42)
B, C = IPv4Address("192.0.2.12"), IPv4Address("192.0.2.13")


def nft(ns: str, *args: str, check: bool = True) -> str:
    return lab_netns.in_ns(ns, "nft", *args, check=check)


def send_udp(ns: str, address: str, port: int, count: int) -> None:
    """Datagrams from a local socket: they come back in through lo and the
    prerouting hook, like any other packet to this host."""
    code = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for _ in range({count}): s.sendto(bytes(16), ({address!r}, {port}))"
    )
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], check=True)


def dropped(ns: str) -> int:
    out = json.loads(nft(ns, "-j", "list", "counter", "ip", "overlayd", "vxlan_dropped"))
    return int(next(i["counter"]["packets"] for i in out["nftables"] if "counter" in i))


async def test_the_kernel_lists_our_filter_as_we_render_it(netns: str) -> None:
    allow = NftVxlanFilter(Nft(netns))
    assert await allow.ensure(F) == "installed the VXLAN filter in table ip overlayd (first write)"
    assert await allow.listing(F) == render_objects(F)
    assert await allow.ensure(F) is None  # nothing changed, nothing written
    assert await allow.sources(F) == frozenset()


async def test_rewrites_of_egress_and_filter_rules_keep_the_elements_and_the_count(
    netns: str,
) -> None:
    shared = Nft(netns)
    egress, allow = NftTable(nft=shared), NftVxlanFilter(shared)
    await allow.ensure(F)
    await allow.update(F, ElementChanges((B, C), ()))
    send_udp(netns, "127.0.0.1", F.port, 3)
    assert dropped(netns) == 3
    assert allow.dropped_packets() == {"ip": 3}
    gw = EgressSpec("gwbridge", CLUSTER, "ovl0", "ovl_gwbridge", IPv4Network("172.18.0.0/16"))
    for spec in (gw, EgressSpec("masquerade", CLUSTER, "ovl0", "ovl_gwbridge"), gw):
        assert await egress.ensure(spec) is not None
        assert await allow.ensure(F) is None  # the egress rewrite left our objects alone
    # The rules themselves change (another VNI): the chain is made again,
    # the counter and the elements stay.
    other = replace(F, vni=7)
    assert await allow.ensure(other) == (
        "installed the VXLAN filter in table ip overlayd (rules changed)"
    )
    assert "@th,96,24 0x7 " in nft(netns, "list", "chain", "ip", "overlayd", "vxlan_in")
    assert await allow.sources(other) == frozenset({B, C})
    assert dropped(netns) == 3
    # Positive control: the counter does count after the rewrite.
    send_udp(netns, "127.0.0.1", F.port, 2)
    assert dropped(netns) == 5
    # Egress none removes only the egress chains: the table stays for the filter.
    await egress.ensure(EgressSpec("none", CLUSTER, "ovl0", "ovl_gwbridge"))
    assert await egress.listing() == ""
    assert await allow.ensure(other) is None and dropped(netns) == 5


async def test_edits_by_hand_are_undone_and_strangers_in_our_table_removed(netns: str) -> None:
    shared = Nft(netns)
    egress, allow = NftTable(nft=shared), NftVxlanFilter(shared)
    masq = EgressSpec("masquerade", CLUSTER, "ovl0", "ovl_gwbridge")
    await egress.ensure(masq)
    await allow.ensure(F)
    await allow.update(F, ElementChanges((B,), ()))
    nft(netns, "insert", "rule", "ip", "overlayd", "vxlan_in", "accept")
    assert await allow.ensure(F) == (
        "installed the VXLAN filter in table ip overlayd (altered or deleted by hand)"
    )
    assert await allow.listing(F) == render_objects(F)
    assert await allow.sources(F) == frozenset({B})  # the set was left as it was
    # A set of another type in place of ours is made again (empty: the
    # manager re-adds the elements).
    nft(netns, "delete", "chain", "ip", "overlayd", "vxlan_in")
    nft(netns, "delete", "set", "ip", "overlayd", "vxlan_peers")
    nft(netns, "add", "set", "ip", "overlayd", "vxlan_peers", "{ type inet_service; }")
    assert await allow.ensure(F) is not None
    assert await allow.listing(F) == render_objects(F)
    assert await allow.sources(F) == frozenset()
    # Something nobody of ours made, in our table, goes at the egress check.
    nft(netns, "add", "chain", "ip", "overlayd", "stray", "{ type filter hook input priority 0; }")
    assert await egress.ensure(masq) == (
        "replaced the egress chains of table ip overlayd (removed chain stray added by hand)"
    )
    assert "stray" not in nft(netns, "list", "table", "ip", "overlayd")
    assert await allow.ensure(F) is None


async def test_removal_takes_only_the_filter_and_then_the_empty_table(netns: str) -> None:
    shared = Nft(netns)
    egress, allow = NftTable(nft=shared), NftVxlanFilter(shared)
    masq = EgressSpec("masquerade", CLUSTER, "ovl0", "ovl_gwbridge")
    await egress.ensure(masq)
    await allow.ensure(F)
    assert await allow.remove() == "removed the VXLAN filter from table ip overlayd"
    assert "vxlan" not in nft(netns, "list", "table", "ip", "overlayd")
    assert await egress.ensure(masq) is None  # the egress chains were not touched
    assert await allow.remove() is None
    await allow.ensure(F)
    await egress.ensure(EgressSpec("none", CLUSTER, "ovl0", "ovl_gwbridge"))
    assert "vxlan_in" in nft(netns, "list", "table", "ip", "overlayd")
    await allow.remove()
    assert nft(netns, "list", "tables").strip() == ""


# --- the managers in a reconcile pass -----------------------------------------

PREFIX = "/coreos.com/network"
CONFIG = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"VNI": 42}}')
OWN_SUBNET = IPv4Network("10.244.1.0/24")
OWN = Lease(OWN_SUBNET, IPv4Address("192.0.2.11"), 42, stable_mac("vtep", OWN_SUBNET, 42))
PEER_B = Lease(IPv4Network("10.244.2.0/24"), B, 42, "02:00:00:00:00:02")
PEER_C = Lease(IPv4Network("10.244.3.0/24"), C, 42, "02:00:00:00:00:03")


def raw(*leases: Lease) -> dict[str, bytes]:
    return {subnet_key(PREFIX, lease.subnet): render_lease(lease).encode() for lease in leases}


@pytest.fixture
async def host(netns: str) -> AsyncIterator[tuple[str, Knowledge, Dataplane]]:
    lab_netns.in_ns(netns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "wire")
    lab_netns.in_ns(netns, "ip", "addr", "add", "192.0.2.11/24", "dev", "eth0")
    lab_netns.in_ns(netns, "ip", "link", "set", "eth0", "up")
    lab_netns.in_ns(netns, "ip", "link", "set", "wire", "up")
    dataplane = Dataplane.open(netns)
    underlay = await dataplane.netlink.find_underlay("eth0", None)
    spec = device_spec(
        config=CONFIG,
        own=OWN,
        bridge="ovl0",
        underlay_ifindex=underlay.ifindex,
        underlay_mtu=underlay.mtu,
        underlay="eth0",
    )
    egress = EgressSpec("none", CONFIG.network, "ovl0", "ovl_gwbridge")
    knowledge = Knowledge(CONFIG, OWN, spec, egress, PREFIX, raw(OWN, PEER_B, PEER_C))
    try:
        yield netns, knowledge, dataplane
    finally:
        await dataplane.close()


def elements(ns: str) -> set[str]:
    out = json.loads(nft(ns, "-j", "list", "set", "ip", "overlayd", "vxlan_peers"))
    return {str(e) for i in out["nftables"] if "set" in i for e in i["set"].get("elem", [])}


def fdb_remotes(ns: str) -> set[str]:
    out = lab_netns.sh(["bridge", "-n", ns, "-j", "fdb", "show", "dev", "ovl.42"])
    return {e["dst"] for e in json.loads(out or "[]") if e.get("dst")}


async def test_a_pass_allows_the_tunnelled_peers_and_a_check_repairs_set_and_rule(
    host: tuple[str, Knowledge, Dataplane],
) -> None:
    ns, knowledge, dataplane = host
    telemetry = Telemetry()
    loop = Reconciler(knowledge, dataplane, telemetry)
    assert (await loop.reconcile_once()).ok
    assert elements(ns) == {str(B), str(C)} == fdb_remotes(ns)
    assert telemetry.vxlan_allowed == 2
    send_udp(ns, "192.0.2.11", 8472, 4)  # from ourselves: not a peer
    assert dropped(ns) == 4
    # An element deleted by hand: a light pass believes, a check looks.
    nft(ns, "delete", "element", "ip", "overlayd", "vxlan_peers", f"{{ {B} }}")
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    assert elements(ns) == {str(C)}
    assert (await loop.reconcile_once(level=Level.CHECK)).ok
    assert elements(ns) == {str(B), str(C)}
    # The rule deleted by hand: put back at the next check, the count kept.
    nft(ns, "delete", "chain", "ip", "overlayd", "vxlan_in")
    assert (await loop.reconcile_once(level=Level.CHECK)).ok
    assert "vxlan_peers accept" in nft(ns, "list", "chain", "ip", "overlayd", "vxlan_in")
    assert dropped(ns) == 4
    assert telemetry.drift_repairs["nftables"] == 2
    # A peer leaves: its address goes in the same light pass, with its entries.
    knowledge.raw_leases = raw(OWN, PEER_B)
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    assert elements(ns) == {str(B)} == fdb_remotes(ns)
    # The setting off: the next daemon's first pass removes the filter.
    off = standard_managers(dataplane, Telemetry(), vxlan_filter=False)
    assert (await Reconciler(knowledge, dataplane, managers=off).reconcile_once()).ok
    assert "vxlan" not in nft(ns, "list", "ruleset")
    assert fdb_remotes(ns) == {str(B)}  # the overlay itself is untouched


# --- IPv6: the allow-list in table ip6 overlayd --------------------------------

F6 = FilterSpec(IPv6Address("2001:db8::11"), 8472, 42, IPV6)
B6, C6 = IPv6Address("2001:db8::12"), IPv6Address("2001:db8:1::13")


def dropped6(ns: str) -> int:
    out = json.loads(nft(ns, "-j", "list", "counter", "ip6", "overlayd", "vxlan_dropped"))
    return int(next(i["counter"]["packets"] for i in out["nftables"] if "counter" in i))


async def test_both_families_filters_live_side_by_side_with_both_egress_tables(
    netns: str,
) -> None:
    shared = Nft(netns)
    egress, allow = NftTable(nft=shared), NftVxlanFilter(shared)
    assert await allow.ensure(F) is not None
    assert await allow.ensure(F6) == (
        "installed the VXLAN filter in table ip6 overlayd (first write)"
    )
    assert await allow.listing(F6) == render_objects(F6)
    assert await allow.ensure(F6) is None and await allow.ensure(F) is None
    await allow.update(F, ElementChanges((B,), ()))
    await allow.update(F6, ElementChanges((B6, C6), ()))
    assert await allow.sources(F6) == frozenset({B6, C6})
    assert await allow.sources(F) == frozenset({B})
    # Egress rewrites of both tables leave both filters' objects and elements.
    dual = EgressSpec(
        "masquerade", CLUSTER, "ovl0", "ovl_gwbridge", cluster6=IPv6Network("fd00:10:244::/48")
    )
    for spec in (dual, replace(dual, mode="none"), dual):
        assert await egress.ensure(spec) is not None
        assert await allow.ensure(F6) is None and await allow.ensure(F) is None
    assert await allow.sources(F6) == frozenset({B6, C6})
    assert allow.dropped_packets() == {"ip": 0, "ip6": 0}
    # Removing the IPv6 filter leaves the IPv4 one, and the ip6 table keeps
    # only its egress chains.
    assert await allow.remove(IPV6) == "removed the VXLAN filter from table ip6 overlayd"
    assert "vxlan" not in nft(netns, "list", "table", "ip6", "overlayd")
    assert await allow.ensure(F) is None and await allow.sources(F) == frozenset({B})
    assert allow.dropped_packets() == {"ip": 0}


def _vtep(ns: str, local: str, inner: str, remote: str | None) -> None:
    """A plain VXLAN device over IPv6 (VNI 42, port 8472), as a peer's."""
    far = ["remote", remote] if remote else []
    lab_netns.ip(ns, "link", "add", "vx", "type", "vxlan", "id", "42", "local", local, *far,
                 "dstport", "8472")  # fmt: skip
    lab_netns.ip(ns, "addr", "add", inner, "dev", "vx")
    lab_netns.ip(ns, "link", "set", "vx", "up")


def _pings(ns: str, address: str) -> bool:
    return (
        subprocess.run(
            ["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", address],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )


@pytest.fixture
def v6_underlay() -> Iterator[tuple[str, str, str]]:
    """Three namespaces on an IPv6 underlay: our host (2001:db8::11, VTEP
    10.99.0.1 inside), a peer (2001:db8::12, VTEP 10.99.0.2) and a stranger
    on another link (2001:db8:1::13, VTEP 10.99.0.3), both tunnelling to us."""
    host, peer, stranger = unique_name("h"), unique_name("p"), unique_name("s")
    made = []
    try:
        for ns in (host, peer, stranger):
            lab_netns.add_namespace(ns)
            made.append(ns)
        lab_netns.veth(host, "eth0", peer, "eth0")
        lab_netns.veth(host, "eth1", stranger, "eth0")
        for ns, dev, address in (
            (host, "eth0", "2001:db8::11/64"),
            (host, "eth1", "2001:db8:1::11/64"),
            (peer, "eth0", "2001:db8::12/64"),
            (stranger, "eth0", "2001:db8:1::13/64"),
        ):
            lab_netns.ip(ns, "addr", "add", address, "dev", dev, "nodad")
            lab_netns.ip(ns, "link", "set", dev, "up")
        lab_netns.ip(stranger, "route", "add", "2001:db8::/64", "via", "2001:db8:1::11")
        _vtep(host, "2001:db8::11", "10.99.0.1/24", None)
        for remote in ("2001:db8::12", "2001:db8:1::13"):
            lab_netns.sh(["bridge", "-n", host, "fdb", "append", "00:00:00:00:00:00", "dev", "vx",
                          "dst", remote])  # fmt: skip
        _vtep(peer, "2001:db8::12", "10.99.0.2/24", "2001:db8::11")
        _vtep(stranger, "2001:db8:1::13", "10.99.0.3/24", "2001:db8::11")
        yield host, peer, stranger
    finally:
        for ns in made:
            lab_netns.delete_namespace(ns)


async def test_vxlan_over_ipv6_passes_from_a_peer_and_is_dropped_from_anyone_else(
    v6_underlay: tuple[str, str, str],
) -> None:
    host, peer, stranger = v6_underlay
    # Without the filter both reach our VTEP (the positive control of the setup).
    wait_until(lambda: _pings(peer, "10.99.0.1") and _pings(stranger, "10.99.0.1"))
    allow = NftVxlanFilter(Nft(host))
    await allow.ensure(F6)
    await allow.update(F6, ElementChanges((IPv6Address("2001:db8::12"),), ()))
    assert _pings(peer, "10.99.0.1")  # a peer's VXLAN passes
    before = dropped6(host)
    assert not _pings(stranger, "10.99.0.1")  # anyone else's is dropped...
    assert dropped6(host) > before  # ...by our rule, which counts it
    # The stranger becomes a peer: it passes from then on.
    await allow.update(F6, ElementChanges((IPv6Address("2001:db8:1::13"),), ()))
    assert _pings(stranger, "10.99.0.1")
    # Another VNI from a peer is dropped as well (the VNI is part of the accept rule).
    await allow.ensure(replace(F6, vni=7))
    count = dropped6(host)
    assert not _pings(peer, "10.99.0.1")
    assert dropped6(host) > count
