"""A plan kept across passes and moved by the leases that changed
(`PeerSelector`, `FamilyPlanner`) always equals the plan made from scratch
(`select_peers`, `family_plan`), and its delta turns the previous entries
into the new ones: over random sequences of lease writes and deletions,
with overlapping subnets, double claims, shared MACs, garbage values, our
own addresses, and peers on and off the underlay's link."""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from functools import partial
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlayd.config import parse_network_config
from overlayd.daemon.leasing import own_lease
from overlayd.journaled import JournaledDict
from overlayd.model import IPV4, IPV6, KINDS, Entry, EntrySet, IPNetwork, Lease, NetworkConfig, Op
from overlayd.plan.cluster import ClusterPlan, FamilyPlanner, family_plan
from overlayd.plan.leases import lease_key, render_lease
from overlayd.plan.selection import PeerSelection, PeerSelector, select_peers
from overlayd.surfaces.events import EventBus, PeerChanges

PREFIX = "/coreos.com/network"
BASE = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56"}
CONFIGS = {
    "vxlan": {**BASE, "Backend": {"Type": "vxlan", "VNI": 1}},
    "vxlan-v4-only": {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 1}},
    "direct-routing": {**BASE, "Backend": {"Type": "vxlan", "VNI": 1, "DirectRouting": True}},
    "host-gw": {**BASE, "Backend": {"Type": "host-gw"}},
}
# The underlay's link: peers at 192.0.2.x / 2001:db8::x are on it.
ONLINK: dict[int, tuple[IPNetwork, ...]] = {
    4: (IPv4Network("192.0.2.0/24"),),
    6: (IPv6Network("2001:db8::/64"),),
}

SUBNETS = [IPv4Network(f"10.244.{n}.0/24") for n in range(1, 7)] + [
    IPv4Network("10.244.2.0/23"),  # overlaps two
    IPv4Network("10.245.0.0/24"),  # outside the network
]
PUBLICS = [IPv4Address(f"192.0.2.{n}") for n in (11, 12, 13, 14)] + [IPv4Address("198.51.100.1")]
MACS = [f"02:00:00:00:00:0{n}" for n in range(1, 6)]
SUBNETS6: list[IPv6Network | None] = [None] + [
    IPv6Network(f"fd00:10:244:{n:x}::/64") for n in range(1, 7)
]
SUBNETS6 += [IPv6Network("fd00:10:245::/64"), IPv6Network("fd00:10:244:20::/63")]
PUBLICS6 = [IPv6Address(f"2001:db8::{n}") for n in (11, 12, 13)] + [IPv6Address("2001:db8:1::1")]


def own_of(config: NetworkConfig, which: int = 0) -> Lease:
    """This host's lease: one of two, so that a test can move the host."""
    dual = config.ipv6 is not None
    return own_lease(
        config,
        SUBNETS[which],
        PUBLICS[which],
        SUBNETS6[1 + which] if dual else None,
        PUBLICS6[which] if dual else None,
    )


def lease_value(
    config: NetworkConfig, data: st.DataObject, macs: Sequence[str]
) -> tuple[str, bytes]:
    """A key and value: mostly sound leases from small pools (so that they
    collide, also with this host's addresses and VTEP MACs), now and then a
    foreign VNI or a garbage value."""
    subnet = data.draw(st.sampled_from(SUBNETS))
    subnet6 = data.draw(st.sampled_from(SUBNETS6)) if config.ipv6 is not None else None
    lease = Lease(
        subnet,
        data.draw(st.sampled_from(PUBLICS)),
        data.draw(st.sampled_from([1, 1, 1, 2])),
        data.draw(st.sampled_from(macs)) if config.backend.type == "vxlan" else "",
        config.backend.type,
        ipv6_subnet=subnet6,
        public_ipv6=data.draw(st.sampled_from(PUBLICS6)) if subnet6 is not None else None,
        vtep_mac_v6=(
            data.draw(st.sampled_from(macs)) if subnet6 and config.backend.type == "vxlan" else ""
        ),
    )
    key = lease_key(PREFIX, lease)
    if data.draw(st.integers(0, 15)) == 0:
        return key, b'{"PublicIP": "not an address"'
    return key, render_lease(lease).encode()


