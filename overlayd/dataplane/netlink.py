"""Devices through netlink: the only module that imports pyroute2.

It finds the underlay interface and makes the bridge and the VTEPs look like
a `DeviceSpec`, flannel-style: an existing device is kept when it is
compatible and only what differs is changed (MAC, MTU, master, state); a
VTEP whose VNI, port, local address or lower device differ cannot be changed
in place and is recreated.

Dual-stack: the bridge holds both gateways, and a second VTEP (`ovl-v6.<VNI>`,
flannel's `flannel-v6.<VNI>`) sending from the underlay's IPv6 address is a
second port of the same bridge. Both VTEPs are made by the same code with
the family's local address; per-peer entries of each family go through
their own VTEP and the one bridge.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv6Address,
    IPv6Interface,
    ip_address,
    ip_interface,
    ip_network,
)
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
    RTMGRP_NEIGH,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netns import create_socket

from overlayd.dataplane.rtnl_batch import NETLINK_ROUTE, Devices, EntryWriter, describe_errno
from overlayd.dataplane.sysctl import PROC6, SysctlError, set_sysctl
from overlayd.errors import OverlaydError
from overlayd.model import (
    IPV4,
    IPV6,
    ROUTE_PROTOCOL,
    BridgeFdb,
    Change,
    DeviceSpec,
    Family,
    IPAddress,
    IPNetwork,
    LinkFacts,
    Neighbour,
    Observed,
    Op,
    Route,
    TunnelFdb,
    Underlay,
)
from overlayd.plan.desired import VTEP6_PREFIX, VTEP_PREFIX, vtep6_name

log = logging.getLogger(__name__)

AF_BRIDGE = 7
ENOENT = 2
ESRCH = 3
ENODEV = 19
EINVAL = 22
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
NTF_MASTER = 0x04
RTNH_F_ONLINK = 0x04
AF_INET6 = 10
RT_SCOPE_UNIVERSE = 0
IFA_F_NODAD = 0x02


class DeviceError(OverlaydError):
    """A device cannot be made to match the spec without harming somebody."""


def _info_kind(link: Any) -> str | None:
    kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    return str(kind) if kind is not None else None


# Address flags and scopes (linux/if_addr.h, linux/rtnetlink.h).
IFA_F_TEMPORARY = 0x01
IFA_F_NODAD = 0x02
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
# An IPv6 address the IPv6 VTEP must not send from when none was named:
# one still in (or failed) duplicate address detection, one on its way
# out, or a privacy address that a new one replaces within a day (peers
# would go on sending to the old one).
_UNFIT_SOURCE6 = IFA_F_TENTATIVE | IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TEMPORARY
# Flags of a gateway address we add, by IP version. IPv6: no duplicate
# address detection, which keeps a new address "tentative" (1.1 to 1.7 s
# measured here), and a tentative gateway answers no neighbour solicitation:
# containers cannot reach it (or anything beyond it) meanwhile. The subnet
# is leased to this host alone, so nobody else can hold its gateway.
_GATEWAY_FLAGS = {4: 0, 6: IFA_F_NODAD}
# The VXLAN attribute, and pyroute2's keyword, of a VTEP's local address.
_VXLAN_LOCAL = {4: ("IFLA_VXLAN_LOCAL", "vxlan_local"), 6: ("IFLA_VXLAN_LOCAL6", "vxlan_local6")}
FAMILIES = {family.version: family for family in (IPV4, IPV6)}


@dataclass(frozen=True, slots=True)
class _Address:
    """One address of a link, as an address dump gives it."""

    interface: IPv4Interface | IPv6Interface
    flags: int
    scope: int


@dataclass(frozen=True, slots=True)
class _Vtep:
    """One VTEP of a spec: its family, name, MAC and local address."""

    family: Family
    name: str
    mac: str
    local: IPAddress


def _vteps(spec: DeviceSpec) -> list[_Vtep]:
    """The VTEPs the spec wants: the IPv4 one unless host-gw, and the IPv6
    one in a dual-stack VXLAN network."""
    wanted = []
    if spec.vtep:
        wanted.append(_Vtep(IPV4, spec.vtep, spec.vtep_mac, spec.local_ip))
    if spec.vtep6:
        if spec.local_ip6 is None:
            raise DeviceError(f"{spec.vtep6} needs an IPv6 address to send from (--public-ipv6)")
        wanted.append(_Vtep(IPV6, spec.vtep6, spec.vtep6_mac, spec.local_ip6))
    return wanted


class Netlink:
    """An rtnetlink socket in the current (or the named) network namespace."""

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._ipr = AsyncIPRoute(netns=netns) if netns else AsyncIPRoute()
        self._writer = EntryWriter(netns)
        # The indexes entry writes use, by device name: a lookup through
        # pyroute2 costs about as much as a write, and a peer joining writes
        # only four entries per family. Forgotten whenever devices may be
        # made or removed, and after any failed write (a device somebody
        # replaced fails the write with its old index, and the pass again).
        self._entry_devices: dict[str, int] = {}

    async def close(self) -> None:
        self._ipr.close()
        self._writer.close()

    def entry_writer_port(self) -> int | None:
        return self._writer.port()

    async def _link(self, **match: Any) -> Any | None:
        try:
            links = await self._ipr.link("get", **match)
        except NetlinkError as exc:
            if exc.code == ENODEV:
                return None
            raise
        return links[0] if links else None

    async def _addresses(self, ifindex: int, family: Family) -> list[_Address]:
        found = []
        async for msg in await self._ipr.addr("dump", index=ifindex, family=family.netlink):
            # The family goes into the request, not into a filter of the
            # reply: a kernel without IPv6 (ipv6.disable=1) answers an IPv6
            # dump with every family's addresses, and an IPv4 address taken
            # for an IPv6 one would be deleted as a stray.
            if msg.get("family") != family.netlink or msg.get("index") != ifindex:
                continue
            flags = msg.get("IFA_FLAGS")  # the flags above the first eight bits
            found.append(
                _Address(
                    ip_interface((msg.get("IFA_ADDRESS"), msg["prefixlen"])),
                    int(msg["flags"] if flags is None else flags),
                    int(msg["scope"]),
                )
            )
        return found

    async def _ipv4_addresses(self, ifindex: int) -> list[IPv4Interface]:
        return [
            address.interface
            for address in await self._addresses(ifindex, IPV4)
            if isinstance(address.interface, IPv4Interface)
        ]

    async def _default_route_ifindex(self) -> int | None:
        async for route in await self._ipr.route("dump", family=2, table=254):
            if route["dst_len"] == 0 and route.get("RTA_OIF"):
                return int(route.get("RTA_OIF"))
        return None

    async def find_underlay(
        self,
        iface: str | None,
        public_ip: IPv4Address | None,
        public_ipv6: IPv6Address | None = None,
    ) -> Underlay:
        """The interface tunnel traffic leaves by (flannel's `--iface` rules:
        a name or an address; default the interface of the default route),
        with the addresses the VTEPs send from."""
        link = None
        if iface is not None:
            try:
                wanted = ip_address(iface)
            except ValueError:
                link = await self._link(ifname=iface)
                if link is None:
                    raise DeviceError(f"--iface {iface}: no such interface") from None
            else:
                family = FAMILIES[wanted.version]
                async for msg in await self._ipr.addr("dump", family=family.netlink):
                    if ip_address(msg.get("IFA_ADDRESS")) == wanted:
                        link = await self._link(index=msg["index"])
                        break
                if link is None:
                    raise DeviceError(f"--iface {iface}: no interface has this address")
        else:
            index = await self._default_route_ifindex()
            if index is None:
                raise DeviceError("no default route: name the underlay with --iface")
            link = await self._link(index=index)
        assert link is not None
        addresses = await self._ipv4_addresses(link["index"])
        name = str(link.get("IFLA_IFNAME"))
        if public_ip is None:
            if not addresses:
                raise DeviceError(f"{name} has no IPv4 address: set --public-ip")
            local = addresses[0].ip
        else:
            local = public_ip
        return Underlay(
            name=name,
            ifindex=int(link["index"]),
            mtu=int(link.get("IFLA_MTU")),
            address=local,
            address6=await self._underlay_address6(int(link["index"]), name, public_ipv6),
        )

    async def _underlay_address6(
        self, index: int, name: str, public_ipv6: IPv6Address | None
    ) -> IPv6Address | None:
        """--public-ipv6, which must be on the underlay (the IPv6 VTEP sends
        from it, unlike --public-ip, which may be a NAT's), or else the
        underlay's first global IPv6 address fit to send from, if any."""
        addresses = await self._addresses(index, IPV6)
        if public_ipv6 is not None:
            if not any(address.interface.ip == public_ipv6 for address in addresses):
                raise DeviceError(
                    f"--public-ipv6 {public_ipv6} is not an address of {name}:"
                    " the IPv6 VTEP sends from it, so it must be"
                )
            return public_ipv6
        for address in addresses:
            ip = address.interface.ip
            if (
                isinstance(ip, IPv6Address)
                and address.scope == RT_SCOPE_UNIVERSE
                and not address.flags & _UNFIT_SOURCE6
            ):
                return ip
        return None

    async def ensure_devices(self, spec: DeviceSpec) -> list[str]:
        """Make the bridge and VTEPs match the spec; returns what was changed."""
        self._entry_devices.clear()
        changed: list[str] = []
        bridge_index = await self._ensure_bridge(spec.bridge, spec.bridge_mac, spec.mtu, changed)
        await self._ensure_gateway(spec.bridge, bridge_index, IPV4, spec.gateway, changed)
        await self._ensure_gateway(spec.bridge, bridge_index, IPV6, spec.gateway6, changed)
        vteps = _vteps(spec)
        # Incompatible VTEPs go before any is made: one holding the VNI and
        # port of the other family's (an IPv4 VTEP under the IPv6 name, say)
        # would make the kernel refuse to create that one.
        kept = [await self._compatible_vtep(spec, vtep, changed) for vtep in vteps]
        for vtep, link in zip(vteps, kept, strict=True):
            await self._ensure_vtep(spec, vtep, link, bridge_index, changed)
        if not spec.vtep:
            for name in await self.vtep_names():  # host-gw has no tunnel
                await self.delete_link(name)
                changed.append(f"removed {name} (no tunnel in host-gw mode)")
        elif not spec.vtep6:
            # IPv6 switched off (or never on): an IPv6 VTEP left from before
            # would still decapsulate peers' frames onto the bridge. Looked
            # up by name, not by a dump of every link on every check.
            name = vtep6_name(spec.vni)
            link = await self._link(ifname=name)
            if link is not None and _info_kind(link) == "vxlan":
                await self._ipr.link("del", index=link["index"])
                changed.append(f"removed {name} (IPv6 is off)")
        return changed

    async def connected_networks(self, ifindex: int, family: Family = IPV4) -> list[IPNetwork]:
        """The networks of one family directly on a link: whose addresses
        need no router."""
        return [address.interface.network for address in await self._addresses(ifindex, family)]

    async def _ensure_bridge(self, name: str, mac: str, mtu: int | None, changed: list[str]) -> int:
        link = await self._link(ifname=name)
        if link is not None and _info_kind(link) != "bridge":
            raise DeviceError(
                f"{name} exists and is a {_info_kind(link)}, not a bridge: "
                "choose another name or remove it"
            )
        if link is None:
            extra = {"mtu": mtu} if mtu is not None else {}
            await self._ipr.link("add", ifname=name, kind="bridge", address=mac, **extra)
            changed.append(f"created bridge {name}")
            link = await self._link(ifname=name)
            assert link is not None
        index = int(link["index"])
        updates: dict[str, Any] = {}
        if link.get("IFLA_ADDRESS") != mac:
            updates["address"] = mac
        if mtu is not None and link.get("IFLA_MTU") != mtu:
            updates["mtu"] = mtu
        if updates:
            await self._ipr.link("set", index=index, **updates)
            changed.append(f"set {', '.join(sorted(updates))} of {name}")
        if not link["flags"] & 1:  # IFF_UP
            await self._ipr.link("set", index=index, state="up")
            changed.append(f"brought {name} up")
        return index

    async def _ensure_gateway(
        self,
        name: str,
        index: int,
        family: Family,
        gateway: IPv4Interface | IPv6Interface | None,
        changed: list[str],
    ) -> None:
        """The bridge's one address of `family` (none when the family is
        off). Link-scope addresses are the kernel's (IPv6's fe80::/64 on
        every link) and stay."""
        present = await self._addresses(index, family)
        kept = False
        for address in present:
            if address.scope == RT_SCOPE_LINK:
                continue
            # The bridge is ours: an address of a previous lease must go, or
            # the host would keep answering for a subnet it no longer holds.
            # So must our gateway if duplicate address detection (of an
            # address somebody else added) failed: the kernel never uses it.
            if address.interface != gateway or address.flags & IFA_F_DADFAILED:
                await self._ipr.addr(
                    "del",
                    index=index,
                    address=str(address.interface.ip),
                    prefixlen=address.interface.network.prefixlen,
                )
                changed.append(f"removed {address.interface} from {name}")
            else:
                kept = True
        if gateway is not None and not kept:
            if family.version == 6:
                await self._enable_ipv6(name, changed)
            await self._ipr.addr(
                "add",
                index=index,
                address=str(gateway.ip),
                prefixlen=gateway.network.prefixlen,
                flags=_GATEWAY_FLAGS[family.version],
            )
            changed.append(f"added {gateway} to {name}")

    async def _enable_ipv6(self, name: str, changed: list[str]) -> None:
        """IPv6 on for the bridge (net.ipv6.conf.<bridge>.disable_ipv6=0): a
        host or namespace with `default.disable_ipv6=1` makes new links
        without IPv6, and the kernel refuses their addresses. Only asked
        when the gateway is missing: with IPv6 off it always is."""
        try:
            if await set_sysctl(PROC6 / "conf" / name / "disable_ipv6", "0", self._netns):
                changed.append(f"enabled IPv6 on {name} (net.ipv6.conf.{name}.disable_ipv6=0)")
        except (OSError, SysctlError) as exc:
            raise DeviceError(
                f"cannot enable IPv6 on {name} ({exc}): dual-stack needs IPv6 in the kernel"
                " (is it booted with ipv6.disable=1?)"
            ) from exc

    def _vtep_compatible(self, link: Any, spec: DeviceSpec, vtep: _Vtep) -> bool:
        if _info_kind(link) != "vxlan":
            return False
        data = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
        if data is None:
            return False
        local = data.get(_VXLAN_LOCAL[vtep.family.version][0])
        return bool(
            data.get("IFLA_VXLAN_ID") == spec.vni
            and data.get("IFLA_VXLAN_PORT") == spec.port
            and local is not None
            and ip_address(local) == vtep.local
            and data.get("IFLA_VXLAN_LINK") == spec.underlay_ifindex
            and data.get("IFLA_VXLAN_LEARNING") == 0
        )

    async def _compatible_vtep(self, spec: DeviceSpec, vtep: _Vtep, changed: list[str]) -> Any:
        """The VTEP's link if it can be kept, else None (removed if there)."""
        link = await self._link(ifname=vtep.name)
        if link is not None and not self._vtep_compatible(link, spec, vtep):
            await self._ipr.link("del", index=link["index"])
            changed.append(f"removed incompatible {vtep.name}")
            link = None
        return link

    async def _ensure_vtep(
        self, spec: DeviceSpec, vtep: _Vtep, link: Any, bridge_index: int, changed: list[str]
    ) -> None:
        if link is None:
            local = {_VXLAN_LOCAL[vtep.family.version][1]: str(vtep.local)}
            await self._ipr.link(
                "add",
                ifname=vtep.name,
                kind="vxlan",
                vxlan_id=spec.vni,
                vxlan_port=spec.port,
                vxlan_link=spec.underlay_ifindex,
                vxlan_learning=0,
                address=vtep.mac,
                mtu=spec.mtu,
                **local,
            )
            changed.append(f"created {vtep.name}")
            link = await self._link(ifname=vtep.name)
            assert link is not None
        index = int(link["index"])
        updates: dict[str, Any] = {}
        if link.get("IFLA_ADDRESS") != vtep.mac:
            updates["address"] = vtep.mac
        if link.get("IFLA_MTU") != spec.mtu:
            updates["mtu"] = spec.mtu
        if link.get("IFLA_MASTER") != bridge_index:
            updates["master"] = bridge_index
        if updates:
            try:
                await self._ipr.link("set", index=index, **updates)
            except NetlinkError as exc:
                if exc.code == EINVAL and "mtu" in updates:
                    # The kernel made the VTEP with its largest MTU instead
                    # of the one asked for, and refuses that one now.
                    raise DeviceError(
                        f"{vtep.name}: MTU {spec.mtu} does not fit an IPv{vtep.family.version}"
                        f" tunnel (at most the underlay's MTU - {vtep.family.vxlan_overhead})"
                    ) from exc
                raise
            changed.append(f"set {', '.join(sorted(updates))} of {vtep.name}")
        if not link["flags"] & 1:
            await self._ipr.link("set", index=index, state="up")
            changed.append(f"brought {vtep.name} up")
        await self._ensure_port_flags(vtep.name, index, changed)

    async def _ensure_port_flags(self, name: str, index: int, changed: list[str]) -> None:
        # Peers' MACs are programmed statically: the VTEP's bridge port must
        # neither learn (a learned entry would shadow ours) nor flood unknown
        # unicast into the tunnel, which has no default destination anyway.
        link = await self._link(index=index)
        slave = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA") if link else None
        learning = slave.get("IFLA_BRPORT_LEARNING") if slave else None
        flood = slave.get("IFLA_BRPORT_UNICAST_FLOOD") if slave else None
        if learning != 0 or flood != 0:
            await self._ipr.link(
                "set", index=index, kind="bridge_slave", learning=0, unicast_flood=0
            )
            changed.append(f"turned learning and flooding off on {name}'s bridge port")

    async def ensure_gwbridge(
        self,
        name: str,
        gateway: IPv4Interface,
        mac: str,
        gateway6: IPv6Interface | None = None,
    ) -> list[str]:
        """The egress bridge of gwbridge mode: a plain bridge with the gateway
        address of the gwbridge subnet (and of its IPv6 subnet when
        dual-stack); containers attach their second interface to it."""
        changed: list[str] = []
        # MTU left to the kernel: the gwbridge's traffic is not encapsulated.
        index = await self._ensure_bridge(name, mac, None, changed)
        await self._ensure_gateway(name, index, IPV4, gateway, changed)
        await self._ensure_gateway(name, index, IPV6, gateway6, changed)
        return changed

    async def routes(self, family: Family, *, exclude_dev: str | None = None) -> list[IPNetwork]:
        """Destinations of the main table's routes of `family`, except one
        device's (what a gwbridge subnet must not overlap)."""
        skip = None
        if exclude_dev is not None:
            link = await self._link(ifname=exclude_dev)
            skip = link["index"] if link is not None else None
        found = []
        async for route in await self._ipr.route("dump", family=family.netlink, table=254):
            if skip is not None and route.get("RTA_OIF") == skip:
                continue
            dst = route.get("RTA_DST") or family.any_network.split("/")[0]
            found.append(ip_network(f"{dst}/{route['dst_len']}", strict=False))
        return found

    async def apply_entries(
        self, changes: Sequence[Change], spec: DeviceSpec, family: Family = IPV4
    ) -> list[str]:
        """Apply a few entry changes of one family straight through netlink,
        with no process to start (entries.py's batches win only when there
        are many). The same entries, flags and states as the batch lines;
        returns the failures, one line each."""
        vtep = spec.vtep_for(family)
        br = await self._entry_device(spec.bridge)
        vx = await self._entry_device(vtep) if vtep else 0
        if br is None or vx is None:
            return [f"{spec.bridge if br is None else vtep} is missing"]
        errors = await self._writer.write(changes, Devices(br, vx, spec.underlay_ifindex))
        failed = [
            f"{change.op.value} {change.entry}: {describe_errno(code)}"
            for change, code in zip(changes, errors, strict=True)
            # A delete of what is already gone did what we wanted.
            if code and not (change.op is Op.DELETE and code in (ENOENT, ESRCH))
        ]
        if failed:
            self._entry_devices.clear()
        return failed

    async def _entry_device(self, name: str) -> int | None:
        index = self._entry_devices.get(name)
        if index is None:
            link = await self._link(ifname=name)
            if link is None:
                return None
            index = self._entry_devices[name] = int(link["index"])
        return index

    async def vtep_names(self) -> list[str]:
        """VXLAN devices named like ours (VTEP_PREFIX or VTEP6_PREFIX + VNI),
        whatever the VNI was."""
        found = []
        async for link in await self._ipr.link("dump"):
            name = str(link.get("IFLA_IFNAME"))
            if _info_kind(link) != "vxlan":
                continue
            for prefix in (VTEP_PREFIX, VTEP6_PREFIX):
                if name.startswith(prefix) and name.removeprefix(prefix).isdigit():
                    found.append(name)
        return found

    async def delete_link(self, name: str) -> bool:
        self._entry_devices.clear()
        link = await self._link(ifname=name)
        if link is None:
            return False
        await self._ipr.link("del", index=link["index"])
        return True


# Neighbour states of the entries we own: permanent (neighbours, tunnel FDB)
# and static (NUD_NOARP: bridge FDB). Dynamic ARP churn is none of our business.
_NUD_NOARP = 0x40
_OWNED_NUD = 0x80 | _NUD_NOARP
# Links and neighbours (ARP, NDP and FDB alike) for all; routes and
# addresses of the families we program.
_GROUPS = RTMGRP_LINK | RTMGRP_NEIGH
_FAMILY_GROUPS = {
    4: RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_IFADDR,
    6: RTMGRP_IPV6_ROUTE | RTMGRP_IPV6_IFADDR,
}
# One read of events, and the receive buffer asked for (the kernel caps it
# at net.core.rmem_max; a burst beyond it is ENOBUFS, which means a resync).
EVENTS_READ = 1 << 16
EVENTS_BUFFER = 1 << 22
_HEADER = struct.Struct("=IHHII")


def own_echoes_skipped(data: bytes, own: int | None) -> list[bytes]:
    """The messages of a datagram of events, less those whose header names
    our entry writer's port: the kernel sends route and neighbour events
    with the port of the socket whose request made them, so those are our
    own writes coming back, and decoding them with pyroute2 (0.2 to 0.3 ms
    each) had been most of the monitor's time while peers churn. FDB events
    carry port 0 and are judged as before."""
    found = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, _, _, _, port = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            break
        if not (own and port == own):
            found.append(data[offset : offset + length])
        offset += (length + 3) & ~3
    return found


# Device roles (the names mapping's values) whose neighbour and FDB entries
# may be ours: the bridge's neighbours, the VTEPs' FDB entries.
_ENTRY_ROLES = ("bridge", "vtep", "vtep6")


class DriftMonitor:
    """Netlink events that may mean someone changed what we own.

    It turns each relevant message into an `Observed` and hands it on; the
    reconciler tells our own changes coming back from drift and decides what
    to repair. A lost or failed read (ENOBUFS when events come faster than
    we read them) is reported as drift too, because the events it dropped
    could have been anybody's.
    """

    def __init__(self, netns: str | None = None, families: Sequence[Family] = (IPV4,)) -> None:
        self._netns = netns
        # The port of the socket our entry writes go through (rtnl_batch),
        # None before it is open: their echoes need no decoding.
        self.own_port: Callable[[], int | None] = lambda: None
        self._indexes: dict[int, str] = {}
        # Addresses on our links that events have told of: (index, address,
        # prefix length).
        self._addresses: set[tuple[int, str, int]] = set()
        self._families: dict[int, Family] = {}
        self.families = families

    @property
    def families(self) -> Sequence[Family]:
        return tuple(self._families.values())

    @families.setter
    def families(self, families: Sequence[Family]) -> None:
        # Netlink's family number -> the family, for the families we program.
        self._families = {family.netlink: family for family in families}

    def _groups(self) -> int:
        groups = int(_GROUPS)
        for family in self._families.values():
            groups |= int(_FAMILY_GROUPS[family.version])
        return groups

    def _observe(self, msg: Any, names: Mapping[str, str]) -> Observed | None:
        """What a netlink message says about things we may own; None when it
        concerns nothing of ours."""
        event = msg.get("event")
        if not isinstance(event, str):
            return None  # a message type pyroute2 does not name: not one of ours
        present = event.startswith("RTM_NEW")
        if event in ("RTM_NEWLINK", "RTM_DELLINK"):
            name = msg.get("IFLA_IFNAME")
            if name not in names:
                return None
            if not present:
                self._indexes.pop(msg["index"], None)
                self._addresses = {a for a in self._addresses if a[0] != msg["index"]}
                return Observed(False, None, f"link {name}")
            self._indexes[msg["index"]] = name
            facts = LinkFacts(
                name=str(name),
                mac=str(msg.get("IFLA_ADDRESS") or ""),
                mtu=int(msg.get("IFLA_MTU") or 0),
                master=self._indexes.get(msg.get("IFLA_MASTER") or 0),
                up=bool(msg.get("flags", 0) & 1),  # IFF_UP
            )
            return Observed(True, None, f"link {name}", link=facts)
        if event in ("RTM_NEWADDR", "RTM_DELADDR"):
            if msg.get("scope") == RT_SCOPE_LINK:
                # The kernel's own link-local addresses, which we leave alone:
                # IPv6 gives every link one and reports it again when its
                # duplicate address detection ends.
                return None
            index = msg.get("index")
            name = self._indexes.get(index)
            if not name:
                return None
            key = (index, str(msg.get("IFA_ADDRESS")), msg.get("prefixlen"))
            if present and key in self._addresses:
                # The same address again: a lifetime refreshed by a router
                # advertisement (SLAAC addresses on the underlay, with
                # accept_ra=2), or its DAD ended. Nothing to look at.
                return None
            if present:
                self._addresses.add(key)
            else:
                self._addresses.discard(key)
            return Observed(present, None, f"address on {name}")
        if event in ("RTM_NEWROUTE", "RTM_DELROUTE"):
            family = self._families.get(msg.get("family"))
            if family is None:
                return None
            base = family.network(msg.get("RTA_DST") or "default").network_address
            dst = ip_network(f"{base}/{msg['dst_len']}", strict=False)
            gateway = msg.get("RTA_GATEWAY")
            role = names.get(self._indexes.get(msg.get("RTA_OIF"), ""))
            hop = family.address(gateway) if gateway and role in ("bridge", "underlay") else None
            route = Route(dst, hop or family.address(0), direct=role == "underlay")
            foreign = msg.get("proto") != ROUTE_PROTOCOL
            return Observed(present, route, f"route {dst}", foreign=foreign)
        if event in ("RTM_NEWNEIGH", "RTM_DELNEIGH"):
            name = self._indexes.get(msg.get("ifindex"))
            if name is None or names.get(name) not in _ENTRY_ROLES:
                return None
            mac = str(msg.get("NDA_LLADDR") or "")
            state = msg.get("state", 0)
            family = self._families.get(msg.get("family"))
            if family is not None:
                ip = family.address(msg.get("NDA_DST"))
                # Dynamic ARP or NDP is not ours, unless it took our entry's place.
                foreign = present and not state & _OWNED_NUD
                return Observed(present, Neighbour(ip, mac), f"neigh {ip}", foreign=foreign)
            if msg.get("family") == AF_BRIDGE:
                # Which family's entry: the VTEP it is on says (a bridge FDB
                # entry has no address to tell by), so that only that
                # family's manager judges it.
                version = {"vtep": 4, "vtep6": 6}.get(names.get(name, ""), 0)
                remote = msg.get("NDA_DST")
                if remote:
                    tunnel = TunnelFdb(mac, ip_address(remote))
                    return Observed(present, tunnel, f"fdb {mac}", family=version)
                # The bridge reports its own entries with NDA_MASTER set;
                # static (NOARP) ones are ours, permanent ones are local MACs.
                if msg.get("NDA_MASTER"):
                    foreign = not (state & _NUD_NOARP and not state & 0x80)
                    return Observed(
                        present,
                        BridgeFdb(mac),
                        f"fdb {mac} master",
                        foreign=foreign,
                        family=version,
                    )
        return None

    async def _learn_indexes(self, ipr: Any, names: Mapping[str, str]) -> None:
        self._indexes = {}
        self._addresses = set()
        async for link in await ipr.link("dump"):
            name = link.get("IFLA_IFNAME")
            if name in names:
                self._indexes[int(link["index"])] = str(name)

    async def run(
        self,
        names: Callable[[], Mapping[str, str]],
        on_drift: Callable[[Observed], None],
        *,
        families: Sequence[Family] | None = None,
    ) -> None:
        """Listen until cancelled. `names`: device name -> role ("bridge",
        "vtep", "vtep6", "underlay", "gwbridge"), asked again for every
        message; `families` (default: those given at construction): whose
        routes, addresses and neighbours to look at."""
        if families is not None:
            self.families = families
        missed: str | None = None
        loop = asyncio.get_running_loop()
        while True:
            events: socket.socket | None = None
            try:
                events = self._events_socket()
                ipr = AsyncIPRoute(netns=self._netns) if self._netns else AsyncIPRoute()
                try:
                    await self._learn_indexes(ipr, names())
                finally:
                    ipr.close()
                if missed is not None:
                    # Listening again: whatever happened meanwhile is unknown.
                    on_drift(Observed(False, None, missed))
                    missed = None
                marshal = MarshalRtnl()
                while True:
                    data = await loop.sock_recv(events, EVENTS_READ)
                    for message in own_echoes_skipped(data, self.own_port()):
                        for msg in marshal.parse(message):
                            observed = self._observe(msg, names())
                            if observed is not None:
                                on_drift(observed)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # ENOBUFS and friends: listen again, then resync
                log.warning("event=netlink_monitor_error error=%r; resyncing", exc)
                missed = f"netlink monitor error {exc!r}"
                await asyncio.sleep(0.1)
            finally:
                if events is not None:
                    events.close()

    def _events_socket(self) -> socket.socket:
        """A netlink socket of our own for the events, bound to the groups
        before the links are listed (so that nothing falls in between) and
        read raw, so that the echoes of our own entry writes are dropped by
        their header before pyroute2 decodes anything (own_echoes_skipped)."""
        sock: socket.socket = create_socket(
            self._netns or None,
            family=socket.AF_NETLINK,
            socket_type=socket.SOCK_RAW,
            proto=NETLINK_ROUTE,
        )
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, EVENTS_BUFFER)
            sock.bind((0, self._groups()))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock
