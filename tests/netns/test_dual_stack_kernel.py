"""The dual-stack data plane on the real kernel, in throwaway namespaces with
a dual-stack underlay (192.0.2.0/24 and 2001:db8::/64, inside the namespace
only): the IPv6 VTEP as a second port of the bridge and the bridge's IPv6
gateway; IPv6 entries written through both paths (netlink for a few, iproute2
batches for many) and read back equal; only our entries read and deleted;
repair after entries or the VTEP went; the drift monitor's IPv6 events; the
IPv6 sysctls; the underlay's IPv6 address; teardown."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from overlayd.config import AgentConfig, parse_network_config
from overlayd.daemon.teardown import teardown
from overlayd.dataplane import Dataplane
from overlayd.dataplane.netlink import DeviceError, DriftMonitor, Netlink
from overlayd.model import (
    IPV4,
    IPV6,
    BridgeFdb,
    DeviceSpec,
    Entry,
    EntrySet,
    Family,
    Lease,
    Neighbour,
    Observed,
    Op,
    Route,
    TunnelFdb,
    Underlay,
)
from overlayd.plan.desired import device_spec, stable_mac, vtep6_name
from overlayd.plan.diff import diff
from tests.conftest import needs_root, wait_until
from tests.unit.fake_store import FakeStore

pytestmark = [needs_root, pytest.mark.root]

CONFIG = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"VNI": 1, "Port": 8472}}')
OWN = Lease(
    IPv4Network("10.244.1.0/24"),
    IPv4Address("192.0.2.11"),
    1,
    stable_mac("vtep", IPv4Network("10.244.1.0/24"), 1),
)
GATEWAY6 = IPv6Interface("fd00:10:244:1::1/64")
VTEP6_MAC = "02:00:00:00:06:01"
VTEP6 = vtep6_name(1)


def sh(ns: str, *argv: str, check: bool = True) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=check
    ).stdout


def jq(ns: str, *argv: str) -> list[dict[str, Any]]:
    out = sh(ns, *argv)
    return json.loads(out) if out.strip() else []


def dual_spec(underlay: Underlay) -> DeviceSpec:
    """The IPv4 spec with the IPv6 half added, as the plan will make it: the
    MTU fits the IPv6 tunnel (underlay - 70), the smaller of the two."""
    assert underlay.address6 is not None
    base = device_spec(
        config=CONFIG,
        own=OWN,
        bridge="ovl0",
        underlay_ifindex=underlay.ifindex,
        underlay_mtu=underlay.mtu,
        underlay=underlay.name,
    )
    return replace(
        base,
        mtu=underlay.mtu - IPV6.vxlan_overhead,
        gateway6=GATEWAY6,
        vtep6=VTEP6,
        vtep6_mac=VTEP6_MAC,
        local_ip6=underlay.address6,
    )


def underlay_links(ns: str) -> None:
    """eth0, dual-stack, its addresses usable at once (nodad)."""
    sh(ns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "wire")
    sh(ns, "ip", "addr", "add", "192.0.2.11/24", "dev", "eth0")
    sh(ns, "ip", "addr", "add", "2001:db8::11/64", "dev", "eth0", "nodad")
    sh(ns, "ip", "link", "set", "eth0", "up")
    sh(ns, "ip", "link", "set", "wire", "up")


@dataclass
class Host:
    ns: str
    dataplane: Dataplane
    spec: DeviceSpec


@pytest.fixture
async def host(netns: str) -> AsyncIterator[Host]:
    underlay_links(netns)
    dataplane = Dataplane.open(netns)
    try:
        underlay = await dataplane.netlink.find_underlay("eth0", None)
        spec = dual_spec(underlay)
        yield Host(netns, dataplane, spec)
    finally:
        await dataplane.close()


def peer_entries6(count: int, first: int = 2) -> list[Entry]:
    """What the plan gives `count` tunnelled IPv6 peers, and one direct route
    (host-gw or DirectRouting) to a peer on the underlay's link."""
    entries: list[Entry] = []
    for i in range(first, first + count):
        subnet = IPv6Network(f"fd00:10:244:{i:x}::/64")
        hop = subnet.network_address
        mac = f"02:00:00:06:{i >> 8:02x}:{i & 0xFF:02x}"
        entries += [
            Route(subnet, hop),
            Neighbour(hop, mac),
            TunnelFdb(mac, IPv6Address(f"2001:db8::1:{i:x}")),
            BridgeFdb(mac),
        ]
    entries.append(Route(IPv6Network("fd00:10:244:ffff::/64"), IPv6Address("2001:db8::ff"), True))
    return entries


