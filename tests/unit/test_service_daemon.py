"""The daemon's side of services, with a fake data plane: which passes
write what to the services table, how one container starting costs its
services alone, how bad definitions are skipped, and what the DNS records
hear of."""

from __future__ import annotations

import logging
from dataclasses import replace
from ipaddress import IPv4Network, ip_address

import pytest

from overlayd.daemon.loop import Knowledge, Reconciler, standard_managers
from overlayd.daemon.managers import Level
from overlayd.daemon.managers.services import ServiceState
from overlayd.plan.endpoints import render_endpoint
from overlayd.plan.policy_model import Endpoint, LabelSelector, Protocol
from overlayd.plan.service import render_service, service_key
from overlayd.plan.service_model import Service, ServicePort
from overlayd.plan.service_rules import TABLE, TABLES
from overlayd.surfaces.telemetry import Telemetry
from tests.unit.test_loop import CONFIG, PEER, FakeDataplane, knowledge
from tests.unit.test_policy_daemon import OWN_PREFIX, endpoint

SERVICE_NETWORK = IPv4Network("10.96.0.0/16")
WHERE = f"inet {TABLE}"


def service(name: str, vip: str, **labels: str) -> Service:
    return Service(
        name=name,
        selector=LabelSelector(tuple(sorted(labels.items()))),
        ports=(ServicePort("http", Protocol.TCP, 80, 8080),),
        vips=(ip_address(vip),),
    )


def inputs_with(*services: Service, endpoints: tuple[Endpoint, ...] = ()) -> Knowledge:
    inputs = knowledge(PEER)
    inputs.config = replace(CONFIG, service_network=SERVICE_NETWORK)
    put(inputs, *services, endpoints=endpoints)
    return inputs


def put(inputs: Knowledge, *services: Service, endpoints: tuple[Endpoint, ...] = ()) -> None:
    inputs.raw_services = {
        service_key(OWN_PREFIX, s.name): render_service(s).encode() for s in services
    }
    inputs.raw_endpoints = {e.key: render_endpoint(e) for e in endpoints}


def reconciler(
    inputs: Knowledge, dataplane: FakeDataplane, heard: list[ServiceState]
) -> Reconciler:
    managers = standard_managers(dataplane, Telemetry(), on_service_records=heard.append)
    return Reconciler(inputs, dataplane, managers=managers)


async def test_services_become_one_table_and_a_container_costs_only_its_service() -> None:
    dataplane, heard = FakeDataplane(), list[ServiceState]()
    web1 = endpoint("web1", "10.244.1.5", app="web")
    db = endpoint("db", "10.244.2.7", PEER, app="db")
    inputs = inputs_with(
        service("web", "10.96.0.10", app="web"),
        service("db", "10.96.0.11", app="db"),
        endpoints=(web1, db),
    )
    loop = reconciler(inputs, dataplane, heard)
    assert (await loop.reconcile_once()).ok
    created = dataplane.service_statements[-1]
    assert created[:2] == [f"table {WHERE}", f"delete table {WHERE}"]
    assert any("dnat" in line and "10.244.1.5" in line for line in created)
    assert heard[-1].backends == {"web": (web1,), "db": (db,)}
    # A second web container on the peer: one light pass rewrites the web
    # service's chain and nothing of the db service.
    dataplane.service_statements.clear()
    web2 = endpoint("web2", "10.244.2.9", PEER, app="web")
    put(
        inputs,
        service("web", "10.96.0.10", app="web"),
        service("db", "10.96.0.11", app="db"),
        endpoints=(web1, db, web2),
    )
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    [statements] = dataplane.service_statements
    assert any("dnat" in line and "10.244.2.9:8080" in line for line in statements)
    assert not any("10.244.2.7" in line for line in statements)  # db's backend untouched
    assert heard[-1].backends["web"] == (web1, web2)
    # A container no service selects: no transaction, but DNS hears of it
    # (container names are records too).
    dataplane.service_statements.clear()
    lone = endpoint("lone", "10.244.1.8", app="other")
    put(
        inputs,
        service("web", "10.96.0.10", app="web"),
        service("db", "10.96.0.11", app="db"),
        endpoints=(web1, db, web2, lone),
    )
    before = len(heard)
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    assert dataplane.service_statements == []
    assert len(heard) == before + 1 and lone in heard[-1].endpoints
    # Nothing changed: nothing written, nothing heard.
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    assert dataplane.service_statements == [] and len(heard) == before + 1
    # The last service gone: the tables go.
    put(inputs, endpoints=(web1, db, web2, lone))
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    assert dataplane.service_statements[-1] == [f"delete table inet {t}" for t in TABLES]


