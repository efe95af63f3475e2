"""The address family is a parameter: the same plan and readers serve IPv4
and IPv6, with the figures that differ (VXLAN overhead, default route,
netlink numbers) taken from the family."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Address, IPv6Network

from overlayd.config import parse_network_config
from overlayd.dataplane.netlink import DriftMonitor
from overlayd.model import IPV4, IPV6, ROUTE_PROTOCOL, Route, route_key
from overlayd.plan.desired import max_overlay_mtu

CONFIG = parse_network_config('{"Network": "10.244.0.0/16"}')


def test_an_ipv6_underlay_costs_70_bytes_and_an_ipv4_one_50() -> None:
    assert max_overlay_mtu(CONFIG, 1500, IPV4) == 1450
    assert max_overlay_mtu(CONFIG, 1500, IPV6) == 1430


def test_route_destinations_parse_per_family_default_included() -> None:
    assert IPV4.network("default") == IPv4Network("0.0.0.0/0")
    assert IPV6.network("default") == IPv6Network("::/0")
    assert IPV6.network("fd00:10:244:2::/64") == IPv6Network("fd00:10:244:2::/64")
    assert route_key(IPV6.network("fd00::1")) == (int(IPv6Address("fd00::1")), 128)


def test_the_drift_monitor_sees_routes_of_the_families_it_was_given_only() -> None:
    event = {
        "event": "RTM_NEWROUTE",
        "family": IPV6.netlink,
        "proto": ROUTE_PROTOCOL,
        "RTA_DST": "fd00:10:244:2::",
        "dst_len": 64,
        "RTA_GATEWAY": "fd00:10:244:2::",
        "RTA_OIF": 5,
    }
    v4_only, dual = DriftMonitor(), DriftMonitor(families=(IPV4, IPV6))
    for monitor in (v4_only, dual):
        monitor._indexes = {5: "ovl0"}
    assert v4_only._observe(event, {"ovl0": "bridge"}) is None
    seen = dual._observe(event, {"ovl0": "bridge"})
    assert seen is not None and seen.entry == Route(
        IPv6Network("fd00:10:244:2::/64"), IPv6Address("fd00:10:244:2::")
    )
