"""Devices through netlink: the only module that imports pyroute2.

It finds the underlay interface and makes the bridge and the VTEP look like
a `DeviceSpec`, flannel-style: an existing device is kept when it is
compatible and only what differs is changed (MAC, MTU, master, state); a
VTEP whose VNI, port, local address or lower device differ cannot be changed
in place and is recreated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address, IPv4Interface
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from overlayd.errors import OverlaydError
from overlayd.model import DeviceSpec

log = logging.getLogger(__name__)

ENODEV = 19


class DeviceError(OverlaydError):
    """A device cannot be made to match the spec without harming somebody."""


@dataclass(frozen=True, slots=True)
class Underlay:
    name: str
    ifindex: int
    mtu: int
    address: IPv4Address


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

    async def find_underlay(self, iface: str | None, public_ip: IPv4Address | None) -> Underlay:
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
            name=name, ifindex=int(link["index"]), mtu=int(link.get("IFLA_MTU")), address=local
        )

    async def ensure_devices(self, spec: DeviceSpec) -> list[str]:
        """Make the bridge and VTEP match the spec; returns what was changed."""
        changed: list[str] = []
        bridge_index = await self._ensure_bridge(spec, changed)
        await self._ensure_gateway(spec, bridge_index, changed)
        await self._ensure_vtep(spec, bridge_index, changed)
        return changed

    async def _ensure_bridge(self, spec: DeviceSpec, changed: list[str]) -> int:
        link = await self._link(ifname=spec.bridge)
        if link is not None and _info_kind(link) != "bridge":
            raise DeviceError(
                f"{spec.bridge} exists and is a {_info_kind(link)}, not a bridge: "
                "choose another --bridge or remove it"
            )
        if link is None:
            await self._ipr.link(
                "add", ifname=spec.bridge, kind="bridge", address=spec.bridge_mac, mtu=spec.mtu
            )
            changed.append(f"created bridge {spec.bridge}")
            link = await self._link(ifname=spec.bridge)
            assert link is not None
        index = int(link["index"])
        updates: dict[str, Any] = {}
        if link.get("IFLA_ADDRESS") != spec.bridge_mac:
            updates["address"] = spec.bridge_mac
        if link.get("IFLA_MTU") != spec.mtu:
            updates["mtu"] = spec.mtu
        if updates:
            await self._ipr.link("set", index=index, **updates)
            changed.append(f"set {', '.join(sorted(updates))} of {spec.bridge}")
        if not link["flags"] & 1:  # IFF_UP
            await self._ipr.link("set", index=index, state="up")
            changed.append(f"brought {spec.bridge} up")
        return index

    async def _ensure_gateway(self, spec: DeviceSpec, index: int, changed: list[str]) -> None:
        present = await self._ipv4_addresses(index)
        for address in present:
            # The bridge is ours: an address of a previous lease must go, or
            # the host would keep answering for a subnet it no longer holds.
            if address != spec.gateway:
                await self._ipr.addr(
                    "del", index=index, address=str(address.ip), prefixlen=address.network.prefixlen
                )
                changed.append(f"removed {address} from {spec.bridge}")
        if spec.gateway not in present:
            await self._ipr.addr(
                "add",
                index=index,
                address=str(spec.gateway.ip),
                prefixlen=spec.gateway.network.prefixlen,
            )
            changed.append(f"added {spec.gateway} to {spec.bridge}")

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

    async def delete_link(self, name: str) -> bool:
        link = await self._link(ifname=name)
        if link is None:
            return False
        await self._ipr.link("del", index=link["index"])
        return True
