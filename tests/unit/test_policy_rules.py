"""Network policy rendered as nftables objects, from data alone: the
Kubernetes recipes as golden files (dual-stack, and egress in gwbridge
mode), transactions whose size does not grow with the endpoints,
transactions that nft accepts in order (checked against a small model of
nft's own rules about references), IPv6 link-local traffic judged by MAC,
odd names and a 10,000-port policy, and the JSON listing read back."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import replace
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
)
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlayd.model import IPAddress
from overlayd.plan.policy_model import (
    Direction,
    Endpoint,
    IpBlock,
    LabelSelector,
    MacAddress,
    Operator,
    Policy,
    PortRange,
    Protocol,
    Requirement,
    Rule,
    SelectorPeer,
)
from overlayd.plan.policy_rules import (
    BASE,
    EMPTY,
    TABLE,
    WHERE,
    Count,
    CounterOwner,
    LocalSubnets,
    PolicyRuleset,
    counter_name,
    element_repairs,
    listed_counters,
    listed_counts,
    listed_elements,
    listed_ports,
    policy_counter_names,
    policy_ruleset,
    policy_transaction,
    render_ruleset,
    script,
    terse_listing,
    with_endpoints,
)

GOLDEN = Path(__file__).parent / "golden"
LOCAL = LocalSubnets(IPv4Network("10.244.1.0/24"), IPv6Network("fd00:10:244:1::/64"))
LOCAL4 = LocalSubnets(IPv4Network("10.244.1.0/24"))
GWBRIDGE = (IPv4Network("172.18.0.0/16"), IPv6Network("fd4a:4eae:8d08::/64"))
LOCAL_GW = LocalSubnets(LOCAL.subnet, LOCAL.subnet6, GWBRIDGE)
INGRESS, EGRESS = Direction.INGRESS, Direction.EGRESS
TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP


def sel(**labels: str) -> LabelSelector:
    return LabelSelector(tuple(sorted(labels.items())))


def endpoint(name: str, host: int, index: int, v6: bool = True, **labels: str) -> Endpoint:
    """An endpoint; one of host 1 (ours) has a MAC too, as this host reads
    its own endpoints' registrations (other hosts' MACs are never used)."""
    addresses: tuple[IPAddress, ...] = (IPv4Address(f"10.244.{host}.{index}"),)
    if v6:
        addresses += (IPv6Address(f"fd00:10:244:{host:x}::{index:x}"),)
    return Endpoint(
        key=f"/overlayd/endpoints/10.244.{host}.0-24/{name}",
        id=name,
        host=f"10.244.{host}.0-24",
        name=name,
        addresses=addresses,
        labels=labels,
        macs=(MacAddress(0x0A580AF40100 + index),) if host == 1 else (),
    )


def with_gwbridge(e: Endpoint) -> Endpoint:
    """The endpoint with gwbridge addresses, as a host in gwbridge mode reads its own."""
    if not e.macs:
        return e
    index = int(e.addresses[0]) & 0xFF
    return replace(
        e,
        gwbridge_addresses=(
            IPv4Address(f"172.18.0.{index}"),
            IPv6Address(f"fd4a:4eae:8d08::{index:x}"),
        ),
    )


ENDPOINTS = (
    endpoint("db", 1, 2, app="db"),
    endpoint("web", 1, 3, app="web", role="frontend"),
    endpoint("api", 1, 4, app="api"),
    endpoint("remote-web", 2, 2, app="web", role="frontend"),
    endpoint("remote-batch", 2, 3, v6=False, app="batch"),
)

RECIPES = {
    "deny_all_ingress": Policy("deny-all-ingress", LabelSelector(), frozenset({INGRESS})),
    "allow_from_label": Policy(
        "db-from-frontend",
        sel(app="db"),
        frozenset({INGRESS}),
        ingress=(Rule(peers=(SelectorPeer(sel(role="frontend")),)),),
    ),
    "port_range": Policy(
        "api-ports",
        sel(app="api"),
        frozenset({INGRESS}),
        ingress=(Rule(ports=(PortRange(TCP, 8000, 8080), PortRange(UDP, 8000, 8080))),),
    ),
    "egress_ipblock": Policy(
        "web-egress",
        sel(app="web"),
        frozenset({EGRESS}),
        egress=(
            Rule(
                peers=(
                    IpBlock(IPv4Network("10.0.0.0/8"), (IPv4Network("10.244.1.0/24"),)),
                    IpBlock(IPv6Network("2001:db8::/32")),
                )
            ),
        ),
    ),
    "default_allow_unselected": Policy("db-isolated", sel(app="db"), frozenset({INGRESS, EGRESS})),
}


def rules_of(ruleset: PolicyRuleset) -> list[str]:
    return [rule for chain in ruleset.chains.values() for rule in chain.rules]


# --- the recipes --------------------------------------------------------------


def matches_golden(rendered: str, name: str) -> bool:
    golden = GOLDEN / f"{name}.nft"
    if os.environ.get("OVERLAYD_WRITE_GOLDEN") == "1":  # after a deliberate change
        golden.write_text(rendered)
    return rendered == golden.read_text()


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_matches_its_golden_file(recipe: str) -> None:
    rendered = render_ruleset(policy_ruleset([RECIPES[recipe]], ENDPOINTS, LOCAL))
    assert matches_golden(rendered, f"policy_{recipe}")


def test_egress_to_an_ip_block_in_gwbridge_mode_matches_its_golden_file() -> None:
    endpoints = [with_gwbridge(e) for e in ENDPOINTS]
    rendered = render_ruleset(policy_ruleset([RECIPES["egress_ipblock"]], endpoints, LOCAL_GW))
    assert matches_golden(rendered, "policy_egress_ipblock_gwbridge")


# --- gwbridge egress mode -----------------------------------------------------


def test_in_gwbridge_mode_a_containers_gwbridge_addresses_are_judged_as_its_own() -> None:
    endpoints = [with_gwbridge(e) for e in ENDPOINTS]
    policy = RECIPES["egress_ipblock"]  # web: out to 10.0.0.0/8 and 2001:db8::/32 only
    ruleset = policy_ruleset([policy], endpoints, LOCAL_GW)
    web = {
        str(a) for n, st in ruleset.sets.items() if n.startswith("s_app_web_") for a in st.elements
    }
    # The local web's gwbridge addresses select it like its overlay ones;
    # the remote web's (10.244.2.2) overlay address only.
    assert {"172.18.0.3", "fd4a:4eae:8d08::3", "10.244.1.3", "10.244.2.2"} <= web
    assert not any(a.startswith(("172.18.0.2", "fd4a:4eae:8d08::2")) for a in web)  # db
    # Packets from the gwbridge's subnets are judged; the rest of the world
    # is another host's business (the positive control: the same rule
    # without the gwbridge names the overlay subnet alone).
    egress = ruleset.chains["egress"].rules
    assert "ip saddr != { 10.244.1.0/24, 172.18.0.0/16 } return" in egress
    assert "ip6 saddr != { fd00:10:244:1::/64, fd4a:4eae:8d08::/64 } return" in egress
    plain = policy_ruleset([policy], ENDPOINTS, LOCAL).chains["egress"].rules
    assert "ip saddr != 10.244.1.0/24 return" in plain
    # Published ports DNATed to a gwbridge address meet ingress policy too.
    deny = policy_ruleset([RECIPES["deny_all_ingress"]], endpoints, LOCAL_GW)
    assert "ip daddr != { 10.244.1.0/24, 172.18.0.0/16 } accept" in deny.chains["ingress"].rules


def test_a_gwbridge_address_costs_no_statement_of_its_own() -> None:
    """An endpoint's overlay and gwbridge addresses of one family go into a
    set in one statement: a container starting in gwbridge mode writes as
    many statements as in masquerade mode."""
    plain = policy_ruleset(FLAT_POLICIES, cluster(10), LOCAL)
    gw = policy_ruleset(FLAT_POLICIES, [with_gwbridge(e) for e in cluster(10)], LOCAL_GW)
    add_plain = policy_transaction(plain, with_endpoints(plain, [], [NEWCOMER]))
    add_gw = policy_transaction(gw, with_endpoints(gw, [], [with_gwbridge(NEWCOMER)]))
    assert len(add_gw) == len(add_plain) == 5
    assert any("10.244.1.253, 172.18.0.253" in statement for statement in add_gw)


def test_local_networks_are_in_address_order_and_make_a_family_judged() -> None:
    assert LOCAL_GW.networks(4) == (IPv4Network("10.244.1.0/24"), IPv4Network("172.18.0.0/16"))
    low = LocalSubnets(IPv4Network("10.244.1.0/24"), gwbridge=(IPv4Network("10.0.0.0/16"),))
    assert low.networks(4) == (IPv4Network("10.0.0.0/16"), IPv4Network("10.244.1.0/24"))
    # A gwbridge with IPv6 on a host whose lease has none: IPv6 from it is judged.
    only_gw6 = LocalSubnets(IPv4Network("10.244.1.0/24"), gwbridge=(GWBRIDGE[1],))
    assert only_gw6.versions == (4, 6) and LOCAL4.versions == (4,)


# --- IPv6 link-local ------------------------------------------------------------


def test_link_local_packets_are_judged_by_the_local_endpoints_mac() -> None:
    ruleset = policy_ruleset([RECIPES["default_allow_unselected"]], ENDPOINTS, LOCAL)
    egress, ingress = ruleset.chains["egress"].rules, ruleset.chains["ingress"].rules
    # Before the subnet checks, which would let an fe80:: address through
    # (it is in no subnet); after neighbour discovery, which always passes
    # (in the base chain, before either direction).
    base = ruleset.chains[BASE].rules
    assert base.index("icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept") < (
        base.index("jump egress")
    )
    jump = egress.index("ip6 saddr fe80::/10 jump egress_link_local")
    assert jump == 0 and jump < egress.index("ip saddr != 10.244.1.0/24 return")
    assert ingress.index("ip6 daddr fe80::/10 jump ingress_link_local") < ingress.index(
        "ip daddr != 10.244.1.0/24 accept"
    )
    (mac_set,) = [n for n in ruleset.sets if n.endswith("_mac")]
    assert ruleset.sets[mac_set].type == "ether_addr"
    assert ruleset.sets[mac_set].elements == {MacAddress.parse("0a:58:0a:f4:01:02")}  # db's
    chain = ruleset.chains["egress_link_local"].rules
    assert chain[0].startswith("icmpv6 type { mld-listener-query, ")  # the link's own messages
    assert chain[0].endswith(" return")  # on to ingress; ingress's accept (the last judge)
    assert ruleset.chains["ingress_link_local"].rules[1].endswith(" accept")
    egress_deny = counter_name("db-isolated", EGRESS, "deny")
    assert chain[1:] == (f'ether saddr @{mac_set} counter name "{egress_deny}" drop',)
    # Ingress first drops a unicast link-local destination in a group frame.
    assert ruleset.chains["ingress_link_local"].rules[0] == (
        "ether daddr & 01:00:00:00:00:00 == 01:00:00:00:00:00 drop"
    )
    ingress_deny = counter_name("db-isolated", INGRESS, "deny")
    assert ruleset.chains["ingress_link_local"].rules[-1] == (
        f'ether daddr @{mac_set} counter name "{ingress_deny}" drop'
    )


def test_a_link_local_packet_meets_the_same_policy_chain_as_any_other() -> None:
    ruleset = policy_ruleset([RECIPES["allow_from_label"]], ENDPOINTS, LOCAL)
    chain = next(n for n in ruleset.chains if n.startswith("p_db_from_frontend_"))
    (mac_set,) = [n for n in ruleset.sets if n.endswith("_mac")]
    assert f"ether daddr @{mac_set} jump {chain}" in ruleset.chains["ingress_link_local"].rules
    # Only the policy selector has a MAC set; a peer selector needs none.
    assert mac_set.startswith("s_app_db_")


def test_a_host_without_ipv6_still_judges_link_local_traffic() -> None:
    ruleset = policy_ruleset([RECIPES["deny_all_ingress"]], ENDPOINTS, LOCAL4)
    rules = ruleset.chains["ingress"].rules
    assert rules.index("ip6 daddr fe80::/10 jump ingress_link_local") < rules.index(
        "meta nfproto ipv6 accept"
    )
    assert {s.type for s in ruleset.sets.values()} == {"ipv4_addr", "ether_addr"}


def test_an_unselected_endpoint_is_in_no_set_that_selects_endpoints_to_judge() -> None:
    ruleset = policy_ruleset([RECIPES["default_allow_unselected"]], ENDPOINTS, LOCAL)
    judged = {name: s.elements for name, s in ruleset.sets.items() if name.startswith("s_app_db_")}
    assert judged and all(judged.values())  # positive control: db is in them
    web = {a for e in ENDPOINTS if e.name == "web" for a in e.addresses}
    assert not any(web & elements for elements in judged.values())
    # Nothing but the sets says who is judged: every deny and dispatch rule names one.
    for name in ("ingress_deny", "egress_deny"):
        assert all("@s_app_db_" in rule for rule in ruleset.chains[name].rules)


def test_deny_all_ingress_has_a_deny_and_no_allow_chain() -> None:
    ruleset = policy_ruleset([RECIPES["deny_all_ingress"]], ENDPOINTS, LOCAL)
    # No egress chain at all.
    assert list(ruleset.chains) == ["ingress_deny", "ingress_link_local", "ingress", BASE]
    assert "jump egress" not in ruleset.chains[BASE].rules
    assert "jump ingress_policies" not in ruleset.chains["ingress"].rules
    assert set(ruleset.counters.values()) == {CounterOwner("deny-all-ingress", INGRESS, "deny")}
    everyone = {a for e in ENDPOINTS for a in (*e.addresses, *e.macs)}
    assert frozenset().union(*(s.elements for s in ruleset.sets.values())) == everyone


def test_a_host_without_ipv6_judges_only_link_local_ipv6_and_has_no_ipv6_sets() -> None:
    ruleset = policy_ruleset(list(RECIPES.values()), ENDPOINTS, LOCAL4)
    assert all(s.type != "ipv6_addr" for s in ruleset.sets.values())
    assert ruleset.chains[BASE].rules[:2] == (
        "ct state established,related accept",
        "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept",
    )
    for direction, field, passed in (("ingress", "daddr", "accept"), ("egress", "saddr", "return")):
        rules = ruleset.chains[direction].rules
        assert rules[:2] == (
            f"ip6 {field} fe80::/10 jump {direction}_link_local",
            f"meta nfproto ipv6 {passed}",
        )
    assert not any(
        rule.startswith("ip6 ") and "fe80::/10" not in rule for rule in rules_of(ruleset)
    )
    # Positive control: the dual-stack host has them.
    dual = policy_ruleset(list(RECIPES.values()), ENDPOINTS, LOCAL)
    assert any(rule.startswith("ip6 saddr @") for rule in rules_of(dual))


def test_no_policy_means_no_table() -> None:
    assert policy_ruleset([], ENDPOINTS, LOCAL) == EMPTY
    # A policy that isolates no direction does nothing either.
    inert = Policy("inert", LabelSelector(), frozenset())
    assert policy_ruleset([inert], ENDPOINTS, LOCAL) == EMPTY
    assert render_ruleset(EMPTY) == ""
    full = policy_ruleset([RECIPES["deny_all_ingress"]], ENDPOINTS, LOCAL)
    assert policy_transaction(full, EMPTY) == [f"delete table {WHERE}"]
    assert policy_transaction(None, EMPTY) == [f"table {WHERE}", f"delete table {WHERE}"]
    assert policy_transaction(EMPTY, EMPTY) == []
    # From nothing, the whole table, made so that it works whether or not it exists.
    assert policy_transaction(EMPTY, full)[:3] == [
        f"table {WHERE}",
        f"delete table {WHERE}",
        f"add table {WHERE}",
    ]


def test_the_ruleset_does_not_depend_on_the_order_of_its_inputs() -> None:
    policies, endpoints = list(RECIPES.values()), list(ENDPOINTS)
    first = policy_ruleset(policies, endpoints, LOCAL)
    rng = random.Random(7)
    for _ in range(5):
        rng.shuffle(policies)
        rng.shuffle(endpoints)
        again = policy_ruleset(policies, endpoints, LOCAL)
        assert again == first and render_ruleset(again) == render_ruleset(first)


def test_policies_are_tried_in_name_order_and_the_first_selecting_one_counts_the_drop() -> None:
    a = Policy("a", sel(app="db"), frozenset({INGRESS}), ingress=(Rule(),))
    b = Policy("b", LabelSelector(), frozenset({INGRESS}))
    ruleset = policy_ruleset([b, a], ENDPOINTS, LOCAL)
    deny = ruleset.chains["ingress_deny"].rules
    assert [r.split('"')[1] for r in deny] == [
        "p_a_ca978112ca_ingress_deny",
        "p_a_ca978112ca_ingress_deny",
        "p_b_3e23e81600_ingress_deny",
        "p_b_3e23e81600_ingress_deny",
    ]
    # Rule() allows everything: no peer match, no port match.
    assert ruleset.chains["p_a_ca978112ca_ingress"].rules == (
        'counter name "p_a_ca978112ca_ingress_allow" accept',
    )


# --- rule details -------------------------------------------------------------


def chain_rules(policy: Policy, local: LocalSubnets = LOCAL) -> tuple[str, ...]:
    ruleset = policy_ruleset([policy], ENDPOINTS, local)
    chains = [c for name, c in ruleset.chains.items() if name.startswith("p_")]
    return chains[0].rules if chains else ()


def policy_with_ports(*ports: PortRange) -> Policy:
    return Policy("p", LabelSelector(), frozenset({INGRESS}), ingress=(Rule(ports=ports),))


def ports_match(*ports: PortRange) -> str:
    """The rule's port match, a port set written out as its elements."""
    ruleset = policy_ruleset([policy_with_ports(*ports)], ENDPOINTS, LOCAL)
    rule = ruleset.chains["p_p_148de9c5a7_ingress"].rules[0]
    match = rule.removesuffix(' counter name "p_p_148de9c5a7_ingress_allow" accept')
    for name, s in ruleset.port_sets.items():
        match = match.replace(f"@{name}", f"{{ {', '.join(s.elements)} }}")
    return match


