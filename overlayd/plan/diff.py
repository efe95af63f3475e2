"""The keyed diff between desired and actual entries, in a safe order.

Order matters for traffic in flight: a route must never point at a next hop
whose neighbour or FDB entry is missing. So the top layer's stale entries
(routes of departed peers) go first, then entries are added or replaced
from the bottom layer up (FDB, neighbour, route), and only at the end are
the other stale entries removed from the top down (a peer whose MAC changed
keeps working through the switch). The layers come from the table of entry
kinds in model.py; nothing here knows one kind from another.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from overlayd.model import KINDS, Change, Entry, EntryKind, EntrySet, Op

K = TypeVar("K")
V = TypeVar("V")

_BOTTOM_UP = sorted(KINDS, key=lambda kind: kind.layer)
_TOP_LAYER = max(kind.layer for kind in KINDS)


def replace_and_delete(desired: Mapping[K, V], actual: Mapping[K, V]) -> tuple[list[V], list[V]]:
    """What to write (new or different) and what to remove (not desired),
    for one kind of keyed object."""
    replace = []
    current_of = actual.get
    for key, value in desired.items():
        current = current_of(key)
        # Identity first: unchanged peers keep their (memoized) entry objects,
        # and comparing dataclasses field by field costs more.
        if current is not value and current != value:
            replace.append(value)
    delete = [value for key, value in actual.items() if key not in desired]
    return replace, delete


def ordered_changes(pending: Mapping[EntryKind, tuple[list[Entry], list[Entry]]]) -> list[Change]:
    """(to write, to delete) per kind, as one list of changes in the safe order."""
    first: list[Change] = []
    replaces: list[Change] = []
    last: list[Change] = []
    for kind in _BOTTOM_UP:
        replace, delete = pending.get(kind, ([], []))
        replaces += [Change(Op.REPLACE, entry) for entry in replace]
        deletions = [Change(Op.DELETE, entry) for entry in delete]
        if kind.layer == _TOP_LAYER:
            first += deletions
        else:
            last[:0] = deletions  # top down
    return [*first, *replaces, *last]


def diff(desired: EntrySet, actual: EntrySet) -> list[Change]:
    """Changes that turn `actual` into `desired`; empty when they match."""
    return ordered_changes(
        {kind: replace_and_delete(desired.table(kind), actual.table(kind)) for kind in KINDS}
    )
