"""Holding this host's subnet lease in etcd: acquire it (`SubnetLeaser`),
keep it alive and lease again when it is lost (`LeaseKeeper`), take it back
after a restart.

Safety comes from etcd: a subnet key is only ever created by a transaction
that succeeds when the key is absent, bound to an etcd lease, so two hosts
can never hold the same subnet; keys of one network all have the same
length and alignment, so they never partly overlap either.

In a dual-stack network one key names both subnets (flannel's
`10.244.1.0-24&fd00:10:244:1::-64`), so one transaction allocates both; it
also checks that the v4-only spelling of the same IPv4 subnet is absent.
What it cannot check is another host's dual key for a different IPv4 subnet
naming the same IPv6 subnet (etcd compares keys, not what they name): the
IPv6 subnet is chosen among those no listed key names, and a collision that
races past that is caught by `select_peers`, which gives neither host's
IPv6 half to the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Protocol

from overlayd.errors import LeaseError, SubnetsExhaustedError
from overlayd.model import Lease, NetworkConfig
from overlayd.plan.desired import stable_mac
from overlayd.plan.host import lease_fits
from overlayd.plan.ipam import is_candidate, paired_subnet6, pick_subnet
from overlayd.plan.leases import (
    parse_lease,
    parse_lease_key,
    render_lease,
    subnet_key,
    subnet_key_range,
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


def own_lease(
    config: NetworkConfig,
    subnet: IPv4Network,
    public_ip: IPv4Address,
    subnet6: IPv6Network | None = None,
    public_ipv6: IPv6Address | None = None,
) -> Lease:
    """This host's lease; with both IPv6 arguments, a dual-stack one whose
    IPv6 VtepMAC, like the IPv4 one, depends on the subnet only."""
    if subnet6 is None or public_ipv6 is None:
        subnet6 = public_ipv6 = None
    if config.backend.type == "host-gw":
        return Lease(subnet, public_ip, 0, "", "host-gw", subnet6, public_ipv6)
    vni = config.backend.vni
    return Lease(
        subnet,
        public_ip,
        vni,
        stable_mac("vtep", subnet, vni),
        ipv6_subnet=subnet6,
        public_ipv6=public_ipv6,
        vtep_mac_v6=stable_mac("vtep6", subnet6, vni) if subnet6 is not None else "",
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
        public_ipv6: IPv6Address | None = None,
    ) -> None:
        self._store = store
        self._prefix = etcd_prefix
        self._public_ip = public_ip
        self.public_ipv6 = public_ipv6
        # True when the last acquisition found no free IPv6 subnet: the
        # lease is then rightly IPv4-only (see lease_fits' ipv6_capable).
        self.ipv6_exhausted = False
        self._ttl = ttl
        self._rng = rng or random.Random()

    def _previous_subnet(self, config: NetworkConfig, raw: dict[str, bytes]) -> str | None:
        """The key of a live lease that already belongs to our public IP."""
        for key, value in raw.items():
            try:
                subnet, _ = parse_lease_key(key, self._prefix)
                lease = parse_lease(subnet, value)
            except LeaseError:
                continue
            if lease.public_ip == self._public_ip and is_candidate(config, lease.subnet):
                return key
        return None

    def _ipv6_subnet(
        self,
        config: NetworkConfig,
        raw: dict[str, bytes],
        *,
        keep: IPv6Network | None,
        hints: tuple[IPv6Network, ...],
        ours: str | None,
        paired: IPv4Network,
    ) -> IPv6Network | None:
        """The IPv6 subnet to hold: None unless the network is dual-stack and
        this host has an IPv6 underlay address; else `keep` (the one our
        previous key names) if still a free candidate, else the hints (the
        subnet file of a previous run), else the IPv6 subnet with the same
        index as our IPv4 one (`paired_subnet6`), else any free one.

        The pairing is what keeps IPv6 subnets unique among overlayd hosts:
        etcd's transaction guards every spelling of a key for our IPv4
        subnet, and two hosts holding different IPv4 subnets pair them with
        different IPv6 ones. Only a host that picks otherwise (flannel, or
        the fallback when the paired one is taken) can race; `select_peers`
        then gives neither claimant's IPv6 subnet any route. With IPv6
        subnets exhausted the host goes on with IPv4 only (warned)."""
        self.ipv6_exhausted = False
        pool = config.ipv6
        if pool is None or self.public_ipv6 is None:
            return None
        taken: list[IPv6Network] = []
        for key in raw:
            if key == ours:
                continue
            try:
                _, subnet6 = parse_lease_key(key, self._prefix)
            except LeaseError:
                continue
            if subnet6 is not None:
                taken.append(subnet6)
        pair = paired_subnet6(config, paired)
        preferred = ((keep,) if keep is not None else ()) + hints + ((pair,) if pair else ())
        try:
            return pick_subnet(pool, taken, preferred=preferred, rng=self._rng)
        except SubnetsExhaustedError as exc:
            log.warning("event=ipv6_subnets_exhausted effect=%r reason=%r", "IPv4 only", str(exc))
            self.ipv6_exhausted = True
            return None

    async def acquire(
        self,
        config: NetworkConfig,
        *,
        hints: tuple[IPv4Network, ...] = (),
        hints6: tuple[IPv6Network, ...] = (),
    ) -> HeldLease:
        """Take back our previous subnets if etcd still has them, else the
        first free hints (the subnet file of a previous run), else free ones."""
        lease_id = await self._store.grant(self._ttl)
        try:
            held = await self._acquire_with(config, hints, hints6, lease_id)
        except BaseException:
            # Do not leave an unused etcd lease behind until its TTL runs out.
            with contextlib.suppress(Exception):
                await self._store.revoke(lease_id)
            raise
        return held

    async def _acquire_with(
        self,
        config: NetworkConfig,
        hints: tuple[IPv4Network, ...],
        hints6: tuple[IPv6Network, ...],
        lease_id: int,
    ) -> HeldLease:
        for _ in range(MAX_ATTEMPTS):
            raw, _ = await self._store.get_prefix(subnets_prefix(self._prefix))
            previous = self._previous_subnet(config, raw)
            if previous is not None:
                held = await self._take_over(config, raw, previous, lease_id, hints6)
                if held is not None:
                    return held
                continue
            taken = []
            for key in raw:
                try:
                    taken.append(parse_lease_key(key, self._prefix)[0])
                except LeaseError:
                    continue
            subnet = pick_subnet(config, taken, preferred=hints, rng=self._rng)
            subnet6 = self._ipv6_subnet(
                config, raw, keep=None, hints=hints6, ours=None, paired=subnet
            )
            lease = own_lease(config, subnet, self._public_ip, subnet6, self.public_ipv6)
            key = subnet_key(self._prefix, subnet, subnet6)
            # Any spelling of a key for this IPv4 subnet (v4-only or with
            # any IPv6 subnet) holds the subnet: none may exist.
            absent = subnet_key_range(self._prefix, subnet)
            if await self._store.create(key, render_lease(lease), lease_id, absent=absent):
                log.info("event=lease_acquired subnet=%s key=%s ttl=%d", subnet, key, self._ttl)
                return HeldLease(lease=lease, key=key, lease_id=lease_id)
            log.debug("subnet %s was taken meanwhile; choosing again", subnet)
        raise SubnetsExhaustedError(
            f"could not lease a subnet of {config.network} after {MAX_ATTEMPTS} attempts"
        )

    async def _take_over(
        self,
        config: NetworkConfig,
        raw: dict[str, bytes],
        key: str,
        lease_id: int,
        hints6: tuple[IPv6Network, ...],
    ) -> HeldLease | None:
        """Our previous key, rebound to our etcd lease; if the IPv6 half must
        change (the network became dual-stack, or stopped being, or the old
        IPv6 subnet no longer fits), the key is replaced in the same
        transaction, so the IPv4 subnet is never free in between."""
        found = await self._store.get_with_revision(key)
        if found is None:
            return None
        subnet, old6 = parse_lease_key(key, self._prefix)
        subnet6 = self._ipv6_subnet(config, raw, keep=old6, hints=hints6, ours=key, paired=subnet)
        lease = own_lease(config, subnet, self._public_ip, subnet6, self.public_ipv6)
        new_key = subnet_key(self._prefix, subnet, subnet6)
        value = render_lease(lease)
        if new_key == key:
            done = await self._store.take_over(key, value, lease_id, found[1])
        else:
            absent = subnet_key_range(self._prefix, subnet)
            done = await self._store.rekey(key, found[1], new_key, value, lease_id, absent=absent)
        if not done:
            return None
        log.info("event=lease_reclaimed subnet=%s key=%s ttl=%d", subnet, new_key, self._ttl)
        return HeldLease(lease=lease, key=new_key, lease_id=lease_id)

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
            partial(
                self._leaser.acquire,
                self._config(),
                hints=(old.lease.subnet,),
                hints6=(old.lease.ipv6_subnet,) if old.lease.ipv6_subnet is not None else (),
            ),
        )
        self.held = held
        # Events about the old key that came in while we leased again (its
        # deletion, say) are about a lease we no longer rely on; what matters
        # is whether the new one fits the config as it is now.
        self._doubt.clear()
        capable = self._leaser.public_ipv6 is not None and not self._leaser.ipv6_exhausted
        if not lease_fits(self._config(), held.lease, ipv6_capable=capable):
            self._doubt.set()
        if old.lease_id != held.lease_id:
            await self._leaser.revoke(old.lease_id)  # keeps nothing any more
        self._telemetry.lease_acquired(held.lease, held.key, self._ttl)
        self._on_new_lease(held)
