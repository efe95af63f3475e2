"""Network policy documents and the verdict: the verdict is held to a
brute-force reading of Kubernetes' rules over the raw documents, every
refusal names its field, and rendering round-trips."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from overlayd.errors import PolicyError
from overlayd.model import IPAddress, IPNetwork
from overlayd.plan.policy import (
    MAX_POLICY_BYTES,
    PolicyChecker,
    label_key_problem,
    label_value_problem,
    parse_policy,
    parse_policy_key,
    parse_selector,
    policies_prefix,
    policy_key,
    render_policy,
    verdict,
)
from overlayd.plan.policy_model import (
    Direction,
    Endpoint,
    EndpointIndex,
    IpBlock,
    LabelSelector,
    Operator,
    Policy,
    PortRange,
    Protocol,
    Requirement,
    Rule,
    SelectorPeer,
)

Doc = dict[str, Any]


def a(text: str) -> IPAddress:
    return ip_address(text)


def endpoint(name: str, addresses: Sequence[str], **labels: str) -> Endpoint:
    return Endpoint(
        key=f"/overlayd/endpoints/10.244.1.0-24/{name}",
        id=name,
        host="10.244.1.0-24",
        name=name,
        addresses=tuple(a(x) for x in addresses),
        labels=labels,
    )


def k8s(name: str, spec: Doc) -> Doc:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


# --- the reference: Kubernetes' rules read straight off the raw documents ------------


def ref_types(spec: Doc) -> set[str]:
    types = spec.get("policyTypes") or []
    if not types:
        types = ["Ingress"] + (["Egress"] if spec.get("egress") else [])
    return set(types)


def ref_selects(selector: Doc, labels: Mapping[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if key not in labels or labels[key] != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and not (key in labels and labels[key] in values):
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def ref_peer(peer: Doc, address: IPAddress, labels: Mapping[str, str] | None) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        cidr = ip_network(block["cidr"])
        if cidr.version != address.version or address not in cidr:
            return False
        return all(address not in ip_network(e) for e in block.get("except") or [])
    return labels is not None and ref_selects(peer["podSelector"], labels)


def ref_ports(ports: list[Doc] | None, protocol: str, port: int) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        first = int(entry["port"])
        if first <= port <= int(entry.get("endPort", first)):
            return True
    return False


def ref_owner(address: IPAddress, endpoints: Sequence[Endpoint]) -> Endpoint | None:
    owners = [e for e in endpoints if address in e.addresses]
    return owners[0] if len(owners) == 1 else None


def ref_direction(
    docs: Sequence[Doc],
    endpoints: Sequence[Endpoint],
    local: IPAddress,
    remote: IPAddress,
    direction: str,
    protocol: str,
    port: int,
) -> tuple[bool, set[str], set[str]]:
    """(isolated, selected by, allowed by) at the endpoint owning `local`."""
    owner = ref_owner(local, endpoints)
    if owner is None:
        return False, set(), set()
    remote_owner = ref_owner(remote, endpoints)
    remote_labels = remote_owner.labels if remote_owner else None
    rules_field, peers_field = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selected, allowed = set(), set()
    for doc in docs:
        spec = doc["spec"]
        if direction not in ref_types(spec) or not ref_selects(spec["podSelector"], owner.labels):
            continue
        selected.add(doc["metadata"]["name"])
        for rule in spec.get(rules_field) or []:
            peers = rule.get(peers_field) or []
            if (not peers or any(ref_peer(p, remote, remote_labels) for p in peers)) and ref_ports(
                rule.get("ports"), protocol, port
            ):
                allowed.add(doc["metadata"]["name"])
    return bool(selected), selected, allowed


# --- random documents --------------------------------------------------------------

KEYS = ["app", "tier", "example.com/team"]
VALUES = ["a", "b", ""]
V4 = [f"10.0.0.{i}" for i in range(1, 6)] + ["192.0.2.1"]
V6 = ["fd00::1", "fd00::2", "fd00::5"]
CIDRS: list[IPNetwork] = [
    IPv4Network("0.0.0.0/0"),
    IPv4Network("10.0.0.0/29"),
    IPv4Network("10.0.0.0/30"),
    IPv4Network("10.0.0.4/30"),
    IPv4Network("10.0.0.2/31"),
    IPv4Network("10.0.0.5/32"),
    IPv6Network("::/0"),
    IPv6Network("fd00::/126"),
    IPv6Network("fd00::/127"),
    IPv6Network("fd00::5/128"),
]

labels_st = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=3)


def _add_expressions(draw: st.DrawFn, selector: Doc, count: st.SearchStrategy[int]) -> None:
    """Puts `count` random matchExpressions into `selector` (none: no key)."""
    expressions = []
    for _ in range(draw(count)):
        operator = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
        expression: Doc = {"key": draw(st.sampled_from(KEYS)), "operator": operator}
        if operator in ("In", "NotIn"):
            expression["values"] = draw(st.lists(st.sampled_from(VALUES), min_size=1, max_size=3))
        expressions.append(expression)
    if expressions:
        selector["matchExpressions"] = expressions


@st.composite
def selectors(draw: st.DrawFn) -> Doc:
    # Small selectors, so that they select some endpoints and not others.
    selector: Doc = {}
    if draw(st.booleans()):
        selector["matchLabels"] = draw(labels_st.filter(lambda labels: len(labels) <= 1))
    _add_expressions(draw, selector, st.sampled_from([0, 0, 1, 2]))
    return selector


@st.composite
def peers(draw: st.DrawFn) -> Doc:
    if draw(st.booleans()):
        return {"podSelector": draw(selectors())}
    cidr = draw(st.sampled_from(CIDRS))
    inside = [
        c
        for c in CIDRS
        if c.version == cidr.version and c.prefixlen > cidr.prefixlen and c.network_address in cidr
    ]
    block: Doc = {"cidr": str(cidr)}
    if inside and draw(st.integers(0, 2)) > 0:
        excepts: list[IPNetwork] = draw(st.lists(st.sampled_from(inside), min_size=1, max_size=2))
        block["except"] = [str(c) for c in excepts]
    return {"ipBlock": block}


@st.composite
def port_entries(draw: st.DrawFn) -> Doc:
    entry: Doc = {}
    protocol = draw(st.sampled_from([None, "TCP", "UDP", "SCTP"]))
    if protocol is not None:
        entry["protocol"] = protocol
    if draw(st.integers(0, 3)):
        entry["port"] = draw(st.integers(1, 4))
        if draw(st.booleans()):
            entry["endPort"] = entry["port"] + draw(st.integers(0, 2))
    return entry


@st.composite
def rules(draw: st.DrawFn, peers_field: str) -> Doc:
    rule: Doc = {}
    shape = draw(st.sampled_from(["absent", "empty", "list", "list"]))
    if shape == "empty":
        rule[peers_field] = []
    elif shape == "list":
        rule[peers_field] = draw(st.lists(peers(), min_size=1, max_size=3))
    shape = draw(st.sampled_from(["absent", "empty", "list"]))
    if shape == "empty":
        rule["ports"] = []
    elif shape == "list":
        rule["ports"] = draw(st.lists(port_entries(), min_size=1, max_size=3))
    return rule


@st.composite
def documents(draw: st.DrawFn, name: str) -> Doc:
    spec: Doc = {"podSelector": draw(selectors())}
    types = draw(st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"], []]))
    if types is not None:
        spec["policyTypes"] = types
    # Rules only where the types allow them (others are refused); with
    # implicit types, egress rules turn Egress on.
    for field, peers_field, direction in (
        ("ingress", "from", "Ingress"),
        ("egress", "to", "Egress"),
    ):
        if types and direction not in types:
            continue
        if draw(st.integers(0, 3)):
            spec[field] = draw(st.lists(rules(peers_field), min_size=1, max_size=3))
        elif draw(st.booleans()):
            spec[field] = []
    return k8s(name, spec)


@st.composite
def policy_sets(draw: st.DrawFn) -> list[Doc]:
    count = draw(st.integers(1, 4))
    return [draw(documents(f"p{index}")) for index in range(count)]


@st.composite
def endpoint_sets(draw: st.DrawFn) -> list[Endpoint]:
    found = []
    for index in range(draw(st.integers(1, 6))):
        addresses = [draw(st.sampled_from(V4))] if draw(st.integers(0, 3)) else []
        if not addresses or draw(st.booleans()):
            addresses.append(draw(st.sampled_from(V6)))
        found.append(endpoint(f"e{index}", addresses, **draw(labels_st)))
    return found


@st.composite
def wide_selectors(draw: st.DrawFn) -> Doc:
    # Up to three labels and three expressions: several positive terms, so
    # that the index's narrowest term is checked against the others.
    selector: Doc = {"matchLabels": draw(labels_st)}
    _add_expressions(draw, selector, st.integers(0, 3))
    return selector


@given(st.one_of(selectors(), wide_selectors()), st.lists(labels_st, max_size=12))
def test_the_label_index_selects_what_the_selector_matches(
    doc: Doc, labels: list[dict[str, str]]
) -> None:
    selector = parse_selector(doc, "selector")
    endpoints = [endpoint(f"e{i}", ["10.0.0.1"], **found) for i, found in enumerate(labels)]
    index = EndpointIndex(endpoints)
    wanted = [i for i, e in enumerate(endpoints) if ref_selects(doc, e.labels)]
    assert index.select_indices(selector) == wanted
    assert [i for i, e in enumerate(endpoints) if selector.matches(e.labels)] == wanted


def ref_verdict(
    docs: Sequence[Doc],
    endpoints: Sequence[Endpoint],
    src: IPAddress,
    dst: IPAddress,
    protocol: str,
    port: int,
) -> tuple[object, ...]:
    egress = ref_direction(docs, endpoints, src, dst, "Egress", protocol, port)
    ingress = ref_direction(docs, endpoints, dst, src, "Ingress", protocol, port)
    allowed = all(not isolated or bool(allowed_by) for isolated, _, allowed_by in (egress, ingress))
    return allowed, ingress, egress, ref_owner(src, endpoints), ref_owner(dst, endpoints)


PAIRS = [(a(s), a(d)) for pool in (V4, V6) for s in pool for d in pool]


@settings(max_examples=120)
@given(policy_sets(), endpoint_sets())
def test_verdict_matches_kubernetes_rules(docs: list[Doc], endpoints: list[Endpoint]) -> None:
    """Every pair of addresses of the pools (endpoints' or not), every
    protocol and every port a rule can name: one random packet per example
    would seldom reach the corners (an except, an endPort) that decide."""
    policies = [parse_policy(json.dumps(doc)) for doc in docs]
    checker = PolicyChecker(policies, endpoints)
    for src, dst in PAIRS:
        for protocol in Protocol:
            for port in range(1, 8):
                got = checker.verdict(src, dst, protocol, port)
                assert (
                    got.allowed,
                    (
                        got.ingress.isolated,
                        set(got.ingress.selected_by),
                        set(got.ingress.allowed_by),
                    ),
                    (got.egress.isolated, set(got.egress.selected_by), set(got.egress.allowed_by)),
                    got.source,
                    got.destination,
                ) == ref_verdict(docs, endpoints, src, dst, protocol.value, port), (
                    src,
                    dst,
                    protocol,
                    port,
                )
    src, dst = PAIRS[1]
    assert verdict(policies, endpoints, src, dst, Protocol.UDP, 1) == checker.verdict(
        src, dst, Protocol.UDP, 1
    )


# --- round trips and normal forms ---------------------------------------------------


def ours(doc: Doc) -> Doc:
    """The same policy in overlayd's own shape."""
    spec = doc["spec"]

    def peer(p: Doc) -> Doc:
        return {"selector": p["podSelector"]} if "podSelector" in p else p

    found: Doc = {"name": doc["metadata"]["name"], "selector": spec["podSelector"]}
    for field, peers_field in (("ingress", "from"), ("egress", "to")):
        if field in spec:
            found[field] = [
                {k: [peer(p) for p in v] if k == peers_field else v for k, v in rule.items()}
                for rule in spec[field]
            ]
    if "policyTypes" in spec:
        found["policyTypes"] = spec["policyTypes"]
    return found


@given(documents("round-trip"))
def test_render_round_trips(doc: Doc) -> None:
    policy = parse_policy(json.dumps(doc))
    text = render_policy(policy)
    assert parse_policy(text) == policy
    assert render_policy(parse_policy(text)) == text  # canonical: a fixed point
    # Our shape, YAML, and data already parsed all mean the same policy.
    assert parse_policy(json.dumps(ours(doc))) == policy
    assert parse_policy(yaml.safe_dump(doc)) == policy
    assert parse_policy(doc) == policy


@given(documents("shuffled"), st.randoms(use_true_random=False))
def test_equal_policies_compare_equal(doc: Doc, rng: random.Random) -> None:
    """Selectors are kept sorted, so the order they were written in does
    not matter."""

    def shuffle(selector: Doc) -> None:
        labels = list((selector.get("matchLabels") or {}).items())
        rng.shuffle(labels)
        if "matchLabels" in selector:
            selector["matchLabels"] = dict(labels)
        for expression in selector.get("matchExpressions", []):
            rng.shuffle(expression.get("values", []))
        rng.shuffle(selector.get("matchExpressions", []))

    shuffled = json.loads(json.dumps(doc))
    shuffle(shuffled["spec"]["podSelector"])
    for field, peers_field in (("ingress", "from"), ("egress", "to")):
        for rule in shuffled["spec"].get(field, []):
            for peer in rule.get(peers_field, []):
                if "podSelector" in peer:
                    shuffle(peer["podSelector"])
    assert parse_policy(shuffled) == parse_policy(doc)


def test_rendered_form_is_canonical_json() -> None:
    policy = parse_policy(
        """
        name: web
        selector: {matchLabels: {tier: web, app: shop}}
        ingress:
        - from: [{ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.128/25]}}]
          ports: [{port: 80}, {protocol: UDP, port: 5000, endPort: 5010}, {protocol: SCTP}]
        """
    )
    assert render_policy(policy) == (
        '{"ingress":[{"from":[{"ipBlock":{"cidr":"192.0.2.0/24","except":["192.0.2.128/25"]}}],'
        '"ports":[{"port":80,"protocol":"TCP"},{"endPort":5010,"port":5000,"protocol":"UDP"},'
        '{"protocol":"SCTP"}]}],"name":"web","policyTypes":["Ingress"],'
        '"selector":{"matchLabels":{"app":"shop","tier":"web"}}}'
    )


# --- Kubernetes semantics, as examples --------------------------------------------

DB = endpoint("db", ["10.244.1.5", "fd00:10:244:1::5"], app="db")
FRONTEND = endpoint("frontend", ["10.244.1.6"], role="frontend")
WEB = endpoint("web", ["10.244.2.7"], app="web")
ENDPOINTS = [DB, FRONTEND, WEB]
OUTSIDE = a("198.51.100.9")


def allowed(
    policy: Doc | str, src: Endpoint | IPAddress, dst: Endpoint | IPAddress, port: int = 80
) -> bool:
    source = src.addresses[0] if isinstance(src, Endpoint) else src
    destination = dst.addresses[0] if isinstance(dst, Endpoint) else dst
    parsed = [parse_policy(policy if isinstance(policy, str) else json.dumps(policy))]
    return verdict(parsed, ENDPOINTS, source, destination, Protocol.TCP, port).allowed


def test_recipe_deny_all_ingress() -> None:
    deny = k8s("default-deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]})
    assert not allowed(deny, FRONTEND, DB)
    assert not allowed(deny, OUTSIDE, WEB)
    # Egress is untouched: an endpoint still reaches what is not an endpoint.
    assert allowed(deny, WEB, OUTSIDE)
    result = verdict(
        [parse_policy(deny)], ENDPOINTS, FRONTEND.addresses[0], DB.addresses[0], Protocol.UDP, 53
    )
    assert result.ingress.isolated and result.ingress.selected_by == ("default-deny-ingress",)
    assert result.ingress.allowed_by == () and not result.egress.isolated


def test_recipe_deny_all_ingress_by_empty_list() -> None:
    deny = k8s("deny", {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": []})
    assert not allowed(deny, FRONTEND, DB)
    assert allowed(deny, FRONTEND, WEB)  # not selected


def test_recipe_allow_from_label() -> None:
    policy = """
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: db-from-frontend}
    spec:
      podSelector: {matchLabels: {app: db}}
      ingress:
      - from:
        - podSelector: {matchLabels: {role: frontend}}
    """
    assert allowed(policy, FRONTEND, DB)
    assert not allowed(policy, WEB, DB)
    assert not allowed(policy, OUTSIDE, DB)  # no endpoint's address: no label to select
    checked = verdict(
        [parse_policy(policy)], ENDPOINTS, FRONTEND.addresses[0], DB.addresses[0], Protocol.TCP, 1
    )
    assert checked.ingress.allowed_by == ("db-from-frontend",)
    assert checked.source == FRONTEND and checked.destination == DB


def test_recipe_port_range() -> None:
    policy = k8s(
        "range",
        {
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"ports": [{"protocol": "TCP", "port": 32000, "endPort": 32768}]}],
        },
    )
    assert allowed(policy, WEB, DB, 32000) and allowed(policy, WEB, DB, 32768)
    assert not allowed(policy, WEB, DB, 31999) and not allowed(policy, WEB, DB, 32769)
    parsed = [parse_policy(policy)]
    src, dst = WEB.addresses[0], DB.addresses[0]
    assert not verdict(parsed, ENDPOINTS, src, dst, Protocol.UDP, 32000).allowed
    assert verdict(parsed, ENDPOINTS, src, dst, Protocol.TCP, 32100).allowed


def test_recipe_egress_to_ip_block_only() -> None:
    policy = k8s(
        "web-egress",
        {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "198.51.100.0/24"}}]}],
        },
    )
    assert allowed(policy, WEB, OUTSIDE)
    assert not allowed(policy, WEB, a("203.0.113.1"))
    assert not allowed(policy, WEB, DB)  # an endpoint outside the block
    assert allowed(policy, DB, WEB)  # ingress to web is not isolated
    assert allowed(policy, DB, OUTSIDE)  # db is not selected


