"""The composition root: builds the adapters and runs the agent's tasks.

The control socket and the metrics endpoint open first, so that a start
that waits for etcd can be seen waiting. Start-up is then sequential
(underlay, network config, egress plan, lease, first reconcile, subnet
file, READY to systemd); after that a TaskGroup runs the lease keep-alive,
the etcd watch, the netlink drift monitor, the resync timer, the reconcile
loop, the heartbeat and watchdog, and the MQTT publisher if one is
configured, until the process is told to stop. Stopping leaves the data
plane in place, so a restart is hitless; `teardown` removes it on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from ipaddress import IPv4Network
from typing import TypeVar

from overlayd.backoff import sleep_backoff
from overlayd.config import AgentConfig, parse_network_config
from overlayd.daemon.leasing import HeldLease, SubnetLeaser
from overlayd.daemon.loop import Knowledge, Reconciler
from overlayd.dataplane import Dataplane
from overlayd.dataplane.netlink import Underlay
from overlayd.errors import ConfigError, LeaseError
from overlayd.model import VXLAN_OVERHEAD, DeviceSpec, Lease, NetworkConfig
from overlayd.plan.desired import device_spec, max_overlay_mtu, overlay_mtu
from overlayd.plan.egress import EgressSpec, choose_gwbridge_subnet
from overlayd.plan.ipam import is_candidate
from overlayd.plan.leases import config_key, parse_lease, parse_subnet_key, subnet_key
from overlayd.store.etcd import EtcdStore, StoreUnavailable, WatchCompacted
from overlayd.surfaces.control import serve_control
from overlayd.surfaces.httpd import MetricsServer
from overlayd.surfaces.mqtt import MqttPublisher
from overlayd.surfaces.notify import Notifier
from overlayd.surfaces.subnetfile import SubnetFile, read_subnet, write_atomically
from overlayd.surfaces.telemetry import Telemetry

T = TypeVar("T")
TEARDOWN_ETCD_SECONDS = 10.0

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


def describe_mode(config: NetworkConfig) -> str:
    if config.backend.type == "vxlan" and config.backend.direct_routing:
        return "vxlan+direct-routing"
    return config.backend.type


def public_settings(s: AgentConfig) -> dict[str, object]:
    """The settings `overlayctl` may need to act like the daemon (diagnose)."""
    return {
        "etcd_endpoints": list(s.etcd_endpoints),
        "etcd_prefix": s.etcd_prefix,
        "iface": s.iface,
        "public_ip": str(s.public_ip) if s.public_ip else None,
        "subnet_file": str(s.subnet_file),
        "bridge": s.bridge,
        "lease_ttl": s.lease_ttl,
        "resync_seconds": s.resync_seconds,
        "egress": s.egress,
        "metrics_address": "{}:{}".format(*s.metrics_address) if s.metrics_address else None,
        "mqtt_url": s.mqtt_url,
    }


def check_mtu(config: NetworkConfig, underlay: Underlay) -> int:
    mtu = overlay_mtu(config, underlay.mtu)
    if mtu > max_overlay_mtu(config, underlay.mtu):
        overhead = f" minus {VXLAN_OVERHEAD}" if config.backend.type == "vxlan" else ""
        raise ConfigError(
            "Backend.MTU", f"{mtu} does not fit in {underlay.name}'s MTU {underlay.mtu}{overhead}"
        )
    return mtu


class Agent:
    def __init__(self, settings: AgentConfig) -> None:
        self.settings = settings
        self.store = EtcdStore(settings.etcd_endpoints)
        self.dataplane = Dataplane.open()
        self.ready = asyncio.Event()
        self.telemetry = Telemetry(settings=public_settings(settings), egress=settings.egress)
        self.notifier = Notifier()
        self.publisher: MqttPublisher | None = None
        self.reconciler: Reconciler | None = None
        self._revision = 0
        self._prefix = settings.etcd_prefix.rstrip("/") + "/"
        self._config_key = config_key(settings.etcd_prefix)
        self._rejected_config: bytes | None = None
        self._lease_doubt = asyncio.Event()  # our key vanished or no longer fits

    async def close(self) -> None:
        await self.store.close()
        await self.dataplane.close()

    async def _list(self) -> tuple[dict[str, bytes], int]:
        """Config and leases in one read, so that both come from one revision."""
        return await retry_unavailable("list", lambda: self.store.get_prefix(self._prefix))

    async def _network_config(self) -> NetworkConfig:
        waited = False
        while True:
            value, _ = await retry_unavailable(
                "read config", partial(self.store.get, self._config_key)
            )
            if value is not None:
                # An invalid config is fatal at start: ConfigError names the field.
                return parse_network_config(value)
            if not waited:
                log.warning("event=waiting_for_config key=%s", self._config_key)
                waited = True
            await asyncio.sleep(1.0)

    async def _egress(self, config: NetworkConfig) -> EgressSpec:
        s = self.settings
        subnet = None
        if s.egress == "gwbridge":
            routes = await self.dataplane.netlink.ipv4_routes(exclude_dev=s.gwbridge)
            subnet = choose_gwbridge_subnet(s.gwbridge_subnet, config.network, routes)
        log.info("event=egress mode=%s gwbridge=%s subnet=%s", s.egress, s.gwbridge, subnet)
        return EgressSpec(
            mode=s.egress,
            cluster=config.network,
            overlay_bridge=s.bridge,
            gwbridge=s.gwbridge,
            gwbridge_subnet=subnet,
        )

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
                bridge=k.spec.bridge,
            ).render(),
        )
        self.telemetry.subnet_file_written = True

    async def run(self) -> None:
        s = self.settings
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(
                serve_control(
                    s.control_socket,
                    {"status": self.telemetry.status, "peers": self.telemetry.peer_list},
                )
            )
            if s.metrics_address is not None:
                server = MetricsServer(s.metrics_address, self.telemetry)
                server.start()
                stack.callback(server.stop)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._heartbeat(), name="heartbeat")
                group.create_task(self.notifier.feed_watchdog(self.telemetry), name="watchdog")
                await self._run(group)

    async def _heartbeat(self) -> None:
        while True:
            self.telemetry.beat()
            await asyncio.sleep(1.0)

    async def _run(self, group: asyncio.TaskGroup) -> None:
        s = self.settings
        underlay = await self.dataplane.netlink.find_underlay(s.iface, s.public_ip)
        log.info(
            "event=underlay iface=%s address=%s mtu=%d",
            underlay.name,
            underlay.address,
            underlay.mtu,
        )
        if s.mqtt_url is not None:
            self.publisher = MqttPublisher(
                s.mqtt_url, s.mqtt_topic, str(underlay.address), self.telemetry
            )
            group.create_task(self.publisher.run(), name="mqtt")
        self.notifier.status("waiting for the network config in etcd")
        config = await self._network_config()
        check_mtu(config, underlay)
        self.telemetry.mode = describe_mode(config)
        egress = await self._egress(config)  # before leasing: a bad gwbridge-subnet is fatal
        leaser = SubnetLeaser(
            self.store, etcd_prefix=s.etcd_prefix, public_ip=underlay.address, ttl=s.lease_ttl
        )
        hint = read_subnet(s.subnet_file)
        hints: tuple[IPv4Network, ...] = (hint,) if hint is not None else ()
        self.notifier.status("leasing a subnet")
        held = await retry_unavailable(
            "acquire lease", partial(leaser.acquire, config, hints=hints)
        )
        self.telemetry.lease_acquired(held.lease, held.key, s.lease_ttl)
        knowledge = Knowledge(
            config=config,
            own=held.lease,
            spec=self._spec(config, held.lease, underlay),
            egress=egress,
            etcd_prefix=s.etcd_prefix,
        )
        everything, self._revision = await self._list()
        knowledge.raw_leases = self._leases_of(everything)
        self.reconciler = Reconciler(knowledge, self.dataplane, self.telemetry)
        self.notifier.status(f"programming {held.lease.subnet}")
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
        self.notifier.ready(f"subnet {held.lease.subnet}, {first.peers} peers")
        reconciler = self.reconciler
        group.create_task(self._keep_alive(leaser, held, knowledge, underlay), name="keep-alive")
        group.create_task(self._watch(knowledge, held, underlay), name="watch")
        group.create_task(
            self.dataplane.monitor.run(
                partial(self._owned_names, knowledge), reconciler.note_drift
            ),
            name="netlink-monitor",
        )
        group.create_task(reconciler.resync_every(s.resync_seconds), name="resync")
        group.create_task(reconciler.run(), name="reconcile")

    @staticmethod
    def _owned_names(k: Knowledge) -> dict[str, str]:
        """Device name -> role, for the drift monitor. The underlay is watched
        too: its addresses decide which peers are on our link."""
        names = {k.spec.bridge: "bridge", k.spec.underlay: "underlay"}
        if k.spec.vtep:
            names[k.spec.vtep] = "vtep"
        if k.egress.mode == "gwbridge":
            names[k.egress.gwbridge] = "gwbridge"
        return names

    def _leases_of(self, everything: dict[str, bytes]) -> dict[str, bytes]:
        subnets = self._prefix + "subnets/"
        return {k: v for k, v in everything.items() if k.startswith(subnets)}

    def _spec(self, config: NetworkConfig, own: Lease, underlay: Underlay) -> DeviceSpec:
        return device_spec(
            config=config,
            own=own,
            bridge=self.settings.bridge,
            underlay_ifindex=underlay.ifindex,
            underlay_mtu=underlay.mtu,
            underlay=underlay.name,
        )

    def _rebuild(self, k: Knowledge, underlay: Underlay) -> None:
        k.spec = self._spec(k.config, k.own, underlay)
        k.egress = replace(k.egress, cluster=k.config.network)
        self._write_subnet_file(k)

    async def _keep_alive(
        self, leaser: SubnetLeaser, held: HeldLease, knowledge: Knowledge, underlay: Underlay
    ) -> None:
        assert self.reconciler is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(leaser.renew_interval):
                    await self._lease_doubt.wait()
            if not self._lease_doubt.is_set():
                if await retry_unavailable("renew lease", partial(leaser.renew, held)):
                    self.telemetry.lease_renewed(self.settings.lease_ttl)
                    continue
                log.warning("event=lease_expired key=%s", held.key)
                self.telemetry.lease_lost("expired")
            self._lease_doubt.clear()
            # Expired (etcd out of reach for longer than the TTL), deleted by
            # someone, or no longer fitting the config: lease again, preferring
            # the subnet we had, so that peers see no change if it is free.
            held = await retry_unavailable(
                "re-acquire lease",
                partial(leaser.acquire, knowledge.config, hints=(held.lease.subnet,)),
            )
            if held.lease != knowledge.own:
                log.warning(
                    "event=lease_changed subnet=%s vtep_mac=%s",
                    held.lease.subnet,
                    held.lease.vtep_mac,
                )
                knowledge.own = held.lease
                self._rebuild(knowledge, underlay)
            self.telemetry.lease_acquired(held.lease, held.key, self.settings.lease_ttl)
            self.reconciler.mark_dirty(full=True)

    def _config_event(self, knowledge: Knowledge, value: bytes | None, underlay: Underlay) -> None:
        """A config written while running: keep the last good one if it is bad."""
        if value is None:
            log.error("event=config_deleted key=%s keeping=last_good", self._config_key)
            return
        try:
            config = parse_network_config(value)
            check_mtu(config, underlay)
        except ConfigError as exc:
            if value != self._rejected_config:
                log.error(
                    "event=config_rejected field=%s reason=%r keeping=last_good",
                    exc.field,
                    exc.reason,
                )
                self._rejected_config = value
            return
        self._rejected_config = None
        if config == knowledge.config:
            return
        log.warning(
            "event=config_changed network=%s subnet_len=%d vni=%d port=%d",
            config.network,
            config.subnet_len,
            config.backend.vni,
            config.backend.port,
        )
        knowledge.config = config
        if (
            not is_candidate(config, knowledge.own.subnet)
            or config.backend.vni != knowledge.own.vni
        ):
            self._lease_doubt.set()
        self._rebuild(knowledge, underlay)

    def _own_key_event(self, held: HeldLease, value: bytes | None) -> None:
        if value is None:
            log.warning("event=own_lease_deleted key=%s", held.key)
            self.telemetry.lease_lost("deleted from etcd")
            self._lease_doubt.set()
            return
        with contextlib.suppress(LeaseError):
            lease = parse_lease(parse_subnet_key(held.key, self.settings.etcd_prefix), value)
            if lease.public_ip != held.lease.public_ip:
                log.warning("event=own_lease_taken key=%s by=%s", held.key, lease.public_ip)
                self.telemetry.lease_lost(f"taken by {lease.public_ip}")
                self._lease_doubt.set()

    async def _watch(self, knowledge: Knowledge, held: HeldLease, underlay: Underlay) -> None:
        assert self.reconciler is not None
        attempt = 0
        while True:
            try:
                async for event in self.store.watch_prefix(self._prefix, self._revision + 1):
                    arrived = time.monotonic()
                    if attempt:
                        self.telemetry.etcd_reconnected()
                    attempt = 0
                    self._revision = max(self._revision, event.revision)
                    if event.key == self._config_key:
                        self._config_event(knowledge, event.value, underlay)
                        self.reconciler.mark_dirty(full=True)
                    elif event.key.startswith(self._prefix + "subnets/"):
                        if event.value is None:
                            knowledge.raw_leases.pop(event.key, None)
                        else:
                            knowledge.raw_leases[event.key] = event.value
                        if event.key == subnet_key(knowledge.etcd_prefix, knowledge.own.subnet):
                            self._own_key_event(held, event.value)
                    self.reconciler.mark_dirty(event_at=arrived)
            except WatchCompacted:
                log.warning("event=watch_compacted revision=%d; listing again", self._revision)
                everything, self._revision = await self._list()
                knowledge.raw_leases = self._leases_of(everything)
                self._config_event(knowledge, everything.get(self._config_key), underlay)
                self.reconciler.mark_dirty(full=True)
            except StoreUnavailable as exc:
                if attempt == 0:
                    log.warning(
                        "event=watch_interrupted resume_from=%d error=%r",
                        self._revision + 1,
                        str(exc)[:200],
                    )
                await sleep_backoff(attempt)
                attempt += 1

    async def teardown(self) -> list[str]:
        """Remove everything this daemon creates, and nothing else: its devices
        (and with them its routes and entries), its nftables table and iptables
        chain, its subnet file, and its lease in etcd. The data plane goes even
        when etcd cannot be reached; only the lease release needs it."""
        s = self.settings
        done: list[str] = []
        names = [s.bridge, s.gwbridge, *await self.dataplane.netlink.vtep_names()]
        for name in names:
            if await self.dataplane.netlink.delete_link(name):
                done.append(f"deleted {name}")
        if await self.dataplane.nft.delete():
            done.append("deleted nftables table ip overlayd")
        done += await self.dataplane.forward.remove()
        subnet = read_subnet(s.subnet_file)
        if s.subnet_file.exists():
            s.subnet_file.unlink()
            done.append(f"removed {s.subnet_file}")
        if subnet is not None:
            try:
                async with asyncio.timeout(TEARDOWN_ETCD_SECONDS):
                    if await self._release(subnet):
                        done.append(f"released lease {subnet_key(s.etcd_prefix, subnet)}")
            except (TimeoutError, StoreUnavailable):
                done.append(f"could not reach etcd: the lease of {subnet} expires by its TTL")
        return done

    async def _release(self, subnet: IPv4Network) -> bool:
        """Delete our lease, only if it is still ours: after an expiry the
        subnet may belong to another host."""
        key = subnet_key(self.settings.etcd_prefix, subnet)
        value, _ = await self.store.get(key)
        underlay = await self.dataplane.netlink.find_underlay(
            self.settings.iface, self.settings.public_ip
        )
        try:
            ours = value is not None and parse_lease(subnet, value).public_ip == underlay.address
        except LeaseError:
            ours = False
        return ours and await self.store.delete(key)
