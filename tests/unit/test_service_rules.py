"""Services rendered as nftables objects, from data alone: a small cluster
as a golden file (random and affinity-pinned backends, node ports Cluster
and Local, a service without backends, a dual-stack one), transactions
that a model of nft accepts and that land where a from-scratch render
lands, a change's statement count independent of how many services exist
(100, 10,000, 30,000, and random sets), and an affinity table that moves
few clients when a backend leaves."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlayd.model import IPAddress, IPNetwork
from overlayd.plan.policy_model import Endpoint, LabelSelector, Protocol
from overlayd.plan.policy_rules import LocalSubnets
from overlayd.plan.service_model import Affinity, Service, ServicePort, TrafficPolicy
from overlayd.plan.service_rules import (
    SHARD_TABLES,
    SHARDS,
    TABLE,
    TABLES,
    ServiceRuleset,
    _maglev,
    render_ruleset,
    service_ruleset,
    service_transaction,
    shard_where,
    statement_count,
    with_service,
)
from tests.unit.nft_model import NftError, Tables

GOLDEN = Path(__file__).parent / "golden"
LOCAL = LocalSubnets(IPv4Network("10.244.1.0/24"), IPv6Network("fd00:10:244:1::/64"))
CLUSTER: tuple[IPNetwork, ...] = (IPv4Network("10.244.0.0/16"), IPv6Network("fd00:10:244::/56"))
TCP, UDP = Protocol.TCP, Protocol.UDP


def ep(host: int, index: int, v6: bool = False, **labels: str) -> Endpoint:
    addresses: tuple[IPAddress, ...] = (IPv4Address(f"10.244.{host}.{index}"),)
    if v6:
        addresses += (IPv6Address(f"fd00:10:244:{host}::{index}"),)
    return Endpoint(
        key=f"/overlayd/endpoints/10.244.{host}.0-24/c{host}x{index}",
        id=f"c{host}x{index}",
        host=f"10.244.{host}.0-24",
        name=f"c{host}x{index}",
        addresses=addresses,
        labels=labels,
    )


def svc(
    name: str,
    vip: str,
    *ports: ServicePort,
    vip6: str | None = None,
    affinity: Affinity = Affinity.NONE,
    policy: TrafficPolicy = TrafficPolicy.CLUSTER,
) -> Service:
    vips: tuple[IPAddress, ...] = (ip_address(vip),)
    if vip6:
        vips += (ip_address(vip6),)
    return Service(
        name=name,
        selector=LabelSelector((("app", name),)),
        ports=ports or (ServicePort("", TCP, 80, 8080),),
        vips=vips,
        affinity=affinity,
        traffic_policy=policy,
    )


def small_cluster() -> tuple[dict[str, Service], dict[str, tuple[Endpoint, ...]]]:
    """Every kind of service once; host 1 is this one."""
    services = {
        s.name: s
        for s in (
            svc("web", "10.96.0.10"),
            svc(
                "sticky",
                "10.96.0.11",
                ServicePort("https", TCP, 443, 8443),
                affinity=Affinity.CLIENT_IP,
            ),
            svc("np-cluster", "10.96.0.12", ServicePort("", TCP, 80, 80, node_port=30080)),
            svc(
                "np-local",
                "10.96.0.13",
                ServicePort("", TCP, 80, 80, node_port=30081),
                policy=TrafficPolicy.LOCAL,
            ),
            svc(
                "np-local-away",
                "10.96.0.14",
                ServicePort("", TCP, 80, 80, node_port=30082),
                policy=TrafficPolicy.LOCAL,
            ),
            svc("empty", "10.96.0.15", ServicePort("dns", UDP, 53, 53, node_port=30053)),
            svc("dual", "10.96.0.16", vip6="fd00:96::16"),
        )
    }
    backends = {
        "web": (ep(1, 2), ep(2, 2)),
        "sticky": (ep(1, 3), ep(2, 3)),
        "np-cluster": (ep(1, 4), ep(2, 4)),
        "np-local": (ep(1, 5), ep(2, 5)),
        "np-local-away": (ep(2, 6), ep(3, 6)),
        "empty": (),
        "dual": (ep(1, 7, v6=True), ep(2, 7, v6=True)),
    }
    return services, backends


def matches_golden(rendered: str, name: str) -> bool:
    golden = GOLDEN / f"{name}.nft"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    return rendered == golden.read_text()


def model_of(ruleset: ServiceRuleset) -> Tables:
    model = Tables.of(f"inet {table}" for table in TABLES)
    model.apply(service_transaction(None, ruleset))
    return model


# --- the render --------------------------------------------------------------


def test_small_cluster_matches_its_golden_file() -> None:
    services, backends = small_cluster()
    rendered = render_ruleset(service_ruleset(services, backends, LOCAL, CLUSTER))
    assert matches_golden(rendered, "services_small_cluster")


def postrouting_rules(ruleset: ServiceRuleset) -> list[str]:
    text = render_ruleset(ruleset)
    chain = text.split("chain nat_postrouting {", 1)[1].split("}", 1)[0]
    return [line.strip() for line in chain.splitlines()[2:] if line.strip()]


def test_marked_connections_leave_from_the_bridge_address_of_their_family() -> None:
    """Node-port (Cluster) and outside clients' connections get this host's
    bridge address as source, per family, not the address of the way out
    (a backend's host over the underlay would drop that); a family this
    host has no subnet of (no bridge address) masquerades."""
    services, backends = small_cluster()
    mark = "meta mark & 0x00200000 == 0x00200000 meta mark set meta mark ^ 0x00200000"
    both = postrouting_rules(service_ruleset(services, backends, LOCAL, CLUSTER))
    assert both[:2] == [
        f"meta nfproto ipv4 {mark} snat ip to 10.244.1.1 fully-random",
        f"meta nfproto ipv6 {mark} snat ip6 to fd00:10:244:1::1 fully-random",
    ]
    no_subnet6 = LocalSubnets(IPv4Network("10.244.1.0/24"))
    alone = postrouting_rules(service_ruleset(services, backends, no_subnet6, CLUSTER))
    assert alone[:2] == [
        f"meta nfproto ipv4 {mark} snat ip to 10.244.1.1 fully-random",
        f"meta nfproto ipv6 {mark} masquerade fully-random",
    ]
    # Hairpin (a container landing on itself) masquerades as before: its
    # way out is the bridge.
    assert all("masquerade" in rule for rule in both[2:]) and len(both) == 4


def test_a_render_builds_in_the_model_and_holds_every_kind_of_service() -> None:
    services, backends = small_cluster()
    ruleset = service_ruleset(services, backends, LOCAL, CLUSTER)
    model = model_of(ruleset)
    maps = model.maps()
    # Random over two backends, behind the VIP; a remote-only Local node
    # port drops, a service with no backend rejects (VIP and node port).
    assert maps["vips_v4"]["10.96.0.10 . tcp . 80"].startswith("goto svc_web_tcp80_")
    assert maps["noep_nodeports_v4"]["tcp . 30082"] == "drop"
    assert maps["noep_vips_v4"]["10.96.0.15 . udp . 53"] == "goto reject_chain"
    assert maps["noep_nodeports_v4"]["udp . 30053"] == "goto reject_chain"
    assert "tcp . 30080" in maps["nodeports_v4"] and "tcp . 30081" in maps["nodeports_v4"]
    # Dual-stack: the same service in both families' maps.
    assert "fd00:96::16 . tcp . 80" in maps["vips_v6"]
    # Hairpin pairs: this host's backends only, of every family served.
    assert "10.244.1.2 . 10.244.1.2" in maps["hairpin_v4"]
    assert "10.244.2.2 . 10.244.2.2" not in maps["hairpin_v4"]
    assert list(maps["hairpin_v6"]) == ["fd00:10:244:1::7 . fd00:10:244:1::7"]


def test_local_node_port_dnats_to_local_backends_only_and_cluster_marks_for_masquerade() -> None:
    services, backends = small_cluster()
    ruleset = service_ruleset(services, backends, LOCAL, CLUSTER)
    local = ruleset.services["np-local"].chains
    (np_local,) = (c for n, c in local.items() if n.startswith("np_"))
    assert np_local.rules == ("meta l4proto tcp dnat ip to 10.244.1.5:80",)  # not 10.244.2.5
    (np_cluster,) = (
        c for n, c in ruleset.services["np-cluster"].chains.items() if n.startswith("np_")
    )
    assert np_cluster.rules[0] == "meta mark set meta mark | 0x00200000"
    assert np_cluster.rules[1].startswith("goto svc_np_cluster_tcp80_")


def test_two_services_claiming_one_vip_and_port_are_refused_by_name() -> None:
    services = {"a": svc("a", "10.96.0.1"), "b": svc("b", "10.96.0.1")}
    with pytest.raises(ValueError, match="'a' and 'b'"):
        service_ruleset(services, {"a": (ep(1, 2),)}, LOCAL, CLUSTER)  # b has none: still a clash


def test_no_services_no_table() -> None:
    empty = service_ruleset({}, {}, LOCAL, CLUSTER)
    assert render_ruleset(empty) == ""
    every = [f"inet {table}" for table in TABLES]
    assert service_transaction(None, empty) == [
        s for where in every for s in (f"table {where}", f"delete table {where}")
    ]
    services, backends = small_cluster()
    full = service_ruleset(services, backends, LOCAL, CLUSTER)
    # Control: they go.
    assert service_transaction(full, empty) == [f"delete table {where}" for where in every]


def test_an_ipv4_only_cluster_has_no_ipv6_objects() -> None:
    services, backends = small_cluster()
    rendered = render_ruleset(
        service_ruleset(services, backends, LocalSubnets(LOCAL.subnet), CLUSTER[:1])
    )
    assert "vips_v4" in rendered
    assert "_v6" not in rendered and "ip6" not in rendered


# --- affinity -------------------------------------------------------------------


def test_affinity_table_shares_slots_evenly_and_a_leaving_backend_moves_few_others() -> None:
    keys = [f"b{i}" for i in range(5)]
    table = _maglev(keys, 251)
    counts = [table.count(i) for i in range(5)]
    assert max(counts) - min(counts) <= 1
    after = _maglev(keys[:4], 251)  # b4 leaves
    moved_others = sum(1 for a, b in zip(table, after, strict=True) if a != 4 and a != b)
    # Control: b4's own slots all moved (to the others).
    assert all(after[slot] != 4 for slot in range(251) if table[slot] == 4)
    assert moved_others < 251 * 0.1  # `mod N` would move about 3/4 of them


def test_affinity_renders_one_jhash_rule_with_a_fixed_seed() -> None:
    services, backends = small_cluster()
    ruleset = service_ruleset(services, backends, LOCAL, CLUSTER)
    ((name, chain),) = ruleset.services["sticky"].chains.items()
    assert name.startswith("svc_sticky_tcp443_")
    dnat = chain.rules[-1]
    assert dnat.startswith(
        "meta l4proto tcp dnat ip to jhash ip saddr mod 251 seed 0x6f766c64 map {"
    )
    assert dnat.count(" : ") == 251
    # Control: the same service without affinity picks at random, by a
    # cascade without any set (a set per service made big tables load in
    # quadratic time): 1 in 2 to the first backend, the rest to the second.
    web = ruleset.services["web"].chains[next(iter(ruleset.services["web"].chains))].rules
    assert "numgen random mod 2 0 dnat" in web[-2] and "numgen" not in web[-1]
    assert not any("map {" in rule for rule in web)


# --- transactions -------------------------------------------------------------


def background(n: int) -> tuple[dict[str, Service], dict[str, tuple[Endpoint, ...]]]:
    """n services with two remote backends each and no node ports, on
    addresses no test change uses (VIPs from 10.97.0.0/16)."""
    services: dict[str, Service] = {}
    backends: dict[str, tuple[Endpoint, ...]] = {}
    for i in range(n):
        name = f"bg{i:05d}"
        services[name] = svc(name, str(IPv4Address("10.97.0.0") + i))
        backends[name] = (
            Endpoint(f"/e/bg/{i}a", f"{i}a", "h", "", (IPv4Address("10.200.0.0") + 2 * i,)),
            Endpoint(f"/e/bg/{i}b", f"{i}b", "h", "", (IPv4Address("10.200.0.0") + 2 * i + 1,)),
        )
    return services, backends


CHANGED = svc(
    "changed", "10.96.1.1", ServicePort("", TCP, 80, 8080, node_port=31000), vip6="fd00:96::1:1"
)
CHANGED_BACKENDS = (ep(1, 20, v6=True), ep(2, 20, v6=True), ep(3, 20, v6=True))


def changes(base: ServiceRuleset) -> dict[str, tuple[ServiceRuleset, ServiceRuleset]]:
    """(before, after) for each kind of change, over `base`."""
    with_it = with_service(base, "changed", CHANGED, CHANGED_BACKENDS)
    fewer = with_service(with_it, "changed", CHANGED, CHANGED_BACKENDS[1:])  # a local one leaves
    remote_gone = with_service(with_it, "changed", CHANGED, CHANGED_BACKENDS[:2])
    return {
        "add service": (base, with_it),
        "remove service": (with_it, base),
        "remove local backend": (with_it, fewer),
        "add local backend": (fewer, with_it),
        "remove remote backend": (with_it, remote_gone),
        "last backend leaves": (
            with_service(with_it, "changed", CHANGED, CHANGED_BACKENDS[:1]),
            with_service(with_it, "changed", CHANGED, ()),
        ),
    }


@pytest.fixture(scope="module")
def counts_by_size() -> dict[int, dict[str, int]]:
    found = {}
    for n in (100, 10_000, 30_000):
        services, backends = background(n)
        base = service_ruleset(services, backends, LOCAL, CLUSTER)
        found[n] = {
            kind: statement_count(service_transaction(before, after))
            for kind, (before, after) in changes(base).items()
        }
    return found


def test_one_change_writes_as_many_statements_with_100_10000_and_30000_services(
    counts_by_size: dict[int, dict[str, int]],
) -> None:
    assert counts_by_size[100] == counts_by_size[10_000] == counts_by_size[30_000]
    # Control: the counts are of real work, not empty transactions.
    assert all(count > 0 for count in counts_by_size[100].values())
    # (A service's chain holds one rule per backend: its own size, not the total's.)
    assert counts_by_size[100]["add service"] < 30


def test_a_backend_change_rewrites_only_its_own_service() -> None:
    services, backends = background(50)
    base = with_service(
        service_ruleset(services, backends, LOCAL, CLUSTER), "changed", CHANGED, CHANGED_BACKENDS
    )
    after = with_service(base, "changed", CHANGED, CHANGED_BACKENDS[1:])
    statements = service_transaction(base, after)
    assert statements and all("bg0" not in s for s in statements)
    assert any("svc_changed_tcp80_" in s for s in statements)  # control: its own chain is


def test_incremental_and_from_scratch_rulesets_agree() -> None:
    services, backends = small_cluster()
    full = service_ruleset(services, backends, LOCAL, CLUSTER)
    fewer = {**backends, "web": backends["web"][:1]}
    assert with_service(full, "web", services["web"], fewer["web"]) == service_ruleset(
        services, fewer, LOCAL, CLUSTER
    )
    smaller = {k: v for k, v in services.items() if k != "dual"}
    assert with_service(full, "dual", None) == service_ruleset(smaller, backends, LOCAL, CLUSTER)


# --- random sets ------------------------------------------------------------------

_NAMES = [f"s{i}" for i in range(8)]
_POOL = [ep(h, i, v6=(i % 2 == 0)) for h in (1, 2) for i in range(2, 8)]


@st.composite
def clusters(draw: st.DrawFn) -> tuple[dict[str, Service], dict[str, tuple[Endpoint, ...]]]:
    """Up to 8 services (fixed names, VIPs and node ports, so that sets
    drawn apart never clash), with random kinds and backends from a pool
    of 12 endpoints on two hosts."""
    services: dict[str, Service] = {}
    backends: dict[str, tuple[Endpoint, ...]] = {}
    for i, name in enumerate(draw(st.lists(st.sampled_from(_NAMES), unique=True, max_size=8))):
        index = _NAMES.index(name)
        node_port = 30100 + index if draw(st.booleans()) else None
        services[name] = svc(
            name,
            f"10.96.2.{index + 1}",
            ServicePort("", draw(st.sampled_from([TCP, UDP])), 80 + i % 2, 8080, node_port),
            vip6=f"fd00:96::2:{index + 1}" if draw(st.booleans()) else None,
            affinity=draw(st.sampled_from(list(Affinity))),
            policy=draw(st.sampled_from(list(TrafficPolicy))),
        )
        backends[name] = tuple(
            draw(st.lists(st.sampled_from(_POOL), unique_by=lambda e: e.key, max_size=4))
        )
    return services, backends


@settings(max_examples=150, deadline=None)
@given(clusters(), clusters())
def test_a_transaction_applied_to_a_gives_b(
    a: tuple[dict[str, Service], dict[str, tuple[Endpoint, ...]]],
    b: tuple[dict[str, Service], dict[str, tuple[Endpoint, ...]]],
) -> None:
    before = service_ruleset(*a, LOCAL, CLUSTER)
    after = service_ruleset(*b, LOCAL, CLUSTER)
    model = model_of(before)
    model.apply(service_transaction(before, after))
    assert model == model_of(after)


@settings(max_examples=100, deadline=None)
@given(clusters(), clusters())
def test_moving_service_by_service_lands_where_a_render_from_scratch_does(
    a: tuple[dict[str, Service], dict[str, tuple[Endpoint, ...]]],
    b: tuple[dict[str, Service], dict[str, tuple[Endpoint, ...]]],
) -> None:
    ruleset = service_ruleset(*a, LOCAL, CLUSTER)
    model = model_of(ruleset)
    services, backends = b
    for name in sorted({*a[0], *services}):
        moved = with_service(ruleset, name, services.get(name), backends.get(name, ()))
        model.apply(service_transaction(ruleset, moved))  # one service at a time
        ruleset = moved
    assert ruleset == service_ruleset(services, backends, LOCAL, CLUSTER)
    assert model == model_of(ruleset)


def _count(
    base: tuple[Mapping[str, Service], Mapping[str, Sequence[Endpoint]]],
    change: tuple[Service, tuple[Endpoint, ...], tuple[Endpoint, ...]],
) -> tuple[int, int]:
    ruleset = service_ruleset(*base, LOCAL, CLUSTER)
    service, old, new = change
    before = with_service(ruleset, service.name, service, old)
    return (
        statement_count(service_transaction(ruleset, before)),
        statement_count(
            service_transaction(before, with_service(before, service.name, service, new))
        ),
    )


@settings(max_examples=60, deadline=None)
@given(
    clusters(),
    st.integers(min_value=1, max_value=30),
    st.integers(min_value=200, max_value=400),
    st.lists(st.sampled_from(_POOL), unique_by=lambda e: e.key, max_size=5),
    st.lists(st.sampled_from(_POOL), unique_by=lambda e: e.key, max_size=5),
)
def test_a_change_costs_the_same_whatever_else_exists(
    spec: tuple[dict[str, Service], dict[str, tuple[Endpoint, ...]]],
    small: int,
    large: int,
    old: list[Endpoint],
    new: list[Endpoint],
) -> None:
    """One service added (with `old` backends), then its backends changed
    to `new`: the same statement counts over `small` and `large`
    background services (which share no backend with it)."""
    services, _ = spec
    if not services:
        return
    service = services[min(services)]
    change = (service, tuple(old), tuple(new))
    assert _count(background(small), change) == _count(background(large), change)


def test_services_spread_over_the_shards_and_a_change_writes_only_into_its_own() -> None:
    ruleset = service_ruleset(*background(40), LOCAL, CLUSTER)
    assert {rules.shard for rules in ruleset.services.values()} == set(range(SHARDS))
    for name in ("bg00003", "bg00017"):
        own = ruleset.services[name].shard
        for change in (
            with_service(ruleset, name, None),
            with_service(ruleset, name, ruleset_service(name), (ep(1, 9),)),
        ):
            statements = service_transaction(ruleset, change)
            touched = {s.split(" inet ", 1)[1].split()[0] for s in statements}
            # The VIP element and the chain in its shard; the hairpin pair
            # of a local backend in the front table; no other shard.
            assert SHARD_TABLES[own] in touched
            assert touched <= {SHARD_TABLES[own], TABLE}


def ruleset_service(name: str) -> Service:
    return background(40)[0][name]


def test_a_transaction_in_the_wrong_order_is_refused_by_the_model() -> None:
    """The model is worth trusting: deleting a chain a map still goes to fails."""
    services, backends = small_cluster()
    ruleset = service_ruleset(services, backends, LOCAL, CLUSTER)
    model = model_of(ruleset)
    chain = next(iter(ruleset.services["web"].chains))
    where = shard_where(ruleset.services["web"].shard)
    with pytest.raises(NftError, match="in use"):
        model.apply([f"flush chain {where} {chain}", f"delete chain {where} {chain}"])
    # Control: the right order passes.
    model.apply(service_transaction(ruleset, with_service(ruleset, "web", None)))
