"""Service definitions: both shapes read to the same value, every refusal
names the field at fault, the canonical form reads back to the same
service, and every host picks the same stored services (bad values and
second claimants of a VIP or node port skipped, by name order)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlayd.errors import ServiceError
from overlayd.model import IPNetwork
from overlayd.plan.policy_model import LabelSelector, Operator, Protocol, Requirement
from overlayd.plan.service import (
    claim_keys,
    node_port_key,
    parse_service,
    parse_service_key,
    render_service,
    route_clashes,
    service_key,
    stored_services,
    vip_key,
    vip_problem,
)
from overlayd.plan.service_model import (
    AFFINITY_SECONDS_DEFAULT,
    Affinity,
    Service,
    ServicePort,
    TrafficPolicy,
)

NETS: tuple[IPNetwork, ...] = (ip_network("10.96.0.0/16"), ip_network("fd00:96::/112"))
OWN = "/overlayd"

OURS: dict[str, Any] = {
    "name": "web",
    "selector": {"matchLabels": {"app": "web"}},
    "ports": [
        {"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
        {"name": "dns", "protocol": "UDP", "port": 53, "nodePort": 30053},
    ],
    "sessionAffinity": "ClientIP",
    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
    "externalTrafficPolicy": "Local",
    "vip": "10.96.0.10",
}

KUBERNETES = """
apiVersion: v1
kind: Service
metadata:
  name: web
  uid: 5a1b
  labels: {team: a}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}
  - {name: dns, port: 53, protocol: UDP, nodePort: 30053}
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ipFamilies: [IPv4]
  ipFamilyPolicy: SingleStack
  internalTrafficPolicy: Cluster
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  externalTrafficPolicy: Local
status: {loadBalancer: {}}
"""

WEB = Service(
    name="web",
    selector=LabelSelector((("app", "web"),)),
    ports=(
        ServicePort("http", Protocol.TCP, 80, 8080, 30080),
        ServicePort("dns", Protocol.UDP, 53, 53, 30053),
    ),
    vips=(IPv4Address("10.96.0.10"),),
    affinity=Affinity.CLIENT_IP,
    affinity_seconds=600,
    traffic_policy=TrafficPolicy.LOCAL,
)


def parse(document: Any, **kwargs: Any) -> Service:
    return parse_service(document, service_networks=NETS, **kwargs)


def test_both_shapes_and_their_text_read_to_the_same_service() -> None:
    assert parse(OURS) == WEB
    assert parse(json.dumps(OURS)) == WEB
    assert parse(KUBERNETES) == WEB
    assert parse(KUBERNETES.encode()) == WEB


def test_defaults_are_kubernetes_ones() -> None:
    service = parse({"name": "a", "selector": {"matchLabels": {"x": "y"}}, "ports": [{"port": 9}]})
    assert service.ports == (ServicePort("", Protocol.TCP, 9, 9, None),)
    assert service.vips == ()  # allocated at creation
    assert service.affinity is Affinity.NONE
    assert service.affinity_seconds == AFFINITY_SECONDS_DEFAULT
    assert service.traffic_policy is TrafficPolicy.CLUSTER


def test_match_expressions_select_in_our_shape() -> None:
    document = OURS | {
        "selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "b"]}]}
    }
    selector = parse(document).selector
    assert selector.match_expressions == (Requirement("app", Operator.IN, frozenset({"a", "b"})),)


def test_dual_stack_vips_from_both_shapes() -> None:
    ours = parse(OURS | {"vip": None, "vips": ["fd00:96::a", "10.96.0.10"]})
    assert ours.vips == (IPv4Address("10.96.0.10"), IPv6Address("fd00:96::a"))
    kubernetes = parse(KUBERNETES.replace("[10.96.0.10]", "[10.96.0.10, 'fd00:96::a']"))
    assert kubernetes.vips == ours.vips
    assert ours.vip(6) == IPv6Address("fd00:96::a")


def without(document: dict[str, Any], *path: str | int) -> dict[str, Any]:
    found = copy.deepcopy(document)
    target: Any = found
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    return found


def with_(document: dict[str, Any], value: Any, *path: str | int) -> dict[str, Any]:
    found = copy.deepcopy(document)
    target: Any = found
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return found


def port0(**fields: Any) -> dict[str, Any]:
    return with_(OURS, OURS["ports"][0] | fields, "ports", 0)


# (the document, the field named, words of the reason)
REFUSALS: list[tuple[str, Callable[[], Any], str, str]] = [
    ("no-name", lambda: without(OURS, "name"), "name", "required"),
    ("bad-name", lambda: with_(OURS, "Web", "name"), "name", "DNS-1123"),
    ("digit-name", lambda: with_(OURS, "9web", "name"), "name", "start with a letter"),
    ("no-selector", lambda: without(OURS, "selector"), "selector", "required"),
    ("empty-selector", lambda: with_(OURS, {}, "selector"), "selector", "selects nothing"),
    (
        "bad-label",
        lambda: with_(OURS, {"matchLabels": {"app": "a b"}}, "selector"),
        "selector.matchLabels",
        "label value",
    ),
    ("unknown-field", lambda: with_(OURS, 1, "clusterIP"), "clusterIP", "unknown field"),
    ("no-ports", lambda: without(OURS, "ports"), "ports", "at least one"),
    ("empty-ports", lambda: with_(OURS, [], "ports"), "ports", "at least one"),
    ("too-many-ports", lambda: with_(OURS, [{"port": 1}] * 101, "ports"), "ports", "limit"),
    ("bad-port-name", lambda: port0(name="HTTP"), "ports[0].name", "DNS-1123"),
    (
        "same-port-name",
        lambda: with_(OURS, "http", "ports", 1, "name"),
        "ports[1].name",
        "also ports[0]",
    ),
    ("unnamed-of-two", lambda: without(OURS, "ports", 1, "name"), "ports[1].name", "more than one"),
    ("bad-protocol", lambda: port0(protocol="ICMP"), "ports[0].protocol", "not TCP, UDP or SCTP"),
    ("no-port", lambda: without(OURS, "ports", 0, "port"), "ports[0].port", "required"),
    ("port-zero", lambda: port0(port=0), "ports[0].port", "1-65535"),
    ("port-text", lambda: port0(port="80"), "ports[0].port", "without quotes"),
    ("target-big", lambda: port0(targetPort=70000), "ports[0].targetPort", "1-65535"),
    ("target-named", lambda: port0(targetPort="http"), "ports[0].targetPort", "named ports"),
    ("node-port-low", lambda: port0(nodePort=8080), "ports[0].nodePort", "30000-32767"),
    ("node-port-high", lambda: port0(nodePort=32768), "ports[0].nodePort", "30000-32767"),
    ("node-port-text", lambda: port0(nodePort="30080"), "ports[0].nodePort", "not a port"),
    ("unknown-port-field", lambda: port0(hostPort=1), "ports[0].hostPort", "unknown field"),
    (
        "duplicate-port",
        lambda: with_(OURS, [OURS["ports"][0], {"name": "b", "port": 80}], "ports"),
        "ports[1].port",
        "80/TCP is also ports[0]",
    ),
    (
        "duplicate-node-port",
        lambda: with_(
            OURS, [OURS["ports"][0], {"name": "b", "port": 81, "nodePort": 30080}], "ports"
        ),
        "ports[1].nodePort",
        "30080/TCP is also ports[0]'s nodePort",
    ),
    ("affinity", lambda: with_(OURS, "Cookie", "sessionAffinity"), "sessionAffinity", "ClientIP"),
    (
        "affinity-config-without",
        lambda: with_(OURS, "None", "sessionAffinity"),
        "sessionAffinityConfig",
        "only with sessionAffinity ClientIP",
    ),
    (
        "timeout-zero",
        lambda: with_(OURS, 0, "sessionAffinityConfig", "clientIP", "timeoutSeconds"),
        "sessionAffinityConfig.clientIP.timeoutSeconds",
        "between 1 and 86400",
    ),
    (
        "timeout-day-and-one",
        lambda: with_(OURS, 86401, "sessionAffinityConfig", "clientIP", "timeoutSeconds"),
        "sessionAffinityConfig.clientIP.timeoutSeconds",
        "between 1 and 86400",
    ),
    (
        "traffic-policy",
        lambda: with_(OURS, "Nearest", "externalTrafficPolicy"),
        "externalTrafficPolicy",
        "Cluster or Local",
    ),
    (
        "local-without-node-ports",
        lambda: with_(
            OURS,
            [{"name": "http", "port": 80}, {"name": "dns", "protocol": "UDP", "port": 53}],
            "ports",
        ),
        "externalTrafficPolicy",
        "no port has a nodePort",
    ),
    ("vip-outside", lambda: with_(OURS, "10.97.0.1", "vip"), "vip", "outside the service network"),
    ("vip-network", lambda: with_(OURS, "10.96.0.0", "vip"), "vip", "first address"),
    ("vip-broadcast", lambda: with_(OURS, "10.96.255.255", "vip"), "vip", "last address"),
    ("vip-text", lambda: with_(OURS, "ten", "vip"), "vip", "not an IP address"),
    ("vip-number", lambda: with_(OURS, 10, "vip"), "vip", "not an address string"),
    (
        "two-v4-vips",
        lambda: with_(without(OURS, "vip"), ["10.96.0.1", "10.96.0.2"], "vips"),
        "vips[1]",
        "a second IPv4 VIP",
    ),
    (
        "vip-and-vips",
        lambda: with_(OURS, ["10.96.0.10"], "vips"),
        "vips",
        "exclude each other",
    ),
]


@pytest.mark.parametrize(
    ("make", "field", "words"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_bad_definitions_are_refused_naming_the_field(
    make: Callable[[], Any], field: str, words: str
) -> None:
    assert parse(OURS) == WEB  # positive control: the document it was made from
    with pytest.raises(ServiceError) as caught:
        parse(make())
    assert caught.value.field == field, str(caught.value)
    assert words in caught.value.reason, str(caught.value)
    assert str(caught.value).startswith(field)


KUBERNETES_REFUSALS: list[tuple[str, str, str, str]] = [
    ("kind: Service", "kind: Pod", "kind", "not Service"),
    ("apiVersion: v1", "apiVersion: v2", "apiVersion", "not supported"),
    ("type: NodePort", "type: LoadBalancer", "spec.type", "ClusterIP or NodePort"),
    ("  name: web\n", "  name: web\n  namespace: prod\n", "metadata.namespace", "no namespaces"),
    ("selector: {app: web}", "selector: {matchLabels: {app: web}}", "spec.selector", "plain map"),
    ("selector: {app: web}", "selector: {}", "spec.selector", "selects nothing"),
    ("clusterIP: 10.96.0.10", "clusterIP: None", "spec.clusterIP", "headless"),
    ("clusterIPs: [10.96.0.10]", "clusterIPs: [10.96.0.11]", "spec.clusterIPs[0]", "must be"),
    ("ipFamilies: [IPv4]", "ipFamilies: [IPv5]", "spec.ipFamilies[0]", "IPv4 or IPv6"),
    ("internalTrafficPolicy: Cluster", "internalTrafficPolicy: Local", "spec.internal", "Cluster"),
    (
        "nodePort: 30053}",
        "nodePort: 30053, targetPort: dns}",
        "spec.ports[1].targetPort",
        "named ports",
    ),
    ("type: NodePort", "type: ClusterIP", "spec.ports[0].nodePort", "needs spec.type NodePort"),
    (
        "nodePort: 30053}",
        "nodePort: 0}",
        "spec.ports[1].nodePort",
        "required with type NodePort",
    ),
    (
        "clusterIP: 10.96.0.10",
        "clusterIP: 10.96.0.10\n  clusterIP: 10.96.0.11",
        "document",
        "twice",
    ),
    ("labels: {team: a}", "labels: &x {team: a}\n  annotations: *x", "document", "aliases"),
]


@pytest.mark.parametrize(
    ("old", "new", "field", "words"),
    [r for r in KUBERNETES_REFUSALS],
    ids=[r[1] for r in KUBERNETES_REFUSALS],
)
def test_bad_kubernetes_services_are_refused_naming_the_field(
    old: str, new: str, field: str, words: str
) -> None:
    assert parse(KUBERNETES) == WEB
    assert old in KUBERNETES
    with pytest.raises(ServiceError) as caught:
        parse(KUBERNETES.replace(old, new, 1))
    assert caught.value.field.startswith(field), str(caught.value)
    assert words in caught.value.reason, str(caught.value)


def test_without_a_service_network_every_service_is_refused_naming_it() -> None:
    assert parse(OURS) == WEB
    with pytest.raises(ServiceError) as caught:
        parse_service(OURS, service_networks=())
    assert caught.value.field == "ServiceNetwork"
    assert "the network config has no ServiceNetwork" in str(caught.value)
    # An IPv6 VIP without an IPv6 service network names that field.
    with pytest.raises(ServiceError) as caught:
        parse_service(OURS | {"vip": "fd00:96::a"}, service_networks=NETS[:1])
    assert caught.value.field == "vip" and "IPv6ServiceNetwork" in caught.value.reason


def test_a_name_given_must_match_the_documents() -> None:
    assert parse(OURS, name="web") == WEB
    assert parse(without(OURS, "name"), name="web") == WEB
    with pytest.raises(ServiceError) as caught:
        parse(OURS, name="api")
    assert caught.value.field == "name" and "stored as" in caught.value.reason


def test_vip_problem_accepts_inner_addresses_only() -> None:
    net = ip_network("10.96.0.0/28")
    assert vip_problem(ip_address("10.96.0.1"), [net]) is None
    assert vip_problem(ip_address("10.96.0.14"), [net]) is None
    assert "first" in (vip_problem(ip_address("10.96.0.0"), [net]) or "")
    assert "last" in (vip_problem(ip_address("10.96.0.15"), [net]) or "")
    assert "outside" in (vip_problem(ip_address("10.96.0.16"), [net]) or "")


# --- the canonical form reads back -------------------------------------------------

LABEL = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)


@st.composite
def services(draw: st.DrawFn) -> Service:
    count = draw(st.integers(1, 5))
    numbers = draw(st.lists(st.integers(1, 65535), min_size=count, max_size=count, unique=True))
    node_ports = draw(
        st.lists(st.integers(30000, 32767), min_size=count, max_size=count, unique=True)
    )
    names = draw(st.lists(LABEL, min_size=count, max_size=count, unique=True))
    ports = tuple(
        ServicePort(
            names[i] if count > 1 or draw(st.booleans()) else "",
            draw(st.sampled_from(list(Protocol))),
            numbers[i],
            draw(st.integers(1, 65535)),
            node_ports[i] if draw(st.booleans()) else None,
        )
        for i in range(count)
    )
    has_node_ports = any(p.node_port is not None for p in ports)
    affinity = draw(st.sampled_from(list(Affinity)))
    vips: list[IPv4Address | IPv6Address] = []
    if draw(st.booleans()):
        vips.append(IPv4Address(int(IPv4Address("10.96.0.0")) + draw(st.integers(1, 65534))))
    if draw(st.booleans()):
        vips.append(IPv6Address(int(IPv6Address("fd00:96::")) + draw(st.integers(1, 65534))))
    labels = draw(st.dictionaries(LABEL, LABEL, min_size=1, max_size=3))
    return Service(
        name=draw(LABEL),
        selector=LabelSelector(tuple(sorted(labels.items()))),
        ports=ports,
        vips=tuple(vips),
        affinity=affinity,
        affinity_seconds=draw(st.integers(1, 86400))
        if affinity is Affinity.CLIENT_IP
        else AFFINITY_SECONDS_DEFAULT,
        traffic_policy=draw(st.sampled_from(list(TrafficPolicy)))
        if has_node_ports
        else TrafficPolicy.CLUSTER,
    )


@given(services())
def test_render_parses_back_to_the_same_service(service: Service) -> None:
    text = render_service(service)
    assert parse(text) == service
    assert render_service(parse(text)) == text


# --- keys ---------------------------------------------------------------------------


def test_keys_name_the_service_and_its_claims() -> None:
    assert service_key(OWN, "web") == "/overlayd/services/web"
    assert parse_service_key("/overlayd/services/web", OWN + "/") == "web"
    assert vip_key(OWN, ip_address("fd00:96::a")) == "/overlayd/vips/fd00:96::a"
    assert node_port_key(OWN, Protocol.UDP, 30053) == "/overlayd/nodeports/udp/30053"
    assert claim_keys(OWN, WEB) == [
        "/overlayd/vips/10.96.0.10",
        "/overlayd/nodeports/tcp/30080",
        "/overlayd/nodeports/udp/30053",
    ]
    for bad in ("/overlayd/services/Web", "/overlayd/services/a/b", "/other/services/web"):
        with pytest.raises(ServiceError):
            parse_service_key(bad, OWN)


# --- stored services ----------------------------------------------------------------


def stored(name: str, vip: str, node_port: int | None = None, port: int = 80) -> bytes:
    entry: dict[str, Any] = {"port": port}
    if node_port is not None:
        entry["nodePort"] = node_port
    return json.dumps(
        {"name": name, "selector": {"matchLabels": {"app": name}}, "ports": [entry], "vips": [vip]}
    ).encode()


def test_stored_services_skip_bad_values_each_with_a_reason() -> None:
    items = {
        service_key(OWN, "a"): stored("a", "10.96.0.1"),
        service_key(OWN, "b"): b"{not json",
        service_key(OWN, "c"): stored("c", "10.97.0.1"),  # outside the service network
        service_key(OWN, "d"): stored("e", "10.96.0.4"),  # the key names another service
        service_key(OWN, "f"): json.dumps(
            {"name": "f", "selector": {"matchLabels": {"a": "b"}}, "ports": [{"port": 1}]}
        ).encode(),  # no VIP
        service_key(OWN, "Bad"): stored("a", "10.96.0.5"),
        "/overlayd/vips/10.96.0.1": b"a",  # not a service key: ignored
    }
    found = stored_services(items, OWN, NETS)
    assert list(found.services) == ["a"]  # positive control
    assert set(found.rejected) == {service_key(OWN, n) for n in ("b", "c", "d", "f", "Bad")}
    assert "not valid" in found.rejected[service_key(OWN, "b")]
    assert "outside the service network" in found.rejected[service_key(OWN, "c")]
    assert "stored as" in found.rejected[service_key(OWN, "d")]
    assert "vips" in found.rejected[service_key(OWN, "f")]


def test_a_family_without_a_service_network_leaves_out_its_vips_not_the_services() -> None:
    """A dual-stack service stored while the config had IPv6ServiceNetwork
    keeps serving its IPv4 VIP once the config has none (IPv6 switched off):
    only the IPv6 VIP is left out, with a note, and it serves again once the
    network is back. A service with nothing left to serve is refused."""
    dual = json.loads(stored("web", "10.96.0.1"))
    dual["vips"] = ["10.96.0.1", "fd00:96::1"]
    items = {
        service_key(OWN, "web"): json.dumps(dual).encode(),
        service_key(OWN, "six"): stored("six", "fd00:96::2"),
        service_key(OWN, "four"): stored("four", "10.96.0.3"),
    }
    both = stored_services(items, OWN, NETS)  # the control: everything served
    assert both.services["web"].vips == (IPv4Address("10.96.0.1"), IPv6Address("fd00:96::1"))
    assert set(both.services) == {"web", "six", "four"} and not both.rejected
    assert not both.unserved
    ipv4_only = stored_services(items, OWN, NETS[:1])
    assert set(ipv4_only.services) == {"web", "four"}
    assert ipv4_only.services["web"].vips == (IPv4Address("10.96.0.1"),)
    assert ipv4_only.unserved == {
        service_key(OWN, "web"): "fd00:96::1 is IPv6, and the network config"
        " has no IPv6ServiceNetwork"
    }
    assert "has no IPv6ServiceNetwork" in ipv4_only.rejected[service_key(OWN, "six")]
    # A VIP of a served family is still checked against its network.
    outside = json.loads(stored("out", "10.97.0.1"))
    outside["vips"] = ["10.97.0.1", "fd00:96::5"]
    value = json.dumps(outside).encode()
    refused = stored_services({service_key(OWN, "out"): value}, OWN, NETS[:1])
    assert "outside the service network" in refused.rejected[service_key(OWN, "out")]


def test_a_second_claimant_of_a_vip_or_node_port_is_skipped_by_name_order() -> None:
    items = {
        service_key(OWN, "zeta"): stored("zeta", "10.96.0.1"),  # a's VIP
        service_key(OWN, "b"): stored("b", "10.96.0.2", 30001),
        service_key(OWN, "c"): stored("c", "10.96.0.3", 30001),  # b's node port
        service_key(OWN, "d"): stored("d", "10.96.0.4", 30002),
        service_key(OWN, "a"): stored("a", "10.96.0.1"),
    }
    found = stored_services(items, OWN, NETS)
    assert list(found.services) == ["a", "b", "d"]
    assert "VIP 10.96.0.1 is a's" in found.rejected[service_key(OWN, "zeta")]
    assert "nodePort 30001/TCP is b's" in found.rejected[service_key(OWN, "c")]
    # Every host, whatever order it learnt the keys in, keeps the same ones.
    again = stored_services(dict(reversed(list(items.items()))), OWN, NETS)
    assert again == found


def test_the_cache_parses_an_unchanged_value_once_and_forgets_deleted_keys() -> None:
    cache: dict[str, Any] = {}
    items = {service_key(OWN, "a"): stored("a", "10.96.0.1")}
    first = stored_services(items, OWN, NETS, cache)
    assert stored_services(items, OWN, NETS, cache) == first
    assert cache[service_key(OWN, "a")][1].service is first.services["a"]
    changed = {service_key(OWN, "a"): stored("a", "10.96.0.9")}
    assert stored_services(changed, OWN, NETS, cache).services["a"].vips == (
        IPv4Address("10.96.0.9"),
    )
    assert stored_services({}, OWN, NETS, cache).services == {} and cache == {}


def test_route_clashes_names_each_overlapping_route_and_ignores_default_routes() -> None:
    services: list[IPNetwork] = [IPv4Network("10.96.0.0/16"), IPv6Network("fd00:96::/108")]
    routes: list[IPNetwork] = [
        IPv4Network("0.0.0.0/0"),
        IPv4Network("10.96.5.0/24"),
        IPv4Network("10.97.0.0/16"),
        IPv6Network("::/0"),
        IPv6Network("fd00::/8"),
    ]
    assert route_clashes(services, routes) == [
        (IPv4Network("10.96.0.0/16"), IPv4Network("10.96.5.0/24")),
        (IPv6Network("fd00:96::/108"), IPv6Network("fd00::/8")),
    ]
    assert route_clashes(services, [IPv4Network("192.0.2.0/24")]) == []
