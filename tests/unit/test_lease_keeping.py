"""Keeping the lease and the host state, with a dictionary store: renewal,
expiry, deletion or theft of our key, a config the lease no longer fits,
and a bad config while running. These paths used to be testable only in
the lab."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from overlayd.config import parse_network_config
from overlayd.daemon.host import HostState
from overlayd.daemon.leasing import HeldLease, LeaseKeeper, SubnetLeaser
from overlayd.model import Lease, Underlay
from overlayd.plan.egress import EgressSpec
from overlayd.plan.host import Host, host_plan, lease_fits
from overlayd.plan.leases import render_lease, subnet_key
from tests.unit.fake_store import FakeStore, eventually

PREFIX = "/coreos.com/network"
CONFIG = parse_network_config('{"Network": "10.244.0.0/16"}')
UNDERLAY = Underlay("eth0", 2, 1500, IPv4Address("192.0.2.11"))
EGRESS = EgressSpec("none", CONFIG.network, "ovl0", "ovl_gwbridge")


class Record:
    """Telemetry's lease facts, as a list."""

    def __init__(self) -> None:
        self.facts: list[tuple[str, Any]] = []

    def lease_acquired(self, lease: Lease, key: str, ttl: float) -> None:
        self.facts.append(("acquired", key))

    def lease_renewed(self, ttl: float) -> None:
        self.facts.append(("renewed", ttl))

    def lease_lost(self, reason: str) -> None:
        self.facts.append(("lost", reason))


@pytest.fixture
async def kept() -> AsyncIterator[tuple[FakeStore, LeaseKeeper, HostState, Record, list[Host]]]:
    store = FakeStore()
    # TTL 3: the keeper renews every second (its floor).
    leaser = SubnetLeaser(
        store, etcd_prefix=PREFIX, public_ip=UNDERLAY.address, ttl=3, rng=random.Random(0)
    )
    held = await leaser.acquire(CONFIG)
    record = Record()
    host = HostState(
        host_plan(CONFIG, held.lease, UNDERLAY, bridge="ovl0", egress=EGRESS),
        underlay=UNDERLAY,
        bridge="ovl0",
        etcd_prefix=PREFIX,
        config_key=f"{PREFIX}/config",
        leases={},
    )
    hosts: list[Host] = []
    host.on_change.append(hosts.append)

    def new_lease(fresh: HeldLease) -> None:
        host.lease_changed(fresh.lease)

    keeper = LeaseKeeper(
        leaser,
        held,
        config=lambda: host.config,
        on_new_lease=new_lease,
        telemetry=record,
        ttl=3,
    )
    host.on_lease_doubt.append(keeper.doubt)
    task = asyncio.create_task(keeper.run())
    try:
        yield store, keeper, host, record, hosts
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_the_lease_is_renewed_while_etcd_keeps_it(
    kept: tuple[FakeStore, LeaseKeeper, HostState, Record, list[Host]],
) -> None:
    _, _, _, record, hosts = kept
    await eventually(lambda: ("renewed", 3) in record.facts)
    assert hosts == [] and ("lost", "expired") not in record.facts


async def test_an_expired_lease_is_taken_again_with_the_same_subnet(
    kept: tuple[FakeStore, LeaseKeeper, HostState, Record, list[Host]],
) -> None:
    store, keeper, _, record, hosts = kept
    before = keeper.held
    await store.expire(before.lease_id)
    await eventually(lambda: keeper.held.lease_id != before.lease_id)
    assert ("lost", "expired") in record.facts
    assert keeper.held.lease == before.lease and hosts == []  # same subnet: nothing to redo
    assert store.values[before.key][2] == keeper.held.lease_id


