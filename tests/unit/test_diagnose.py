"""diagnose(): facts about a host become findings in plain words."""

from __future__ import annotations

import datetime
import json
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface
from typing import Any

from overlayd.model import (
    IPV6,
    BridgeFdb,
    DeviceFacts,
    DeviceSpec,
    EntrySet,
    Lease,
    Neighbour,
    Route,
    TunnelFdb,
)
from overlayd.plan.desired import desired_entries
from overlayd.plan.diagnose import (
    CertificateExpiry,
    FilterFacts,
    HostFacts,
    PolicyFacts,
    _policy_findings,
    diagnose,
    firewall_blocks,
)
from overlayd.plan.policy import parse_policy
from overlayd.plan.policy_model import Endpoint
from overlayd.plan.policy_rules import (
    EMPTY,
    TABLE,
    LocalSubnets,
    PolicyRuleset,
    policy_ruleset,
    render_ruleset,
)
from overlayd.plan.vxlan_filter import filter_spec, render_objects

SPEC = DeviceSpec(
    bridge="ovl0",
    bridge_mac="02:00:00:00:00:aa",
    gateway=IPv4Interface("10.1.1.1/24"),
    vtep="ovl.1",
    vtep_mac="02:00:00:00:00:bb",
    vni=1,
    port=8472,
    local_ip=IPv4Address("192.0.2.11"),
    underlay_ifindex=2,
    mtu=1450,
    underlay="eth0",
)
PEER = Lease(IPv4Network("10.1.2.0/24"), IPv4Address("192.0.2.12"), 1, "02:00:00:00:00:02")


def healthy_facts() -> HostFacts:
    desired = desired_entries([PEER])
    return HostFacts(
        daemon_status={"ready": True, "last_reconcile": {"ok": True, "ago_seconds": 2}},
        daemon_peers=[{"subnet": "10.1.2.0/24", "public_ip": "192.0.2.12"}],
        own_subnet="10.1.1.0/24",
        spec=SPEC,
        desired=desired,
        actual=desired,
        cluster_peers={"10.1.2.0/24": "192.0.2.12"},
        devices={
            "ovl0": DeviceFacts("ovl0", "bridge", 1450, True, None),
            "ovl.1": DeviceFacts("ovl.1", "vxlan", 1450, True, "ovl0"),
        },
        vtep_tx_checksumming=True,
        sysctls={"net.ipv4.ip_forward": "1", "net.ipv4.conf.ovl0.forwarding": "1"},
    )


def failures(facts: HostFacts) -> list[str]:
    return [f"{f.check}: {f.detail}" for f in diagnose(facts) if not f.ok]


def test_a_healthy_host_has_no_failed_check() -> None:
    findings = diagnose(healthy_facts())
    assert all(f.ok for f in findings)
    assert {f.check for f in findings} >= {
        "daemon",
        "lease",
        "device ovl0",
        "device ovl.1",
        "offload",
        "forwarding",
        "firewall",
        "kernel entries",
        "peers",
    }


def test_missing_wrong_and_stale_entries_are_named() -> None:
    facts = healthy_facts()
    stranger = TunnelFdb("02:00:00:00:00:99", IPv4Address("192.0.2.99"))
    facts.actual = EntrySet.of(
        [
            Route(PEER.subnet, IPv4Address("10.1.2.0")),
            Neighbour(IPv4Address("10.1.2.0"), "02:00:00:00:00:77"),  # wrong MAC
            BridgeFdb(PEER.vtep_mac),
            stranger,
        ]
    )
    problems = failures(facts)
    assert "kernel entries: missing FDB entry 02:00:00:00:00:02 -> 192.0.2.12 on ovl.1" in problems
    assert (
        "kernel entries: wrong ARP entry 10.1.2.0 -> 02:00:00:00:00:77 on ovl0: should be ARP"
        " entry 10.1.2.0 -> 02:00:00:00:00:02 on ovl0" in problems
    )
    assert (
        "kernel entries: stale FDB entry 02:00:00:00:00:99 -> 192.0.2.99 on ovl.1: no lease asks"
        " for it" in problems
    )


def test_device_mtu_offload_and_forwarding_problems_are_reported() -> None:
    facts = healthy_facts()
    facts.devices["ovl0"] = DeviceFacts("ovl0", "bridge", 1400, False, None)
    facts.vtep_tx_checksumming = False
    facts.sysctls["net.ipv4.ip_forward"] = "0"
    facts.subnet_file_mtu = 1500
    problems = "\n".join(failures(facts))
    assert "device ovl0: is down; MTU 1400, expected 1450" in problems
    assert "tx checksum offload is off on ovl.1" in problems
    assert "IPv4 forwarding is off" in problems
    assert "FLANNEL_MTU=1500 but the overlay MTU is 1450" in problems


