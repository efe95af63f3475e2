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
from overlayd.model import VXLAN_OVERHEAD, DeviceSpec, Lease, NetworkConfig, Underlay
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


def check_mtu(config: NetworkConfig, underlay: Underlay) -> int:
    """The containers' MTU; ConfigError when a configured one cannot fit."""
    mtu = overlay_mtu(config, underlay.mtu)
    if mtu > max_overlay_mtu(config, underlay.mtu):
        overhead = f" minus {VXLAN_OVERHEAD}" if config.backend.type == "vxlan" else ""
        raise ConfigError(
            "Backend.MTU", f"{mtu} does not fit in {underlay.name}'s MTU {underlay.mtu}{overhead}"
        )
    return mtu


def lease_fits(config: NetworkConfig, own: Lease) -> bool:
    """Whether a lease taken under an older config is still valid under this
    one: its subnet is still a candidate, its backend type is the network's
    (a host-gw lease carries no VtepMAC), and for vxlan its VNI is still the
    network's. When not, the host must lease again."""
    if not is_candidate(config, own.subnet) or config.backend.type != own.backend_type:
        return False
    return config.backend.type != "vxlan" or config.backend.vni == own.vni


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
    return Host(config, own, spec, replace(egress, cluster=config.network))
