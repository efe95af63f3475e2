"""The VXLAN allow-list, rendered from data alone: the rules (golden file),
the transactions that install and remove them without touching the set's
elements or the drop counter, element changes sized by what changed, who
is allowed, and nft listings cut into our objects."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address
from pathlib import Path

from overlayd.model import IPV6, DeviceSpec, IPAddress, Lease
from overlayd.plan.desired import Routing, plan_peers
from overlayd.plan.nftables import select, split_objects, table_text
from overlayd.plan.vxlan_filter import (
    KEYS,
    FilterSpec,
    allowed_sources,
    element_changes,
    filter_spec,
    render_elements,
    render_install,
    render_objects,
    render_removal,
)

GOLDEN = Path(__file__).parent / "golden"
F = FilterSpec(IPv4Address("192.0.2.11"), 8472, 42)
SPEC = DeviceSpec(
    bridge="ovl0",
    bridge_mac="02:00:00:00:00:aa",
    gateway=IPv4Interface("10.244.1.1/24"),
    vtep="ovl.42",
    vtep_mac="02:00:00:00:00:bb",
    vni=42,
    port=8472,
    local_ip=IPv4Address("192.0.2.11"),
    underlay_ifindex=2,
    mtu=1450,
)


def addresses(n: int, base: str = "198.51.100.0") -> frozenset[IPAddress]:
    return frozenset(IPv4Address(base) + i for i in range(n))


def test_the_filter_objects_match_their_golden_file() -> None:
    assert render_objects(F) == (GOLDEN / "vxlan_filter.nft").read_text()


def test_the_rules_accept_our_vni_from_the_set_before_raw_and_drop_the_rest() -> None:
    rules = [line.strip() for line in render_objects(F).splitlines()]
    hook = "type filter hook prerouting priority raw; policy accept;"
    accept = "ip daddr 192.0.2.11 udp dport 8472 @th,96,24 0x2a ip saddr @vxlan_peers accept"
    drop = (
        'udp dport 8472 fib daddr type { local, broadcast, multicast } counter name "vxlan_dropped"'
        " drop"
    )
    positions = [
        next(i for i, r in enumerate(rules) if r.startswith(want)) for want in (hook, accept, drop)
    ]
    assert positions == sorted(positions)  # the accept comes before the drop


def test_filter_spec_follows_the_device_spec_and_needs_a_vtep() -> None:
    assert filter_spec(SPEC) == F
    assert filter_spec(replace(SPEC, vtep="")) is None  # host-gw: no VXLAN to filter


def test_installing_keeps_counter_and_set_and_makes_only_the_chain_again() -> None:
    script = render_install(F)
    lines = script.splitlines()
    assert "add counter ip overlayd vxlan_dropped" in lines
    assert "add set ip overlayd vxlan_peers { type ipv4_addr; }" in lines
    # No statement that would reset the count or drop the elements.
    assert not any(
        word in script for word in ("delete counter", "delete set", "flush", "delete table")
    )
    # The delete cannot fail on a missing chain: the chain is added just before.
    assert lines.index("add chain ip overlayd vxlan_in") < lines.index(
        "delete chain ip overlayd vxlan_in"
    )
    assert sum(line.startswith("add rule ") for line in lines) == 2
    # A set of another type made by hand is made again, after the chain that
    # refers to it is gone.
    again = render_install(F, recreate_set=True).splitlines()
    assert again.index("delete chain ip overlayd vxlan_in") < again.index(
        "delete set ip overlayd vxlan_peers"
    )
    assert "delete counter" not in "\n".join(again)


def test_a_peer_change_is_one_transaction_the_size_of_the_change() -> None:
    held = addresses(5000)
    joining, leaving = IPv4Address("203.0.113.7"), IPv4Address("198.51.100.3")
    desired = (held - {leaving}) | {joining}
    changes = element_changes(desired, held)
    assert changes.add == (joining,) and changes.delete == (leaving,)
    assert render_elements(F, changes) == (
        "add element ip overlayd vxlan_peers { 203.0.113.7 }\n"
        "delete element ip overlayd vxlan_peers { 198.51.100.3 }\n"
    )
    nothing = element_changes(held, held)
    assert not nothing and render_elements(F, nothing) == ""
    # A cold start: one statement for all.
    cold = render_elements(F, element_changes(held, frozenset()))
    assert cold.count("\n") == 1 and cold.count(",") == 4999


def test_only_tunnelled_peers_are_allowed() -> None:
    near = Lease(IPv4Network("10.244.2.0/24"), IPv4Address("192.0.2.12"), 1, "02:00:00:00:00:02")
    far = Lease(IPv4Network("10.244.3.0/24"), IPv4Address("203.0.113.5"), 1, "02:00:00:00:00:03")
    onlink = [IPv4Network("192.0.2.0/24")]
    plain = plan_peers([near, far], Routing("vxlan", False, tuple(onlink)))
    assert allowed_sources(plain) == {near.public_ip, far.public_ip}
    direct = plan_peers([near, far], Routing("vxlan", True, tuple(onlink)))
    assert allowed_sources(direct) == {far.public_ip}  # DirectRouting: `near` is routed
    host_gw = plan_peers([near, far], Routing("host-gw", False, tuple(onlink)))
    assert allowed_sources(host_gw) == frozenset()


def test_removal_deletes_the_chain_before_what_it_refers_to() -> None:
    assert render_removal(KEYS) == (
        "delete chain ip overlayd vxlan_in\n"
        "delete set ip overlayd vxlan_peers\n"
        "delete counter ip overlayd vxlan_dropped\n"
    )
    assert render_removal(["set vxlan_peers"]) == "delete set ip overlayd vxlan_peers\n"
    assert render_removal([]) == ""


def test_the_ipv6_filter_matches_its_golden_file_and_follows_the_ipv6_vtep() -> None:
    six = FilterSpec(IPv6Address("2001:db8::11"), 8472, 42, IPV6)
    assert render_objects(six) == (GOLDEN / "vxlan_filter6.nft").read_text()
    dual = replace(SPEC, vtep6="ovl-v6.42", local_ip6=IPv6Address("2001:db8::11"))
    assert filter_spec(dual, IPV6) == six
    assert filter_spec(dual) == F  # the IPv4 filter is the same as without IPv6
    # No IPv6 VTEP (no IPv6, or host-gw): no IPv6 filter.
    assert filter_spec(SPEC, IPV6) is None
    assert filter_spec(replace(dual, vtep6=""), IPV6) is None


def test_the_family_is_a_parameter() -> None:
    six = FilterSpec(IPv6Address("2001:db8::11"), 8472, 1, IPV6)
    text = render_objects(six)
    assert text.startswith("table ip6 overlayd {")
    assert "type ipv6_addr" in text
    assert "ip6 daddr 2001:db8::11 udp dport 8472 @th,96,24 0x1 ip6 saddr @vxlan_peers" in text
    changes = element_changes(frozenset({IPv6Address("2001:db8::12")}), frozenset())
    assert (
        render_elements(six, changes) == "add element ip6 overlayd vxlan_peers { 2001:db8::12 }\n"
    )
    assert render_removal(["chain vxlan_in"], IPV6) == "delete chain ip6 overlayd vxlan_in\n"


LISTING = """table ip overlayd {
\tcounter vxlan_dropped {
\t\tpackets 17 bytes 1326
\t}

\tset vxlan_peers {
\t\ttype ipv4_addr
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t}

\tct helper ftp {
\t\ttype "ftp" protocol tcp
\t\tl3proto ip
\t}
}
"""


def test_a_listing_is_cut_into_objects_and_a_counters_values_are_not_compared() -> None:
    objects = split_objects(LISTING)
    assert list(objects) == [
        "counter vxlan_dropped",
        "set vxlan_peers",
        "chain forward",
        "ct helper ftp",
    ]
    assert objects["counter vxlan_dropped"] == "\tcounter vxlan_dropped {\n\t}"
    later = split_objects(LISTING.replace("packets 17 bytes 1326", "packets 90 bytes 7020"))
    assert later == objects
    ours = table_text("ip", "overlayd", select(objects, KEYS))
    assert ours == (
        "table ip overlayd {\n\tcounter vxlan_dropped {\n\t}\n\n"
        "\tset vxlan_peers {\n\t\ttype ipv4_addr\n\t}\n}\n"
    )
    assert table_text("ip", "overlayd", select(objects, ["chain vxlan_in"])) == ""
    assert split_objects("") == {}
