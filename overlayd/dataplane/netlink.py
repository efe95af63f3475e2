"""Devices through netlink: the only module that imports pyroute2.

It finds the underlay interface and makes the bridge and the VTEP look like
a `DeviceSpec`, flannel-style: an existing device is kept when it is
compatible and only what differs is changed (MAC, MTU, master, state); a
VTEP whose VNI, port, local address or lower device differ cannot be changed
in place and is recreated.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Interface,
    IPv6Address,
    IPv6Interface,
    ip_address,
    ip_network,
)
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_LINK,
    RTMGRP_NEIGH,
)

from overlayd.errors import OverlaydError
from overlayd.model import (
    IPV4,
    ROUTE_PROTOCOL,
    BridgeFdb,
    Change,
    DeviceSpec,
    Family,
    IPNetwork,
    LinkFacts,
    Neighbour,
    Observed,
    Op,
    Route,
    TunnelFdb,
    Underlay,
    kind_of,
)
from overlayd.plan.desired import VTEP_PREFIX

log = logging.getLogger(__name__)

AF_BRIDGE = 7
ENOENT = 2
ESRCH = 3
ENODEV = 19
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


class Netlink:
    """An rtnetlink socket in the current (or the named) network namespace."""

    def __init__(self, netns: str | None = None) -> None:
        self._ipr = AsyncIPRoute(netns=netns) if netns else AsyncIPRoute()

    async def close(self) -> None:
        self._ipr.close()

    async def _link(self, **match: Any) -> Any | None:
        try:
            links = await self._ipr.link("get", **match)
        except NetlinkError as exc:
            if exc.code == ENODEV:
                return None
            raise
        return links[0] if links else None

    async def _ipv4_addresses(self, ifindex: int) -> list[IPv4Interface]:
        found = []
        async for msg in await self._ipr.addr("dump", index=ifindex, family=2):
            found.append(IPv4Interface((msg.get("IFA_ADDRESS"), msg["prefixlen"])))
        return found

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
        a name or an address; default the interface of the default route)."""
        link = None
        if iface is not None:
            try:
                wanted = IPv4Address(iface)
            except AddressValueError:
                link = await self._link(ifname=iface)
                if link is None:
                    raise DeviceError(f"--iface {iface}: no such interface") from None
            else:
                async for msg in await self._ipr.addr("dump", family=2):
                    if IPv4Address(msg.get("IFA_ADDRESS")) == wanted:
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
            address6=public_ipv6,  # TODO(v6-dp): else the iface's first global one
        )

    async def ensure_devices(self, spec: DeviceSpec) -> list[str]:
        """Make the bridge and VTEP match the spec; returns what was changed."""
        changed: list[str] = []
        bridge_index = await self._ensure_bridge(spec.bridge, spec.bridge_mac, spec.mtu, changed)
        await self._ensure_gateway(spec.bridge, bridge_index, spec.gateway, changed)
        if spec.vtep:
            await self._ensure_vtep(spec, bridge_index, changed)
        else:
            for name in await self.vtep_names():  # host-gw has no tunnel
                await self.delete_link(name)
                changed.append(f"removed {name} (no tunnel in host-gw mode)")
        return changed

    async def connected_networks(self, ifindex: int, family: Family = IPV4) -> list[IPNetwork]:
        """The networks directly on a link: whose addresses need no router."""
        if family is not IPV4:
            return []  # TODO(v6-dp)
        return [address.network for address in await self._ipv4_addresses(ifindex)]

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
        self, name: str, index: int, gateway: IPv4Interface, changed: list[str]
    ) -> None:
        present = await self._ipv4_addresses(index)
        for address in present:
            # The bridge is ours: an address of a previous lease must go, or
            # the host would keep answering for a subnet it no longer holds.
            if address != gateway:
                await self._ipr.addr(
                    "del", index=index, address=str(address.ip), prefixlen=address.network.prefixlen
                )
                changed.append(f"removed {address} from {name}")
        if gateway not in present:
            await self._ipr.addr(
                "add", index=index, address=str(gateway.ip), prefixlen=gateway.network.prefixlen
            )
            changed.append(f"added {gateway} to {name}")

    def _vtep_compatible(self, link: Any, spec: DeviceSpec) -> bool:
        if _info_kind(link) != "vxlan":
            return False
        data = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
        return bool(
            data is not None
            and data.get("IFLA_VXLAN_ID") == spec.vni
            and data.get("IFLA_VXLAN_PORT") == spec.port
            and data.get("IFLA_VXLAN_LOCAL") == str(spec.local_ip)
            and data.get("IFLA_VXLAN_LINK") == spec.underlay_ifindex
            and data.get("IFLA_VXLAN_LEARNING") == 0
        )

    async def _ensure_vtep(self, spec: DeviceSpec, bridge_index: int, changed: list[str]) -> None:
        link = await self._link(ifname=spec.vtep)
        if link is not None and not self._vtep_compatible(link, spec):
            await self._ipr.link("del", index=link["index"])
            changed.append(f"removed incompatible {spec.vtep}")
            link = None
        if link is None:
            await self._ipr.link(
                "add",
                ifname=spec.vtep,
                kind="vxlan",
                vxlan_id=spec.vni,
                vxlan_port=spec.port,
                vxlan_local=str(spec.local_ip),
                vxlan_link=spec.underlay_ifindex,
                vxlan_learning=0,
                address=spec.vtep_mac,
                mtu=spec.mtu,
            )
            changed.append(f"created {spec.vtep}")
            link = await self._link(ifname=spec.vtep)
            assert link is not None
        index = int(link["index"])
        updates: dict[str, Any] = {}
        if link.get("IFLA_ADDRESS") != spec.vtep_mac:
            updates["address"] = spec.vtep_mac
        if link.get("IFLA_MTU") != spec.mtu:
            updates["mtu"] = spec.mtu
        if link.get("IFLA_MASTER") != bridge_index:
            updates["master"] = bridge_index
        if updates:
            await self._ipr.link("set", index=index, **updates)
            changed.append(f"set {', '.join(sorted(updates))} of {spec.vtep}")
        if not link["flags"] & 1:
            await self._ipr.link("set", index=index, state="up")
            changed.append(f"brought {spec.vtep} up")
        await self._ensure_port_flags(spec, index, changed)

    async def _ensure_port_flags(self, spec: DeviceSpec, index: int, changed: list[str]) -> None:
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
            changed.append(f"turned learning and flooding off on {spec.vtep}'s bridge port")

    async def ensure_gwbridge(
        self, name: str, gateway: IPv4Interface, mac: str, *, gateway6: IPv6Interface | None = None
    ) -> list[str]:
        """The egress bridge of gwbridge mode: a plain bridge with the gateway
        address of the gwbridge subnet, and with IPv6 the gateway of its IPv6
        subnet; containers attach their second interface to it."""
        changed: list[str] = []
        # MTU left to the kernel: the gwbridge's traffic is not encapsulated.
        index = await self._ensure_bridge(name, mac, None, changed)
        await self._ensure_gateway(name, index, gateway, changed)
        await self._ensure_gateway6(name, index, gateway6, changed)
        return changed

    async def _ensure_gateway6(
        self, name: str, index: int, gateway: IPv6Interface | None, changed: list[str]
    ) -> None:
        """The gwbridge's one global IPv6 address (None: none), added with
        IFA_F_NODAD: duplicate address detection would keep it tentative,
        unusable as a source or a gateway, for a second or more after every
        start, and nobody else is on this host-local bridge to clash with.
        The kernel's own link-local address is left alone."""
        present: list[tuple[IPv6Interface, int]] = []
        async for msg in await self._ipr.addr("dump", index=index, family=AF_INET6):
            if msg["scope"] == RT_SCOPE_UNIVERSE:
                flags = msg.get("IFA_FLAGS") or msg["flags"]
                present.append((IPv6Interface((msg.get("IFA_ADDRESS"), msg["prefixlen"])), flags))
        kept = False
        for address, flags in present:
            # One added by hand without NODAD may be stuck tentative or
            # failed: it is made again as ours.
            if address == gateway and flags & IFA_F_NODAD:
                kept = True
                continue
            await self._ipr.addr(
                "del",
                index=index,
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
                family=AF_INET6,
            )
            if address != gateway:
                changed.append(f"removed {address} from {name}")
        if gateway is not None and not kept:
            await self._ipr.addr(
                "add",
                index=index,
                address=str(gateway.ip),
                prefixlen=gateway.network.prefixlen,
                family=AF_INET6,
                flags=IFA_F_NODAD,
            )
            changed.append(f"added {gateway} to {name}")

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

    async def apply_entries(self, changes: Sequence[Change], spec: DeviceSpec) -> list[str]:
        """Apply a few entry changes straight through netlink, with no process
        to start (entries.py's batches win only when there are many). The
        same entries, flags and states as the batch lines; returns the
        failures, one line each."""
        bridge_link = await self._link(ifname=spec.bridge)
        vtep_link = await self._link(ifname=spec.vtep) if spec.vtep else None
        if bridge_link is None or (spec.vtep and vtep_link is None):
            return [f"{spec.bridge if bridge_link is None else spec.vtep} is missing"]
        br = int(bridge_link["index"])
        vx = int(vtep_link["index"]) if vtep_link is not None else 0
        failed = []
        for change in changes:
            try:
                await self._apply_one(change, br, vx, spec.underlay_ifindex)
            except NetlinkError as exc:
                if change.op is Op.DELETE and exc.code in (ENOENT, ESRCH):
                    continue  # already gone, which is what we wanted
                failed.append(f"{change.op.value} {change.entry}: {exc}")
        return failed

    async def _apply_one(self, change: Change, br: int, vx: int, underlay: int) -> None:
        write = _WRITERS[kind_of(change.entry).name]
        await write(self._ipr, change.entry, change.op is Op.REPLACE, _Devices(br, vx, underlay))

    async def vtep_names(self) -> list[str]:
        """VXLAN devices named like ours (VTEP_PREFIX + VNI), whatever the VNI was."""
        found = []
        async for link in await self._ipr.link("dump"):
            name = str(link.get("IFLA_IFNAME"))
            vni = name.removeprefix(VTEP_PREFIX)
            if _info_kind(link) == "vxlan" and name.startswith(VTEP_PREFIX) and vni.isdigit():
                found.append(name)
        return found

    async def delete_link(self, name: str) -> bool:
        link = await self._link(ifname=name)
        if link is None:
            return False
        await self._ipr.link("del", index=link["index"])
        return True