PEER4: list[Entry] = [
    Route(IPv4Network("10.244.2.0/24"), IPv4Address("10.244.2.0")),
    Neighbour(IPv4Address("10.244.2.0"), "02:00:00:00:00:02"),
    TunnelFdb("02:00:00:00:00:02", IPv4Address("192.0.2.12")),
    BridgeFdb("02:00:00:00:00:02"),
]


# Both write paths: netlink for a handful of changes, iproute2 batches for
# many, each forced by the threshold so that the path is the one named.
PATHS = {"netlink": (3, 10_000), "iproute2-batch": (100, 0)}


@pytest.fixture(params=sorted(PATHS))
async def ready(host: Host, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Host, int]]:
    """The host with its devices made and the write path chosen; the number
    of IPv6 peers that path is meant for."""
    peers, threshold = PATHS[request.param]
    host.dataplane.netlink_max_changes = threshold
    await host.dataplane.ensure_devices(host.spec)
    yield host, peers


async def program(host: Host, entries: list[Entry], family: Family = IPV6) -> None:
    actual = await host.dataplane.read_entries(host.spec, family)
    result = await host.dataplane.apply(diff(EntrySet.of(entries), actual), host.spec, family)
    assert result.failed == ()


async def test_the_ipv6_vtep_is_a_second_port_of_the_bridge_holding_both_gateways(
    host: Host,
) -> None:
    ns, spec = host.ns, host.spec
    made = await host.dataplane.ensure_devices(spec)
    assert f"created {VTEP6}" in made and f"added {GATEWAY6} to ovl0" in made
    bridge_addresses = {
        (a["local"], a["prefixlen"]): a
        for a in jq(ns, "ip", "-j", "addr", "show", "dev", "ovl0")[0]["addr_info"]
    }
    assert ("10.244.1.1", 24) in bridge_addresses
    gateway6 = bridge_addresses[("fd00:10:244:1::1", 64)]
    # nodad: usable at once, never "tentative".
    assert gateway6.get("nodad") is True and not gateway6.get("tentative")
    vtep = jq(ns, "ip", "-j", "-d", "link", "show", VTEP6)[0]
    data = vtep["linkinfo"]["info_data"]
    assert (data["id"], data["port"], data["local6"], data["learning"], data["link"]) == (
        1,
        8472,
        "2001:db8::11",
        False,
        "eth0",
    )
    assert (vtep["master"], vtep["mtu"], vtep["address"]) == ("ovl0", 1430, VTEP6_MAC)
    port = vtep["linkinfo"]["info_slave_data"]
    assert port["learning"] is False and port["flood"] is False
    # The IPv4 VTEP is still there, on the same bridge, with the same MTU.
    v4 = jq(ns, "ip", "-j", "-d", "link", "show", "ovl.1")[0]
    assert (v4["master"], v4["mtu"], v4["linkinfo"]["info_data"]["local"]) == (
        "ovl0",
        1430,
        "192.0.2.11",
    )
    assert await host.dataplane.ensure_devices(spec) == []  # nothing left to do


