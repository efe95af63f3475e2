"""Routed mode (host-gw) and DirectRouting: which peers go straight over the
underlay, which through the tunnel, and which get no route at all."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

from overlayd.config import parse_network_config
from overlayd.model import Lease, Route
from overlayd.plan.desired import (
    EntryMemo,
    Routing,
    desired_entries,
    device_spec,
    max_overlay_mtu,
    plan_peers,
)
from overlayd.plan.leases import parse_lease, render_lease, subnet_key
from overlayd.plan.selection import select_peers

HOST_GW = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}')
VXLAN = parse_network_config('{"Network": "10.244.0.0/16"}')
LINK = (IPv4Network("192.0.2.0/24"),)
ON = Lease(IPv4Network("10.244.2.0/24"), IPv4Address("192.0.2.12"), 1, "02:00:00:00:00:02")
OFF = Lease(IPv4Network("10.244.3.0/24"), IPv4Address("198.51.100.13"), 1, "02:00:00:00:00:03")


def test_host_gw_leases_are_flannels_and_round_trip() -> None:
    lease = Lease(IPv4Network("10.244.2.0/24"), IPv4Address("192.0.2.12"), 0, "", "host-gw")
    raw = json.loads(render_lease(lease))
    assert raw["BackendType"] == "host-gw" and raw["BackendData"] is None
    assert parse_lease(lease.subnet, render_lease(lease)) == lease


def test_a_lease_of_another_backend_is_rejected() -> None:
    vxlan_lease = render_lease(ON).encode()
    selection = select_peers(HOST_GW, None, {subnet_key("/p", ON.subnet): vxlan_lease}, "/p")
    assert not selection.peers
    assert "BackendType vxlan differs from the network's host-gw" in selection.rejected[0].reason


def test_host_gw_routes_on_link_peers_and_never_black_holes_the_others() -> None:
    plan = plan_peers([ON, OFF], Routing.of(HOST_GW, LINK))
    assert plan.direct == (ON,) and plan.unreachable == (OFF,) and plan.tunneled == ()
    entries = desired_entries(plan.tunneled, direct=plan.direct)
    assert list(entries.routes.values()) == [Route(ON.subnet, ON.public_ip, direct=True)]
    assert not entries.neighbours and not entries.tunnel_fdb and not entries.bridge_fdb


def test_direct_routing_takes_the_link_for_neighbours_and_the_tunnel_for_the_rest() -> None:
    direct = parse_network_config(
        '{"Network": "10.244.0.0/16", "Backend": {"DirectRouting": true}}'
    )
    plan = plan_peers([ON, OFF], Routing.of(direct, LINK))
    assert plan.direct == (ON,) and plan.tunneled == (OFF,) and plan.unreachable == ()
    entries = desired_entries(plan.tunneled, direct=plan.direct)
    assert len(entries.routes) == 2 and list(entries.tunnel_fdb) == [OFF.vtep_mac]


def test_the_choice_follows_the_underlay() -> None:
    direct = parse_network_config(
        '{"Network": "10.244.0.0/16", "Backend": {"DirectRouting": true}}'
    )
    memo: EntryMemo = {}
    narrow = plan_peers([OFF], Routing.of(direct, LINK))
    before = desired_entries(narrow.tunneled, direct=narrow.direct, memo=memo)
    wide = plan_peers([OFF], Routing.of(direct, (*LINK, IPv4Network("198.51.100.0/24"))))
    after = desired_entries(wide.tunneled, direct=wide.direct, memo=memo)
    assert next(iter(before.routes.values())).direct is False
    assert next(iter(after.routes.values())).direct is True and not after.tunnel_fdb


def test_plain_vxlan_tunnels_everyone_and_host_gw_keeps_the_full_mtu() -> None:
    assert plan_peers([ON, OFF], Routing.of(VXLAN, LINK)).tunneled == (ON, OFF)
    assert max_overlay_mtu(HOST_GW, 1500) == 1500 and max_overlay_mtu(VXLAN, 1500) == 1450
    own = Lease(IPv4Network("10.244.1.0/24"), IPv4Address("192.0.2.11"), 0, "", "host-gw")
    spec = device_spec(
        config=HOST_GW,
        own=own,
        bridge="ovl0",
        underlay_ifindex=2,
        underlay_mtu=1500,
        underlay="eth0",
    )
    assert spec.vtep == "" and spec.mtu == 1500