def test_ports_take_the_simplest_form_that_says_them() -> None:
    assert ports_match(PortRange(TCP, 80, 80)) == "tcp dport 80"
    assert ports_match(PortRange(UDP, 8000, 8080)) == "udp dport 8000-8080"
    assert ports_match(PortRange(SCTP)) == "meta l4proto sctp"
    assert ports_match(PortRange(TCP, 443, 443), PortRange(TCP, 80, 80)) == "tcp dport { 80, 443 }"
    assert ports_match(PortRange(TCP), PortRange(UDP)) == "meta l4proto { tcp, udp }"
    assert ports_match(PortRange(UDP, 53, 53), PortRange(TCP, 80, 80), PortRange(SCTP)) == (
        "meta l4proto . th dport { tcp . 80, udp . 53, sctp . 0-65535 }"
    )


def test_overlapping_and_adjacent_port_ranges_are_merged() -> None:
    # nft refuses overlapping intervals in one set.
    assert ports_match(
        PortRange(TCP, 8000, 8080), PortRange(TCP, 8050, 8100), PortRange(TCP, 8101, 8101)
    ) == ("tcp dport 8000-8101")
    assert ports_match(PortRange(TCP, 80, 80), PortRange(TCP)) == "meta l4proto tcp"


def test_an_empty_ports_or_peers_list_matches_nothing_but_none_matches_everything() -> None:
    nothing = Policy("p", sel(app="db"), frozenset({INGRESS}), ingress=(Rule(ports=()),))
    assert chain_rules(nothing) == ()
    nobody = Policy("p", sel(app="db"), frozenset({INGRESS}), ingress=(Rule(peers=()),))
    assert chain_rules(nobody) == ()
    # Positive control: None is "every port" and "anywhere".
    assert chain_rules(replace(nothing, ingress=(Rule(),))) != ()