async def test_an_altered_ipv6_vtep_or_gateway_is_made_right_again(host: Host) -> None:
    ns, spec, dp = host.ns, host.spec, host.dataplane
    await dp.ensure_devices(spec)
    # Wrong VNI and local address: cannot be changed in place, so recreated.
    sh(ns, "ip", "link", "del", VTEP6)
    sh(
        ns,
        "ip",
        "link",
        "add",
        VTEP6,
        "type",
        "vxlan",
        "id",
        "9",
        "local",
        "2001:db8::99",
        "dstport",
        "8472",
    )
    made = await dp.ensure_devices(spec)
    assert f"removed incompatible {VTEP6}" in made and f"created {VTEP6}" in made
    data = jq(ns, "ip", "-j", "-d", "link", "show", VTEP6)[0]["linkinfo"]["info_data"]
    assert (data["id"], data["local6"]) == (1, "2001:db8::11")
    # An IPv4 VTEP under the IPv6 one's name is incompatible too (the real
    # IPv4 VTEP goes first: the kernel refuses two IPv4 VTEPs with the same
    # VNI and port, while one of each family coexist).
    sh(ns, "ip", "link", "del", VTEP6)
    sh(ns, "ip", "link", "del", "ovl.1")
    sh(
        ns,
        "ip",
        "link",
        "add",
        VTEP6,
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        "192.0.2.11",
        "dstport",
        "8472",
        "dev",
        "eth0",
        "nolearning",
    )
    made = await dp.ensure_devices(spec)
    assert {f"removed incompatible {VTEP6}", f"created {VTEP6}", "created ovl.1"} <= set(made)
    # Off the bridge, down, another MAC: set right in place.
    sh(ns, "ip", "link", "set", VTEP6, "nomaster", "down", "address", "02:00:00:00:06:99")
    made = await dp.ensure_devices(spec)
    assert f"set address, master of {VTEP6}" in made and f"brought {VTEP6} up" in made
    # IPv6 switched off on the bridge by hand: all its IPv6 addresses went.
    sh(ns, "sysctl", "-qw", "net.ipv6.conf.ovl0.disable_ipv6=1")
    assert "fd00:10:244:1::1" not in sh(ns, "ip", "-6", "addr", "show", "dev", "ovl0")
    made = await dp.ensure_devices(spec)
    assert "enabled IPv6 on ovl0 (net.ipv6.conf.ovl0.disable_ipv6=0)" in made
    assert "fd00:10:244:1::1/64" in sh(ns, "ip", "-6", "addr", "show", "dev", "ovl0")
    # A gateway of an earlier lease goes; the kernel's link-local address stays.
    sh(ns, "ip", "addr", "add", "fd00:10:244:7::1/64", "dev", "ovl0", "nodad")
    assert "removed fd00:10:244:7::1/64 from ovl0" in await dp.ensure_devices(spec)
    assert "scope link" in sh(ns, "ip", "-6", "addr", "show", "dev", "ovl0")
    assert await dp.ensure_devices(spec) == []


async def test_an_mtu_too_large_for_the_ipv6_tunnel_is_refused_by_name(host: Host) -> None:
    """The kernel creates a VTEP with an MTU above what its underlay can
    carry without a word (it takes its largest instead), then refuses to
    set it: the IPv4 MTU (underlay - 50) is 20 bytes too many for IPv6."""
    ns, dp = host.ns, host.dataplane
    v4_mtu = replace(host.spec, mtu=1500 - IPV4.vxlan_overhead)
    with pytest.raises(DeviceError, match=r"ovl-v6\.1: MTU 1450 does not fit an IPv6 tunnel"):
        await dp.ensure_devices(v4_mtu)
    assert jq(ns, "ip", "-j", "link", "show", VTEP6)[0]["mtu"] == 1430
    assert jq(ns, "ip", "-j", "link", "show", "ovl.1")[0]["mtu"] == 1450  # fits IPv4
    await dp.ensure_devices(host.spec)  # 1430: fits both
    assert {jq(ns, "ip", "-j", "link", "show", d)[0]["mtu"] for d in (VTEP6, "ovl.1")} == {1430}