def test_daemon_down_and_peer_mismatch_are_reported() -> None:
    facts = healthy_facts()
    facts.daemon_peers = [{"subnet": "10.1.9.0/24", "public_ip": "192.0.2.19"}]
    problems = "\n".join(failures(facts))
    assert "10.1.2.0/24 (192.0.2.12) is leased in etcd but the daemon has not programmed it" in (
        problems
    )
    assert "the daemon programs 10.1.9.0/24, whose lease etcd no longer has" in problems
    facts.daemon_status, facts.daemon_peers = None, None
    facts.daemon_error = "/run/overlayd/overlayd.sock does not exist: is overlayd running?"
    assert failures(facts)[0].startswith("daemon: /run/overlayd/overlayd.sock does not exist")


def test_the_daemons_count_of_ipv6_peers_is_compared_with_etcds_ipv6_halves() -> None:
    facts = healthy_facts()
    facts.cluster_peers6 = {"fd00:1:2::/64": "2001:db8::12"}
    facts.daemon_status = {**(facts.daemon_status or {}), "ipv6_peers": 1}
    assert failures(facts) == []  # one peer with both halves is one peer, programmed
    facts.daemon_status["ipv6_peers"] = 0
    assert failures(facts) == [
        "peers: etcd has 1 peer(s) with an IPv6 half to program, the daemon programs 0"
    ]


def input_chain(policy: str = "accept") -> dict[str, Any]:
    return {
        "chain": {
            "family": "inet",
            "table": "filter",
            "name": "input",
            "hook": "input",
            "policy": policy,
        }
    }


def rule(expr: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 7, "expr": expr}
    }


def dport(right: Any, protocol: str = "udp") -> dict[str, Any]:
    return {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": protocol, "field": "dport"}},
            "right": right,
        }
    }


def test_a_drop_rule_for_the_vxlan_port_is_found_as_value_set_or_range() -> None:
    for right in (8472, {"set": [53, 8472]}, {"range": [8000, 9000]}):
        assert firewall_blocks([input_chain(), rule([dport(right), {"drop": None}])], 8472)
    assert not firewall_blocks([input_chain(), rule([dport(53), {"drop": None}])], 8472)
    assert not firewall_blocks([input_chain(), rule([dport(8472, "tcp"), {"drop": None}])], 8472)


def test_a_drop_policy_counts_unless_something_accepts_the_port() -> None:
    assert firewall_blocks([input_chain("drop")], 8472)
    assert firewall_blocks([input_chain("drop"), rule([dport(22, "tcp"), {"accept": None}])], 8472)
    assert not firewall_blocks([input_chain("drop"), rule([dport(8472), {"accept": None}])], 8472)


def test_chains_on_other_hooks_are_ignored() -> None:
    forward = input_chain("drop")
    forward["chain"]["hook"] = "forward"
    assert not firewall_blocks([forward], 8472)


def test_an_etcd_certificate_expiring_within_seven_days_fails_and_one_with_a_month_passes() -> None:
    now = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)

    def cert(days: float) -> CertificateExpiry:
        return CertificateExpiry(
            "etcd-certfile", "/etc/overlayd/h1.pem", "CN=h1", now + datetime.timedelta(days=days)
        )

    def verdict(facts: HostFacts) -> Any:
        return next(f for f in diagnose(facts) if f.check == "etcd etcd-certfile")

    soon = verdict(replace(healthy_facts(), etcd_certificates=[cert(6.5)], now=now))
    assert not soon.ok and "in 6.5 days: renew it" in soon.detail
    later = verdict(replace(healthy_facts(), etcd_certificates=[cert(30)], now=now))
    assert later.ok and "in 30 days" in later.detail
    gone = verdict(replace(healthy_facts(), etcd_certificates=[cert(-1)], now=now))
    assert not gone.ok and "expired" in gone.detail
    unreadable = CertificateExpiry("etcd-cafile", "/x.pem", None, None, "/x.pem does not exist")
    missing = next(
        f
        for f in diagnose(replace(healthy_facts(), etcd_certificates=[unreadable]))
        if f.check == "etcd etcd-cafile"
    )
    assert not missing.ok and "does not exist" in missing.detail


def with_filter(facts: HostFacts) -> HostFacts:
    fs = filter_spec(SPEC)
    assert fs is not None
    facts.vxlan_filter = True
    facts.filters = [
        FilterFacts(
            fs,
            listing=render_objects(fs),
            sources=frozenset({PEER.public_ip}),
            wanted={str(PEER.public_ip): str(PEER.subnet)},
        )
    ]
    return facts


def test_the_vxlan_filter_passes_when_rules_and_set_match_the_peers() -> None:
    findings = [f for f in diagnose(with_filter(healthy_facts())) if f.check == "vxlan filter"]
    assert [f.ok for f in findings] == [True]
    assert "holds the 1 tunnelled peer(s)" in findings[0].detail