@dataclass(frozen=True, slots=True)
class _Devices:
    """Interface indexes a write needs: bridge, VTEP, underlay."""

    bridge: int
    vtep: int
    underlay: int


async def _write_route(ipr: Any, entry: Route, replace: bool, dev: _Devices) -> None:
    if not replace:
        await ipr.route("del", dst=str(entry.dst), proto=ROUTE_PROTOCOL, table=254)
    elif entry.direct:
        await ipr.route(
            "replace",
            dst=str(entry.dst),
            gateway=str(entry.gateway),
            oif=dev.underlay,
            proto=ROUTE_PROTOCOL,
            table=254,
        )
    else:
        await ipr.route(
            "replace",
            dst=str(entry.dst),
            gateway=str(entry.gateway),
            oif=dev.bridge,
            flags=RTNH_F_ONLINK,
            proto=ROUTE_PROTOCOL,
            table=254,
        )


async def _write_neighbour(ipr: Any, entry: Neighbour, replace: bool, dev: _Devices) -> None:
    if replace:
        await ipr.neigh(
            "replace", dst=str(entry.ip), lladdr=entry.mac, ifindex=dev.bridge, state=NUD_PERMANENT
        )
    else:
        await ipr.neigh("del", dst=str(entry.ip), ifindex=dev.bridge)