def block_rules(*blocks: IpBlock) -> tuple[str, ...]:
    policy = Policy("p", sel(app="web"), frozenset({EGRESS}), egress=(Rule(peers=blocks),))
    return tuple(r.split(" counter ")[0] for r in chain_rules(policy))


def test_ip_blocks_with_their_excepts() -> None:
    net = IPv4Network
    assert block_rules(IpBlock(net("0.0.0.0/0"))) == ("meta nfproto ipv4",)
    assert block_rules(IpBlock(IPv6Network("::/0"))) == ("meta nfproto ipv6",)
    assert block_rules(
        IpBlock(net("0.0.0.0/0"), (net("10.0.0.0/8"), net("10.1.0.0/16"), net("192.168.0.0/16")))
    ) == ("ip daddr != { 10.0.0.0/8, 192.168.0.0/16 }",)
    assert block_rules(IpBlock(net("10.0.0.0/8"), (net("10.0.0.0/9"), net("10.128.0.0/9")))) == (
        "ip daddr 10.0.0.0/8 ip daddr != 10.0.0.0/8",  # collapsed; matches nothing, harmlessly
    )
    # An except holding the whole block: no rule at all.
    assert block_rules(IpBlock(net("10.1.0.0/16"), (net("10.0.0.0/8"),))) == ()
    # An IPv6 block on a host without IPv6: nothing to allow.
    policy = Policy(
        "p",
        sel(app="web"),
        frozenset({EGRESS}),
        egress=(Rule(peers=(IpBlock(IPv6Network("2001:db8::/32")),)),),
    )
    assert chain_rules(policy, LOCAL4) == ()
    assert chain_rules(policy) != ()


def test_selector_peers_share_one_set_per_distinct_selector_and_family() -> None:
    expressions = LabelSelector(
        match_expressions=(Requirement("role", Operator.IN, frozenset({"frontend"})),)
    )
    one = Policy(
        "one",
        sel(app="db"),
        frozenset({INGRESS}),
        ingress=(Rule(peers=(SelectorPeer(sel(role="frontend")),)),),
    )
    two = Policy(
        "two",
        sel(role="frontend"),  # its selector is one's peer selector: the same set
        frozenset({INGRESS}),
        ingress=(Rule(peers=(SelectorPeer(expressions),)),),
    )
    ruleset = policy_ruleset([one, two], ENDPOINTS, LOCAL)
    names = sorted(ruleset.sets)
    # {app=db}, {role=frontend}, role In (frontend); two families each, and
    # the two policy selectors' MACs.
    assert len(names) == 8
    frontend = [n for n in names if n.startswith("s_role_frontend_") and not n.endswith("_mac")]
    assert len(frontend) == 2
    assert {str(a) for n in frontend for a in ruleset.sets[n].elements} == {
        "10.244.1.3",
        "fd00:10:244:1::3",
        "10.244.2.2",
        "fd00:10:244:2::2",
    }
    # The In expression selects the same endpoints, in sets of its own.
    others = [n for n in names if n.startswith("s_role_In_frontend_")]
    assert [ruleset.sets[n].elements for n in others] == [
        ruleset.sets[n].elements for n in frontend
    ]


def test_selectors_with_expressions_select_as_the_model_says() -> None:
    exprs = [
        Requirement("app", Operator.NOT_IN, frozenset({"db", "web"})),
        Requirement("role", Operator.DOES_NOT_EXIST),
        Requirement("role", Operator.EXISTS),
        Requirement("app", Operator.IN, frozenset({"db", "batch"})),
    ]
    for requirement in exprs:
        selector = LabelSelector(match_expressions=(requirement,))
        policy = Policy("p", selector, frozenset({INGRESS}))
        ruleset = policy_ruleset([policy], ENDPOINTS, LOCAL)
        got = frozenset().union(*(s.elements for s in ruleset.sets.values()))
        want = {a for e in ENDPOINTS if selector.matches(e.labels) for a in (*e.addresses, *e.macs)}
        assert got == want and want  # every expression here selects somebody


# --- names ---------------------------------------------------------------------

ODD_NAMES = [
    "a b",
    'quote"d',
    "back\\slash",
    "ünïcödé",
    "x" * 300,
    "a.b",
    "a_b",
    "",
    "--",
    "\ud800",  # a lone surrogate, as JSON can carry
    "table",
    "jump",
    "line\nbreak",
    "семь",
]
IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


def test_odd_policy_names_and_labels_give_valid_distinct_bounded_names() -> None:
    odd_labels = {"odd key/ü": 'va"l ue', "k": "\\"}
    endpoints = [*ENDPOINTS, replace(endpoint("odd", 1, 9), labels=odd_labels)]
    policies = [
        Policy(
            name,
            sel(**odd_labels) if i % 2 else LabelSelector(),
            frozenset({INGRESS, EGRESS}),
            ingress=(Rule(peers=(SelectorPeer(sel(**odd_labels)),)),),
            egress=(Rule(ports=(PortRange(TCP, 53, 53),)),),
        )
        for i, name in enumerate(ODD_NAMES)
    ]
    ruleset = policy_ruleset(policies, endpoints, LOCAL)
    names = [*ruleset.sets, *ruleset.chains, *ruleset.counters]
    assert all(IDENTIFIER.match(name) for name in names), names
    assert len(set(names)) == len(names)
    # Every policy has its own four counters, found again by name.
    owners = policy_counter_names(ruleset)
    assert {o.policy for o in owners.values()} == set(ODD_NAMES)
    assert len(owners) == 4 * len(ODD_NAMES)
    # Comments keep the real name readable and cannot break out of their quotes.
    comments = [s.comment for s in ruleset.sets.values()]
    comments += [c.comment for c in ruleset.chains.values() if c.comment]
    assert all(
        '"' not in c and "\\" not in c and c.isprintable() and len(c) <= 128 for c in comments
    )
    assert any(c.startswith("policy a b ") for c in comments)
    assert any(c.startswith("policy quote?d ") for c in comments)
    # The text is one statement per line: no name or comment adds a line.
    for statement in policy_transaction(None, ruleset):
        assert "\n" not in statement


def test_two_policies_of_one_name_are_refused() -> None:
    policy = RECIPES["deny_all_ingress"]
    with pytest.raises(ValueError, match="same nft name"):
        policy_ruleset([policy, replace(policy, selector=sel(app="db"))], ENDPOINTS, LOCAL)


# --- transactions ------------------------------------------------------------


class Kernel:
    """What nft keeps of our table, and the checks that make it refuse a
    transaction: a rule may only name sets, chains and counters that exist,
    and a set, chain or counter a rule names cannot be deleted (EBUSY)."""

    def __init__(self) -> None:
        self.exists = False
        self.counters: set[str] = set()
        self.sets: dict[str, set[str]] = {}
        self.chains: dict[str, list[str]] = {}

    def references(self) -> tuple[set[str], set[str], set[str]]:
        rules = [r for rules in self.chains.values() for r in rules]
        sets = {m for r in rules for m in re.findall(r"@(\S+)", r)}
        chains = {m for r in rules for m in re.findall(r"(?:jump|goto) (\S+)", r)}
        counters = {m for r in rules for m in re.findall(r'counter name "([^"]+)"', r)}
        return sets, chains, counters

    def run(self, statements: Sequence[str]) -> None:
        for statement in statements:
            self.one(statement)

    def one(self, statement: str) -> None:
        if statement in (f"table {WHERE}", f"add table {WHERE}"):
            self.exists = True
            return
        if statement == f"delete table {WHERE}":
            assert self.exists, "ENOENT: no table"
            self.__init__()  # type: ignore[misc]
            return
        parsed = re.match(rf"(\S+) (\S+) {WHERE} (\S+) ?(.*)", statement)
        assert parsed is not None, f"not ours: {statement}"
        verb, kind, name, tail = parsed.groups()
        assert self.exists, f"no table for {statement}"
        used_sets, used_chains, used_counters = self.references()
        elements = set(re.findall(r"[0-9a-f:.]+", tail.strip("{} "))) if tail else set()
        match verb, kind:
            case "add", "counter":
                self.counters.add(name)
            case "delete", "counter":
                assert name in self.counters and name not in used_counters, statement
                self.counters.remove(name)
            case "add", "set":
                inline = re.search(r"elements = \{ (.*) \}; \}$", tail)  # a port set's
                self.sets.setdefault(name, set(inline[1].split(", ")) if inline else set())
            case "delete", "set":
                assert name in self.sets and name not in used_sets, statement
                del self.sets[name]
            case "add", "element":
                self.sets[name] |= elements
            case "delete", "element":
                assert elements <= self.sets[name], f"ENOENT: {statement}"
                self.sets[name] -= elements
            case "add", "chain":
                self.chains.setdefault(name, [])
            case "flush", "chain":
                self.chains[name] = []
            case "delete", "chain":
                assert name in self.chains and name not in used_chains, statement
                del self.chains[name]
            case "add", "rule":
                assert name in self.chains, statement
                for s in re.findall(r"@(\S+)", tail):
                    assert s in self.sets, f"no set {s}: {statement}"
                for c in re.findall(r"(?:jump|goto) (\S+)", tail):
                    assert c in self.chains, f"no chain {c}: {statement}"
                for c in re.findall(r'counter name "([^"]+)"', tail):
                    assert c in self.counters, f"no counter {c}: {statement}"
                self.chains[name].append(tail)
            case _:
                raise AssertionError(f"unknown statement {statement}")

    def holds(self, ruleset: PolicyRuleset) -> bool:
        if ruleset.empty:
            return not self.exists
        return (
            self.exists
            and self.counters == set(ruleset.counters)
            and self.sets
            == {
                **{n: {str(a) for a in s.elements} for n, s in ruleset.sets.items()},
                **{n: set(p.elements) for n, p in ruleset.port_sets.items()},
            }
            and self.chains == {n: list(c.rules) for n, c in ruleset.chains.items()}
        )


def applied(before: PolicyRuleset | None, after: PolicyRuleset, kernel: Kernel) -> Kernel:
    kernel.run(policy_transaction(before, after))
    assert kernel.holds(after)
    return kernel


def test_the_model_kernel_refuses_what_nft_refuses() -> None:
    # Positive controls for the checks the transaction tests rely on.
    full = policy_ruleset([RECIPES["allow_from_label"]], ENDPOINTS, LOCAL)
    kernel = applied(None, full, Kernel())
    some_set = next(iter(full.sets))
    with pytest.raises(AssertionError, match="delete set"):
        kernel.one(f"delete set {WHERE} {some_set}")
    with pytest.raises(AssertionError, match="ENOENT"):
        kernel.one(f"delete element {WHERE} {some_set} {{ 10.9.9.9 }}")
    with pytest.raises(AssertionError, match="no chain"):
        kernel.one(f"add rule {WHERE} ingress jump nowhere")


def test_a_new_policy_brings_its_sets_and_chain_before_the_rules_that_use_them() -> None:
    first = [RECIPES["deny_all_ingress"], RECIPES["port_range"]]
    before = policy_ruleset(first, ENDPOINTS, LOCAL)
    after = policy_ruleset([*first, RECIPES["allow_from_label"]], ENDPOINTS, LOCAL)
    kernel = applied(None, before, Kernel())
    statements = policy_transaction(before, after)
    applied(before, after, kernel)
    # The base chain did not change, so it is not written.
    assert not any(
        s.startswith((f"add rule {WHERE} ingress ", f"flush chain {WHERE} ingress"))
        and not s.startswith(f"flush chain {WHERE} ingress_")
        for s in statements
    )
    assert f"flush chain {WHERE} ingress_deny" in statements  # positive control
    # Every set's elements in one statement, however many.
    adds = [s for s in statements if s.startswith("add element")]
    assert len(adds) == len({s.split()[4] for s in adds})


def test_removing_a_policy_deletes_its_objects_after_the_rules_that_named_them() -> None:
    both = policy_ruleset(
        [RECIPES["deny_all_ingress"], RECIPES["allow_from_label"]], ENDPOINTS, LOCAL
    )
    one = policy_ruleset([RECIPES["deny_all_ingress"]], ENDPOINTS, LOCAL)
    kernel = applied(None, both, Kernel())
    statements = policy_transaction(both, one)
    applied(both, one, kernel)
    position = {s: i for i, s in enumerate(statements)}
    chain = next(n for n in both.chains if n.startswith("p_db_from_"))
    assert (
        position[f"flush chain {WHERE} ingress_policies"]
        < position[f"delete chain {WHERE} {chain}"]
    )
    gone_sets = [f"delete set {WHERE} {n}" for n in both.sets if n not in one.sets]
    assert gone_sets and all(
        position[s] > position[f"delete chain {WHERE} {chain}"] for s in gone_sets
    )


