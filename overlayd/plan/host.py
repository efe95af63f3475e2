"""What this host is, as a pure function of the network config, its lease
and its underlay: the device spec, the egress spec, and the rules that say
when a config is usable here and when a lease no longer fits it.

The daemon holds one `Host` at a time and replaces it whole when the config
or the lease changes; every pass reads the one it finds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from overlayd.errors import ConfigError
from overlayd.model import IPV4, IPV6, DeviceSpec, Lease, NetworkConfig, Underlay
from overlayd.plan.desired import device_spec, max_overlay_mtu, overlay_mtu
from overlayd.plan.egress import EgressSpec
from overlayd.plan.ipam import is_candidate


class HostFacts(Protocol):
    """What is decided about this host: the network config, its own lease,
    its devices and its egress. A planned `Host` has them, and so has a
    reconcile pass's input snapshot (what the kernel was programmed for)."""

    @property
    def config(self) -> NetworkConfig: ...

    @property
    def own(self) -> Lease: ...

    @property
    def spec(self) -> DeviceSpec: ...

    @property
    def egress(self) -> EgressSpec: ...


@dataclass(frozen=True, slots=True)
class Host:
    """Everything a pass needs to know about this host, besides the peers."""

    config: NetworkConfig
    own: Lease
    spec: DeviceSpec
    egress: EgressSpec


def describe_mode(config: NetworkConfig) -> str:
    if config.backend.type == "vxlan" and config.backend.direct_routing:
        return "vxlan+direct-routing"
    return config.backend.type


IPV6_MIN_MTU = 1280  # RFC 8200


def check_mtu(config: NetworkConfig, underlay: Underlay) -> int:
    """The containers' MTU; ConfigError when a configured one cannot fit
    the tunnels this host will use (an IPv6 underlay costs 70 bytes)."""
    families = (IPV4, IPV6) if config.ipv6 is not None and underlay.address6 else (IPV4,)
    mtu = min(overlay_mtu(config, underlay.mtu, family) for family in families)
    if IPV6 in families and mtu < IPV6_MIN_MTU:
        # The kernel disables IPv6 on a link below 1280: the bridge could
        # never hold its IPv6 gateway, and no pass would succeed.
        raise ConfigError(
            "Backend.MTU",
            f"{mtu} is below IPv6's minimum link MTU {IPV6_MIN_MTU}"
            f" ({underlay.name}'s MTU is {underlay.mtu}); raise it or disable IPv6",
        )
    for family in families:
        if mtu > max_overlay_mtu(config, underlay.mtu, family):
            overhead = (
                f" minus {family.vxlan_overhead} (IPv{family.version} underlay)"
                if config.backend.type == "vxlan"
                else ""
            )
            raise ConfigError(
                "Backend.MTU",
                f"{mtu} does not fit in {underlay.name}'s MTU {underlay.mtu}{overhead}",
            )
    return mtu


def lease_fits(config: NetworkConfig, own: Lease, *, ipv6_capable: bool = False) -> bool:
    """Whether a lease taken under an older config is still valid under this
    one: its subnet is still a candidate, its backend type is the network's
    (a host-gw lease carries no VtepMAC), and for vxlan its VNI is still the
    network's; its IPv6 half is there exactly when the network is
    dual-stack and this host has an IPv6 underlay address (`ipv6_capable`),
    and is a candidate of IPv6Network. When not, the host must lease again."""
    if not is_candidate(config, own.subnet) or config.backend.type != own.backend_type:
        return False
    if config.backend.type == "vxlan" and config.backend.vni != own.vni:
        return False
    wants_ipv6 = config.ipv6 is not None and ipv6_capable
    if own.ipv6_subnet is None or config.ipv6 is None:
        return not wants_ipv6 and own.ipv6_subnet is None
    return wants_ipv6 and is_candidate(config.ipv6, own.ipv6_subnet)


def host_plan(
    config: NetworkConfig, own: Lease, underlay: Underlay, *, bridge: str, egress: EgressSpec
) -> Host:
    spec = device_spec(
        config=config,
        own=own,
        bridge=bridge,
        underlay_ifindex=underlay.ifindex,
        underlay_mtu=underlay.mtu,
        underlay=underlay.name,
    )
    cluster6 = config.ipv6.network if config.ipv6 is not None and own.has_ipv6 else None
    return Host(config, own, spec, replace(egress, cluster=config.network, cluster6=cluster6))