async def test_ipv6_switched_off_removes_the_ipv6_vtep_and_gateway_only(host: Host) -> None:
    ns, dp = host.ns, host.dataplane
    await dp.ensure_devices(host.spec)
    await program(host, PEER4, IPV4)
    v4_only = replace(host.spec, gateway6=None, vtep6="", vtep6_mac="", local_ip6=None)
    made = await dp.ensure_devices(v4_only)
    assert sorted(made) == sorted(
        [f"removed {GATEWAY6} from ovl0", f"removed {VTEP6} (IPv6 is off)"]
    )
    assert VTEP6 not in sh(ns, "ip", "link", "show")
    assert "fd00:10:244:1::1" not in sh(ns, "ip", "-6", "addr", "show", "dev", "ovl0")
    # The IPv4 half is untouched, entries included.
    assert "10.244.1.1/24" in sh(ns, "ip", "-4", "addr", "show", "dev", "ovl0")
    assert await dp.read_entries(v4_only, IPV4) == EntrySet.of(PEER4)
    assert await dp.ensure_devices(v4_only) == []


async def test_ipv6_entries_go_in_through_either_path_and_read_back_equal(
    ready: tuple[Host, int],
) -> None:
    host, peers = ready
    entries = peer_entries6(peers)
    await program(host, entries)
    await program(host, PEER4, IPV4)
    # Each family reads exactly its own entries, from its own VTEP.
    assert await host.dataplane.read_entries(host.spec, IPV6) == EntrySet.of(entries)
    assert await host.dataplane.read_entries(host.spec, IPV4) == EntrySet.of(PEER4)
    ns = host.ns
    first = IPv6Network("fd00:10:244:2::/64")
    route = next(r for r in jq(ns, "ip", "-6", "-j", "route", "show", str(first)))
    assert (route["gateway"], route["dev"], route["flags"], route["protocol"]) == (
        "fd00:10:244:2::",
        "ovl0",
        ["onlink"],
        "77",
    )
    direct = jq(ns, "ip", "-6", "-j", "route", "show", "fd00:10:244:ffff::/64")[0]
    assert (direct["gateway"], direct["dev"], direct["protocol"]) == ("2001:db8::ff", "eth0", "77")
    fdb = jq(ns, "bridge", "-j", "fdb", "show", "dev", VTEP6)
    tunnel = next(e for e in fdb if e.get("dst") == "2001:db8::1:2")
    assert tunnel["flags"] == ["self"] and tunnel["state"] == "permanent"
    assert await host.dataplane.read_entries(host.spec, IPV6) == EntrySet.of(entries)
    # Nothing to do a second time.
    assert diff(EntrySet.of(entries), await host.dataplane.read_entries(host.spec, IPV6)) == []


async def test_deleting_ours_leaves_foreign_ipv6_entries_alone(ready: tuple[Host, int]) -> None:
    host, peers = ready
    ns, dp, spec = host.ns, host.dataplane, host.spec
    entries = peer_entries6(peers)
    await program(host, entries)
    foreign = [
        # another route protocol, to a destination like ours
        ("ip", "-6", "route", "add", "fd00:10:244:f000::/64", "via", "2001:db8::60", "dev", "eth0"),
        # a neighbour on our bridge that is not permanent (NDP's own)
        (
            "ip",
            "-6",
            "neigh",
            "add",
            "fd00:10:244:1::99",
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "ovl0",
            "nud",
            "stale",
        ),
        # a learned bridge FDB entry on our VTEP's port
        ("bridge", "fdb", "add", "02:00:00:00:00:77", "dev", VTEP6, "master", "dynamic"),
        # a permanent neighbour, on a device that is not ours
        (
            "ip",
            "-6",
            "neigh",
            "add",
            "2001:db8::99",
            "lladdr",
            "02:00:00:00:00:98",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ),
    ]
    for argv in foreign:
        sh(ns, *argv)
    assert await dp.read_entries(spec, IPV6) == EntrySet.of(entries)  # none of them read
    result = await dp.apply(diff(EntrySet(), await dp.read_entries(spec, IPV6)), spec, IPV6)
    assert result.failed == ()
    assert len(await dp.read_entries(spec, IPV6)) == 0
    assert "fd00:10:244:f000::/64 via 2001:db8::60" in sh(ns, "ip", "-6", "route")
    assert "fd00:10:244:1::99 lladdr 02:00:00:00:00:99" in sh(
        ns, "ip", "-6", "neigh", "show", "dev", "ovl0"
    )
    assert "02:00:00:00:00:77" in sh(ns, "bridge", "fdb", "show", "dev", VTEP6)
    assert "2001:db8::99 lladdr 02:00:00:00:00:98 PERMANENT" in sh(
        ns, "ip", "-6", "neigh", "show", "dev", "eth0"
    )