def test_recipe_default_allow_for_unselected() -> None:
    policy = k8s("db-only", {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": []})
    result = verdict(
        [parse_policy(policy)], ENDPOINTS, WEB.addresses[0], FRONTEND.addresses[0], Protocol.TCP, 80
    )
    assert result.allowed and not result.ingress.isolated and not result.egress.isolated
    assert not allowed(policy, WEB, DB)  # positive control: the policy does bite


def test_policies_add_up() -> None:
    """Two policies selecting one endpoint: either one's rules allow."""
    only_80 = k8s(
        "a", {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"ports": [{"port": 80}]}]}
    )
    only_443 = k8s("b", {"podSelector": {}, "ingress": [{"ports": [{"port": 443}]}]})
    parsed = [parse_policy(only_80), parse_policy(only_443)]
    src, dst = WEB.addresses[0], DB.addresses[0]
    result = verdict(parsed, ENDPOINTS, src, dst, Protocol.TCP, 443)
    assert (
        result.allowed
        and result.ingress.selected_by == ("a", "b")
        and result.ingress.allowed_by == ("b",)
    )
    assert not verdict(parsed, ENDPOINTS, src, dst, Protocol.TCP, 22).allowed


def test_shared_address_belongs_to_no_endpoint() -> None:
    twin = endpoint("twin", [str(DB.addresses[0])], app="db")
    deny = [parse_policy(k8s("deny", {"podSelector": {"matchLabels": {"app": "db"}}}))]
    src = WEB.addresses[0]
    assert verdict(deny, [*ENDPOINTS, twin], src, DB.addresses[0], Protocol.TCP, 1).allowed
    assert not verdict(deny, ENDPOINTS, src, DB.addresses[0], Protocol.TCP, 1).allowed


