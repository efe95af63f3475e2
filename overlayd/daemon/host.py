"""What this host is right now, kept in one place with one writer.

`HostState` holds the current `plan.host.Host` (config, own lease, device
and egress specs) and the mirror's live collection of leases. It is what
every pass reads (it satisfies the loop's `PassInputs`). It changes only
through its two methods: a config value from etcd (`config_changed`) and a
new lease from the lease keeper (`lease_changed`); each replaces the Host
whole and tells its listeners (the loop, the subnet file).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from overlayd.config import parse_network_config
from overlayd.errors import ConfigError
from overlayd.model import DeviceSpec, Lease, NetworkConfig, Underlay
from overlayd.plan.egress import EgressSpec
from overlayd.plan.host import Host, check_mtu, host_plan, lease_fits

log = logging.getLogger("overlayd")


class HostState:
    def __init__(
        self,
        host: Host,
        *,
        underlay: Underlay,
        bridge: str,
        etcd_prefix: str,
        config_key: str,
        leases: Mapping[str, bytes],
        own_prefix: str = "/overlayd",
        endpoints: Mapping[str, bytes] | None = None,
        policies: Mapping[str, bytes] | None = None,
        services: Mapping[str, bytes] | None = None,
        revision: Callable[[], int] = lambda: 0,
    ) -> None:
        self._host = host
        self._underlay = underlay
        self._bridge = bridge
        self._etcd_prefix = etcd_prefix
        self._config_key = config_key
        self.raw_leases = leases
        self._own_prefix = own_prefix
        self.raw_endpoints: Mapping[str, bytes] = endpoints if endpoints is not None else {}
        self.raw_policies: Mapping[str, bytes] = policies if policies is not None else {}
        self.raw_services: Mapping[str, bytes] = services if services is not None else {}
        self._revision = revision
        self._rejected_config: bytes | None = None
        # Called with the new Host after every change.
        self.on_change: list[Callable[[Host], None]] = []
        # Called when the lease no longer fits the config: lease again.
        self.on_lease_doubt: list[Callable[[str], None]] = []

    # --- PassInputs ----------------------------------------------------------

    @property
    def host(self) -> Host:
        return self._host

    @property
    def config(self) -> NetworkConfig:
        return self._host.config

    @property
    def own(self) -> Lease:
        return self._host.own

    @property
    def spec(self) -> DeviceSpec:
        return self._host.spec

    @property
    def egress(self) -> EgressSpec:
        return self._host.egress

    @property
    def etcd_prefix(self) -> str:
        return self._etcd_prefix

    @property
    def own_prefix(self) -> str:
        return self._own_prefix

    @property
    def revision(self) -> int:
        return self._revision()

    # --- the two writers -----------------------------------------------------

    def _replace(self, config: NetworkConfig, own: Lease) -> None:
        self._host = host_plan(
            config, own, self._underlay, bridge=self._bridge, egress=self._host.egress
        )
        for listener in self.on_change:
            try:
                listener(self._host)
            except Exception:  # one listener's failure must not stop the others
                log.exception("event=host_listener_failed")

    def config_changed(self, key: str, value: bytes | None) -> None:
        """A config written while running: keep the last good one if it is bad."""
        if value is None:
            log.error("event=config_deleted key=%s keeping=last_good", self._config_key)
            return
        try:
            config = parse_network_config(value)
            check_mtu(config, self._underlay)
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
        if config == self._host.config:
            return
        log.warning(
            "event=config_changed network=%s subnet_len=%d vni=%d port=%d",
            config.network,
            config.subnet_len,
            config.backend.vni,
            config.backend.port,
        )
        if not lease_fits(config, self._host.own, ipv6_capable=self._underlay.address6 is not None):
            log.warning(
                "event=lease_no_longer_fits subnet=%s network=%s",
                self._host.own.subnet,
                config.network,
            )
            for listener in self.on_lease_doubt:
                listener("no longer fits the network config")
        self._replace(config, self._host.own)

    def lease_changed(self, own: Lease) -> None:
        if own == self._host.own:
            return
        log.warning("event=lease_changed subnet=%s vtep_mac=%s", own.subnet, own.vtep_mac)
        self._replace(self._host.config, own)
