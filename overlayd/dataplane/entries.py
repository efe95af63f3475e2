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

One family at a time: IPv6 entries are read with `ip -6` and their FDB
entries live on the IPv6 VTEP (`DeviceSpec.vtep_for`), the same bridge
holding both families' neighbours.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


K = TypeVar("K")
V = TypeVar("V")


@dataclass(slots=True)
class _Caches:
    """Entry objects (with their keys) by the text iproute2 printed for them.
    A resync reads the same thousands of entries every time, and building
    ipaddress objects from text is most of its cost, so each distinct entry
    is built once and reused; a cache is emptied when it outgrows what it
    serves. One set per family, so that a small IPv6 table never empties
    the IPv4 caches, nor the other way round."""

    routes: dict[tuple[str, str, str], tuple[RouteKey, Route]] = field(default_factory=dict)
    neighbours: dict[tuple[str, str], tuple[int, Neighbour]] = field(default_factory=dict)
    tunnels: dict[tuple[str, str], TunnelFdb] = field(default_factory=dict)


_CACHES: dict[int, _Caches] = {4: _Caches(), 6: _Caches()}


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
    caches = _CACHES[family.version]
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
        built = partial(_route, family, dst, gateway, bool(direct))
        route_at, route = _interned(caches.routes, (dst, gateway, direct), built)
        routes[route_at] = route
    for item in neigh_raw:
        if "lladdr" in item:
            dst, mac = item["dst"], item["lladdr"]
            built_neigh = partial(_neigh, family, dst, mac)
            neigh_at, neigh = _interned(caches.neighbours, (dst, mac), built_neigh)
            neighbours[neigh_at] = neigh
    for item in fdb_raw:
        mac = item.get("mac", "")
        if "self" in item.get("flags", []) and "dst" in item:
            remote = item["dst"]
            try:
                tunnel[mac] = _interned(
                    caches.tunnels, (mac, remote), partial(_tunnel, family, mac, remote)
                )
            except ValueError:
                continue  # a remote of the other family: not this reader's
        elif item.get("master") == bridge and item.get("state") == "static":
            bridge_fdb[mac] = BridgeFdb(mac)
    _trim(caches.routes, len(routes))
    _trim(caches.neighbours, len(neighbours))
    _trim(caches.tunnels, len(tunnel))
    return EntrySet(routes=routes, neighbours=neighbours, tunnel_fdb=tunnel, bridge_fdb=bridge_fdb)


@dataclass(frozen=True, slots=True)
class _Devices:
    """The device names the lines of one family's changes use."""

    bridge: str
    vtep: str  # the family's VTEP
    underlay: str


def _route_line(entry: Route, delete: bool, dev: _Devices) -> tuple[str, str]:
    if delete:
        return "ip", f"route delete {entry.dst} proto {ROUTE_PROTOCOL}"
    if entry.direct:
        return "ip", (
            f"route replace {entry.dst} via {entry.gateway} dev {dev.underlay}"
            f" proto {ROUTE_PROTOCOL}"
        )
    return "ip", (
        f"route replace {entry.dst} via {entry.gateway} dev {dev.bridge} onlink"
        f" proto {ROUTE_PROTOCOL}"
    )


def _neighbour_line(entry: Neighbour, delete: bool, dev: _Devices) -> tuple[str, str]:
    if delete:
        return "ip", f"neigh delete {entry.ip} dev {dev.bridge}"
    return "ip", f"neigh replace {entry.ip} lladdr {entry.mac} dev {dev.bridge} nud permanent"


def _tunnel_fdb_line(entry: TunnelFdb, delete: bool, dev: _Devices) -> tuple[str, str]:
    if delete:
        return "bridge", f"fdb delete {entry.mac} dev {dev.vtep} dst {entry.remote} self"
    return "bridge", f"fdb replace {entry.mac} dev {dev.vtep} dst {entry.remote} self permanent"


def _bridge_fdb_line(entry: BridgeFdb, delete: bool, dev: _Devices) -> tuple[str, str]:
    if delete:
        return "bridge", f"fdb delete {entry.mac} dev {dev.vtep} master"
    return "bridge", f"fdb replace {entry.mac} dev {dev.vtep} master static"


# One encoder per kind of entry (see model.KINDS), by kind name: the tool
# ("ip" or "bridge") and the batch line.
_LINES: dict[str, Callable[[Any, bool, _Devices], tuple[str, str]]] = {
    "route": _route_line,
    "neigh": _neighbour_line,
    "fdb_tunnel": _tunnel_fdb_line,
    "fdb_bridge": _bridge_fdb_line,
}


def _line(change: Change, dev: _Devices) -> tuple[str, str]:
    """The tool ("ip" or "bridge") and the batch line for one change."""
    return _LINES[kind_of(change.entry).name](change.entry, change.op is Op.DELETE, dev)


async def apply_changes(
    changes: Sequence[Change],
    spec: DeviceSpec,
    *,
    netns: str | None = None,
    family: Family = IPV4,
) -> ApplyResult:
    """Apply one family's changes in the given order, batching consecutive
    lines of the same tool.

    `-force` keeps a batch going past a failed line; the failures come back
    so that the caller can schedule a full resync.
    """
    dev = _Devices(spec.bridge, spec.vtep_for(family), spec.underlay)
    # The family flag for `ip` (the lines' addresses say it too; the flag
    # makes a line without one, should there ever be one, the right family).
    argv = {"ip": [*_tool("ip", netns), family.iproute2_flag], "bridge": _tool("bridge", netns)}
    failed: list[str] = []
    groups: list[tuple[str, list[str]]] = []
    for change in changes:
        tool, line = _line(change, dev)
        if groups and groups[-1][0] == tool:
            groups[-1][1].append(line)
        else:
            groups.append((tool, [line]))
    for tool, lines in groups:
        batch = ("\n".join(lines) + "\n").encode()
        code, _, err = await run([*argv[tool], "-force", "-batch", "-"], batch)
        if code != 0:
            failed.extend(x for x in err.decode(errors="replace").splitlines() if x.strip())
    return ApplyResult(applied=len(changes), failed=tuple(failed))
