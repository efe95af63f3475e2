"""The pure parts of the dual-stack adapters: which VTEPs a spec wants, the
batch lines of IPv6 entries (on the IPv6 VTEP, with `ip -6`), and what the
drift monitor makes of IPv6 netlink messages (FDB entries on the IPv6 VTEP,
link-local addresses, the groups it listens to)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, IPv6Network
from typing import Any

import pytest
from pyroute2.netlink.rtnl import RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE

from overlayd.dataplane import entries
from overlayd.dataplane.netlink import AF_BRIDGE, DeviceError, DriftMonitor, _vteps
from overlayd.model import (
    IPV4,
    IPV6,
    BridgeFdb,
    Change,
    DeviceSpec,
    Neighbour,
    Observed,
    Op,
    Route,
    TunnelFdb,
)

V4_ONLY = DeviceSpec(
    bridge="ovl0",
    bridge_mac="02:00:00:00:0b:01",
    gateway=IPv4Interface("10.244.1.1/24"),
    vtep="ovl.1",
    vtep_mac="02:00:00:00:04:01",
    vni=1,
    port=8472,
    local_ip=IPv4Address("192.0.2.11"),
    underlay_ifindex=2,
    mtu=1430,
    underlay="eth0",
)
DUAL = replace(
    V4_ONLY,
    gateway6=IPv6Interface("fd00:10:244:1::1/64"),
    vtep6="ovl-v6.1",
    vtep6_mac="02:00:00:00:06:01",
    local_ip6=IPv6Address("2001:db8::11"),
)
HOP6 = IPv6Address("fd00:10:244:2::")
PEER6 = [
    Change(Op.REPLACE, TunnelFdb("02:00:00:00:06:02", IPv6Address("2001:db8::12"))),
    Change(Op.REPLACE, BridgeFdb("02:00:00:00:06:02")),
    Change(Op.REPLACE, Neighbour(HOP6, "02:00:00:00:06:02")),
    Change(Op.REPLACE, Route(IPv6Network("fd00:10:244:2::/64"), HOP6)),
    Change(
        Op.REPLACE,
        Route(IPv6Network("fd00:10:244:3::/64"), IPv6Address("2001:db8::13"), direct=True),
    ),
]


def test_a_spec_wants_the_ipv6_vtep_only_when_dual_stack_and_tunnelled() -> None:
    assert [(v.name, v.family, v.local) for v in _vteps(V4_ONLY)] == [
        ("ovl.1", IPV4, IPv4Address("192.0.2.11"))
    ]
    assert [(v.name, v.family, v.mac, v.local) for v in _vteps(DUAL)] == [
        ("ovl.1", IPV4, "02:00:00:00:04:01", IPv4Address("192.0.2.11")),
        ("ovl-v6.1", IPV6, "02:00:00:00:06:01", IPv6Address("2001:db8::11")),
    ]
    assert _vteps(replace(V4_ONLY, vtep="")) == []  # host-gw
    with pytest.raises(DeviceError, match=r"ovl-v6\.1 needs an IPv6 address"):
        _vteps(replace(DUAL, local_ip6=None))


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], str]]:
    """The iproute2 batches apply_changes would run, instead of running them."""
    ran: list[tuple[list[str], str]] = []

    async def run(argv: Sequence[str], data: bytes | None = None) -> tuple[int, bytes, bytes]:
        ran.append((list(argv), (data or b"").decode()))
        return 0, b"", b""

    monkeypatch.setattr(entries, "run", run)
    return ran


async def test_ipv6_batches_use_ip_minus_6_and_the_ipv6_vtep(
    batches: list[tuple[list[str], str]],
) -> None:
    result = await entries.apply_changes(PEER6, DUAL, netns="h1", family=IPV6)
    assert result.applied == 5 and result.failed == ()
    assert batches == [
        (
            ["bridge", "-n", "h1", "-force", "-batch", "-"],
            "fdb replace 02:00:00:00:06:02 dev ovl-v6.1 dst 2001:db8::12 self permanent\n"
            "fdb replace 02:00:00:00:06:02 dev ovl-v6.1 master static\n",
        ),
        (
            ["ip", "-n", "h1", "-6", "-force", "-batch", "-"],
            "neigh replace fd00:10:244:2:: lladdr 02:00:00:00:06:02 dev ovl0 nud permanent\n"
            "route replace fd00:10:244:2::/64 via fd00:10:244:2:: dev ovl0 onlink proto 77\n"
            "route replace fd00:10:244:3::/64 via 2001:db8::13 dev eth0 proto 77\n",
        ),
    ]
    batches.clear()
    deletes = [Change(Op.DELETE, c.entry) for c in reversed(PEER6)]
    await entries.apply_changes(deletes, DUAL, family=IPV6)
    assert batches[0][0] == ["ip", "-6", "-force", "-batch", "-"]
    assert batches[1] == (
        ["bridge", "-force", "-batch", "-"],
        "fdb delete 02:00:00:00:06:02 dev ovl-v6.1 master\n"
        "fdb delete 02:00:00:00:06:02 dev ovl-v6.1 dst 2001:db8::12 self\n",
    )


async def test_ipv4_batches_keep_their_vtep(batches: list[tuple[list[str], str]]) -> None:
    fdb = TunnelFdb("02:00:00:00:04:02", IPv4Address("192.0.2.12"))
    await entries.apply_changes([Change(Op.REPLACE, fdb)], DUAL)
    assert batches == [
        (
            ["bridge", "-force", "-batch", "-"],
            "fdb replace 02:00:00:00:04:02 dev ovl.1 dst 192.0.2.12 self permanent\n",
        )
    ]


NAMES = {"ovl0": "bridge", "ovl.1": "vtep", "ovl-v6.1": "vtep6", "eth0": "underlay"}


def monitor(*families: Any) -> DriftMonitor:
    m = DriftMonitor(families=families or (IPV4,))
    m._indexes = {3: "ovl0", 4: "ovl.1", 5: "ovl-v6.1", 2: "eth0", 9: "other0"}
    return m


def fdb_event(ifindex: int, **attrs: Any) -> dict[str, Any]:
    return {"event": "RTM_NEWNEIGH", "family": AF_BRIDGE, "ifindex": ifindex, **attrs}


def test_fdb_entries_on_the_ipv6_vtep_are_observed_as_ours() -> None:
    m = monitor(IPV4, IPV6)
    tunnel = fdb_event(5, NDA_LLADDR="02:00:00:00:06:02", NDA_DST="2001:db8::12", state=0x80)
    assert m._observe(tunnel, NAMES) == Observed(
        True,
        TunnelFdb("02:00:00:00:06:02", IPv6Address("2001:db8::12")),
        "fdb 02:00:00:00:06:02",
        family=6,  # the IPv6 VTEP's: only the IPv6 manager judges it
    )
    bridge = fdb_event(5, NDA_LLADDR="02:00:00:00:06:02", NDA_MASTER=3, state=0x40)
    seen = m._observe(bridge, NAMES)
    assert seen is not None and seen.entry == BridgeFdb("02:00:00:00:06:02")
    assert not seen.foreign and seen.family == 6
    # Learned (not static): keyed like ours, but somebody else's.
    learned = m._observe(fdb_event(5, NDA_LLADDR="02:00:00:00:00:77", NDA_MASTER=3, state=2), NAMES)
    assert learned is not None and learned.foreign
    # The same message on a device that is not ours: nothing.
    elsewhere = {**tunnel, "ifindex": 9}
    assert m._observe(elsewhere, NAMES) is None


def test_ipv6_neighbours_on_the_bridge_are_seen_when_ipv6_is_programmed() -> None:
    event = {
        "event": "RTM_NEWNEIGH",
        "family": IPV6.netlink,
        "ifindex": 3,
        "NDA_DST": "fd00:10:244:2::",
        "NDA_LLADDR": "02:00:00:00:06:02",
        "state": 0x80,
    }
    assert monitor()._observe(event, NAMES) is None
    seen = monitor(IPV4, IPV6)._observe(event, NAMES)
    assert seen == Observed(
        True, Neighbour(HOP6, "02:00:00:00:06:02"), "neigh fd00:10:244:2::", foreign=False
    )
    ndp = monitor(IPV4, IPV6)._observe({**event, "state": 0x02}, NAMES)  # REACHABLE
    assert ndp is not None and ndp.foreign


def test_link_local_address_events_are_not_drift_but_global_ones_are() -> None:
    m = monitor(IPV4, IPV6)
    base = {"event": "RTM_NEWADDR", "family": IPV6.netlink, "index": 3, "prefixlen": 64}
    assert m._observe({**base, "scope": 253, "IFA_ADDRESS": "fe80::1"}, NAMES) is None
    gateway = {**base, "scope": 0, "IFA_ADDRESS": "fd00:10:244:1::1"}
    assert m._observe(gateway, NAMES) == Observed(True, None, "address on ovl0")


def test_an_address_told_of_again_is_a_refresh_not_drift() -> None:
    """A router advertisement refreshes the lifetimes of the underlay's SLAAC
    address with another RTM_NEWADDR; only a new or a removed address is
    worth a full pass."""
    m = monitor(IPV4, IPV6)
    slaac = {
        "event": "RTM_NEWADDR",
        "family": IPV6.netlink,
        "index": 2,
        "prefixlen": 64,
        "scope": 0,
        "IFA_ADDRESS": "2001:db8::5054:ff:fe00:1",
    }
    assert m._observe(slaac, NAMES) == Observed(True, None, "address on eth0")
    assert m._observe(slaac, NAMES) is None
    assert m._observe({**slaac, "prefixlen": 80}, NAMES) is not None  # another prefix
    gone = {**slaac, "event": "RTM_DELADDR"}
    assert m._observe(gone, NAMES) == Observed(False, None, "address on eth0")
    assert m._observe(slaac, NAMES) == Observed(True, None, "address on eth0")  # back


def test_the_monitor_listens_to_ipv6_routes_and_addresses_only_when_asked() -> None:
    v4, dual = monitor()._groups(), monitor(IPV4, IPV6)._groups()
    assert not v4 & (RTMGRP_IPV6_ROUTE | RTMGRP_IPV6_IFADDR)
    assert dual & RTMGRP_IPV6_ROUTE and dual & RTMGRP_IPV6_IFADDR
    m = monitor()
    m.families = (IPV4, IPV6)  # what run(families=...) does
    assert m._groups() == dual
