"""Holding this host's subnet lease in etcd: acquire it (`SubnetLeaser`),
keep it alive and lease again when it is lost (`LeaseKeeper`), take it back
after a restart.

Safety comes from etcd: a subnet key is only ever created by a transaction
that succeeds when the key is absent, bound to an etcd lease, so two hosts
can never hold the same subnet; keys of one network all have the same
length and alignment, so they never partly overlap either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from overlayd.errors import LeaseError, SubnetsExhaustedError
from overlayd.model import Lease, NetworkConfig
from overlayd.plan.desired import stable_mac
from overlayd.plan.host import lease_fits
from overlayd.plan.ipam import is_candidate, pick_subnet
from overlayd.plan.leases import (
    parse_lease,
    parse_subnet_key,
    render_lease,
    subnet_key,
    subnets_prefix,
)
from overlayd.store.base import Store, retry_unavailable

log = logging.getLogger(__name__)

# Attempts before giving up when other hosts keep taking the subnet we chose.
MAX_ATTEMPTS = 50


class LeaseTelemetry(Protocol):
    """What the lease keeper reports (surfaces.telemetry.Telemetry does)."""

    def lease_acquired(self, lease: Lease, key: str, ttl: float) -> None: ...

    def lease_renewed(self, ttl: float) -> None: ...

    def lease_lost(self, reason: str) -> None: ...


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
        store: Store,
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

    async def revoke(self, lease_id: int) -> None:
        """Give up an etcd lease we no longer use. Best effort: if etcd cannot
        be reached, or the lease has already expired (etcd answers "not
        found"), it is gone or goes by its TTL, which is as good."""
        with contextlib.suppress(Exception):
            await self._store.revoke(lease_id)

    async def renew(self, held: HeldLease) -> bool:
        """Refresh the etcd lease; False when it has expired."""
        ttl = await self._store.refresh(held.lease_id)
        return ttl > 0

    @property
    def renew_interval(self) -> float:
        return max(1.0, self._ttl / 3)


class LeaseKeeper:
    """Keeps this host's lease: renews it every third of its TTL, and leases
    again, preferring the same subnet, when it expired (etcd out of reach for
    longer than the TTL), was deleted or taken by someone, or no longer fits
    the config. It is the only writer of the held lease; the mirror tells it
    about its own key (`own_key_changed`)."""

    def __init__(
        self,
        leaser: SubnetLeaser,
        held: HeldLease,
        *,
        config: Callable[[], NetworkConfig],
        on_new_lease: Callable[[HeldLease], None],
        telemetry: LeaseTelemetry,
        ttl: int,
    ) -> None:
        self._leaser = leaser
        self.held = held
        self._config = config
        self._on_new_lease = on_new_lease
        self._telemetry = telemetry
        self._ttl = ttl
        self._doubt = asyncio.Event()

    def doubt(self, reason: str) -> None:
        """Lease again at once."""
        log.info("event=lease_again reason=%r", reason)
        self._doubt.set()

    def own_key_changed(self, key: str, value: bytes | None) -> None:
        """A change to any lease key; only our own current key matters."""
        held = self.held
        if key != held.key:
            return
        if value is None:
            log.warning("event=own_lease_deleted key=%s", held.key)
            self._telemetry.lease_lost("deleted from etcd")
            self._doubt.set()
            return
        with contextlib.suppress(LeaseError):
            lease = parse_lease(held.lease.subnet, value)
            if lease.public_ip != held.lease.public_ip:
                log.warning("event=own_lease_taken key=%s by=%s", held.key, lease.public_ip)
                self._telemetry.lease_lost(f"taken by {lease.public_ip}")
                self._doubt.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._leaser.renew_interval):
                    await self._doubt.wait()
            if not self._doubt.is_set():
                if await retry_unavailable("renew lease", partial(self._leaser.renew, self.held)):
                    self._telemetry.lease_renewed(self._ttl)
                    continue
                log.warning("event=lease_expired key=%s", self.held.key)
                self._telemetry.lease_lost("expired")
            self._doubt.clear()
            await self._lease_again()

    async def _lease_again(self) -> None:
        # Preferring the subnet we had, so that peers see no change if it is free.
        old = self.held
        held = await retry_unavailable(
            "re-acquire lease",
            partial(self._leaser.acquire, self._config(), hints=(old.lease.subnet,)),
        )
        self.held = held
        # Events about the old key that came in while we leased again (its
        # deletion, say) are about a lease we no longer rely on; what matters
        # is whether the new one fits the config as it is now.
        self._doubt.clear()
        if not lease_fits(self._config(), held.lease):
            self._doubt.set()
        if old.lease_id != held.lease_id:
            await self._leaser.revoke(old.lease_id)  # keeps nothing any more
        self._telemetry.lease_acquired(held.lease, held.key, self._ttl)
        self._on_new_lease(held)
