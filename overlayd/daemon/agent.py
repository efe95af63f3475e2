"""The composition root: builds the adapters, the mirror, the managers and
the surfaces, wires them together and runs them in one TaskGroup.

The control socket and the metrics endpoint open first, so that a start
that waits for etcd can be seen waiting. Start-up is then sequential
(underlay, etcd listed, network config, egress plan, lease, first pass,
subnet file, READY to systemd); after that the TaskGroup runs the mirror's
watch, the lease keeper, the netlink drift monitor, the resync timer, the
reconcile loop, the heartbeat and watchdog, and the MQTT publisher if one
is configured, until the process is told to stop. Stopping leaves the data
plane in place, so a restart is hitless; `teardown` removes it on purpose.

Nothing here decides anything: policy is in plan/, state in HostState and
LeaseKeeper, the watch in the mirror, the kernel in the managers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import Coroutine, Mapping
from functools import partial
from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING, Any

from overlayd.config import AgentConfig, parse_network_config
from overlayd.daemon.endpoints import EndpointRegistry
from overlayd.daemon.host import HostState
from overlayd.daemon.leasing import HeldLease, LeaseKeeper, SubnetLeaser
from overlayd.daemon.loop import PassResult, Reconciler, standard_managers
from overlayd.daemon.managers import Inputs, PassInputs
from overlayd.daemon.status import StatusPublisher, status_key
from overlayd.daemon.teardown import teardown
from overlayd.dataplane import Dataplane
from overlayd.errors import OverlaydError
from overlayd.model import IPV4, IPV6, IPNetwork, NetworkConfig, Underlay
from overlayd.plan.egress import EgressSpec, choose_gwbridge_subnet
from overlayd.plan.endpoints import endpoints_prefix, host_id
from overlayd.plan.host import check_mtu, describe_mode, host_plan
from overlayd.plan.ipam import gateways
from overlayd.plan.leases import config_key, subnets_prefix
from overlayd.plan.policy import policies_prefix
from overlayd.plan.service import route_clashes, services_prefix
from overlayd.store.base import retry_unavailable
from overlayd.store.etcd import EtcdStore
from overlayd.store.mirror import Mirror
from overlayd.surfaces.control import serve_control
from overlayd.surfaces.httpd import MetricsServer
from overlayd.surfaces.notify import Notifier
from overlayd.surfaces.subnetfile import SubnetFileWriter, read_subnet, read_subnet6
from overlayd.surfaces.telemetry import Telemetry

if TYPE_CHECKING:
    # Imported where they are made, only when configured: dnspython and
    # aiomqtt took a tenth of a second of every start (python -X importtime),
    # DNS and MQTT on or not; the Docker plugin's parts 10 ms more.
    from overlayd.daemon.dns import DnsResponder
    from overlayd.plan.docker_plugin import HostView
    from overlayd.surfaces.mqtt import MqttPublisher

log = logging.getLogger("overlayd")

# How long a host of a dual-stack network waits for its underlay's IPv6
# address to leave DAD before it goes on with IPv4 only.
ADDRESS6_WAIT_SECONDS = 5.0


def public_settings(s: AgentConfig) -> dict[str, object]:
    """The settings `overlayctl` may need to act like the daemon (diagnose)."""
    return {
        **s.etcd.public(),
        "etcd_prefix": s.etcd_prefix,
        "overlayd_prefix": s.overlayd_prefix,
        "iface": s.iface,
        "public_ip": str(s.public_ip) if s.public_ip else None,
        "public_ipv6": str(s.public_ipv6) if s.public_ipv6 else None,
        "subnet_file": str(s.subnet_file),
        "bridge": s.bridge,
        "lease_ttl": s.lease_ttl,
        "resync_seconds": s.resync_seconds,
        "full_resync_seconds": s.full_resync_seconds,
        "egress": s.egress,
        "vxlan_filter": "on" if s.vxlan_filter else "off",
        "metrics_address": "{}:{}".format(*s.metrics_address) if s.metrics_address else None,
        "mqtt_url": s.mqtt_url,
        "docker_plugin": str(s.docker_plugin_socket) if s.docker_plugin else None,
        "cni_data_dir": str(s.cni_data_dir),
        "dns": "on" if s.dns else "off",
        "dns_domain": s.dns_domain,
    }


def keep_long_lived_out_of_gc() -> None:
    """After a full pass, most objects alive are the cluster's (leases,
    entries, views), and they live as long as their peers. Python's cyclic
    collector would scan all of them in every full collection: at 5,000
    dual-stack peers, 80 ms stalls about once a second while peers churn
    (measured, cpbench). Frozen, they are left out; they are still freed by
    reference counting when they go (none of them is in a cycle). Unfrozen
    and collected first, so that cyclic garbage frozen last time is found;
    a full pass is slow anyway and comes every --full-resync-seconds."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Agent:
    def __init__(self, settings: AgentConfig) -> None:
        self.settings = settings
        self.store = EtcdStore(settings.etcd)
        self.dataplane = Dataplane.open()
        self.ready = asyncio.Event()
        self.telemetry = Telemetry(
            settings=public_settings(settings),
            egress=settings.egress,
            etcd_cert_not_after=self._cert_not_after,
            vxlan_filter="on" if settings.vxlan_filter else "off",
        )
        if settings.vxlan_filter:
            self.telemetry.dropped.reader = self.dataplane.vxlan_filter.dropped_packets
        self.notifier = Notifier()
        self.publisher: MqttPublisher | None = None
        self.reconciler: Reconciler | None = None
        self.dns: DnsResponder | None = None
        self.endpoints: EndpointRegistry | None = None  # once a lease is held
        self._policy_revision = 0  # see policy_event in _wire
        self._background: set[asyncio.Task[Any]] = set()
        self.subnet_file = SubnetFileWriter(settings.subnet_file)
        self._config_key = config_key(settings.etcd_prefix)
        self._subnets = subnets_prefix(settings.etcd_prefix)
        self.mirror = Mirror(
            self.store,
            [settings.etcd_prefix, settings.overlayd_prefix],
            on_reconnect=self.telemetry.etcd_reconnected,
        )

    def _cert_not_after(self) -> float | None:
        material = self.store.material
        if material is None or material.cert_not_after is None:
            return None
        return material.cert_not_after.timestamp()

    async def close(self) -> None:
        await self.store.close()
        await self.dataplane.close()

    async def run(self) -> None:
        s = self.settings
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(
                serve_control(
                    s.control_socket,
                    {
                        "status": lambda args: self.telemetry.status(),
                        "peers": lambda args: self.telemetry.peer_list(),
                        "endpoint_add": self._endpoint_add,
                        "endpoint_del": self._endpoint_del,
                    },
                )
            )
            if s.metrics_address is not None:
                server = MetricsServer(s.metrics_address, self.telemetry)
                server.start()
                stack.callback(server.stop)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._heartbeat(), name="heartbeat")
                group.create_task(self.notifier.feed_watchdog(self.telemetry), name="watchdog")
                await self._start(group)

    async def _endpoint_add(self, args: Mapping[str, Any]) -> dict[str, Any]:
        if self.endpoints is None or not self.ready.is_set():
            raise OverlaydError("overlayd is not ready yet (no lease programmed)")
        return await self.endpoints.register(args)

    async def _endpoint_del(self, args: Mapping[str, Any]) -> dict[str, Any]:
        if self.endpoints is None:
            raise OverlaydError("overlayd is not ready yet (no lease held)")
        return await self.endpoints.unregister(args)

    def _in_background(self, job: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(job, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _heartbeat(self) -> None:
        while True:
            self.telemetry.beat()
            await asyncio.sleep(1.0)

    async def _network_config(self) -> NetworkConfig:
        """The config from the mirror, waiting for it to be written if need be."""
        arrived = asyncio.Event()
        unsubscribe = self.mirror.subscribe(self._config_key, lambda key, value: arrived.set())
        try:
            value = self.mirror.get(self._config_key)
            if value is None:
                log.warning("event=waiting_for_config key=%s", self._config_key)
            while value is None:
                await arrived.wait()
                arrived.clear()
                value = self.mirror.get(self._config_key)
        finally:
            unsubscribe()
        # An invalid config is fatal at start: ConfigError names the field.
        return parse_network_config(value)

    async def _warn_service_network_routes(self, config: NetworkConfig) -> None:
        """A ServiceNetwork overlapping a route of this host (the underlay's,
        say) works, but is rarely meant: said once at start."""
        for network in config.service_networks:
            family = IPV4 if network.version == 4 else IPV6
            routes = await self.dataplane.netlink.routes(family)
            for _, route in route_clashes([network], routes):
                log.warning(
                    "event=service_network_overlaps_route network=%s route=%s effect=%r",
                    network,
                    route,
                    "at a VIP's service ports, an address in both reaches the service, never"
                    " the host down that route; any other traffic to it goes down the route",
                )

    async def _egress(self, config: NetworkConfig) -> EgressSpec:
        s = self.settings
        subnet = subnet6 = None
        cluster6 = config.ipv6.network if config.ipv6 is not None else None
        if s.egress == "gwbridge":
            routes = await self.dataplane.netlink.routes(IPV4, exclude_dev=s.gwbridge)
            services = config.service_networks
            subnet = choose_gwbridge_subnet(
                s.gwbridge_subnet, config.network, routes, service_networks=services
            )
            if cluster6 is not None:
                routes6 = await self.dataplane.netlink.routes(IPV6, exclude_dev=s.gwbridge)
                subnet6 = choose_gwbridge_subnet(
                    s.gwbridge_subnet6, cluster6, routes6, IPV6, service_networks=services
                )
        log.info(
            "event=egress mode=%s gwbridge=%s subnet=%s subnet6=%s",
            s.egress,
            s.gwbridge,
            subnet,
            subnet6,
        )
        return EgressSpec(
            mode=s.egress,
            cluster=config.network,
            overlay_bridge=s.bridge,
            gwbridge=s.gwbridge,
            gwbridge_subnet=subnet,
            cluster6=cluster6,
            gwbridge_subnet6=subnet6,
        )

    def _after_pass(
        self, reconciler: Reconciler, status: StatusPublisher, outcome: PassResult
    ) -> None:
        self._subnet_file_after_pass(reconciler, outcome)
        if outcome.ok:
            status.enforced(reconciler.enforced_revision, self.telemetry.policy)
        if outcome.ok and outcome.full:
            keep_long_lived_out_of_gc()

    def _subnet_file_after_pass(self, reconciler: Reconciler, outcome: PassResult) -> None:
        """The subnet file follows what the kernel is programmed for (see
        SubnetFileWriter); a failure to write it never stops the loop."""
        if outcome.ok and reconciler.programmed is not None:
            try:
                self.subnet_file.programmed(
                    reconciler.programmed, **self._dns_advert(reconciler.programmed)
                )
            except Exception as exc:  # the next pass tries again
                log.error("event=subnet_file_failed error=%r", exc)

    async def _start(self, group: asyncio.TaskGroup) -> None:
        s = self.settings
        underlay = await self.dataplane.netlink.find_underlay(s.iface, s.public_ip, s.public_ipv6)
        log.info(
            "event=underlay iface=%s address=%s address6=%s mtu=%d",
            underlay.name,
            underlay.address,
            underlay.address6,
            underlay.mtu,
        )
        if s.mqtt_url is not None:
            from overlayd.surfaces.mqtt import MqttPublisher  # see TYPE_CHECKING above

            self.publisher = MqttPublisher(
                s.mqtt_url, s.mqtt_topic, str(underlay.address), self.telemetry
            )
            group.create_task(self.publisher.run(), name="mqtt")
        self.notifier.status("waiting for the network config in etcd")
        # A refusal (certificate, CA, password) stops the start with the
        # setting named; an outage is waited out, as later on.
        await retry_unavailable(
            "first contact",
            lambda: self.store.check_access(self._config_key),
            refusal_is_fatal=True,
        )
        group.create_task(self.store.follow_credentials(), name="etcd-credentials")
        await self.mirror.load()
        # Policies and endpoints as listed: everything up to here is in them.
        self._policy_revision = self.mirror.revision_of(endpoints_prefix(s.overlayd_prefix))
        group.create_task(self.mirror.run(), name="etcd-mirror")
        config = await self._network_config()
        if config.ipv6 is not None and underlay.address6 is None:
            # Before the MTU check: it must know whether the IPv6 tunnel is used.
            underlay = await self._wait_for_address6(underlay)
        check_mtu(config, underlay)
        self.telemetry.mode = describe_mode(config)
        egress = await self._egress(config)  # before leasing: a bad gwbridge-subnet is fatal
        await self._warn_service_network_routes(config)
        if s.vxlan_filter:
            log.info(
                "event=vxlan_filter mode=on port=%d vni=%d", config.backend.port, config.backend.vni
            )
        else:
            log.warning(
                "event=vxlan_filter mode=off effect=%r",
                "VXLAN is accepted from any source: filter it elsewhere",
            )
        if config.ipv6 is not None and underlay.address6 is None:
            log.warning(
                "event=ipv6_unavailable iface=%s effect=%r",
                underlay.name,
                "the network is dual-stack but this host has no global IPv6 address:"
                " IPv4 only here (set --public-ipv6 or add one)",
            )
        leaser = SubnetLeaser(
            self.store,
            etcd_prefix=s.etcd_prefix,
            public_ip=underlay.address,
            ttl=s.lease_ttl,
            public_ipv6=underlay.address6,
        )
        hint, hint6 = read_subnet(s.subnet_file), read_subnet6(s.subnet_file)
        hints: tuple[IPv4Network, ...] = (hint,) if hint is not None else ()
        hints6: tuple[IPv6Network, ...] = (hint6,) if hint6 is not None else ()
        self.notifier.status("leasing a subnet")
        held = await retry_unavailable(
            "acquire lease", partial(leaser.acquire, config, hints=hints, hints6=hints6)
        )
        self.telemetry.lease_acquired(held.lease, held.key, s.lease_ttl)
        host = HostState(
            host_plan(config, held.lease, underlay, bridge=s.bridge, egress=egress),
            underlay=underlay,
            bridge=s.bridge,
            etcd_prefix=s.etcd_prefix,
            config_key=self._config_key,
            leases=self.mirror.collection(self._subnets),
            own_prefix=s.overlayd_prefix,
            endpoints=self.mirror.collection(endpoints_prefix(s.overlayd_prefix)),
            policies=self.mirror.collection(policies_prefix(s.overlayd_prefix)),
            services=self.mirror.collection(services_prefix(s.overlayd_prefix)),
            revision=lambda: self._policy_revision,
        )
        dns = self.dns = self._dns_responder(config)
        if dns is not None:
            self.telemetry.dns.source = dns.counters
        reconciler = self.reconciler = Reconciler(
            host,
            self.dataplane,
            self.telemetry,
            managers=standard_managers(
                self.dataplane,
                self.telemetry,
                vxlan_filter=s.vxlan_filter,
                on_service_records=dns.update if dns is not None else None,
            ),
        )
        keeper = self._wire(host, reconciler, leaser, held)
        self.endpoints = EndpointRegistry(
            self.store,
            own_prefix=s.overlayd_prefix,
            state_dir=s.control_socket.parent / "endpoints",
            own=lambda: host.own,
            lease_id=lambda: keeper.held.lease_id,
            enforcer=reconciler,
            egress=lambda: host.egress,
        )
        self.mirror.subscribe(
            endpoints_prefix(s.overlayd_prefix) + host_id(held.lease.subnet) + "/",
            self.endpoints.etcd_changed,
        )
        status = StatusPublisher(
            self.store,
            key=lambda: status_key(s.overlayd_prefix, host_id(host.own.subnet)),
            lease_id=lambda: keeper.held.lease_id,
            hostname=os.uname().nodename,
        )
        self.notifier.status(f"programming {held.lease.subnet}")
        # The first pass makes the cluster's objects, thousands of them, and
        # none is garbage: the cyclic collector scanning them over and over
        # while they are made cost 160 of the 460 ms of planning 5,000
        # dual-stack peers (measured in-process). They are frozen before the
        # collector is back on, and not collected first as after later full
        # passes (keep_long_lived_out_of_gc): either would walk every object
        # before the host is ready and says so in its status key (0.1 to
        # 0.2 s with 10,000 endpoints and 500 policies, measured with
        # py-spy; switched back on with all of them in the youngest
        # generation, the collector's next run walks them all too). Cyclic
        # garbage left from start-up is found after the next full pass,
        # which unfreezes and collects.
        gc.disable()
        try:
            first = await reconciler.reconcile_once()
        finally:
            gc.freeze()
            gc.enable()
        retried = not first.ok
        while not first.ok:
            await asyncio.sleep(1.0)
            first = await reconciler.reconcile_once()
        assert reconciler.programmed is not None  # the first pass was full
        if retried:
            keep_long_lived_out_of_gc()
        if dns is not None:
            # The first pass has put the gateway addresses on the bridge: one
            # bind now, so that the subnet file names the responder from its
            # first writing if it answers, and never if it does not.
            await dns.bind_now(gateways(host.own))
            dns.on_bound = partial(self._dns_bound, reconciler)
        self.subnet_file.programmed(
            reconciler.programmed, **self._dns_advert(reconciler.programmed)
        )
        self.telemetry.subnet_file_written = True
        # From now on after every pass: the subnet file must never name a
        # subnet before the data plane for it is programmed.
        reconciler.on_pass = partial(self._after_pass, reconciler, status)
        group.create_task(status.run(), name="status")
        status.enforced(reconciler.enforced_revision, self.telemetry.policy)
        log.info(
            "event=ready subnet=%s vtep_mac=%s peers=%d subnet_file=%s",
            held.lease.subnet,
            held.lease.vtep_mac,
            first.peers,
            s.subnet_file,
        )
        self.ready.set()
        self.notifier.ready(f"subnet {held.lease.subnet}, {first.peers} peers")
        # Endpoints registered before a restart: bound to this run's lease now.
        self._in_background(self.endpoints.republish(), "endpoints-republish")
        group.create_task(keeper.run(), name="keep-alive")
        group.create_task(
            self.dataplane.monitor.run(partial(self._owned_names, host), reconciler.note_drift),
            name="netlink-monitor",
        )
        group.create_task(
            reconciler.resync_every(s.resync_seconds, s.full_resync_seconds), name="resync"
        )
        group.create_task(reconciler.run(), name="reconcile")
        if dns is not None:
            # Serves what bind_now bound, and retries the rest.
            group.create_task(dns.serve(gateways(host.own)), name="dns")
        if s.docker_plugin:
            # Only now: Docker may ask for an address as soon as the socket
            # exists, and the answer needs this host's programmed subnet.
            # The plugin's run() keeps its failures to itself: the overlay
            # goes on whatever happens to the socket. Imported here: its web
            # framework (aiohttp) took a fifth of a second of every start,
            # with or without the plugin.
            from overlayd.dataplane.veth import VethPairs
            from overlayd.nsexec import CniRunner
            from overlayd.surfaces.docker_plugin import DockerPlugin, PluginSettings

            plugin = DockerPlugin(
                PluginSettings(socket=s.docker_plugin_socket, cni_data_dir=s.cni_data_dir),
                view=partial(self._plugin_view, host, reconciler),
                cni=CniRunner(),
                veths=VethPairs(),
                # In-process, as the control socket's endpoint_add/_del.
                register=self._endpoint_add,
                unregister=self._endpoint_del,
            )
            group.create_task(plugin.run(), name="docker-plugin")

    def _dns_advert(self, programmed: Inputs) -> dict[str, Any]:
        """The subnet file's DNS lines (overlay-cni puts them in its result):
        the bridge's gateway addresses the responder listens on, none while
        it listens on none (a resolv.conf naming only a nameserver that
        never answers leaves a container without any name resolution)."""
        if self.dns is None:
            return {}
        servers = self.dns.advertised(gateways(programmed.own))
        if not servers:
            return {}
        return {"dns_servers": servers, "dns_domain": self.dns.domain}

    def _dns_bound(self, reconciler: Reconciler) -> None:
        """The responder listens on one more address: the subnet file says so."""
        if reconciler.programmed is not None and self.telemetry.subnet_file_written:
            self.subnet_file.programmed(
                reconciler.programmed, **self._dns_advert(reconciler.programmed)
            )

    def _dns_responder(self, config: NetworkConfig) -> DnsResponder | None:
        """The DNS responder, when asked for and the network has services."""
        s = self.settings
        if not s.dns:
            return None
        if not config.service_networks:
            log.info("event=dns_off reason=%r", "the network config has no ServiceNetwork")
            return None
        from overlayd.daemon.dns import DnsResponder  # see TYPE_CHECKING above

        zones: list[IPNetwork] = [config.network]
        if config.ipv6 is not None:
            zones.append(config.ipv6.network)
        return DnsResponder(
            domain=s.dns_domain,
            upstreams=s.dns_upstreams,
            reverse_zones=[*zones, *config.service_networks],
        )

    async def _wait_for_address6(self, underlay: Underlay) -> Underlay:
        """At boot the underlay's IPv6 address may still be tentative (duplicate
        address detection takes a second or two) or not yet configured; a
        dual-stack network is worth a short wait before going on IPv4-only."""
        s = self.settings
        deadline = time.monotonic() + ADDRESS6_WAIT_SECONDS
        while underlay.address6 is None and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            underlay = await self.dataplane.netlink.find_underlay(
                s.iface, s.public_ip, s.public_ipv6
            )
        if underlay.address6 is not None:
            log.info("event=underlay_ipv6 iface=%s address6=%s", underlay.name, underlay.address6)
        return underlay

    @staticmethod
    def _plugin_view(host: PassInputs, reconciler: Reconciler) -> HostView:
        """The host as the last successful full pass programmed it (not the
        plan, which takes a new lease before the bridge has its subnet);
        unsettled while the two differ."""
        from overlayd.plan.docker_plugin import HostView  # see TYPE_CHECKING above

        programmed = reconciler.programmed or Inputs.of(host)  # set by the first pass
        return HostView(
            subnet=programmed.own.subnet,
            cluster=programmed.config.network,
            bridge=programmed.spec.bridge,
            mtu=programmed.spec.mtu,
            egress=programmed.egress.mode,
            settled=programmed.own.subnet == host.own.subnet
            and programmed.own.ipv6_subnet == host.own.ipv6_subnet,
            subnet6=programmed.own.ipv6_subnet,
            cluster6=programmed.egress.cluster6,
            service_networks=programmed.config.service_networks,
        )

    def _wire(
        self, host: HostState, reconciler: Reconciler, leaser: SubnetLeaser, held: HeldLease
    ) -> LeaseKeeper:
        """Who tells whom: etcd changes go to the host state, the lease keeper
        and the loop; a new lease to the host state and the loop; a lease that
        no longer fits to the keeper."""

        def new_lease(held: HeldLease) -> None:
            host.lease_changed(held.lease)
            reconciler.mark_dirty(full=True)
            # The old etcd lease took this host's endpoint keys with it.
            if self.endpoints is not None:
                self._in_background(self.endpoints.republish(), "endpoints-republish")
            if self.dns is not None:
                self._in_background(self.dns.move(gateways(held.lease)), "dns-move")

        keeper = LeaseKeeper(
            leaser,
            held,
            config=lambda: host.config,
            on_new_lease=new_lease,
            telemetry=self.telemetry,
            ttl=self.settings.lease_ttl,
        )

        def config_event(key: str, value: bytes | None) -> None:
            if key == self._config_key:
                try:
                    host.config_changed(key, value)
                finally:
                    reconciler.mark_dirty(full=True)

        def lease_event(key: str, value: bytes | None) -> None:
            keeper.own_key_changed(key, value)
            reconciler.mark_dirty(event_at=time.monotonic())

        def policy_event(key: str, value: bytes | None) -> None:
            # The revision of the newest policy, service or endpoint change, not of the
            # newest key under our prefix: the status keys hosts write there
            # must not count, or every status write would call for another.
            self._policy_revision = self.mirror.revision_of(key)
            reconciler.mark_dirty(event_at=time.monotonic())

        host.on_lease_doubt.append(keeper.doubt)
        self.mirror.subscribe(self._config_key, config_event)
        self.mirror.subscribe(self._subnets, lease_event)
        own = self.settings.overlayd_prefix
        self.mirror.subscribe(endpoints_prefix(own), policy_event)
        self.mirror.subscribe(policies_prefix(own), policy_event)
        self.mirror.subscribe(services_prefix(own), policy_event)
        self.mirror.on_relist.append(partial(reconciler.mark_dirty, full=True))
        # A config written between the mirror's listing and these
        # subscriptions reached no one: look at the current value once.
        host.config_changed(self._config_key, self.mirror.get(self._config_key))
        return keeper

    @staticmethod
    def _owned_names(host: HostState) -> dict[str, str]:
        """Device name -> role, for the drift monitor. The underlay is watched
        too: its addresses decide which peers are on our link."""
        spec, egress = host.spec, host.egress
        names = {spec.bridge: "bridge", spec.underlay: "underlay"}
        if spec.vtep:
            names[spec.vtep] = "vtep"
        if spec.vtep6:
            names[spec.vtep6] = "vtep6"
        if egress.mode == "gwbridge":
            names[egress.gwbridge] = "gwbridge"
        return names

    async def teardown(self) -> list[str]:
        """Remove everything this daemon creates (see daemon/teardown.py)."""
        return await teardown(self.settings, self.store, self.dataplane)
