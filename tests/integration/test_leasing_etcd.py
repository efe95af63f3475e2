"""Subnet leases against a real etcd: atomic, distinct under contention,
taken back after a restart, renewed, and refused clearly when exhausted."""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from overlayd.config import parse_network_config
from overlayd.daemon.leasing import SubnetLeaser
from overlayd.errors import SubnetsExhaustedError
from overlayd.plan.leases import (
    parse_lease,
    parse_subnet_key,
    subnet_key,
    subnet_key_range,
    subnets_prefix,
)
from overlayd.store.etcd import EtcdStore
from tests.conftest import CONVERGE

CONFIG = parse_network_config('{"Network": "10.244.0.0/16"}')
TINY = parse_network_config('{"Network": "10.9.0.0/26"}')  # three /28s


def leaser(store: EtcdStore, prefix: str, host: int, ttl: int = 30) -> SubnetLeaser:
    return SubnetLeaser(
        store, etcd_prefix=prefix, public_ip=IPv4Address(f"192.0.2.{host}"), ttl=ttl
    )


async def test_many_hosts_starting_at_once_get_distinct_subnets(
    etcd_endpoint: str, prefix: str
) -> None:
    async with EtcdStore([etcd_endpoint]) as store:
        held = await asyncio.gather(
            *(leaser(store, prefix, host).acquire(CONFIG) for host in range(1, 101))
        )
        subnets = [h.lease.subnet for h in held]
        assert len(set(subnets)) == 100
        raw, _ = await store.get_prefix(subnets_prefix(prefix))
    assert len(raw) == 100
    for key, value in raw.items():
        lease = parse_lease(parse_subnet_key(key, prefix), value)
        assert lease.subnet.subnet_of(CONFIG.network)
        assert lease.subnet.network_address >= CONFIG.subnet_min


async def test_the_lease_value_is_flannels(etcd_endpoint: str, prefix: str) -> None:
    async with EtcdStore([etcd_endpoint]) as store:
        held = await leaser(store, prefix, 7).acquire(CONFIG)
        value, _ = await store.get(held.key)
    assert value is not None
    raw = json.loads(value)
    assert raw["PublicIP"] == "192.0.2.7" and raw["BackendType"] == "vxlan"
    assert raw["BackendData"] == {"VNI": 1, "VtepMAC": held.lease.vtep_mac}
    assert held.key == subnet_key(prefix, held.lease.subnet)


async def test_a_restarted_host_takes_back_its_subnet_and_mac(
    etcd_endpoint: str, prefix: str
) -> None:
    async with EtcdStore([etcd_endpoint]) as store:
        first = await leaser(store, prefix, 5).acquire(CONFIG)
        for other in range(10, 20):
            await leaser(store, prefix, other).acquire(CONFIG)
        again = await leaser(store, prefix, 5).acquire(CONFIG)  # the old etcd lease still lives
        assert again.lease == first.lease and again.key == first.key
        assert again.lease_id != first.lease_id
        # The key now hangs on the new etcd lease: revoking the old one keeps it.
        await store.revoke(first.lease_id)
        assert (await store.get(first.key))[0] is not None


async def test_the_subnet_file_hint_is_used_when_free_and_skipped_when_taken(
    etcd_endpoint: str, prefix: str
) -> None:
    wanted = IPv4Network("10.244.200.0/24")
    async with EtcdStore([etcd_endpoint]) as store:
        held = await leaser(store, prefix, 1).acquire(CONFIG, hints=(wanted,))
        assert held.lease.subnet == wanted
        other = await leaser(store, prefix, 2).acquire(CONFIG, hints=(wanted,))
        assert other.lease.subnet != wanted


async def gone(store: EtcdStore, *keys: str) -> None:
    """Until etcd has expired the keys (it revokes a lease some time after its
    TTL, later on a busy machine); fails after CONVERGE seconds."""
    async with asyncio.timeout(CONVERGE):
        while True:
            values = [(await store.get(key))[0] for key in keys]
            if all(value is None for value in values):
                return
            await asyncio.sleep(0.1)