def test_rules_of_an_unlisted_direction_are_ignored_by_the_verdict() -> None:
    """A Policy built by hand (parse_policy refuses this) with egress rules
    but no Egress type: Kubernetes ignores them."""
    policy = Policy(
        name="odd",
        selector=LabelSelector(),
        types=frozenset({Direction.INGRESS}),
        ingress=(Rule(),),
        egress=(Rule(peers=(IpBlock(IPv4Network("192.0.2.0/24")),)),),
    )
    result = verdict([policy], ENDPOINTS, WEB.addresses[0], OUTSIDE, Protocol.TCP, 1)
    assert result.allowed and not result.egress.isolated
    deny_egress = Policy("deny", LabelSelector(), frozenset({Direction.EGRESS}))
    assert not verdict([deny_egress], ENDPOINTS, WEB.addresses[0], OUTSIDE, Protocol.TCP, 1).allowed


def test_checker_scales_to_ten_thousand_endpoints() -> None:
    """`policy check` over 10,000 endpoints and 500 policies: indexing once
    and judging a packet are both quick (generous bounds: a shared CPU)."""
    endpoints = [
        endpoint(f"e{i}", [f"10.{i // 65536 + 1}.{i // 256 % 256}.{i % 256}"], app=f"a{i % 500}")
        for i in range(10_000)
    ]
    policies = [
        Policy(
            f"p{i}",
            LabelSelector((("app", f"a{i}"),)),
            frozenset({Direction.INGRESS, Direction.EGRESS}),
            ingress=(
                Rule(
                    (SelectorPeer(LabelSelector((("app", f"a{(i + 1) % 500}"),))),),
                    (PortRange(Protocol.TCP, 80, 80),),
                ),
            ),
            egress=(Rule(),),
        )
        for i in range(500)
    ]
    started = time.perf_counter()
    checker = PolicyChecker(policies, endpoints)
    allowed = checker.verdict(
        endpoints[1].addresses[0], endpoints[0].addresses[0], Protocol.TCP, 80
    )
    denied = checker.verdict(endpoints[2].addresses[0], endpoints[0].addresses[0], Protocol.TCP, 80)
    elapsed = time.perf_counter() - started
    assert allowed.allowed and allowed.ingress.allowed_by == ("p0",)
    assert not denied.allowed and denied.ingress.selected_by == ("p0",)
    assert elapsed < 2.0, elapsed