async def test_incremental_rules_equal_a_fresh_render_after_label_changes() -> None:
    """A container whose labels change leaves one service and joins another;
    the moved ruleset equals the one a full pass makes from scratch."""
    dataplane, heard = FakeDataplane(), list[ServiceState]()
    web1 = endpoint("web1", "10.244.1.5", app="web")
    inputs = inputs_with(
        service("web", "10.96.0.10", app="web"),
        service("db", "10.96.0.11", app="db"),
        endpoints=(web1,),
    )
    loop = reconciler(inputs, dataplane, heard)
    assert (await loop.reconcile_once()).ok
    relabelled = replace(web1, labels={"app": "db"})
    put(
        inputs,
        service("web", "10.96.0.10", app="web"),
        service("db", "10.96.0.11", app="db"),
        endpoints=(relabelled,),
    )
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    moved = heard[-1]
    assert moved.backends == {"web": (), "db": (relabelled,)}
    fresh_dataplane, fresh_heard = FakeDataplane(), list[ServiceState]()
    fresh = reconciler(inputs, fresh_dataplane, fresh_heard)
    assert (await fresh.reconcile_once()).ok
    assert fresh_heard[-1].backends == moved.backends
    [manager] = [m for m in loop.managers if m.name == "services"]
    [fresh_manager] = [m for m in fresh.managers if m.name == "services"]
    assert manager.believed == fresh_manager.believed  # type: ignore[attr-defined]


async def test_bad_services_are_skipped_with_one_warning_and_none_without_a_service_network(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dataplane, heard = FakeDataplane(), list[ServiceState]()
    web1 = endpoint("web1", "10.244.1.5", app="web")
    inputs = inputs_with(service("web", "10.96.0.10", app="web"), endpoints=(web1,))
    inputs.raw_services = {
        **inputs.raw_services,
        service_key(OWN_PREFIX, "broken"): b'{"name": "broken", "portz": []}',
    }
    loop = reconciler(inputs, dataplane, heard)
    with caplog.at_level(logging.WARNING):
        assert (await loop.reconcile_once()).ok
        assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    skipped = [r for r in caplog.records if "event=service_skipped" in r.getMessage()]
    assert len(skipped) == 1 and "broken" in skipped[0].getMessage()
    assert set(heard[-1].services) == {"web"}  # the good one is served all the same
    # Without a ServiceNetwork no service is usable: the tables go.
    inputs.config = CONFIG
    assert (await loop.reconcile_once()).ok
    deleted = [s for s in dataplane.service_statements[-1] if s.startswith("delete table")]
    assert deleted == [f"delete table inet {t}" for t in TABLES]
    assert heard[-1].services == {}


async def test_a_dual_stack_service_serves_its_ipv4_vip_in_a_network_without_ipv6(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A service stored with an IPv6 VIP (made while the config had an
    IPv6ServiceNetwork) in a network that has none now: served through its
    IPv4 VIP, its IPv6 one left out of the table and of DNS, with one
    warning over passes; before, the whole service was skipped."""
    dataplane, heard = FakeDataplane(), list[ServiceState]()
    web1 = endpoint("web1", "10.244.1.5", app="web")
    dual = replace(
        service("web", "10.96.0.10", app="web"),
        vips=(ip_address("10.96.0.10"), ip_address("fd00:10:96::a")),
    )
    inputs = inputs_with(dual, endpoints=(web1,))
    assert inputs.config.ipv6 is None and inputs.config.service_networks == (SERVICE_NETWORK,)
    loop = reconciler(inputs, dataplane, heard)
    with caplog.at_level(logging.WARNING):
        assert (await loop.reconcile_once()).ok
        assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    written = "\n".join(dataplane.service_statements[-1])
    assert "10.96.0.10 . tcp . 80" in written and "10.244.1.5:8080" in written
    assert "fd00:10:96::a" not in written
    assert heard[-1].services["web"].vips == (ip_address("10.96.0.10"),)
    warned = [
        r.getMessage() for r in caplog.records if "event=service_vip_unserved" in r.getMessage()
    ]
    assert len(warned) == 1 and "fd00:10:96::a" in warned[0], warned
    assert not [r for r in caplog.records if "event=service_skipped" in r.getMessage()]


async def test_dns_hears_of_endpoints_after_the_service_network_went() -> None:
    """A responder started while the config had a ServiceNetwork still
    serves container names once it is gone: a container leaving must leave
    DNS in its pass, not at the next full one."""
    dataplane, heard = FakeDataplane(), list[ServiceState]()
    web1 = endpoint("web1", "10.244.1.5", app="web")
    web2 = endpoint("web2", "10.244.2.9", PEER, app="web")
    inputs = inputs_with(service("web", "10.96.0.10", app="web"), endpoints=(web1, web2))
    loop = reconciler(inputs, dataplane, heard)
    assert (await loop.reconcile_once()).ok
    inputs.config = CONFIG  # no ServiceNetwork any more
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    assert heard[-1].services == {}
    assert {e.key for e in heard[-1].endpoints} == {web1.key, web2.key}  # control
    put(inputs, endpoints=(web1,))  # web2 leaves
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    assert [e.key for e in heard[-1].endpoints] == [web1.key]