def test_the_last_policy_of_a_direction_takes_its_base_chain_with_it() -> None:
    both = policy_ruleset(
        [RECIPES["deny_all_ingress"], RECIPES["egress_ipblock"]], ENDPOINTS, LOCAL
    )
    ingress_only = policy_ruleset([RECIPES["deny_all_ingress"]], ENDPOINTS, LOCAL)
    kernel = applied(None, both, Kernel())
    statements = policy_transaction(both, ingress_only)
    applied(both, ingress_only, kernel)
    assert statements.index(f"delete chain {WHERE} egress") < statements.index(
        f"delete chain {WHERE} egress_policies"
    )
    applied(ingress_only, both, kernel)  # and back


def test_one_base_chain_judges_egress_then_ingress_and_an_egress_allow_goes_on_to_ingress() -> None:
    both = policy_ruleset(
        [RECIPES["deny_all_ingress"], RECIPES["egress_ipblock"]], ENDPOINTS, LOCAL
    )
    egress_only = policy_ruleset([RECIPES["egress_ipblock"]], ENDPOINTS, LOCAL)
    assert [n for n, c in both.chains.items() if c.hook] == [BASE]  # one base chain
    assert both.chains[BASE].rules[-2:] == ("jump egress", "jump ingress")
    assert list(both.chains)[-1] == BASE  # made last, deleted first
    chain = next(n for n in both.chains if n.startswith("p_web_egress_"))
    # While ingress is isolated an egress allow goes on to it (never accept,
    # which would end the base chain unjudged by ingress); without, it accepts.
    assert all(r.endswith(" goto ingress") for r in both.chains[chain].rules)
    assert all(r.endswith(" accept") for r in egress_only.chains[chain].rules)
    # Nothing in egress accepts; ingress never returns (the goto relies on it).
    for name in ("egress", "egress_link_local", "egress_policies", "egress_deny"):
        assert not any(r.endswith(" accept") for r in both.chains[name].rules), name
    assert both.chains["ingress"].rules[-1] == "accept"


def test_the_first_and_last_ingress_policy_rewrite_the_egress_allows_in_order() -> None:
    egress_only = policy_ruleset([RECIPES["egress_ipblock"]], ENDPOINTS, LOCAL)
    both = policy_ruleset(
        [RECIPES["deny_all_ingress"], RECIPES["egress_ipblock"]], ENDPOINTS, LOCAL
    )
    deny_only = policy_ruleset([RECIPES["deny_all_ingress"]], ENDPOINTS, LOCAL)
    kernel = applied(None, egress_only, Kernel())
    statements = policy_transaction(egress_only, both)
    chain = next(n for n in both.chains if n.startswith("p_web_egress_"))
    # `ingress` is made before the rules that go to it.
    first_goto = next(i for i, s in enumerate(statements) if s.endswith(" goto ingress"))
    assert statements.index(f"add chain {WHERE} ingress") < first_goto
    assert f"flush chain {WHERE} {chain}" in statements
    applied(egress_only, both, kernel)
    applied(both, egress_only, kernel)  # the last ingress policy: allows accept again
    applied(egress_only, both, kernel)
    applied(both, deny_only, kernel)
    # Ingress going with one egress policy whose chain goes to it: every
    # gone chain is flushed (its goto ingress with it) before any is
    # deleted, or `ingress` would still be in use when deleted.
    other = replace(RECIPES["egress_ipblock"], name="web-egress-2")
    three = policy_ruleset(
        [RECIPES["deny_all_ingress"], RECIPES["egress_ipblock"], other], ENDPOINTS, LOCAL
    )
    one = policy_ruleset([other], ENDPOINTS, LOCAL)
    statements = policy_transaction(three, one)
    assert f"delete chain {WHERE} ingress" in statements
    flushes = [i for i, s in enumerate(statements) if s.startswith("flush chain")]
    deletes = [i for i, s in enumerate(statements) if s.startswith("delete chain")]
    assert max(flushes) < min(deletes)
    applied(three, one, applied(None, three, Kernel()))


SELECTORS = [LabelSelector(), sel(app="db"), sel(app="web"), sel(role="frontend"), sel(app="x")]


@st.composite
def policies(draw: st.DrawFn) -> list[Policy]:
    found = []
    for name in draw(st.sets(st.sampled_from("abcdef"), max_size=4)):
        rules = tuple(
            Rule(
                peers=draw(
                    st.none()
                    | st.lists(
                        st.sampled_from(SELECTORS).map(SelectorPeer)
                        | st.just(IpBlock(IPv4Network("10.0.0.0/8"))),
                        max_size=2,
                    ).map(tuple)
                ),
                ports=draw(
                    st.none()
                    | st.lists(
                        st.builds(
                            lambda p, f: PortRange(p, f, f + 10),
                            st.sampled_from(list(Protocol)),
                            st.integers(1, 100),
                        ),
                        max_size=2,
                    ).map(tuple)
                ),
            )
            for _ in range(draw(st.integers(0, 2)))
        )
        found.append(
            Policy(
                name,
                draw(st.sampled_from(SELECTORS)),
                draw(st.frozensets(st.sampled_from(list(Direction)))),
                ingress=rules,
                egress=rules[::-1],
            )
        )
    return found


endpoint_sets = st.sets(st.integers(0, len(ENDPOINTS) - 1)).map(
    lambda chosen: [ENDPOINTS[i] for i in sorted(chosen)]
)


@given(policies(), endpoint_sets, policies(), endpoint_sets, st.booleans())
def test_any_transaction_takes_the_kernel_from_before_to_after(
    p1: list[Policy], e1: list[Endpoint], p2: list[Policy], e2: list[Endpoint], v6: bool
) -> None:
    local = LOCAL if v6 else LOCAL4
    before, after = policy_ruleset(p1, e1, local), policy_ruleset(p2, e2, local)
    kernel = applied(None, before, Kernel())
    applied(before, after, kernel)
    # Unknown state: a fresh table from whatever is there.
    applied(None, after, kernel)
    # Nothing to do when nothing changed.
    assert policy_transaction(after, after) == []


RELABELLED = (
    replace(ENDPOINTS[0], labels={"app": "web", "role": "frontend"}),
    replace(ENDPOINTS[2], labels={}),
    replace(ENDPOINTS[3], addresses=(IPv4Address("10.244.2.9"),)),
)