def note_event(seen: list[tuple[str, str]], kind: str, view: dict[str, Any]) -> None:
    seen.append((kind, repr(view)))


def as_sets(selection: PeerSelection) -> tuple[object, ...]:
    return (
        set(selection.peers),
        {r.key: r.reason for r in selection.rejected},
        set(selection.peers6),
        {r.key: r.reason for r in selection.rejected6},
        set(selection.without_ipv6),
    )


def tables(entries: EntrySet) -> dict[str, dict[Hashable, Entry]]:
    return {kind.name: dict(entries.table(kind)) for kind in KINDS}


def plan_parts(plan: ClusterPlan) -> tuple[object, ...]:
    peers = plan.peers
    return (
        tables(plan.desired),
        set(peers.tunneled),
        set(peers.direct),
        set(peers.unreachable),
        dict(plan.rejected),
        set(plan.without_ipv6),
        plan.sources,
    )


def apply_delta(
    kernel: dict[str, dict[Hashable, Entry]], plan: ClusterPlan
) -> dict[str, dict[Hashable, Entry]]:
    assert plan.delta is not None
    after = {name: dict(table) for name, table in kernel.items()}
    for change in plan.delta:
        kind = next(k for k in KINDS if isinstance(change.entry, k.type))
        key = kind.key(change.entry)
        if change.op is Op.DELETE:
            assert after[kind.name].pop(key) == change.entry  # deletes what is there
        else:
            assert after[kind.name].get(key) != change.entry  # writes only a change
            after[kind.name][key] = change.entry
    return after


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_plan_moved_by_changed_leases_equals_the_plan_made_from_scratch(
    name: str, data: st.DataObject
) -> None:
    config = parse_network_config(json.dumps(CONFIGS[name]))
    owns = [own_of(config, 0), own_of(config, 1)]
    own = owns[0]
    macs = [*MACS, *(m for o in owns for m in (o.vtep_mac, o.vtep_mac_v6) if m)]
    families = (IPV4, IPV6) if config.ipv6 is not None else (IPV4,)
    first = {lease_key(PREFIX, own): render_lease(own).encode()}
    # The mirror's collections note their changes (and the selector reads
    # the notes); a plain dict makes it compare everything.
    raw: dict[str, bytes] = (
        TinyJournal(first) if data.draw(st.booleans(), label="journaled") else first
    )
    selector = PeerSelector()
    planners = {family.version: FamilyPlanner(family) for family in families}
    kernel: dict[int, dict[str, dict[Hashable, Entry]]] = {}
    # The peer events of moved plans against those of whole ones.
    events: dict[str, list[tuple[str, str]]] = {"moved": [], "whole": []}
    changes: dict[str, PeerChanges] = {}
    for way, seen in events.items():
        bus = EventBus()
        bus.listeners.append(partial(note_event, seen))
        changes[way] = PeerChanges(bus)
    for _ in range(data.draw(st.integers(1, 25), label="passes")):
        for _ in range(data.draw(st.integers(0, 3), label="changes")):
            if raw and data.draw(st.integers(0, 3)) == 0:
                del raw[data.draw(st.sampled_from(sorted(raw)))]
            else:
                key, value = lease_value(config, data, macs)
                raw[key] = value
        happening = data.draw(st.integers(0, 19), label="happening")
        if happening == 0:  # the host re-leased another subnet
            own = owns[1] if own is owns[0] else owns[0]
        elif happening == 1:  # a failed pass
            selector.forget()
            for planner in planners.values():
                planner.forget()
        full = data.draw(st.integers(0, 9)) == 0
        selected = selector.select(config, own, raw, PREFIX, full=full)
        reference = select_peers(config, own, raw, PREFIX)
        assert as_sets(selected.selection) == as_sets(reference)
        # Now and then a pass that plans IPv4 only: IPv6 must not move from
        # a selection it never saw.
        planned_families = families[:1] if happening == 2 else families
        for family in planned_families:
            onlink = ONLINK[family.version]
            planned = planners[family.version].plan(selected, config, onlink, PREFIX)
            scratch = family_plan(reference, family, config, onlink, PREFIX)
            assert plan_parts(planned) == plan_parts(scratch)
            before = kernel.get(family.version)
            if planned.delta is not None:
                assert before is not None and planned.base is not None
                assert tables(planned.base) == before
                assert apply_delta(before, planned) == tables(planned.desired)
            kernel[family.version] = tables(planned.desired)
            if family is IPV4:
                tunneled = cast(Sequence[Lease], planned.peers.tunneled)
                direct = cast(Sequence[Lease], planned.peers.direct)
                changes["moved"].update(tunneled, direct, plan=planned.peers, moved=planned.moved)
                changes["whole"].update(tunneled, direct)
                assert changes["moved"].peers == changes["whole"].peers
                assert sorted(events["moved"]) == sorted(events["whole"])


