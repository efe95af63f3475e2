"""Services written to a store: VIPs allocated inside the service network
(never its first or last address), claims of names, VIPs and node ports
refused with the holder named, and a deletion that frees every claim."""

from __future__ import annotations

import asyncio
import re
from ipaddress import IPv4Address, ip_address, ip_network
from typing import Any

import pytest

from overlayd.model import IPAddress, IPNetwork
from overlayd.plan.service import parse_service, service_key, stored_services
from overlayd.plan.service_model import Service
from overlayd.store.services import (
    ServiceConflict,
    ServiceNetworkFull,
    allocate,
    create_service,
    delete_service,
)
from tests.unit.fake_store import FakeStore

OWN = "/overlayd"
NETS: tuple[IPNetwork, ...] = (ip_network("10.96.0.0/16"), ip_network("fd00:96::/112"))


def service(name: str, networks: tuple[IPNetwork, ...] = NETS, **fields: Any) -> Service:
    document = {"name": name, "selector": {"matchLabels": {"app": name}}, "ports": [{"port": 80}]}
    return parse_service(document | fields, service_networks=networks)


def test_allocation_is_deterministic_inside_the_network_and_skips_taken() -> None:
    net = ip_network("10.96.0.0/28")
    first = allocate(net, set(), "web")
    assert first == allocate(net, set(), "web")
    assert first in net and first not in (net.network_address, net.broadcast_address)
    taken: set[IPAddress] = {first}
    second = allocate(net, taken, "web")
    assert second != first and second in net


def test_a_full_network_is_said_and_its_first_and_last_never_used() -> None:
    net = ip_network("10.96.0.0/28")
    taken: set[IPAddress] = set()
    for n in range(14):
        taken.add(allocate(net, taken, f"s{n}"))
    assert net.network_address not in taken and net.broadcast_address not in taken
    assert len(taken) == 14
    with pytest.raises(ServiceNetworkFull, match=re.escape("10.96.0.0/28 is full")):
        allocate(net, taken, "one-more")


async def test_create_allocates_one_vip_per_network_and_claims_them() -> None:
    store = FakeStore()
    done = await create_service(store, OWN, service("web"), NETS)
    assert [v.version for v in done.service.vips] == [4, 6]
    assert all(v in n for v, n in zip(done.service.vips, NETS, strict=True))
    raw, _ = await store.get_prefix(OWN + "/")
    assert raw[f"{OWN}/vips/{done.service.vips[0]}"] == b"web"
    assert raw[f"{OWN}/vips/{done.service.vips[1]}"] == b"web"
    # What was written is what every host reads back.
    assert stored_services(raw, OWN, NETS).services == {"web": done.service}


async def test_taken_names_vips_and_node_ports_are_refused_naming_the_holder() -> None:
    store = FakeStore()
    await create_service(
        store, OWN, service("a", vip="10.96.0.10", ports=[{"port": 80, "nodePort": 30080}]), NETS
    )
    # Positive control: another service with its own VIP and node port.
    await create_service(
        store, OWN, service("b", vip="10.96.0.11", ports=[{"port": 80, "nodePort": 30081}]), NETS
    )
    with pytest.raises(ServiceConflict, match="already exists"):
        await create_service(store, OWN, service("a"), NETS)
    with pytest.raises(ServiceConflict, match=re.escape("VIP 10.96.0.10 is taken by service 'a'")):
        await create_service(store, OWN, service("c", vip="10.96.0.10"), NETS)
    with pytest.raises(ServiceConflict, match="nodePort 30080/TCP is taken by service 'a'"):
        await create_service(store, OWN, service("c", ports=[{"port": 1, "nodePort": 30080}]), NETS)
    # The same node port number over UDP is another claim.
    await create_service(
        store, OWN, service("d", ports=[{"port": 1, "protocol": "UDP", "nodePort": 30080}]), NETS
    )
    raw, _ = await store.get_prefix(OWN + "/services/")
    assert sorted(raw) == [service_key(OWN, n) for n in ("a", "b", "d")]


async def test_a_leftover_claim_is_named_as_one() -> None:
    store = FakeStore()
    await store.put(f"{OWN}/vips/10.96.0.10", "gone")
    with pytest.raises(ServiceConflict, match="leftover claim of a service 'gone'"):
        await create_service(store, OWN, service("c", vip="10.96.0.10"), NETS)
    assert (await create_service(store, OWN, service("c", vip="10.96.0.12"), NETS)).revision


async def test_delete_frees_the_vip_and_node_ports_at_once() -> None:
    store = FakeStore()
    spec = service("a", vip="10.96.0.10", ports=[{"port": 80, "nodePort": 30080}])
    await create_service(store, OWN, spec, NETS)
    await create_service(store, OWN, service("b"), NETS)
    before = store.revision
    revision = await delete_service(store, OWN, "a")
    assert revision == before + 1  # one transaction
    raw, _ = await store.get_prefix(OWN + "/")
    assert not any(v == b"a" for v in raw.values()) and service_key(OWN, "b") in raw
    again = await create_service(store, OWN, spec, NETS)
    assert again.service.vips[0] == IPv4Address("10.96.0.10")
    with pytest.raises(Exception, match="no service 'x'"):
        await delete_service(store, OWN, "x")


async def test_concurrent_creators_get_distinct_vips() -> None:
    store = FakeStore()
    small: tuple[IPNetwork, ...] = (ip_network("10.96.0.0/27"),)
    done = await asyncio.gather(
        *(create_service(store, OWN, service(f"s{n}", small), small) for n in range(20))
    )
    vips = [d.service.vips[0] for d in done]
    assert len(set(vips)) == 20 and all(v in small[0] for v in vips)
    assert ip_address("10.96.0.0") not in vips and ip_address("10.96.0.31") not in vips