async def _write_tunnel_fdb(ipr: Any, entry: TunnelFdb, replace: bool, dev: _Devices) -> None:
    # pyroute2's fdb("replace") does not set these itself (FACTS.md):
    # without NTF_SELF the entry lands in the bridge and loses `dst`.
    await ipr.fdb(
        "replace" if replace else "del",
        ifindex=dev.vtep,
        lladdr=entry.mac,
        dst=str(entry.remote),
        state=NUD_PERMANENT,
        flags=NTF_SELF,
    )


async def _write_bridge_fdb(ipr: Any, entry: BridgeFdb, replace: bool, dev: _Devices) -> None:
    await ipr.fdb(
        "replace" if replace else "del",
        ifindex=dev.vtep,
        lladdr=entry.mac,
        state=_NUD_NOARP,
        flags=NTF_MASTER,
    )


# One writer per kind of entry (see model.KINDS), by kind name.
_WRITERS: dict[str, Callable[[Any, Any, bool, _Devices], Awaitable[None]]] = {
    "route": _write_route,
    "neigh": _write_neighbour,
    "fdb_tunnel": _write_tunnel_fdb,
    "fdb_bridge": _write_bridge_fdb,
}


# Neighbour states of the entries we own: permanent (neighbours, tunnel FDB)
# and static (NUD_NOARP: bridge FDB). Dynamic ARP churn is none of our business.
_NUD_NOARP = 0x40
_OWNED_NUD = 0x80 | _NUD_NOARP
_GROUPS = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_IFADDR


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
        self._indexes: dict[int, str] = {}
        # Netlink's family number -> the family, for the families we program.
        self._families = {family.netlink: family for family in families}

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
            name = self._indexes.get(msg.get("index"))
            return Observed(present, None, f"address on {name}") if name else None
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
            if name is None or names.get(name) not in ("bridge", "vtep"):
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
                remote = msg.get("NDA_DST")
                if remote:
                    return Observed(present, TunnelFdb(mac, ip_address(remote)), f"fdb {mac}")
                # The bridge reports its own entries with NDA_MASTER set;
                # static (NOARP) ones are ours, permanent ones are local MACs.
                if msg.get("NDA_MASTER"):
                    foreign = not (state & _NUD_NOARP and not state & 0x80)
                    return Observed(present, BridgeFdb(mac), f"fdb {mac} master", foreign=foreign)
        return None

    async def _learn_indexes(self, ipr: Any, names: Mapping[str, str]) -> None:
        self._indexes = {}
        async for link in await ipr.link("dump"):
            name = link.get("IFLA_IFNAME")
            if name in names:
                self._indexes[int(link["index"])] = str(name)

    async def run(
        self, names: Callable[[], Mapping[str, str]], on_drift: Callable[[Observed], None]
    ) -> None:
        missed: str | None = None
        while True:
            ipr = AsyncIPRoute(netns=self._netns) if self._netns else AsyncIPRoute()
            try:
                await ipr.bind(groups=_GROUPS)
                await self._learn_indexes(ipr, names())
                if missed is not None:
                    # Listening again: whatever happened meanwhile is unknown.
                    on_drift(Observed(False, None, missed))
                    missed = None
                while True:
                    async for msg in ipr.get():
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
                ipr.close()
