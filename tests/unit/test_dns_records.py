"""DNS records are a pure projection of services, backends and endpoints:
every service and container name with a valid label resolves under the
domain, in any case; VIPs and endpoint addresses map back by PTR; names
that are not DNS labels get nothing while the rest still resolve."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import ip_address, ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlayd.model import IPAddress, IPNetwork
from overlayd.plan.dns_records import (
    DEFAULT_DOMAIN,
    EMPTY,
    DnsRecords,
    Srv,
    address_of_reverse_name,
    build_records,
    reverse_name,
    validate_domain,
)
from overlayd.plan.policy_model import Endpoint, LabelSelector, Protocol
from overlayd.plan.service_model import Service, ServicePort, backends_by_service


def endpoint(name: str, *addresses: str, app: str = "web", host: str = "h1") -> Endpoint:
    return Endpoint(
        key=f"/overlayd/endpoints/{host}/{name}-{addresses[0]}",
        id=f"{name}-{addresses[0]}",
        host=host,
        name=name,
        addresses=tuple(ip_address(a) for a in addresses),
        labels={"app": app},
    )


def service(name: str, *vips: str, app: str = "web", ports: Sequence[ServicePort] = ()) -> Service:
    return Service(
        name=name,
        selector=LabelSelector(match_labels=(("app", app),)),
        ports=tuple(ports) or (ServicePort("http", Protocol.TCP, 80, 8080),),
        vips=tuple(ip_address(v) for v in vips),
    )


def build(
    services: Sequence[Service],
    endpoints: Sequence[Endpoint],
    *,
    domain: str = DEFAULT_DOMAIN,
    reverse_zones: Sequence[IPNetwork] = (),
) -> DnsRecords:
    by_name = {s.name: s for s in services}
    return build_records(
        services,
        backends_by_service(by_name, endpoints),
        endpoints,
        domain=domain,
        reverse_zones=reverse_zones,
    )


WEB = service("web", "10.96.0.10", "fd00:96::10")
W1 = endpoint("web-1", "10.244.1.2", "fd00:244:1::2")
W2 = endpoint("web-2", "10.244.2.2", host="h2")
DB = endpoint("db", "10.244.1.3", app="db")


def addresses(records: DnsRecords, name: str) -> tuple[IPAddress, ...]:
    found = records.lookup(name)
    assert found is not None, name
    return found.addresses


def test_service_name_gives_its_vips_of_both_families() -> None:
    records = build([WEB], [W1, W2, DB])
    assert addresses(records, "web.overlay.internal") == (
        ip_address("10.96.0.10"),
        ip_address("fd00:96::10"),
    )


def test_tasks_name_gives_the_backends_addresses_only_in_backend_order() -> None:
    records = build([WEB], [W2, DB, W1])
    assert addresses(records, "tasks.web.overlay.internal") == (
        ip_address("10.244.1.2"),
        ip_address("fd00:244:1::2"),
        ip_address("10.244.2.2"),
    )


def test_tasks_name_of_a_service_without_backends_exists_without_addresses() -> None:
    records = build([service("lonely", "10.96.0.11", app="nobody")], [W1])
    assert records.lookup("tasks.lonely.overlay.internal") == EMPTY
    assert addresses(records, "lonely.overlay.internal") == (ip_address("10.96.0.11"),)


def test_container_name_gives_its_addresses() -> None:
    records = build([WEB], [W1, DB])
    assert addresses(records, "web-1.overlay.internal") == W1.addresses
    assert addresses(records, "db.overlay.internal") == (ip_address("10.244.1.3"),)


def test_srv_for_each_named_port_points_at_the_service_name() -> None:
    ports = (
        ServicePort("http", Protocol.TCP, 80, 8080),
        ServicePort("dns", Protocol.UDP, 53, 5353),
    )
    records = build([service("web", "10.96.0.10", ports=ports)], [W1])
    http = records.lookup("_http._tcp.web.overlay.internal")
    dns = records.lookup("_dns._udp.web.overlay.internal")
    assert http is not None and http.srv == (Srv(0, 100, 80, "web.overlay.internal"),)
    assert dns is not None and dns.srv == (Srv(0, 100, 53, "web.overlay.internal"),)
    # The name between the SRV owner and the service exists, empty (RFC 8020).
    assert records.lookup("_tcp.web.overlay.internal") == EMPTY
    # Positive control: a port name never given has no record.
    assert records.lookup("_grpc._tcp.web.overlay.internal") is None


def test_unnamed_port_gets_no_srv() -> None:
    records = build(
        [service("web", "10.96.0.10", ports=[ServicePort("", Protocol.TCP, 80, 80)])], []
    )
    assert not [n for n in records.names() if n.startswith("_")]
    assert records.lookup("web.overlay.internal") is not None


def test_ptr_maps_vips_to_the_service_and_endpoint_addresses_to_the_container() -> None:
    records = build([WEB], [W1])
    for address, target in [
        ("10.96.0.10", "web.overlay.internal"),
        ("fd00:96::10", "web.overlay.internal"),
        ("10.244.1.2", "web-1.overlay.internal"),
        ("fd00:244:1::2", "web-1.overlay.internal"),
    ]:
        found = records.lookup(ip_address(address).reverse_pointer)
        assert found is not None and found.ptr == (target,), address
    # Positive control: an address nobody has gets nothing.
    assert records.lookup(ip_address("10.244.1.99").reverse_pointer) is None


def test_lookup_ignores_case_and_a_trailing_dot() -> None:
    records = build([WEB], [endpoint("Web-1", "10.244.1.2")])
    assert addresses(records, "WEB.Overlay.Internal.") == WEB.vips
    assert addresses(records, "web-1.OVERLAY.internal") == (ip_address("10.244.1.2"),)
    assert addresses(records, "TASKS.web.overlay.internal") == (ip_address("10.244.1.2"),)
    ptr = records.lookup(ip_address("fd00:96::10").reverse_pointer.upper())
    assert ptr is not None and ptr.ptr == ("web.overlay.internal",)


@pytest.mark.parametrize("bad", ["my_app", "web.1", "-web", "web-", "", "a" * 64, "wéb"])
def test_names_that_are_not_dns_labels_are_skipped_and_the_rest_kept(bad: str) -> None:
    records = build([WEB], [endpoint(bad, "10.244.1.7"), W1])
    assert records.lookup(f"{bad}.overlay.internal") is None
    assert bad in records.skipped
    # Its address still resolves by nothing, the good container by its name.
    assert records.lookup(ip_address("10.244.1.7").reverse_pointer) is None
    assert addresses(records, "web-1.overlay.internal") == W1.addresses


def test_a_service_with_a_bad_name_is_skipped_and_others_kept() -> None:
    records = build([service("bad_name", "10.96.0.12"), WEB], [W1])
    assert records.lookup("bad_name.overlay.internal") is None
    assert records.lookup(ip_address("10.96.0.12").reverse_pointer) is None
    assert addresses(records, "web.overlay.internal") == WEB.vips


def test_two_endpoints_with_one_name_give_both_addresses() -> None:
    records = build([], [endpoint("api", "10.244.2.5", host="h2"), endpoint("api", "10.244.1.5")])
    assert addresses(records, "api.overlay.internal") == (
        ip_address("10.244.2.5"),
        ip_address("10.244.1.5"),
    )
    # Each address names the one container.
    found = records.lookup(ip_address("10.244.1.5").reverse_pointer)
    assert found is not None and found.ptr == ("api.overlay.internal",)


def test_a_service_keeps_its_name_over_a_container_of_the_same_name() -> None:
    records = build([WEB], [endpoint("web", "10.244.1.9")])
    assert addresses(records, "web.overlay.internal") == WEB.vips
    # The container is still named by its address.
    found = records.lookup(ip_address("10.244.1.9").reverse_pointer)
    assert found is not None and found.ptr == ("web.overlay.internal",)


def test_the_domain_is_configurable_and_names_elsewhere_are_not_ours() -> None:
    records = build([WEB], [W1], domain="Cluster.Example")
    assert addresses(records, "web.cluster.example") == WEB.vips
    assert records.lookup("web.overlay.internal") is None
    assert records.authoritative("nothing.cluster.example")
    assert records.authoritative("cluster.example")
    assert not records.authoritative("example.com")
    assert not records.authoritative("xcluster.example")


def test_reverse_zones_make_unknown_addresses_ours_and_others_not() -> None:
    records = build([WEB], [W1], reverse_zones=[ip_network("10.244.0.0/16")])
    assert records.authoritative(ip_address("10.244.9.9").reverse_pointer)
    assert not records.authoritative(ip_address("192.0.2.1").reverse_pointer)
    assert not records.authoritative("244.10.in-addr.arpa")  # partial: not ours to deny


@pytest.mark.parametrize("bad", ["", "under_score.example", "in-addr.arpa", "x" * 200])
def test_a_bad_domain_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_domain(bad)
    assert validate_domain("overlay.internal.") == DEFAULT_DOMAIN


@pytest.mark.parametrize("address", ["10.0.0.1", "0.0.0.0", "255.255.255.255", "::1", "fd00::7"])
def test_reverse_names_round_trip(address: str) -> None:
    parsed = ip_address(address)
    assert address_of_reverse_name(reverse_name(parsed)) == parsed


@pytest.mark.parametrize(
    "name", ["1.2.3.in-addr.arpa", "1.2.3.256.in-addr.arpa", "01.2.3.4.in-addr.arpa", "x.ip6.arpa"]
)
def test_malformed_reverse_names_stand_for_no_address(name: str) -> None:
    assert address_of_reverse_name(name) is None


# Any cluster: every name a record was built from resolves.

_labels = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[Service], list[Endpoint]]:
    service_names = draw(st.lists(_labels, unique=True, max_size=5))
    services = [
        service(name, f"10.96.0.{i + 1}", app=f"a{i % 3}") for i, name in enumerate(service_names)
    ]
    container_names = draw(st.lists(_labels, max_size=12))
    endpoints = [
        endpoint(
            name,
            f"10.244.{i // 200}.{i % 200 + 2}",
            f"fd00:244::{i + 2:x}",
            app=f"a{draw(st.integers(0, 3))}",
        )
        for i, name in enumerate(container_names)
    ]
    return services, endpoints


@given(clusters(), st.sampled_from(["overlay.internal", "c.example"]))
def test_any_records_answer_every_name_they_were_built_from(
    cluster: tuple[list[Service], list[Endpoint]], domain: str
) -> None:
    services, endpoints = cluster
    records = build(services, endpoints, domain=domain)
    by_name = {s.name: s for s in services}
    backends = backends_by_service(by_name, endpoints)
    for s in services:
        assert set(addresses(records, f"{s.name}.{domain}".upper())) == set(s.vips)
        tasks = {a for e in backends[s.name] for a in e.addresses}
        assert set(addresses(records, f"tasks.{s.name}.{domain}")) == tasks
        srv = records.lookup(f"_http._tcp.{s.name}.{domain}")
        assert srv is not None and srv.srv[0].target == f"{s.name}.{domain}"
        for vip in s.vips:
            found = records.lookup(reverse_name(vip))
            assert found is not None and f"{s.name}.{domain}" in found.ptr
    for e in endpoints:
        if e.name not in by_name:
            assert set(e.addresses) <= set(addresses(records, f"{e.name}.{domain}"))
        for a in e.addresses:
            found = records.lookup(reverse_name(a))
            assert found is not None and f"{e.name}.{domain}" in found.ptr