class TinyJournal(JournaledDict):
    """Notes dropped after a few changes, so that readers also fall back."""

    slack = 3


def test_a_peer_joining_a_conflict_free_cluster_moves_the_plan_by_that_peer_alone() -> None:
    """The fast path is taken when it may be: one new lease among many
    gives a delta of exactly its entries, for both families."""
    config = parse_network_config(json.dumps(CONFIGS["vxlan"]))
    own = own_of(config)

    def peer(n: int) -> Lease:
        return own_lease(
            config,
            IPv4Network(f"10.244.{n}.0/24"),
            IPv4Address(f"198.51.100.{n}"),
            IPv6Network(f"fd00:10:244:{n:x}::/64"),
            IPv6Address(f"2001:db8:1::{n:x}"),
        )

    raw = {
        lease_key(PREFIX, lease): render_lease(lease).encode() for lease in map(peer, range(2, 200))
    }
    selector = PeerSelector()
    planners = {f.version: FamilyPlanner(f) for f in (IPV4, IPV6)}
    first = selector.select(config, own, raw, PREFIX)
    assert first.delta is None  # the whole rule, the first time
    for family in (IPV4, IPV6):
        planners[family.version].plan(first, config, (), PREFIX)
    joining = peer(200)
    raw[lease_key(PREFIX, joining)] = render_lease(joining).encode()
    second = selector.select(config, own, raw, PREFIX)
    assert second.delta is not None
    assert second.delta.added == (joining,) and second.delta.removed == ()
    for family in (IPV4, IPV6):
        planned = planners[family.version].plan(second, config, (), PREFIX)
        assert planned.delta is not None
        assert len(planned.delta) == 4 and all(c.op is Op.REPLACE for c in planned.delta)
        assert len(planned.peers.tunneled) == 199
    # A lease that overlaps another makes the whole rule decide again.
    raw[lease_key(PREFIX, Lease(IPv4Network("10.244.2.0/23"), PUBLICS[1], 1, MACS[0]))] = (
        render_lease(Lease(IPv4Network("10.244.2.0/23"), PUBLICS[1], 1, MACS[0])).encode()
    )
    third = selector.select(config, own, raw, PREFIX)
    assert third.delta is None
    assert any("overlaps" in r.reason for r in third.selection.rejected)


def test_what_the_kernel_is_believed_to_hold_decides_whether_a_delta_is_used() -> None:
    """`EntryTracker.believes` is identity, not equality: after a read of
    the kernel (equal tables, other objects) the full diff runs."""
    from overlayd.plan.tracker import EntryTracker

    config = parse_network_config(json.dumps(CONFIGS["vxlan"]))
    own = own_of(config)
    raw: Mapping[str, bytes] = {lease_key(PREFIX, own): render_lease(own).encode()}
    selected = PeerSelector().select(config, own, raw, PREFIX)
    planned = FamilyPlanner(IPV4).plan(selected, config, (), PREFIX)
    tracker = EntryTracker()
    tracker.replace_desired(planned.desired)
    tracker.settle()
    assert tracker.believes(planned.desired)
    tracker.replace_actual(EntrySet.of(planned.desired.all()))
    assert not tracker.believes(planned.desired)
