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

from overlayd.model import Change, Entry, EntrySet, Op

K = TypeVar("K")
E = TypeVar("E", bound=Entry)


def _replace_and_delete(
    desired: Mapping[K, E], actual: Mapping[K, E]
) -> tuple[list[Change], list[Change]]:
    replace = [
        Change(Op.REPLACE, entry) for key, entry in desired.items() if actual.get(key) != entry
    ]
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