async def test_our_key_deleted_or_taken_by_another_host_is_leased_again(
    kept: tuple[FakeStore, LeaseKeeper, HostState, Record, list[Host]],
) -> None:
    store, keeper, _, record, _ = kept
    key = keeper.held.key
    await store.delete(key)
    keeper.own_key_changed(key, None)
    await eventually(lambda: key in store.values)
    assert ("lost", "deleted from etcd") in record.facts
    # Another host writes our subnet: we must not keep answering for it.
    thief = Lease(keeper.held.lease.subnet, IPv4Address("192.0.2.99"), 1, "02:00:00:00:00:99")
    taken_before = keeper.held
    keeper.own_key_changed(key, render_lease(thief).encode())
    await eventually(lambda: keeper.held is not taken_before)
    assert ("lost", "taken by 192.0.2.99") in record.facts
    # Someone else's key changing is none of the keeper's business.
    ours = keeper.held.lease.subnet
    neighbour = ours.network_address + (256 if ours.network_address.packed[2] < 255 else -256)
    other = subnet_key(PREFIX, IPv4Network((neighbour, 24)))
    assert other != keeper.held.key
    keeper.own_key_changed(other, None)
    assert record.facts.count(("lost", "deleted from etcd")) == 1


async def test_a_config_the_lease_no_longer_fits_leases_again_inside_the_new_network(
    kept: tuple[FakeStore, LeaseKeeper, HostState, Record, list[Host]],
) -> None:
    _, keeper, host, _, hosts = kept
    old_key = keeper.held.key
    moved = json.dumps({"Network": "10.250.0.0/16"}).encode()
    host.config_changed(f"{PREFIX}/config", moved)
    await eventually(lambda: keeper.held.key != old_key)
    assert str(keeper.held.lease.subnet).startswith("10.250.")
    assert host.own == keeper.held.lease
    assert hosts[-1].spec.gateway.ip in keeper.held.lease.subnet
    assert str(host.egress.cluster) == "10.250.0.0/16"


async def test_a_bad_config_while_running_keeps_the_last_good_one(
    kept: tuple[FakeStore, LeaseKeeper, HostState, Record, list[Host]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, _, host, _, hosts = kept
    before = host.host
    host.config_changed(f"{PREFIX}/config", b'{"Network": "not a network"}')
    host.config_changed(f"{PREFIX}/config", b'{"Network": "not a network"}')
    host.config_changed(f"{PREFIX}/config", None)
    assert host.host is before and hosts == []
    rejected = [r for r in caplog.records if "config_rejected" in r.getMessage()]
    assert len(rejected) == 1 and "field=Network" in rejected[0].getMessage()
    # Positive control: a good change does go through.
    host.config_changed(
        f"{PREFIX}/config", b'{"Network": "10.244.0.0/16", "Backend": {"Port": 4789}}'
    )
    assert host.spec.port == 4789 and len(hosts) == 1


async def test_losing_our_key_leases_again_once_and_gives_the_old_etcd_lease_back(
    kept: tuple[FakeStore, LeaseKeeper, HostState, Record, list[Host]],
) -> None:
    store, keeper, _, record, _ = kept
    before = keeper.held
    await store.delete(before.key)
    keeper.own_key_changed(before.key, None)
    await eventually(lambda: keeper.held.lease_id != before.lease_id)
    await eventually(lambda: store.leases[before.lease_id] == 0)  # revoked
    await asyncio.sleep(0.2)  # room for a second, spurious re-lease
    assert [fact for fact in record.facts if fact[0] == "acquired"] == [("acquired", before.key)]


def test_a_lease_fits_a_config_of_its_own_backend_only() -> None:
    vxlan = Lease(IPv4Network("10.244.5.0/24"), UNDERLAY.address, 1, "02:00:00:00:00:05")
    host_gw = Lease(IPv4Network("10.244.5.0/24"), UNDERLAY.address, 0, "", "host-gw")
    hgw_config = parse_network_config(
        '{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}'
    )
    other_vni = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"VNI": 7}}')
    assert lease_fits(CONFIG, vxlan) and lease_fits(hgw_config, host_gw)
    assert not lease_fits(hgw_config, vxlan) and not lease_fits(CONFIG, host_gw)
    assert not lease_fits(other_vni, vxlan)