@given(policies(), endpoint_sets, endpoint_sets, st.sets(st.integers(0, 2)))
def test_moving_a_ruleset_by_the_changed_endpoints_is_making_it_again(
    chosen: list[Policy], e1: list[Endpoint], e2: list[Endpoint], relabel: set[int]
) -> None:
    by_key = {e.key: e for e in e2}
    for i in relabel:  # some endpoints of e2 changed their labels or addresses
        if RELABELLED[i].key in by_key:
            by_key[RELABELLED[i].key] = RELABELLED[i]
    after = list(by_key.values())
    gone = [e for e in e1 if e not in after]
    came = [e for e in after if e not in e1]
    before = policy_ruleset(chosen, e1, LOCAL)
    assert with_endpoints(before, gone, came) == policy_ruleset(chosen, after, LOCAL)


# --- flat cost ---------------------------------------------------------------


def cluster(n: int) -> list[Endpoint]:
    """n dual-stack endpoints over hosts of 250, host 1 being ours."""
    found = []
    for i in range(n):
        host, index = 1 + i // 250, 2 + i % 250
        labels = {"app": f"a{i % 5}", "role": "frontend" if i % 3 == 0 else "backend"}
        found.append(replace(endpoint(f"c{i}", host, index), labels=labels))
    return found


FLAT_POLICIES = [
    Policy("deny-a0", sel(app="a0"), frozenset({INGRESS})),
    Policy(
        "a1-from-frontend",
        sel(app="a1"),
        frozenset({INGRESS}),
        ingress=(Rule(peers=(SelectorPeer(sel(role="frontend")),)),),
    ),
    Policy(
        "a2-egress",
        sel(app="a2"),
        frozenset({EGRESS}),
        egress=(
            Rule(peers=(IpBlock(IPv4Network("10.0.0.0/8")),), ports=(PortRange(TCP, 80, 80),)),
        ),
    ),
]
NEW_POLICY = Policy(
    "a3-from-a1",
    sel(app="a3"),
    frozenset({INGRESS, EGRESS}),
    ingress=(Rule(peers=(SelectorPeer(sel(app="a1")),), ports=(PortRange(TCP, 8000, 8080),)),),
)
# A local endpoint in {app=a1} and {role=frontend}: four sets with IPv6.
NEWCOMER = endpoint("new", 1, 253, app="a1", role="frontend")


def costs(n: int) -> dict[str, int]:
    endpoints = cluster(n)
    base = policy_ruleset(FLAT_POLICIES, endpoints, LOCAL)
    plus_endpoint = policy_ruleset(FLAT_POLICIES, [*endpoints, NEWCOMER], LOCAL)
    minus_endpoint = policy_ruleset(FLAT_POLICIES, endpoints[1:], LOCAL)
    relabelled = [replace(endpoints[6], labels={"app": "a0", "role": "backend"}), *endpoints]
    relabel = policy_ruleset(FLAT_POLICIES, relabelled[:6] + relabelled[7:], LOCAL)
    plus_policy = policy_ruleset([*FLAT_POLICIES, NEW_POLICY], endpoints, LOCAL)
    minus_policy = policy_ruleset(FLAT_POLICIES[1:], endpoints, LOCAL)
    add = policy_transaction(base, plus_endpoint)
    assert all(s.startswith("add element ") for s in add)  # elements only, never a rule
    return {
        "add endpoint": len(add),
        "remove endpoint": len(policy_transaction(base, minus_endpoint)),
        "relabel endpoint": len(policy_transaction(base, relabel)),
        "add policy": len(policy_transaction(base, plus_policy)),
        "remove policy": len(policy_transaction(base, minus_policy)),
        "cold start": len(policy_transaction(None, base)),
    }


def test_changes_cost_the_same_number_of_statements_with_10_1000_and_10000_endpoints() -> None:
    measured = {n: costs(n) for n in (10, 1_000, 10_000)}
    print(measured)
    assert measured[10] == measured[1_000] == measured[10_000]
    assert measured[10] == {
        # {app=a1} and {role=frontend}, v4 and v6, and {app=a1}'s MACs (the
        # newcomer is local; {role=frontend} is only a peer selector)
        "add endpoint": 5,
        "remove endpoint": 5,  # c0: {app=a0} and {role=frontend}, v4 and v6; {app=a0}'s MACs
        "relabel endpoint": 6,  # c6 leaves {app=a1}, joins {app=a0}: v4, v6 and MACs each
        # New counters, sets (each with its elements), chain and rules, and
        # the dispatch, deny and link-local chains refilled: sized by the policies.
        "add policy": 42,
        "remove policy": 12,
        "cold start": 77,  # the base chain and ingress's closing accept are 2 more
    }


def test_a_policy_with_10000_ports_is_one_rule_and_one_set() -> None:
    ports = tuple(PortRange(TCP, p, p) for p in range(1, 20_001, 2))
    big = Policy("big", sel(app="a1"), frozenset({INGRESS}), ingress=(Rule(ports=ports),))
    small = replace(big, ingress=(Rule(ports=ports[:1]),))
    endpoints = cluster(100)
    statements = policy_transaction(None, policy_ruleset([big], endpoints, LOCAL))
    assert (
        len(statements)
        == len(policy_transaction(None, policy_ruleset([small], endpoints, LOCAL))) + 1
    )
    (rule,) = [s for s in statements if "dport" in s]
    assert rule.startswith(f"add rule {WHERE} p_big_") and "tcp dport @ports_1_3_5_" in rule
    (made,) = [s for s in statements if s.startswith(f"add set {WHERE} ports_")]
    assert made.partition("elements = { ")[2].count(",") == 9_999
    assert "elements = { 1, 3, 5, " in made


# --- what the kernel lists ---------------------------------------------------

LISTING = {
    "nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": TABLE, "handle": 1}},
        {
            "counter": {
                "family": "inet",
                "name": "p_a_ca978112ca_ingress_deny",
                "table": TABLE,
                "handle": 2,
                "packets": 3,
                "bytes": 180,
            }
        },
        {
            "set": {
                "family": "inet",
                "name": "s_app_db_9afd86d58c_v4",
                "table": TABLE,
                "type": "ipv4_addr",
                "handle": 3,
                "comment": "selector {app=db}{}",
                "elem": ["10.244.1.2", {"elem": {"val": "10.244.2.9", "timeout": 30}}],
            }
        },
        {
            "set": {
                "family": "inet",
                "name": "s_app_db_9afd86d58c_v6",
                "table": TABLE,
                "type": "ipv6_addr",
                "handle": 4,
            }
        },
        {
            "set": {
                "family": "inet",
                "name": "s_app_db_9afd86d58c_mac",
                "table": TABLE,
                "type": "ether_addr",
                "handle": 5,
                "elem": ["0a:58:0a:f4:01:02"],
            }
        },
        {
            "set": {
                "family": "inet",
                "name": "ports_80_9000_9100_x",
                "table": TABLE,
                "type": "inet_service",
                "handle": 6,
                "flags": ["interval"],
                "elem": [80, {"range": [9000, 9100]}],
            }
        },
        {
            "set": {
                "family": "inet",
                "name": "ports_tcp_80_udp_53_x",
                "table": TABLE,
                "type": ["inet_proto", "inet_service"],
                "handle": 7,
                "flags": ["interval"],
                "elem": [{"concat": ["tcp", 80]}, {"concat": ["udp", {"range": [53, 60]}]}],
            }
        },
        {"set": {"family": "ip", "name": "vxlan_peers", "table": "overlayd", "elem": ["1.2.3.4"]}},
    ]
}


