"""Desired state per peer, and a diff that is empty when the kernel matches
and ordered so that no route points at a missing next hop."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from overlayd.config import parse_network_config
from overlayd.model import BridgeFdb, Change, EntrySet, Lease, Neighbour, Op, Route, TunnelFdb
from overlayd.plan.desired import EntryMemo, desired_entries, device_spec, stable_mac
from overlayd.plan.diff import diff

CONFIG = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"VNI": 4, "Port": 4789}}')
OWN = Lease(IPv4Network("10.244.1.0/24"), IPv4Address("192.0.2.11"), 4, "02:00:00:00:00:01")
B = Lease(IPv4Network("10.244.2.0/24"), IPv4Address("192.0.2.12"), 4, "02:00:00:00:00:02")
C = Lease(IPv4Network("10.244.3.0/24"), IPv4Address("192.0.2.13"), 4, "02:00:00:00:00:03")


def kinds(changes: list[Change]) -> list[tuple[str, str]]:
    return [(c.op.value, type(c.entry).__name__) for c in changes]


def test_each_peer_gets_flannels_four_entries() -> None:
    assert desired_entries([B]) == EntrySet.of(
        [
            Route(B.subnet, IPv4Address("10.244.2.0")),
            Neighbour(IPv4Address("10.244.2.0"), B.vtep_mac),
            TunnelFdb(B.vtep_mac, B.public_ip),
            BridgeFdb(B.vtep_mac),
        ]
    )


def test_device_spec_follows_the_lease_and_the_underlay() -> None:
    spec = device_spec(config=CONFIG, own=OWN, bridge="ovl0", underlay_ifindex=2, underlay_mtu=9000)
    assert str(spec.gateway) == "10.244.1.1/24"
    assert spec.vtep == "ovl.4" and spec.vni == 4 and spec.port == 4789
    assert spec.mtu == 8950
    assert spec.local_ip == OWN.public_ip and spec.vtep_mac == OWN.vtep_mac


def test_configured_mtu_wins_over_the_derived_one() -> None:
    cfg = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"MTU": 1400}}')
    assert (
        device_spec(config=cfg, own=OWN, bridge="b", underlay_ifindex=2, underlay_mtu=1500).mtu
        == 1400
    )


def test_macs_are_stable_unicast_and_differ_per_subnet() -> None:
    a = stable_mac("vtep", OWN.subnet, 1)
    assert a == stable_mac("vtep", OWN.subnet, 1)
    assert a != stable_mac("vtep", B.subnet, 1) != stable_mac("bridge", OWN.subnet, 1)
    first = int(a[:2], 16)
    assert first & 0x01 == 0 and first & 0x02 == 2


def test_the_entry_memo_reuses_entries_and_gives_the_same_result() -> None:
    memo: EntryMemo = {}
    first = desired_entries([B, C], memo=memo)
    again = desired_entries([B, C], memo=memo)
    assert first == again == desired_entries([C, B])
    assert next(iter(first.routes.values())) is next(iter(again.routes.values()))


def test_no_changes_when_the_kernel_matches() -> None:
    entries = desired_entries([B, C])
    assert diff(entries, desired_entries([C, B])) == []


def test_a_new_peer_gets_fdb_and_neighbour_before_its_route() -> None:
    changes = diff(desired_entries([B]), EntrySet())
    assert kinds(changes) == [
        ("replace", "TunnelFdb"),
        ("replace", "BridgeFdb"),
        ("replace", "Neighbour"),
        ("replace", "Route"),
    ]


def test_a_departed_peer_loses_its_route_first_and_everything_else() -> None:
    changes = diff(desired_entries([B]), desired_entries([B, C]))
    assert kinds(changes) == [
        ("delete", "Route"),
        ("delete", "Neighbour"),
        ("delete", "BridgeFdb"),
        ("delete", "TunnelFdb"),
    ]
    assert all(c.entry != Route(B.subnet, IPv4Address("10.244.2.0")) for c in changes)


def test_a_peer_with_a_new_mac_switches_over_and_leaves_nothing_stale() -> None:
    moved = Lease(B.subnet, B.public_ip, 4, "02:00:00:00:00:99")
    changes = diff(desired_entries([moved]), desired_entries([B]))
    assert kinds(changes) == [
        ("replace", "TunnelFdb"),
        ("replace", "BridgeFdb"),
        ("replace", "Neighbour"),
        ("delete", "BridgeFdb"),
        ("delete", "TunnelFdb"),
    ]
    deleted = {c.entry.mac for c in changes if c.op is Op.DELETE}  # type: ignore[union-attr]
    assert deleted == {B.vtep_mac}


def test_a_peer_with_a_new_public_ip_only_updates_the_tunnel_entry() -> None:
    moved = Lease(B.subnet, IPv4Address("192.0.2.99"), 4, B.vtep_mac)
    changes = diff(desired_entries([moved]), desired_entries([B]))
    assert changes == [Change(Op.REPLACE, TunnelFdb(B.vtep_mac, IPv4Address("192.0.2.99")))]


def test_a_stray_entry_is_deleted_and_a_wrong_one_replaced() -> None:
    right = desired_entries([B])
    stray = IPv4Network("10.244.50.0/24")
    wrong = Route(B.subnet, IPv4Address("0.0.0.0"))
    actual = EntrySet.of(
        [
            Route(stray, IPv4Address("10.244.50.0")),
            wrong,
            *right.neighbours.values(),
            *right.tunnel_fdb.values(),
            *right.bridge_fdb.values(),
        ]
    )
    changes = diff(desired_entries([B]), actual)
    assert changes == [
        Change(Op.DELETE, Route(stray, IPv4Address("10.244.50.0"))),
        Change(Op.REPLACE, Route(B.subnet, IPv4Address("10.244.2.0"))),
    ]
