"""Desired and believed state of keyed kernel objects, after Calico Felix's
`deltatracker`: per kind, what we want and what we believe the kernel holds
(None when we do not know and must read it back), with the pending changes
as their difference.

Belief is what makes an idle daemon cheap: a pass diffs against it instead
of dumping thousands of entries, and netlink events that match it are our
own writes coming back. Anything that casts doubt (a failed write, an event
nobody expected) makes the owner `forget()`, and the next pass reads the
kernel again (`replace_actual`).

Generic over the key and value types; the per-peer entries use one tracker
per entry kind (model.KINDS), and the nftables sets and maps to come will
use the same class for their elements.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

from overlayd.model import KIND_OF, KINDS, Change, Entry, EntryKind, EntrySet, Observed
from overlayd.plan.diff import ordered_changes, replace_and_delete

K = TypeVar("K")
V = TypeVar("V")


class DeltaTracker(Generic[K, V]):
    """One kind of keyed object."""

    def __init__(self) -> None:
        self.desired: Mapping[K, V] = {}
        self.actual: Mapping[K, V] | None = None

    def replace_desired(self, values: Mapping[K, V]) -> None:
        self.desired = values

    def replace_actual(self, values: Mapping[K, V]) -> None:
        """What a read of the kernel found."""
        self.actual = values

    def forget(self) -> None:
        self.actual = None

    @property
    def known(self) -> bool:
        return self.actual is not None

    def pending(self) -> tuple[list[V], list[V]]:
        """(to write, to delete); everything desired when nothing is known."""
        return replace_and_delete(self.desired, self.actual or {})

    def settle(self) -> None:
        """Believe that the kernel now holds what is desired. Called before
        the writes finish, so that their netlink echoes are recognised; a
        write that fails makes the owner `forget()`."""
        self.actual = self.desired

    def expects(self, key: K, value: V | None) -> bool:
        """Whether a kernel event (value None: the object went) matches belief."""
        if self.actual is None:
            return False
        current = self.actual.get(key)
        if value is None:
            return current is None
        return current == value


class EntryTracker:
    """The per-peer entries: one `DeltaTracker` per entry kind."""

    def __init__(self) -> None:
        self._trackers: dict[str, DeltaTracker[object, Entry]] = {
            kind.name: DeltaTracker() for kind in KINDS
        }

    @property
    def known(self) -> bool:
        return all(tracker.known for tracker in self._trackers.values())

    def believed(self) -> EntrySet | None:
        if not self.known:
            return None
        return EntrySet.from_tables(
            {name: tracker.actual or {} for name, tracker in self._trackers.items()}
        )

    def believes(self, entries: EntrySet) -> bool:
        """Whether what we believe the kernel holds is `entries`' very
        tables (the objects, not equal ones): a plan moved from them by a
        delta then has the delta as its pending changes."""
        return all(self._trackers[kind.name].actual is entries.table(kind) for kind in KINDS)

    def replace_desired(self, desired: EntrySet) -> None:
        for kind in KINDS:
            self._trackers[kind.name].replace_desired(desired.table(kind))

    def replace_actual(self, actual: EntrySet) -> None:
        for kind in KINDS:
            self._trackers[kind.name].replace_actual(actual.table(kind))

    def forget(self) -> None:
        for tracker in self._trackers.values():
            tracker.forget()

    def settle(self) -> None:
        for tracker in self._trackers.values():
            tracker.settle()

    def changes(self) -> list[Change]:
        """The pending changes of every kind, in the safe order (plan/diff.py)."""
        pending: dict[EntryKind, tuple[list[Entry], list[Entry]]] = {
            kind: self._trackers[kind.name].pending() for kind in KINDS
        }
        return ordered_changes(pending)

    def expects(self, observed: Observed) -> bool:
        """Whether a netlink event about an entry is our own write coming back."""
        entry = observed.entry
        kind = KIND_OF.get(type(entry)) if entry is not None else None
        if kind is None:
            return False
        tracker = self._trackers[kind.name]
        if observed.foreign:
            # Somebody else's entry: none of ours unless it replaced ours.
            return tracker.actual is not None and kind.key(entry) not in tracker.actual
        value = entry if observed.present else None
        return tracker.expects(kind.key(entry), value)