def test_a_missing_or_altered_rule_and_a_wrong_set_are_named() -> None:
    facts = with_filter(healthy_facts())
    facts.filters[0].listing = ""
    assert failures(facts) == [
        f"vxlan filter: {what} is missing from table ip overlayd: VXLAN is not filtered"
        for what in ("counter vxlan_dropped", "set vxlan_peers", "chain vxlan_in")
    ]
    facts = with_filter(healthy_facts())
    listing = facts.filters[0].listing
    assert listing is not None
    facts.filters[0].listing = listing.replace("0x1 ", "0x2 ")
    assert [x.split(":")[1].strip() for x in failures(facts)] == [
        "chain vxlan_in in table ip overlayd is not what overlayd writes for 192.0.2.11, port 8472,"
        " VNI 1"
    ]
    facts = with_filter(healthy_facts())
    facts.filters[0].sources = frozenset({IPv4Address("192.0.2.99")})
    assert failures(facts) == [
        "vxlan filter: 192.0.2.12 (peer 10.1.2.0/24) is not in set vxlan_peers of table ip"
        " overlayd: its VXLAN is dropped",
        "vxlan filter: 192.0.2.99 is in set vxlan_peers of table ip overlayd but is no tunnelled"
        " peer: it may send VXLAN",
    ]


SPEC6 = replace(
    SPEC,
    gateway6=IPv6Interface("fd00:10:244:1::1/64"),
    vtep6="ovl-v6.1",
    vtep6_mac="02:00:00:00:06:bb",
    local_ip6=IPv6Address("2001:db8::11"),
)


def test_the_ipv6_filter_is_compared_like_the_ipv4_one() -> None:
    facts = with_filter(healthy_facts())
    facts.spec = SPEC6
    fs6 = filter_spec(SPEC6, IPV6)
    assert fs6 is not None and fs6.local_ip == IPv6Address("2001:db8::11")
    six = FilterFacts(
        fs6,
        listing=render_objects(fs6),
        sources=frozenset({IPv6Address("2001:db8::12")}),
        wanted={"2001:db8::12": "fd00:10:244:2::/64"},
    )
    facts.filters.append(six)
    findings = [f for f in diagnose(facts) if f.check == "vxlan filter"]
    assert [(f.ok, "table ip6 overlayd" in f.detail) for f in findings] == [
        (True, False),
        (True, True),
    ]
    # The IPv6 rule altered by hand and a peer's IPv6 address missing from the set.
    listing = six.listing
    assert listing is not None
    six.listing = listing.replace("ip6 daddr 2001:db8::11", "ip6 daddr 2001:db8::99")
    six.sources = frozenset()
    found = failures(facts)
    assert len(found) == 2
    assert found[0].startswith(
        "vxlan filter: chain vxlan_in in table ip6 overlayd is not what overlayd writes for"
        " 2001:db8::11, port 8472, VNI 1: "
    )
    assert found[1] == (
        "vxlan filter: 2001:db8::12 (peer fd00:10:244:2::/64) is not in set vxlan_peers of"
        " table ip6 overlayd: its VXLAN is dropped"
    )
    # A v4-only host has no IPv6 filter to look at.
    assert filter_spec(SPEC, IPV6) is None


def test_an_ip6_input_chain_that_drops_vxlan_is_found_only_with_an_ipv6_vtep() -> None:
    dport = {"payload": {"protocol": "udp", "field": "dport"}}
    expr = [{"match": {"op": "==", "left": dport, "right": 8472}}, {"drop": None}]
    ruleset: list[dict[str, Any]] = [
        {"chain": {"family": "ip6", "table": "fw", "name": "in", "hook": "input"}},
        {"rule": {"family": "ip6", "table": "fw", "chain": "in", "handle": 3, "expr": expr}},
    ]
    v4_only = [f for f in diagnose(replace(healthy_facts(), ruleset=ruleset)) if not f.ok]
    assert v4_only == []
    dual = [f.detail for f in diagnose(replace(healthy_facts(), spec=SPEC6, ruleset=ruleset))]
    assert (
        "VXLAN port may be blocked: ip6 fw chain in: a rule drops UDP port 8472 (handle 3)" in dual
    )


def test_a_filter_turned_off_passes_but_says_so() -> None:
    facts = with_filter(healthy_facts())
    facts.vxlan_filter = False
    facts.filters[0].listing = ""
    findings = [f for f in diagnose(facts) if f.check == "vxlan filter"]
    assert [f.ok for f in findings] == [True]
    assert findings[0].detail.startswith("off (vxlan-filter=off)")


# --- network policy ------------------------------------------------------------------


