"""Per-peer kernel entries through iproute2: read with `-j`, write with `-batch`.

Why not pyroute2 here: on these machines pyroute2 spends about 0.6 ms of
Python per netlink message, so 1,000 peers (4,000 entries) take seconds,
while one `ip -batch` / `bridge -batch` process programs them in a tenth of
that. Reading through `-j` is equally cheap. Devices, which are few, stay on
pyroute2 (netlink.py).

Ownership: routes carry our private protocol number; neighbour entries are
the permanent ones on our bridge; FDB entries are the static bridge entries
and the self entries with a remote on our VTEP. Nothing else is read, so
nothing else can be deleted.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

from overlayd.dataplane.command import run
from overlayd.model import (
    IPV4,
    ROUTE_PROTOCOL,
    BridgeFdb,
    Change,
    DeviceSpec,
    EntrySet,
    Family,
    Neighbour,
    Op,
    Route,
    RouteKey,
    TunnelFdb,
    kind_of,
    route_key,
)

log = logging.getLogger(__name__)


class CommandError(Exception):
    """An iproute2 command failed as a whole (not a single batch line)."""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: int
    failed: tuple[str, ...]  # iproute2's error lines, empty when all went in


async def _json(argv: Sequence[str]) -> list[dict[str, Any]]:
    code, out, err = await run(argv)
    if code != 0:
        if b"does not exist" in err or b"Cannot find device" in err:
            return []
        raise CommandError(f"{' '.join(argv)}: {err.decode(errors='replace').strip()}")
    text = out.strip()
    return json.loads(text) if text else []


def _tool(name: str, netns: str | None) -> list[str]:
    return [name, "-n", netns] if netns else [name]


# Entry objects (with their keys) by the text iproute2 printed for them. A
# resync reads the same thousands of entries every time, and building
# ipaddress objects from text is most of its cost, so each distinct entry is
# built once and reused; a cache is emptied when it outgrows what it serves.
_routes: dict[tuple[str, str, str], tuple[RouteKey, Route]] = {}
_neighbours: dict[tuple[str, str], tuple[int, Neighbour]] = {}
_tunnels: dict[tuple[str, str], TunnelFdb] = {}
K = TypeVar("K")
V = TypeVar("V")


def _interned(cache: dict[K, V], text: K, build: Callable[[], V]) -> V:
    hit = cache.get(text)
    if hit is None:
        hit = cache[text] = build()
    return hit


def _trim(cache: dict[K, V], in_use: int) -> None:
    if len(cache) > 2 * in_use + 1024:
        cache.clear()


def _route(family: Family, dst: str, gateway: str, direct: bool) -> tuple[RouteKey, Route]:
    network = family.network(dst)
    # A route of ours that lost its shape (another device, no gateway) gets
    # an impossible gateway, so the diff replaces it.
    return route_key(network), Route(network, family.address(gateway or 0), direct)


def _tunnel(family: Family, mac: str, remote: str) -> TunnelFdb:
    return TunnelFdb(mac, family.address(remote))


def _neigh(family: Family, ip: str, mac: str) -> tuple[int, Neighbour]:
    address = family.address(ip)
    return int(address), Neighbour(address, mac)


async def _nothing() -> list[dict[str, Any]]:
    return []


async def read_entries(
    spec: DeviceSpec, *, netns: str | None = None, family: Family = IPV4
) -> EntrySet:
    """The entries of one address family overlayd owns, as the kernel holds
    them now."""
    ip, br = _tool("ip", netns), _tool("bridge", netns)
    bridge, flag, vtep = spec.bridge, family.iproute2_flag, spec.vtep_for(family)
    routes_raw, neigh_raw, fdb_raw = await asyncio.gather(
        _json([*ip, "-j", flag, "route", "show", "table", "main", "proto", str(ROUTE_PROTOCOL)]),
        _json([*ip, "-j", flag, "neigh", "show", "dev", bridge, "nud", "permanent"]),
        _json([*br, "-j", "fdb", "show", "dev", vtep]) if vtep else _nothing(),
    )
    routes: dict[RouteKey, Route] = {}
    neighbours: dict[int, Neighbour] = {}
    tunnel: dict[str, TunnelFdb] = {}
    bridge_fdb: dict[str, BridgeFdb] = {}
    for item in routes_raw:
        dev, dst = item.get("dev"), item["dst"]
        gateway = item.get("gateway", "") if dev in (bridge, spec.underlay) else ""
        direct = "direct" if dev == spec.underlay and dev != bridge else ""
        route_at, route = _interned(
            _routes, (dst, gateway, direct), partial(_route, family, dst, gateway, bool(direct))
        )
        routes[route_at] = route
    for item in neigh_raw:
        if "lladdr" in item:
            dst, mac = item["dst"], item["lladdr"]
            neigh_at, neigh = _interned(_neighbours, (dst, mac), partial(_neigh, family, dst, mac))
            neighbours[neigh_at] = neigh
    for item in fdb_raw:
        mac = item.get("mac", "")
        if "self" in item.get("flags", []) and "dst" in item:
            remote = item["dst"]
            try:
                tunnel[mac] = _interned(
                    _tunnels, (mac, remote), partial(_tunnel, family, mac, remote)
                )
            except ValueError:
                continue  # a remote of the other family: not this reader's
        elif item.get("master") == bridge and item.get("state") == "static":
            bridge_fdb[mac] = BridgeFdb(mac)
    _trim(_routes, len(routes))
    _trim(_neighbours, len(neighbours))
    _trim(_tunnels, len(tunnel))
    return EntrySet(routes=routes, neighbours=neighbours, tunnel_fdb=tunnel, bridge_fdb=bridge_fdb)


def _route_line(entry: Route, delete: bool, spec: DeviceSpec) -> tuple[str, str]:
    if delete:
        return "ip", f"route delete {entry.dst} proto {ROUTE_PROTOCOL}"
    if entry.direct:
        return "ip", (
            f"route replace {entry.dst} via {entry.gateway} dev {spec.underlay}"
            f" proto {ROUTE_PROTOCOL}"
        )
    return "ip", (
        f"route replace {entry.dst} via {entry.gateway} dev {spec.bridge} onlink"
        f" proto {ROUTE_PROTOCOL}"
    )


def _neighbour_line(entry: Neighbour, delete: bool, spec: DeviceSpec) -> tuple[str, str]:
    if delete:
        return "ip", f"neigh delete {entry.ip} dev {spec.bridge}"
    return "ip", f"neigh replace {entry.ip} lladdr {entry.mac} dev {spec.bridge} nud permanent"


def _tunnel_fdb_line(entry: TunnelFdb, delete: bool, spec: DeviceSpec) -> tuple[str, str]:
    if delete:
        return "bridge", f"fdb delete {entry.mac} dev {spec.vtep} dst {entry.remote} self"
    return "bridge", f"fdb replace {entry.mac} dev {spec.vtep} dst {entry.remote} self permanent"


def _bridge_fdb_line(entry: BridgeFdb, delete: bool, spec: DeviceSpec) -> tuple[str, str]:
    if delete:
        return "bridge", f"fdb delete {entry.mac} dev {spec.vtep} master"
    return "bridge", f"fdb replace {entry.mac} dev {spec.vtep} master static"


# One encoder per kind of entry (see model.KINDS), by kind name: the tool
# ("ip" or "bridge") and the batch line.
_LINES: dict[str, Callable[[Any, bool, DeviceSpec], tuple[str, str]]] = {
    "route": _route_line,
    "neigh": _neighbour_line,
    "fdb_tunnel": _tunnel_fdb_line,
    "fdb_bridge": _bridge_fdb_line,
}


def _line(change: Change, spec: DeviceSpec) -> tuple[str, str]:
    """The tool ("ip" or "bridge") and the batch line for one change."""
    return _LINES[kind_of(change.entry).name](change.entry, change.op is Op.DELETE, spec)


async def apply_changes(
    changes: Sequence[Change], spec: DeviceSpec, *, netns: str | None = None, family: Family = IPV4
) -> ApplyResult:
    """Apply in the given order, batching consecutive lines of the same tool.

    `-force` keeps a batch going past a failed line; the failures come back
    so that the caller can schedule a full resync.
    """
    failed: list[str] = []
    groups: list[tuple[str, list[str]]] = []
    if family is not IPV4:
        # The lines name `spec.vtep`: this family's VTEP takes its place.
        spec = replace(spec, vtep=spec.vtep_for(family))
    for change in changes:
        tool, line = _line(change, spec)
        if groups and groups[-1][0] == tool:
            groups[-1][1].append(line)
        else:
            groups.append((tool, [line]))
    for tool, lines in groups:
        batch = ("\n".join(lines) + "\n").encode()
        code, _, err = await run([*_tool(tool, netns), "-force", "-batch", "-"], batch)
        if code != 0:
            failed.extend(x for x in err.decode(errors="replace").splitlines() if x.strip())
    return ApplyResult(applied=len(changes), failed=tuple(failed))