async def test_ipv6_entries_deleted_by_hand_or_lost_with_the_vtep_are_put_back(
    ready: tuple[Host, int],
) -> None:
    host, peers = ready
    ns, dp, spec = host.ns, host.dataplane, host.spec
    entries = peer_entries6(peers)
    wanted = EntrySet.of(entries)
    await program(host, entries)
    sh(ns, "ip", "-6", "route", "del", "fd00:10:244:2::/64")
    sh(ns, "ip", "-6", "neigh", "del", "fd00:10:244:3::", "dev", "ovl0")
    sh(
        ns,
        "bridge",
        "fdb",
        "del",
        "02:00:00:06:00:02",
        "dev",
        VTEP6,
        "dst",
        "2001:db8::1:2",
        "self",
    )
    sh(ns, "bridge", "fdb", "del", "02:00:00:06:00:03", "dev", VTEP6, "master")
    sh(ns, "ip", "-6", "route", "del", "fd00:10:244:ffff::/64")
    repair = diff(wanted, await dp.read_entries(spec, IPV6))
    assert len(repair) == 5 and {c.op for c in repair} == {Op.REPLACE}
    assert (await dp.apply(repair, spec, IPV6)).failed == ()
    assert await dp.read_entries(spec, IPV6) == wanted
    # The VTEP deleted by hand takes its FDB entries with it; made again, the
    # next read finds exactly those missing, and they go back.
    sh(ns, "ip", "link", "del", VTEP6)
    assert f"created {VTEP6}" in await dp.ensure_devices(spec)
    repair = diff(wanted, await dp.read_entries(spec, IPV6))
    assert sorted({type(c.entry).__name__ for c in repair}) == ["BridgeFdb", "TunnelFdb"]
    assert len(repair) == 2 * peers
    assert (await dp.apply(repair, spec, IPV6)).failed == ()
    assert await dp.read_entries(spec, IPV6) == wanted


async def test_a_changed_ipv6_peer_leaves_nothing_stale(ready: tuple[Host, int]) -> None:
    host, peers = ready
    dp, spec = host.dataplane, host.spec
    await program(host, peer_entries6(peers))
    moved: list[Entry] = [
        TunnelFdb("02:00:00:06:00:02", IPv6Address("2001:db8::2:2")),
        BridgeFdb("02:00:00:06:00:02"),
        Neighbour(IPv6Address("fd00:10:244:2::"), "02:00:00:06:00:02"),
        Route(IPv6Network("fd00:10:244:2::/64"), IPv6Address("fd00:10:244:2::")),
    ]
    await program(host, moved)
    assert await dp.read_entries(spec, IPV6) == EntrySet.of(moved)