def test_the_json_listing_gives_the_elements_and_counts() -> None:
    import json

    listed = listed_elements(json.dumps(LISTING))
    assert listed == {
        "s_app_db_9afd86d58c_v4": frozenset({ip_address("10.244.1.2"), ip_address("10.244.2.9")}),
        "s_app_db_9afd86d58c_v6": frozenset(),
        "s_app_db_9afd86d58c_mac": frozenset({MacAddress.parse("0a:58:0a:f4:01:02")}),
    }
    assert listed_counters(LISTING) == {"p_a_ca978112ca_ingress_deny": 3}
    # Port sets as the render writes their elements (and not as addresses).
    assert listed_ports(LISTING) == {
        "ports_80_9000_9100_x": frozenset({"80", "9000-9100"}),
        "ports_tcp_80_udp_53_x": frozenset({"tcp . 80", "udp . 53-60"}),
    }


def test_listed_counts_give_packets_and_bytes_and_skip_values_that_are_not_counts() -> None:
    assert listed_counts(LISTING) == {"p_a_ca978112ca_ingress_deny": Count(3, 180)}
    odd = {
        "nftables": [
            {"counter": {"family": "inet", "table": TABLE, "name": n, "packets": p, "bytes": b}}
            for n, p, b in (("neg", -1, 0), ("text", "7", 0), ("flag", True, 0), ("ok", 2, 9))
        ]
        + [{"counter": {"family": "ip", "table": TABLE, "name": "other", "packets": 5}}]
    }
    assert listed_counts(odd) == {"ok": Count(2, 9)}


def test_a_table_made_afresh_starts_its_counters_from_the_values_given() -> None:
    ruleset = policy_ruleset([RECIPES["allow_from_label"]], ENDPOINTS, LOCAL)
    counted, untouched = sorted(ruleset.counters)[:2]
    counts = {counted: Count(7, 420), untouched: Count(0, 0), "p_gone_x_ingress_deny": Count(1, 1)}
    made = policy_transaction(None, ruleset, counts)
    assert f"add counter {WHERE} {counted} {{ packets 7 bytes 420 }}" in made
    assert f"add counter {WHERE} {untouched}" in made
    assert not any("p_gone_x" in line for line in made)  # only the ruleset's counters
    # Without values, and for a table changed in place, nothing to carry.
    assert policy_transaction(None, ruleset) == [
        line.replace(" { packets 7 bytes 420 }", "") for line in made
    ]
    moved = policy_transaction(ruleset, with_endpoints(ruleset, [ENDPOINTS[0]], []), counts)
    assert moved and not any("counter" in line for line in moved)


def test_element_repairs_put_the_sets_back() -> None:
    ruleset = policy_ruleset([RECIPES["default_allow_unselected"]], ENDPOINTS, LOCAL)
    listed = {name: s.elements for name, s in ruleset.sets.items()}
    assert element_repairs(ruleset, listed, {}) == []
    v4 = "s_app_db_9afd86d58c_v4"
    listed[v4] = frozenset({ip_address("10.244.9.9")})
    assert element_repairs(ruleset, listed, {}) == [
        f"add element {WHERE} {v4} {{ 10.244.1.2 }}",
        f"delete element {WHERE} {v4} {{ 10.244.9.9 }}",
    ]
    del listed[v4]
    assert element_repairs(ruleset, listed, {}) is None


def test_a_changed_or_missing_port_set_takes_a_new_table() -> None:
    """A port set is part of the rules that name it: a check pass that finds
    it changed cannot patch it, and asks for the whole table again."""
    ruleset = policy_ruleset(
        [policy_with_ports(PortRange(TCP, 80, 80), PortRange(TCP, 443, 443))], ENDPOINTS, LOCAL
    )
    listed = {name: s.elements for name, s in ruleset.sets.items()}
    [name] = ruleset.port_sets
    assert element_repairs(ruleset, listed, {name: frozenset({"80", "443"})}) == []
    assert element_repairs(ruleset, listed, {name: frozenset({"80"})}) is None
    assert element_repairs(ruleset, listed, {}) is None


def test_the_script_is_the_statements_one_per_line() -> None:
    assert script(["a", "b"]) == "a\nb\n"
    assert script([]) == ""


def test_the_terse_rendering_is_the_kernel_listing_without_counter_values() -> None:
    ruleset = policy_ruleset([RECIPES["allow_from_label"]], ENDPOINTS, LOCAL)
    full, terse = render_ruleset(ruleset), render_ruleset(ruleset, elements=False)
    assert "elements = " in full and "elements = " not in terse
    assert [line for line in full.splitlines() if "elements = " not in line] == terse.splitlines()
    # As `nft -t list table` prints it (checked against the kernel in tests/netns).
    listed = terse.replace("_allow {\n", "_allow {\n\t\tpackets 7 bytes 420\n")
    assert listed != terse and terse_listing(listed) == terse


def test_tables_compare_alike_whatever_order_nft_lists_their_blocks_in() -> None:
    """nft lists sets and chains in the order they were made; after
    incremental changes that is not render_ruleset's. The order of rules
    inside a chain still counts (the negative control)."""
    from overlayd.plan.policy_rules import comparable

    written = (
        "table inet overlayd_policy {\n\tset s_b {\n\t\ttype ipv4_addr\n\t}\n\n"
        "\tset s_a {\n\t\ttype ipv4_addr\n\t}\n\n"
        "\tchain c {\n\t\tip saddr @s_a accept\n\t\tdrop\n\t}\n}\n"
    )
    listed = (
        "table inet overlayd_policy {\n\tchain c {\n\t\tip saddr @s_a accept\n\t\tdrop\n\t}\n\n"
        "\tset s_a {\n\t\ttype ipv4_addr\n\t}\n\n\tset s_b {\n\t\ttype ipv4_addr\n\t}\n}\n"
    )
    assert comparable(written) == comparable(listed)
    swapped = listed.replace("accept\n\t\tdrop", "drop\n\t\tip saddr @s_a accept")
    assert comparable(written) != comparable(swapped)
