"""The keyed diff between desired and actual entries, in a safe order.

Order matters for traffic in flight: a route must never point at a next hop
whose neighbour or FDB entry is missing. So routes of departed peers go
first, then FDB and neighbour entries are added or replaced, then routes are
added, and only at the end are stale FDB and neighbour entries removed (a
peer whose MAC changed keeps working through the switch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from overlayd.model import (
    BridgeFdb,
    Change,
    Entry,
    EntrySet,
    Neighbour,
    Observed,
    Op,
    Route,
    TunnelFdb,
    route_key,
)

K = TypeVar("K")
E = TypeVar("E", bound=Entry)


def _replace_and_delete(
    desired: Mapping[K, E], actual: Mapping[K, E]
) -> tuple[list[Change], list[Change]]:
    replace = []
    current_of = actual.get
    for key, entry in desired.items():
        current = current_of(key)
        # Identity first: unchanged peers keep their (memoized) entry objects,
        # and comparing dataclasses field by field costs more.
        if current is not entry and current != entry:
            replace.append(Change(Op.REPLACE, entry))
    delete = [Change(Op.DELETE, entry) for key, entry in actual.items() if key not in desired]
    return replace, delete


def diff(desired: EntrySet, actual: EntrySet) -> list[Change]:
    """Changes that turn `actual` into `desired`; empty when they match."""
    route_replace, route_delete = _replace_and_delete(desired.routes, actual.routes)
    tunnel_replace, tunnel_delete = _replace_and_delete(desired.tunnel_fdb, actual.tunnel_fdb)
    bridge_replace, bridge_delete = _replace_and_delete(desired.bridge_fdb, actual.bridge_fdb)
    neigh_replace, neigh_delete = _replace_and_delete(desired.neighbours, actual.neighbours)
    return [
        *route_delete,
        *tunnel_replace,
        *bridge_replace,
        *neigh_replace,
        *route_replace,
        *neigh_delete,
        *bridge_delete,
        *tunnel_delete,
    ]


def expected(observed: Observed, believed: EntrySet | None) -> bool:
    """Whether a kernel event only confirms what we believe the kernel holds
    (our own change coming back to us). Anything else is drift."""
    entry = observed.entry
    if believed is None or entry is None:
        return False
    if isinstance(entry, Route):
        current: Entry | None = believed.routes.get(route_key(entry.dst))
    elif isinstance(entry, Neighbour):
        current = believed.neighbours.get(int(entry.ip))
        if not observed.present:
            # A vanished neighbour we do not own is ARP housekeeping.
            return current is None
    elif isinstance(entry, TunnelFdb):
        current = believed.tunnel_fdb.get(entry.mac)
    elif isinstance(entry, BridgeFdb):
        current = believed.bridge_fdb.get(entry.mac)
    else:
        return False
    return current == entry if observed.present else current is None