# --- refusals --------------------------------------------------------------------

BASE = {"name": "p", "selector": {}}


def with_ingress(*rules: Doc) -> Doc:
    return {**BASE, "ingress": list(rules)}


def port(**entry: Any) -> Doc:
    return with_ingress({"ports": [{"port": 80}, {"port": 81}, entry]})


BAD: list[tuple[str, object, str, str]] = [
    # (id, document, the field path the message starts with, a word of the reason)
    ("not-object", "[1, 2]", "document", "not a list"),
    ("yaml-syntax", "name: p\nselector: {\n", "document", "not valid YAML"),
    ("json-syntax", '{"name": "p", "selector": {}', "document", "not valid JSON"),
    ("duplicate-key", '{"name": "p", "name": "q", "selector": {}}', "document", "twice"),
    (
        "yaml-alias",
        "name: p\nselector: &s {}\ningress: [{from: [{selector: *s}]}]",
        "document",
        "aliases",
    ),
    ("too-big", "#" * (MAX_POLICY_BYTES + 1), "document", "larger"),
    ("unknown-top", {**BASE, "ingres": []}, "ingres", "unknown field"),
    ("unknown-rule", with_ingress({"form": []}), "ingress[0].form", "unknown field"),
    ("to-in-ingress", with_ingress({"to": []}), "ingress[0].to", "name their peers in from"),
    ("unknown-port-field", port(prot="TCP"), "ingress[0].ports[2].prot", "unknown field"),
    ("no-name", {"selector": {}}, "name", "required"),
    ("bad-name", {**BASE, "name": "Web_1"}, "name", "DNS-1123"),
    ("no-selector", {"name": "p"}, "selector", "required"),
    (
        "end-port-range",
        port(port=80, endPort=70000),
        "ingress[0].ports[2].endPort",
        "70000 is not a port (1-65535)",
    ),
    (
        "end-port-below",
        port(port=80, endPort=79),
        "ingress[0].ports[2].endPort",
        "less than port 80",
    ),
    ("end-port-alone", port(endPort=90), "ingress[0].ports[2].endPort", "needs port"),
    ("port-zero", port(port=0), "ingress[0].ports[2].port", "not a port"),
    ("named-port", port(port="http"), "ingress[0].ports[2].port", "named ports"),
    ("quoted-port", port(port="80"), "ingress[0].ports[2].port", "without quotes"),
    ("bool-port", port(port=True), "ingress[0].ports[2].port", "boolean"),
    ("protocol", port(protocol="ICMP"), "ingress[0].ports[2].protocol", "TCP, UDP or SCTP"),
    ("protocol-case", port(protocol="tcp"), "ingress[0].ports[2].protocol", "TCP, UDP or SCTP"),
    (
        "host-bits",
        with_ingress({"from": [{"ipBlock": {"cidr": "10.1.2.3/16"}}]}),
        "ingress[0].from[0].ipBlock.cidr",
        "the network is 10.1.0.0/16",
    ),
    (
        "bare-address",
        with_ingress({"from": [{"ipBlock": {"cidr": "10.1.2.3"}}]}),
        "ingress[0].from[0].ipBlock.cidr",
        "not a CIDR",
    ),
    (
        "except-outside",
        with_ingress({"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}),
        "ingress[0].from[0].ipBlock.except[0]",
        "strict subnet",
    ),
    (
        "except-equal",
        with_ingress({"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}]}),
        "ingress[0].from[0].ipBlock.except[0]",
        "strict subnet",
    ),
    (
        "except-family",
        with_ingress({"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["fd00::/8"]}}]}),
        "ingress[0].from[0].ipBlock.except[0]",
        "IPv6",
    ),
    (
        "peer-both",
        with_ingress({"from": [{"selector": {}, "ipBlock": {"cidr": "10.0.0.0/8"}}]}),
        "ingress[0].from[0]",
        "exclude each other",
    ),
    ("peer-empty", with_ingress({"from": [{}]}), "ingress[0].from[0]", "needs selector or ipBlock"),
    (
        "label-key",
        {**BASE, "selector": {"matchLabels": {"a b": "x"}}},
        "selector.matchLabels",
        "label key",
    ),
    (
        "label-value",
        {**BASE, "selector": {"matchLabels": {"app": "x y"}}},
        "selector.matchLabels",
        "label value",
    ),
    (
        "label-unicode",
        {**BASE, "selector": {"matchLabels": {"app": "caf\u00e9"}}},
        "selector.matchLabels",
        "\\u00e9",
    ),
    (
        "label-long",
        {**BASE, "selector": {"matchLabels": {"app": "x" * 64}}},
        "selector.matchLabels",
        "63",
    ),
    (
        "yaml-bool-label",
        "name: p\nselector: {matchLabels: {enabled: yes}}",
        "selector.matchLabels",
        "quote it",
    ),
    (
        "in-without-values",
        {**BASE, "selector": {"matchExpressions": [{"key": "app", "operator": "In"}]}},
        "selector.matchExpressions[0].values",
        "at least one",
    ),
    (
        "exists-with-values",
        {
            **BASE,
            "selector": {
                "matchExpressions": [{"key": "app", "operator": "Exists", "values": ["a"]}]
            },
        },
        "selector.matchExpressions[0].values",
        "takes no values",
    ),
    (
        "operator",
        {
            **BASE,
            "selector": {"matchExpressions": [{"key": "app", "operator": "Gt", "values": ["1"]}]},
        },
        "selector.matchExpressions[0].operator",
        "In, NotIn",
    ),
    ("types-unknown", {**BASE, "policyTypes": ["ingress"]}, "policyTypes[0]", "Ingress or Egress"),
    (
        "rules-outside-types",
        {**BASE, "policyTypes": ["Ingress"], "egress": [{}]},
        "egress",
        "policyTypes does not include Egress",
    ),
    ("too-many-rules", with_ingress(*[{}] * 101), "ingress", "limit of 100"),
    (
        "too-many-ports",
        with_ingress({"ports": [{"port": 1}] * 10_001}),
        "ingress[0].ports",
        "limit of 10000",
    ),
    ("name-mismatch", k8s("a", {"podSelector": {}}), "metadata.name", "applied as"),
    (
        "namespace-selector",
        k8s("a", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
        "spec.ingress[0].from[0].namespaceSelector",
        "no namespaces",
    ),
    (
        "namespace-and-pod",
        k8s(
            "a",
            {
                "podSelector": {},
                "ingress": [
                    {
                        "from": [
                            {"podSelector": {}, "namespaceSelector": {"matchLabels": {"x": "y"}}}
                        ]
                    }
                ],
            },
        ),
        "spec.ingress[0].from[0].namespaceSelector",
        "no namespaces",
    ),
    (
        "namespace",
        {**k8s("a", {"podSelector": {}}), "metadata": {"name": "a", "namespace": "default"}},
        "metadata.namespace",
        "k8s.pod.namespace",
    ),
    ("kind", {**k8s("a", {"podSelector": {}}), "kind": "Pod"}, "kind", "not NetworkPolicy"),
    (
        "api-version",
        {**k8s("a", {"podSelector": {}}), "apiVersion": "extensions/v1beta1"},
        "apiVersion",
        "networking.k8s.io/v1",
    ),
    ("k8s-selector", k8s("a", {"ingress": []}), "spec.podSelector", "required"),
    ("k8s-unknown-spec", k8s("a", {"podSelector": {}, "egres": []}), "spec.egres", "unknown field"),
]


@pytest.mark.parametrize(
    ("document", "path", "reason"),
    [pytest.param(doc, path, reason, id=name) for name, doc, path, reason in BAD],
)
def test_bad_documents_are_refused_with_the_field_named(
    document: object, path: str, reason: str
) -> None:
    text = document if isinstance(document, str) else json.dumps(document)
    name = "b" if path == "metadata.name" else None
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, name=name)
    assert str(caught.value).startswith(f"{path}: "), str(caught.value)
    assert caught.value.field == path
    assert reason in str(caught.value), str(caught.value)


def test_accepted_edge_documents() -> None:
    """The positive controls of the table above."""
    everything = parse_policy(
        with_ingress(
            {
                "from": [
                    {
                        "ipBlock": {
                            "cidr": "0.0.0.0/0",
                            "except": ["10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16"],
                        }
                    }
                ]
            }
        )
    )
    block = everything.ingress[0].peers[0] if everything.ingress[0].peers else None
    assert isinstance(block, IpBlock) and len(block.excepts) == 3
    assert block.contains(a("8.8.8.8")) and not block.contains(a("10.1.2.3"))
    # matches the name given, with or without the document's own
    assert parse_policy(k8s("a", {"podSelector": {}}), name="a").name == "a"
    assert parse_policy({"selector": {}}, name="given").name == "given"
    # odd but valid label characters
    odd = parse_policy(
        {**BASE, "selector": {"matchLabels": {"example.com/a_b.c-d": "X.y_z-0", "e": ""}}}
    )
    assert odd.selector.match_labels == (("e", ""), ("example.com/a_b.c-d", "X.y_z-0"))
    # kubectl's informational metadata is ignored; a null rule list is absent
    listed = k8s("a", {"podSelector": {}, "egress": None})
    listed["metadata"] = {"name": "a", "uid": "x", "labels": {"a": "b"}, "resourceVersion": "1"}
    assert parse_policy(listed).types == frozenset({Direction.INGRESS})
    # bytes, a BOM and YAML comments
    assert parse_policy(b"\xef\xbb\xbfname: p  # comment\nselector: {}\n").name == "p"


def test_ten_thousand_ports_parse_quickly() -> None:
    ports = [
        {"protocol": "UDP" if i % 2 else "TCP", "port": i + 1, "endPort": i + 2}
        for i in range(10_000)
    ]
    text = json.dumps(with_ingress({"ports": ports}))
    started = time.perf_counter()
    policy = parse_policy(text)
    rendered = render_policy(policy)
    again = parse_policy(rendered)
    elapsed = time.perf_counter() - started
    assert again == policy and policy.ingress[0].ports is not None
    assert len(policy.ingress[0].ports) == 10_000
    assert elapsed < 2.0, elapsed  # about 0.1 s on the development machine
    result = verdict([policy], [DB], OUTSIDE, DB.addresses[0], Protocol.UDP, 9_999)
    assert (
        result.allowed
        and not verdict([policy], [DB], OUTSIDE, DB.addresses[0], Protocol.SCTP, 9_999).allowed
    )


def test_render_refuses_an_oversized_canonical_form() -> None:
    ports = tuple(PortRange(Protocol.UDP, 1, 2) for _ in range(30_000))
    rule = Rule(ports=ports)
    huge = Policy("huge", LabelSelector(), frozenset({Direction.INGRESS}), ingress=(rule,))
    with pytest.raises(PolicyError, match=r"^document: its canonical form"):
        render_policy(huge)
    render_policy(
        Policy(
            "fine",
            LabelSelector(),
            frozenset({Direction.INGRESS}),
            ingress=(Rule(ports=ports[:100]),),
        )
    )


def test_defaults_follow_kubernetes() -> None:
    egress_only_rules = parse_policy({**BASE, "egress": [{}]})
    assert egress_only_rules.types == frozenset({Direction.INGRESS, Direction.EGRESS})
    assert egress_only_rules.ingress == () and egress_only_rules.egress == (Rule(None, None),)
    empty_egress = parse_policy({**BASE, "egress": []})
    assert empty_egress.types == frozenset({Direction.INGRESS})
    rule = parse_policy(with_ingress({"from": [], "ports": []})).ingress[0]
    assert rule == Rule(None, None)
    tcp = parse_policy(with_ingress({"ports": [{"port": 80}, {}]})).ingress[0].ports
    assert tcp == (PortRange(Protocol.TCP, 80, 80), PortRange(Protocol.TCP))
    selector = parse_policy(
        {
            **BASE,
            "selector": {
                "matchExpressions": [
                    {"key": "b", "operator": "Exists"},
                    {"key": "a", "operator": "NotIn", "values": ["y", "x", "y"]},
                ]
            },
        }
    ).selector
    assert selector.match_expressions == (
        Requirement("a", Operator.NOT_IN, frozenset({"x", "y"})),
        Requirement("b", Operator.EXISTS),
    )


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("app", True),
        ("a", True),
        ("example.com/app", True),
        ("k8s.pod.namespace", True),
        ("A-b_c.D", True),
        ("x" * 63, True),
        ("x" * 64, False),
        ("", False),
        ("-app", False),
        ("app-", False),
        ("a/b/c", False),
        ("/app", False),
        ("Example.com/app", False),
        ("example.com/", False),
        ("ex_ample.com/app", False),
        ("app\n", False),
        ("ap p", False),
        ("\u0430pp", False),  # a Cyrillic a
    ],
)
def test_label_keys(key: str, ok: bool) -> None:
    assert (label_key_problem(key) is None) is ok
    assert (label_value_problem(key) is None) is ((ok and "/" not in key) or key == "")


def test_keys() -> None:
    assert policies_prefix("/overlayd/") == "/overlayd/policies/"
    assert policy_key("/overlayd", "web") == "/overlayd/policies/web"
    assert parse_policy_key("/overlayd/policies/web", "/overlayd") == "web"
    for bad in ("/overlayd/policies/Web", "/overlayd/endpoints/web", "/overlayd/policies/a/b"):
        with pytest.raises(PolicyError, match=r"^key: "):
            parse_policy_key(bad, "/overlayd")