async def test_renewal_keeps_the_lease_and_reports_expiry(etcd_endpoint: str, prefix: str) -> None:
    async with EtcdStore([etcd_endpoint]) as store:
        # Renewed every second, well inside the TTL even on a loaded machine,
        # for longer than the TTL: the key must outlive it.
        held = await leaser(store, prefix, 1, ttl=3).acquire(CONFIG)
        lease_holder = leaser(store, prefix, 1, ttl=3)
        for _ in range(4):
            await asyncio.sleep(1)
            assert await lease_holder.renew(held)
        assert (await store.get(held.key))[0] is not None
        await gone(store, held.key)  # no more renewals: it expires
        assert not await lease_holder.renew(held)


async def test_exhaustion_is_a_clear_error_and_an_expired_lease_is_reused(
    etcd_endpoint: str, prefix: str
) -> None:
    async with EtcdStore([etcd_endpoint]) as store:
        short = [await leaser(store, prefix, h, ttl=2).acquire(TINY) for h in (1, 2)]
        await leaser(store, prefix, 3, ttl=60).acquire(TINY)
        with pytest.raises(SubnetsExhaustedError, match=r"/28 subnet left in 10.9.0.0/26"):
            await leaser(store, prefix, 4).acquire(TINY)
        await gone(store, *(h.key for h in short))  # the two short leases expire
        late = await leaser(store, prefix, 4).acquire(TINY)
        assert late.lease.subnet in {h.lease.subnet for h in short}


DUAL = parse_network_config(
    '{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56"}'
)


def dual_leaser(store: EtcdStore, prefix: str, host: int) -> SubnetLeaser:
    return SubnetLeaser(
        store,
        etcd_prefix=prefix,
        public_ip=IPv4Address(f"192.0.2.{host}"),
        ttl=30,
        public_ipv6=IPv6Address(f"2001:db8::{host}"),
    )


async def test_dual_stack_hosts_starting_at_once_get_distinct_subnets_of_both_families(
    etcd_endpoint: str, prefix: str
) -> None:
    async with EtcdStore([etcd_endpoint]) as store:
        held = await asyncio.gather(
            *(dual_leaser(store, prefix, host).acquire(DUAL) for host in range(1, 61))
        )
        raw, _ = await store.get_prefix(subnets_prefix(prefix))
    assert len(raw) == 60 and all("&fd00:10:244:" in key for key in raw)
    assert len({h.lease.subnet for h in held}) == 60
    assert len({h.lease.ipv6_subnet for h in held}) == 60


async def test_etcd_refuses_a_second_spelling_of_a_held_ipv4_subnet(
    etcd_endpoint: str, prefix: str
) -> None:
    """The range compare in the create transaction, on a real etcd: a key for
    10.244.7.0/24 with any IPv6 subnet, or none, blocks every other."""
    subnet = IPv4Network("10.244.7.0/24")
    async with EtcdStore([etcd_endpoint]) as store:
        lease_id = await store.grant(30)
        first = subnet_key(prefix, subnet, IPv6Network("fd00:10:244:7::/64"))
        absent = subnet_key_range(prefix, subnet)
        assert await store.create(first, "{}", lease_id, absent=absent)  # the control
        for other in (
            subnet_key(prefix, subnet),
            subnet_key(prefix, subnet, IPv6Network("fd00:10:244:70::/64")),
        ):
            assert not await store.create(other, "{}", lease_id, absent=absent)
        # A neighbouring subnet whose key shares the prefix text is not blocked.
        near = subnet_key(prefix, IPv4Network("10.244.7.0/25"))
        assert await store.create(
            near, "{}", lease_id, absent=subnet_key_range(prefix, IPv4Network("10.244.7.0/25"))
        )
        # Re-keying the held one (v6 added or changed) is allowed; with a
        # second spelling present it is not.
        found = await store.get_with_revision(first)
        assert found is not None
        second = subnet_key(prefix, subnet, IPv6Network("fd00:10:244:8::/64"))
        assert await store.rekey(first, found[1], second, "{}", lease_id, absent=absent)
        await store.put(subnet_key(prefix, subnet), "{}")  # somebody else's spelling
        found = await store.get_with_revision(second)
        assert found is not None
        third = subnet_key(prefix, subnet, IPv6Network("fd00:10:244:9::/64"))
        assert not await store.rekey(second, found[1], third, "{}", lease_id, absent=absent)
