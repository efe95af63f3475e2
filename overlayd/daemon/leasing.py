"""Holding this host's subnet lease in etcd: acquire it, keep it alive, take
it back after a restart.

Safety comes from etcd: a subnet key is only ever created by a transaction
that succeeds when the key is absent, bound to an etcd lease, so two hosts
can never hold the same subnet; keys of one network all have the same
length and alignment, so they never partly overlap either.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from overlayd.errors import LeaseError, SubnetsExhaustedError
from overlayd.model import Lease, NetworkConfig
from overlayd.plan.desired import stable_mac
from overlayd.plan.ipam import is_candidate, pick_subnet
from overlayd.plan.leases import (
    parse_lease,
    parse_subnet_key,
    render_lease,
    subnet_key,
    subnets_prefix,
)
from overlayd.store.etcd import EtcdStore

log = logging.getLogger(__name__)

# Attempts before giving up when other hosts keep taking the subnet we chose.
MAX_ATTEMPTS = 50


@dataclass(frozen=True, slots=True)
class HeldLease:
    lease: Lease
    key: str
    lease_id: int


def own_lease(config: NetworkConfig, subnet: IPv4Network, public_ip: IPv4Address) -> Lease:
    if config.backend.type == "host-gw":
        return Lease(subnet=subnet, public_ip=public_ip, vni=0, vtep_mac="", backend_type="host-gw")
    vni = config.backend.vni
    return Lease(
        subnet=subnet,
        public_ip=public_ip,
        vni=vni,
        vtep_mac=stable_mac("vtep", subnet, vni),
    )


class SubnetLeaser:
    """Acquires and renews one subnet lease for one public IP."""

    def __init__(
        self,
        store: EtcdStore,
        *,
        etcd_prefix: str,
        public_ip: IPv4Address,
        ttl: int,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._prefix = etcd_prefix
        self._public_ip = public_ip
        self._ttl = ttl
        self._rng = rng or random.Random()

    async def _previous_subnet(self, config: NetworkConfig, raw: dict[str, bytes]) -> str | None:
        """The key of a live lease that already belongs to our public IP."""
        for key, value in raw.items():
            try:
                lease = parse_lease(parse_subnet_key(key, self._prefix), value)
            except LeaseError:
                continue
            if lease.public_ip == self._public_ip and is_candidate(config, lease.subnet):
                return key
        return None

    async def acquire(
        self, config: NetworkConfig, *, hints: tuple[IPv4Network, ...] = ()
    ) -> HeldLease:
        """Take back our previous subnet if etcd still has it, else the first
        free hint (the subnet file of a previous run), else a free subnet."""
        lease_id = await self._store.grant(self._ttl)
        try:
            held = await self._acquire_with(config, hints, lease_id)
        except BaseException:
            # Do not leave an unused etcd lease behind until its TTL runs out.
            with contextlib.suppress(Exception):
                await self._store.revoke(lease_id)
            raise
        return held

    async def _acquire_with(
        self, config: NetworkConfig, hints: tuple[IPv4Network, ...], lease_id: int
    ) -> HeldLease:
        for _ in range(MAX_ATTEMPTS):
            raw, _ = await self._store.get_prefix(subnets_prefix(self._prefix))
            previous = await self._previous_subnet(config, raw)
            if previous is not None:
                held = await self._take_over(config, previous, lease_id)
                if held is not None:
                    return held
                continue
            taken = []
            for key in raw:
                try:
                    taken.append(parse_subnet_key(key, self._prefix))
                except LeaseError:
                    continue
            subnet = pick_subnet(config, taken, preferred=hints, rng=self._rng)
            lease = own_lease(config, subnet, self._public_ip)
            key = subnet_key(self._prefix, subnet)
            if await self._store.create(key, render_lease(lease), lease_id):
                log.info("event=lease_acquired subnet=%s key=%s ttl=%d", subnet, key, self._ttl)
                return HeldLease(lease=lease, key=key, lease_id=lease_id)
            log.debug("subnet %s was taken meanwhile; choosing again", subnet)
        raise SubnetsExhaustedError(
            f"could not lease a subnet of {config.network} after {MAX_ATTEMPTS} attempts"
        )

    async def _take_over(self, config: NetworkConfig, key: str, lease_id: int) -> HeldLease | None:
        found = await self._store.get_with_revision(key)
        if found is None:
            return None
        subnet = parse_subnet_key(key, self._prefix)
        lease = own_lease(config, subnet, self._public_ip)
        if not await self._store.take_over(key, render_lease(lease), lease_id, found[1]):
            return None
        log.info("event=lease_reclaimed subnet=%s key=%s ttl=%d", subnet, key, self._ttl)
        return HeldLease(lease=lease, key=key, lease_id=lease_id)

    async def renew(self, held: HeldLease) -> bool:
        """Refresh the etcd lease; False when it has expired."""
        ttl = await self._store.refresh(held.lease_id)
        return ttl > 0

    @property
    def renew_interval(self) -> float:
        return max(1.0, self._ttl / 3)