async def test_the_drift_monitor_reports_ipv6_entries_on_the_ipv6_vtep(host: Host) -> None:
    ns, dp, spec = host.ns, host.dataplane, host.spec
    await dp.ensure_devices(spec)
    names = {"ovl0": "bridge", "ovl.1": "vtep", VTEP6: "vtep6", "eth0": "underlay"}
    seen: dict[str, list[Observed]] = {"dual": [], "v4": []}
    dual, v4_only = DriftMonitor(ns), DriftMonitor(ns)
    tasks = [
        asyncio.create_task(dual.run(lambda: names, seen["dual"].append, families=(IPV4, IPV6))),
        asyncio.create_task(v4_only.run(lambda: names, seen["v4"].append)),
    ]
    try:
        # Listening once each has learned our devices' indexes.
        await asyncio.to_thread(wait_until, lambda: bool(dual._indexes and v4_only._indexes))
        entries = peer_entries6(1)
        await program(host, entries)

        def entries_seen(which: str) -> set[Entry]:
            return {o.entry for o in seen[which] if o.present and o.entry and not o.foreign}

        await asyncio.to_thread(wait_until, lambda: set(entries) <= entries_seen("dual"))
        # The FDB entries (AF_BRIDGE) reach both; IPv6 routes and neighbours
        # only the monitor that programs IPv6. A marker FDB entry written
        # after them all: once the IPv4 monitor has seen it, it has read
        # every event before it (netlink delivers a socket's events in order).
        marker = TunnelFdb("02:00:00:06:00:99", IPv6Address("2001:db8::1:99"))
        sh(ns, "bridge", "fdb", "append", marker.mac, "dev", VTEP6, "dst", str(marker.remote))
        await asyncio.to_thread(wait_until, lambda: marker in entries_seen("v4"))
        v4_seen = entries_seen("v4")
        assert TunnelFdb("02:00:00:06:00:02", IPv6Address("2001:db8::1:2")) in v4_seen
        assert not any(isinstance(e, Route | Neighbour) for e in v4_seen)
        # A deletion on the IPv6 VTEP is reported as such.
        sh(ns, "bridge", "fdb", "del", "02:00:00:06:00:02", "dev", VTEP6, "master")
        await asyncio.to_thread(
            wait_until,
            lambda: any(
                not o.present and o.entry == BridgeFdb("02:00:00:06:00:02") for o in seen["dual"]
            ),
        )
        # The gateway's address is an event; a link-local one is not (the
        # kernel makes one on every link and reports it again when its
        # duplicate address detection ends). Both changes are made, and the
        # gateway's seen, before the link-local one is judged absent.
        sh(ns, "ip", "addr", "add", "fe80::99/64", "dev", "ovl0")
        sh(ns, "ip", "addr", "del", str(GATEWAY6), "dev", "ovl0")
        await asyncio.to_thread(
            wait_until, lambda: any(o.detail == "address on ovl0" for o in seen["dual"])
        )
        assert [o.present for o in seen["dual"] if "address" in o.detail] == [False]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_dual_stack_turns_ipv6_forwarding_on_and_says_what_it_costs(netns: str) -> None:
    underlay_links(netns)
    dp = Dataplane.open(netns)
    try:
        sh(netns, "ip", "link", "add", "ovl0", "type", "bridge")
        sh(netns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
        sh(netns, "sysctl", "-qw", "net.ipv6.conf.eth0.accept_ra=1")
        # IPv4 only: IPv6 forwarding is left as it is.
        await dp.ensure_forwarding("ovl0", underlay="eth0")
        assert sh(netns, "sysctl", "-n", "net.ipv6.conf.all.forwarding").strip() == "0"
        changed = await dp.ensure_forwarding("ovl0", ipv6=True, underlay="eth0")
        assert changed == [
            "enabled IPv6 forwarding (net.ipv6.conf.all.forwarding=1); eth0 now ignores"
            " router advertisements (net.ipv6.conf.eth0.accept_ra=2 if the host needs them)"
        ]
        for key in ("all", "default", "eth0"):
            assert sh(netns, "sysctl", "-n", f"net.ipv6.conf.{key}.forwarding").strip() == "1"
        assert await dp.ensure_forwarding("ovl0", ipv6=True, underlay="eth0") == []
        # gwbridge isolation needs bridged IPv6 frames in the IPv6 hooks too.
        sh(netns, "sysctl", "-qw", "net.bridge.bridge-nf-call-ip6tables=0")
        assert await dp.ensure_bridge_netfilter() == []
        assert sh(netns, "sysctl", "-n", "net.bridge.bridge-nf-call-ip6tables").strip() == "0"
        assert await dp.ensure_bridge_netfilter(ipv6=True) == [
            "enabled net.bridge.bridge-nf-call-ip6tables=1 (gwbridge isolation)"
        ]
    finally:
        await dp.close()


async def test_the_underlays_ipv6_address_is_named_or_the_first_fit_to_send_from(
    netns: str,
) -> None:
    ns = netns
    for name in ("up0", "down1"):
        sh(ns, "ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p")
        sh(
            ns,
            "ip",
            "addr",
            "add",
            f"192.0.2.{10 + len(name)}/24" if name == "up0" else "198.51.100.1/24",
            "dev",
            name,
        )
    # Deprecated (preferred lifetime over) and global: not fit; then a fit one.
    sh(ns, "ip", "addr", "add", "2001:db8:1::5/64", "dev", "up0", "nodad", "preferred_lft", "0")
    sh(ns, "ip", "addr", "add", "2001:db8::10/64", "dev", "up0", "nodad")
    # On a link that is down, duplicate address detection never ends.
    sh(ns, "ip", "addr", "add", "2001:db8:2::1/64", "dev", "down1")
    for name in ("up0", "up0p", "down1p"):
        sh(ns, "ip", "link", "set", name, "up")
    nl = Netlink(ns)
    try:
        up0 = await nl.find_underlay("up0", None)
        assert up0.address6 == IPv6Address("2001:db8::10")
        assert "tentative" in sh(ns, "ip", "-6", "addr", "show", "dev", "down1")
        assert (await nl.find_underlay("down1", None)).address6 is None
        named = await nl.find_underlay("up0", None, IPv6Address("2001:db8:1::5"))
        assert named.address6 == IPv6Address("2001:db8:1::5")  # named: taken as it is
        with pytest.raises(
            DeviceError, match="--public-ipv6 2001:db8::99 is not an address of up0"
        ):
            await nl.find_underlay("up0", None, IPv6Address("2001:db8::99"))
        by_v6 = await nl.find_underlay("2001:db8::10", None)
        assert (by_v6.name, by_v6.address, by_v6.address6) == (
            "up0",
            IPv4Address("192.0.2.13"),
            IPv6Address("2001:db8::10"),
        )
        # The on-link networks of either family, for host-gw and DirectRouting.
        assert await nl.connected_networks(up0.ifindex) == [IPv4Network("192.0.2.0/24")]
        onlink6 = await nl.connected_networks(up0.ifindex, IPV6)
        assert IPv6Network("2001:db8::/64") in onlink6 and IPv6Network("2001:db8:1::/64") in onlink6
        assert all(n.version == 6 for n in onlink6)
    finally:
        await nl.close()


async def test_teardown_removes_both_vteps_and_nothing_else(host: Host, tmp_path: Path) -> None:
    ns, dp = host.ns, host.dataplane
    await dp.ensure_devices(host.spec)
    sh(ns, "ip", "link", "add", "vx9", "type", "vxlan", "id", "9", "dstport", "4789")
    assert sorted(await dp.netlink.vtep_names()) == ["ovl-v6.1", "ovl.1"]
    settings = AgentConfig(iface="eth0", bridge="ovl0", subnet_file=tmp_path / "subnet.env")
    done = await teardown(settings, FakeStore(), dp)
    assert {"deleted ovl0", "deleted ovl.1", f"deleted {VTEP6}"} <= set(done)
    links = {link["ifname"] for link in jq(ns, "ip", "-j", "link", "show")}
    assert links == {"lo", "eth0", "wire", "vx9"}
