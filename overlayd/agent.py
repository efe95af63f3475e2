"""The composition root: builds the adapters and runs the agent's tasks.

Start-up is sequential (underlay, network config, lease, first reconcile,
subnet file); after that a TaskGroup runs the lease keep-alive, the etcd
watch, the resync timer and the reconcile loop until the process is told
to stop. Stopping leaves the data plane in place, so a restart is hitless.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from ipaddress import IPv4Network
from typing import TypeVar

from overlayd.config import AgentConfig, parse_network_config
from overlayd.dataplane import Dataplane
from overlayd.errors import ConfigError
from overlayd.leasing import HeldLease, SubnetLeaser, sleep_backoff
from overlayd.model import NetworkConfig
from overlayd.plan.desired import device_spec, overlay_mtu
from overlayd.plan.egress import EgressSpec, choose_gwbridge_subnet
from overlayd.plan.leases import config_key, subnets_prefix
from overlayd.reconcile import Knowledge, Reconciler
from overlayd.store.etcd import EtcdStore, StoreUnavailable, WatchCompacted
from overlayd.subnetfile import SubnetFile, read_subnet, write_atomically

T = TypeVar("T")

log = logging.getLogger("overlayd")


async def retry_unavailable(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """Call until etcd answers, backing off with jitter between attempts."""
    attempt = 0
    while True:
        try:
            return await call()
        except StoreUnavailable as exc:
            if attempt % 10 == 0:
                log.warning("event=etcd_unavailable during=%s error=%r", what, str(exc)[:200])
            await sleep_backoff(attempt)
            attempt += 1


class Agent:
    def __init__(self, settings: AgentConfig) -> None:
        self.settings = settings
        self.store = EtcdStore(settings.etcd_endpoints)
        self.dataplane = Dataplane.open()
        self.ready = asyncio.Event()
        self.reconciler: Reconciler | None = None
        self._revision = 0

    async def close(self) -> None:
        await self.store.close()
        await self.dataplane.close()

    async def _network_config(self) -> NetworkConfig:
        key = config_key(self.settings.etcd_prefix)
        waited = False
        while True:
            value, _ = await retry_unavailable("read config", lambda: self.store.get(key))
            if value is not None:
                # An invalid config is fatal at start: ConfigError names the field.
                return parse_network_config(value)
            if not waited:
                log.warning("event=waiting_for_config key=%s", key)
                waited = True
            await asyncio.sleep(1.0)

    async def _egress(self, config: NetworkConfig) -> EgressSpec:
        s = self.settings
        subnet = None
        if s.egress == "gwbridge":
            routes = await self.dataplane.netlink.ipv4_routes(exclude_dev=s.gwbridge)
            subnet = choose_gwbridge_subnet(s.gwbridge_subnet, config.network, routes)
        egress = EgressSpec(
            mode=s.egress,
            cluster=config.network,
            overlay_bridge=s.bridge,
            gwbridge=s.gwbridge,
            gwbridge_subnet=subnet,
        )
        log.info("event=egress mode=%s gwbridge=%s subnet=%s", s.egress, s.gwbridge, subnet)
        return egress

    def _write_subnet_file(self, k: Knowledge) -> None:
        write_atomically(
            self.settings.subnet_file,
            SubnetFile(
                network=k.config.network,
                subnet=k.own.subnet,
                mtu=k.spec.mtu,
                ipmasq=k.egress.mode == "masquerade",
                egress=k.egress.mode,
                gwbridge=k.egress.gwbridge if k.egress.mode == "gwbridge" else None,
                gwbridge_gateway=k.egress.gwbridge_gateway,
            ).render(),
        )

    async def run(self) -> None:
        s = self.settings
        underlay = await self.dataplane.netlink.find_underlay(s.iface, s.public_ip)
        log.info(
            "event=underlay iface=%s address=%s mtu=%d",
            underlay.name,
            underlay.address,
            underlay.mtu,
        )
        config = await self._network_config()
        mtu = overlay_mtu(config, underlay.mtu)
        if mtu > underlay.mtu - 50:
            raise ConfigError(
                "Backend.MTU",
                f"{mtu} does not fit in {underlay.name}'s MTU {underlay.mtu} minus 50",
            )
        egress = await self._egress(config)  # before leasing: a bad gwbridge-subnet is fatal
        leaser = SubnetLeaser(
            self.store, etcd_prefix=s.etcd_prefix, public_ip=underlay.address, ttl=s.lease_ttl
        )
        hint = read_subnet(s.subnet_file)
        hints: tuple[IPv4Network, ...] = (hint,) if hint is not None else ()
        held = await retry_unavailable("acquire lease", lambda: leaser.acquire(config, hints=hints))
        spec = device_spec(
            config=config,
            own=held.lease,
            bridge=s.bridge,
            underlay_ifindex=underlay.ifindex,
            underlay_mtu=underlay.mtu,
        )
        knowledge = Knowledge(
            config=config,
            own=held.lease,
            spec=spec,
            egress=egress,
            etcd_prefix=s.etcd_prefix,
        )
        raw, self._revision = await retry_unavailable(
            "list leases", lambda: self.store.get_prefix(subnets_prefix(s.etcd_prefix))
        )
        knowledge.raw_leases = raw
        self.reconciler = Reconciler(knowledge, self.dataplane)
        first = await self.reconciler.reconcile_once()
        while not first.ok:
            await asyncio.sleep(1.0)
            first = await self.reconciler.reconcile_once()
        self._write_subnet_file(knowledge)
        log.info(
            "event=ready subnet=%s vtep_mac=%s peers=%d subnet_file=%s",
            held.lease.subnet,
            held.lease.vtep_mac,
            first.peers,
            s.subnet_file,
        )
        self.ready.set()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._keep_alive(leaser, held, knowledge), name="keep-alive")
            group.create_task(self._watch(knowledge), name="watch")
            group.create_task(self.reconciler.resync_every(s.resync_seconds), name="resync")
            group.create_task(self.reconciler.run(), name="reconcile")

    async def _keep_alive(
        self, leaser: SubnetLeaser, held: HeldLease, knowledge: Knowledge
    ) -> None:
        assert self.reconciler is not None
        while True:
            await asyncio.sleep(leaser.renew_interval)
            alive = await retry_unavailable("renew lease", partial(leaser.renew, held))
            if alive and held.key in knowledge.raw_leases:
                continue
            # Expired (etcd unreachable for longer than the TTL) or deleted by
            # someone: lease again, preferring the subnet we had.
            log.warning("event=lease_lost key=%s", held.key)
            held = await retry_unavailable(
                "re-acquire lease",
                partial(leaser.acquire, knowledge.config, hints=(held.lease.subnet,)),
            )
            config = knowledge.config
            if held.lease != knowledge.own:
                log.warning("event=lease_changed subnet=%s", held.lease.subnet)
                knowledge.own = held.lease
                knowledge.spec = device_spec(
                    config=config,
                    own=held.lease,
                    bridge=knowledge.spec.bridge,
                    underlay_ifindex=knowledge.spec.underlay_ifindex,
                    underlay_mtu=knowledge.spec.mtu + 50,
                )
                self._write_subnet_file(knowledge)
            self.reconciler.mark_dirty()

    async def _watch(self, knowledge: Knowledge) -> None:
        assert self.reconciler is not None
        prefix = subnets_prefix(self.settings.etcd_prefix)
        attempt = 0
        while True:
            try:
                async for event in self.store.watch_prefix(prefix, self._revision + 1):
                    attempt = 0
                    self._revision = max(self._revision, event.revision)
                    if event.value is None:
                        knowledge.raw_leases.pop(event.key, None)
                    else:
                        knowledge.raw_leases[event.key] = event.value
                    self.reconciler.mark_dirty()
            except WatchCompacted:
                log.warning("event=watch_compacted revision=%d; listing again", self._revision)
                raw, self._revision = await retry_unavailable(
                    "list leases", lambda: self.store.get_prefix(prefix)
                )
                knowledge.raw_leases = raw
                self.reconciler.mark_dirty()
            except StoreUnavailable as exc:
                if attempt == 0:
                    log.warning("event=watch_interrupted error=%r", str(exc)[:200])
                await sleep_backoff(attempt)
                attempt += 1