def _port_json(text: str) -> Any:
    """A port set element as nft -j lists it: 80, {"range": [..]}, {"concat": [..]}."""
    if " . " in text:
        return {"concat": [_port_json(part) for part in text.split(" . ")]}
    if "-" in text:
        first, last = text.split("-")
        return {"range": [int(first), int(last)]}
    return int(text) if text.isdigit() else text


def _policy_listing(
    ruleset: PolicyRuleset, drop: int = 0, ports: dict[str, list[str]] | None = None
) -> str:
    """The JSON nft would list for `ruleset`'s sets, less `drop` elements;
    `ports`: port sets listed with these elements instead."""
    sets = []
    for name, s in ruleset.sets.items():
        elements = sorted(map(str, s.elements))
        sets.append(
            {
                "set": {
                    "family": "inet",
                    "table": TABLE,
                    "name": name,
                    "type": s.type,
                    "elem": elements[drop:],
                }
            }
        )
    for name, p in ruleset.port_sets.items():
        texts = (ports or {}).get(name, list(p.elements))
        kind = p.type if p.type == "inet_service" else ["inet_proto", "inet_service"]
        elem = [_port_json(t) for t in texts]
        sets.append(
            {
                "set": {
                    "family": "inet",
                    "table": TABLE,
                    "name": name,
                    "type": kind,
                    "flags": ["interval"],
                    "elem": elem,
                }
            }
        )
    return json.dumps({"nftables": sets})


def test_diagnose_finds_a_policy_table_that_differs_from_etcds_policies() -> None:
    from ipaddress import IPv4Network, ip_address

    web = Endpoint("/o/endpoints/10.244.1.0-24/c1", "c1", "10.244.1.0-24", "web",
                   (ip_address("10.244.1.5"),), {"app": "web"})  # fmt: skip
    policy = parse_policy(
        {"name": "deny", "selector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}
    )
    ruleset = policy_ruleset([policy], [web], LocalSubnets(IPv4Network("10.244.1.0/24")))
    terse = render_ruleset(ruleset, elements=False)
    good = PolicyFacts(ruleset, _policy_listing(ruleset), terse)
    [finding] = _policy_findings(good)
    assert finding.ok and "sets" in finding.detail  # the positive control
    [finding] = _policy_findings(PolicyFacts(ruleset, _policy_listing(ruleset, drop=1), terse))
    assert not finding.ok and "1 element(s) missing" in finding.detail
    [finding] = _policy_findings(PolicyFacts(ruleset, None))
    assert not finding.ok and "missing" in finding.detail
    edited = terse.replace("drop", "accept")
    [finding] = _policy_findings(PolicyFacts(ruleset, _policy_listing(ruleset), edited))
    assert not finding.ok and "differ" in finding.detail
    [finding] = _policy_findings(PolicyFacts(EMPTY, None))
    assert finding.ok and "no policies" in finding.detail
    skipped = _policy_findings(PolicyFacts(EMPTY, None, skipped={"/o/policies/x": "bad"}))
    assert [f.ok for f in skipped] == [False, True]


def test_diagnose_takes_a_port_sets_elements_in_the_kernels_order_as_the_same_set() -> None:
    from ipaddress import IPv4Network, ip_address

    web = Endpoint("/o/endpoints/10.244.1.0-24/c1", "c1", "10.244.1.0-24", "web",
                   (ip_address("10.244.1.5"),), {"app": "web"})  # fmt: skip
    policy = parse_policy(
        {
            "name": "cache",
            "selector": {"matchLabels": {"app": "web"}},
            "ingress": [{"ports": [{"port": 6379}, {"protocol": "UDP", "port": 53}]}],
        }
    )
    ruleset = policy_ruleset([policy], [web], LocalSubnets(IPv4Network("10.244.1.0/24")))
    terse = render_ruleset(ruleset, elements=False)
    [(name, ports)] = ruleset.port_sets.items()
    assert ports.elements == ("tcp . 6379", "udp . 53") and f"dport @{name} " in terse
    # nftables 1.0.6 lists such a set's elements in an order of its own
    # (udp . 53 first): the same set.
    listed = _policy_listing(ruleset, ports={name: ["udp . 53", "tcp . 6379"]})
    [finding] = _policy_findings(PolicyFacts(ruleset, listed, terse))
    assert finding.ok, finding.detail
    # Another element is another set, in any order.
    other = _policy_listing(ruleset, ports={name: ["udp . 54", "tcp . 6379"]})
    [finding] = _policy_findings(PolicyFacts(ruleset, other, terse))
    assert not finding.ok and f"port set {name} differs" in finding.detail
    [finding] = _policy_findings(PolicyFacts(ruleset, _policy_listing(EMPTY), terse))
    assert not finding.ok and f"port set {name} missing" in finding.detail
