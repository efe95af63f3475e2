"""Data-plane I/O, one adapter per kind of kernel interface: devices through
netlink (pyroute2, netlink.py), per-peer entries through iproute2's batch
mode (entries.py), the nftables tables (one per address family) with their
egress chains and VXLAN allow-lists (nft.py), the iptables and ip6tables
FORWARD exceptions (iptables.py), sysctls (sysctl.py), read-only looks for
diagnose (inspect.py), and the Docker plugin's veth pairs through iproute2
(veth.py: made once per container, not per pass, and kept apart from the
devices the reconciler owns; the agent hands it to the plugin as a port).

`Dataplane` is the facade the managers program against; `DataplanePort` is
its Protocol, so the daemon's loop can be unit-tested with a fake.
May import: model, errors, plan (for rendering), and the tools' libraries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv6Interface
from typing import Any, Protocol

from overlayd.dataplane import entries, sysctl
from overlayd.dataplane.entries import ApplyResult
from overlayd.dataplane.iptables import ForwardAccept
from overlayd.dataplane.libnft import NftSession
from overlayd.dataplane.netlink import DriftMonitor, Netlink
from overlayd.dataplane.nft import Nft, NftTable, NftVxlanFilter
from overlayd.model import IPV4, IPV6, Change, DeviceSpec, EntrySet, Family, IPAddress, IPNetwork
from overlayd.plan import policy_rules, service_rules
from overlayd.plan.egress import EgressSpec
from overlayd.plan.vxlan_filter import ElementChanges, FilterSpec


class DataplanePort(Protocol):
    """What the managers ask of the kernel. Every `ensure_*` makes one kind
    of object match and returns what it had to change, in words."""

    async def ensure_devices(self, spec: DeviceSpec) -> list[str]: ...

    async def ensure_gwbridge(
        self, name: str, gateway: IPv4Interface, mac: str, *, gateway6: IPv6Interface | None = None
    ) -> list[str]: ...

    async def connected_networks(self, ifindex: int, family: Family = IPV4) -> list[IPNetwork]: ...

    async def ensure_forwarding(
        self, bridge: str, *, ipv6: bool = False, underlay: str = ""
    ) -> list[str]: ...

    async def ensure_bridge_netfilter(self, *, ipv6: bool = False) -> list[str]: ...

    async def ensure_egress_table(self, egress: EgressSpec) -> str | None: ...

    async def ensure_forward_accept(self, egress: EgressSpec) -> list[str]: ...

    async def ensure_vxlan_filter(self, f: FilterSpec) -> str | None: ...

    async def remove_vxlan_filter(self, family: Family) -> str | None: ...

    async def vxlan_filter_sources(self, f: FilterSpec) -> frozenset[IPAddress] | None: ...

    async def update_vxlan_filters(
        self, writes: Sequence[tuple[FilterSpec, ElementChanges]]
    ) -> None: ...

    async def apply_policy(self, statements: Sequence[str]) -> None:
        """One nft transaction on the policy table (plan/policy_rules.py)."""
        ...

    async def policy_listing(self) -> Mapping[str, Any] | None:
        """The policy table's sets and counters as `nft -j` lists them, in
        one document; None when the table does not exist."""
        ...

    async def policy_counters(self) -> str | None:
        """The policy table's named counters as `nft -j` lists them; None
        when the table does not exist."""
        ...

    async def apply_services(self, statements: Sequence[str]) -> None:
        """One nft transaction on the services table (plan/service_rules.py)."""
        ...

    async def services_listing(self) -> Mapping[str, Any] | None:
        """The services table's maps and sets as `nft -j` lists them; None
        when the table does not exist."""
        ...

    async def read_entries(self, spec: DeviceSpec, family: Family = IPV4) -> EntrySet: ...

    async def apply(
        self, changes: Sequence[Change], spec: DeviceSpec, family: Family = IPV4
    ) -> ApplyResult: ...


@dataclass
class Dataplane:
    """The adapters for one network namespace (None: the current one)."""

    netlink: Netlink
    nft: NftTable
    forward: ForwardAccept
    monitor: DriftMonitor
    vxlan_filter: NftVxlanFilter
    netns: str | None = None
    # Up to this many changes go through netlink; more through iproute2.
    netlink_max_changes: int = 64
    # The services tables are written often and in small steps, through a
    # kept libnftables context (see dataplane/libnft.py), made at the first
    # write: a new nft process per change costs 15 to 20 ms.
    sessions: dict[str, NftSession] = field(default_factory=dict)

    @classmethod
    def open(cls, netns: str | None = None) -> Dataplane:
        nft = Nft(netns)
        netlink = Netlink(netns)
        monitor = DriftMonitor(netns, families=(IPV4, IPV6))
        monitor.own_port = netlink.entry_writer_port
        return cls(
            netlink, NftTable(nft=nft), ForwardAccept(netns), monitor, NftVxlanFilter(nft), netns
        )

    async def close(self) -> None:
        await self.netlink.close()
        sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            await session.close()

    async def ensure_devices(self, spec: DeviceSpec) -> list[str]:
        return await self.netlink.ensure_devices(spec)

    async def ensure_gwbridge(
        self, name: str, gateway: IPv4Interface, mac: str, *, gateway6: IPv6Interface | None = None
    ) -> list[str]:
        return await self.netlink.ensure_gwbridge(name, gateway, mac, gateway6=gateway6)

    async def connected_networks(self, ifindex: int, family: Family = IPV4) -> list[IPNetwork]:
        return await self.netlink.connected_networks(ifindex, family)

    async def ensure_forwarding(
        self, bridge: str, *, ipv6: bool = False, underlay: str = ""
    ) -> list[str]:
        return await sysctl.ensure_forwarding_and_redirects(
            bridge, netns=self.netns, ipv6=ipv6, underlay=underlay
        )

    async def ensure_bridge_netfilter(self, *, ipv6: bool = False) -> list[str]:
        return await sysctl.ensure_bridge_netfilter(netns=self.netns, ipv6=ipv6)

    async def ensure_egress_table(self, egress: EgressSpec) -> str | None:
        return await self.nft.ensure(egress)

    async def ensure_forward_accept(self, egress: EgressSpec) -> list[str]:
        return await self.forward.ensure(egress)

    async def ensure_vxlan_filter(self, f: FilterSpec) -> str | None:
        return await self.vxlan_filter.ensure(f)

    async def remove_vxlan_filter(self, family: Family = IPV4) -> str | None:
        return await self.vxlan_filter.remove(family)

    async def vxlan_filter_sources(self, f: FilterSpec) -> frozenset[IPAddress] | None:
        return await self.vxlan_filter.sources(f)

    async def update_vxlan_filters(
        self, writes: Sequence[tuple[FilterSpec, ElementChanges]]
    ) -> None:
        """Element changes of one or both families' sets, in one transaction."""
        await self.vxlan_filter.update_many(writes)

    def _session(self, table: str) -> NftSession:
        if table not in self.sessions:
            self.sessions[table] = NftSession(self.netns)
        return self.sessions[table]

    async def apply_policy(self, statements: Sequence[str]) -> None:
        # Through the nft command, not a kept context: at 500 policies the
        # cost of an endpoint change is nft's fetch of the set elements
        # (37 ms of 38), not its start; and tests/lab/test_policy_lifecycle
        # slows this table's writes with an nft wrapper on the daemon's PATH.
        await self.nft.nft.apply(policy_rules.script(statements))

    async def policy_listing(self) -> Mapping[str, Any] | None:
        return await self.nft.nft.sets_and_counters_json(policy_rules.WHERE)

    async def policy_counters(self) -> str | None:
        return await self.nft.nft.counters_json(policy_rules.WHERE)

    async def apply_services(self, statements: Sequence[str]) -> None:
        await self._session(service_rules.WHERE).apply(service_rules.script(statements))

    async def services_listing(self) -> Mapping[str, Any] | None:
        return await self.nft.nft.maps_and_sets_json(service_rules.WHERE)

    async def update_vxlan_filter(self, f: FilterSpec, changes: ElementChanges) -> None:
        await self.vxlan_filter.update(f, changes)

    async def read_entries(self, spec: DeviceSpec, family: Family = IPV4) -> EntrySet:
        return await entries.read_entries(spec, netns=self.netns, family=family)

    async def apply(
        self, changes: Sequence[Change], spec: DeviceSpec, family: Family = IPV4
    ) -> ApplyResult:
        """A handful of changes (one peer joining) through netlink, in
        milliseconds; many (a cold start) through one iproute2 batch per
        tool, which encodes thousands of messages far faster than pyroute2.
        The changes are all of one family: its entries go through its VTEP."""
        if len(changes) <= self.netlink_max_changes:
            failed = await self.netlink.apply_entries(changes, spec, family)
            return ApplyResult(applied=len(changes), failed=tuple(failed))
        return await entries.apply_changes(changes, spec, netns=self.netns, family=family)
