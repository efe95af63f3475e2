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

from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from typing import Generic, TypeVar

from overlayd.model import KIND_OF, KINDS, Change, Entry, EntryKind, EntrySet, Observed, Op
from overlayd.plan.diff import ordered_changes, replace_and_delete

# How many writing passes' writes a late echo is recognised from, and the
# most writes of one pass remembered (a cold start's thousands are not: a
# late echo of one of them costs a full pass, not memory for good).
ECHO_PASSES = 64
ECHO_SECONDS = 5.0
ECHO_WRITES_MAX = 1024

K = TypeVar("K")
V = TypeVar("V")


class DeltaTracker(Generic[K, V]):
    """One kind of keyed object."""

    def __init__(self) -> None:
        self.desired: Mapping[K, V] = {}
        self.actual: Mapping[K, V] | None = None
        # What the last ECHO_PASSES passes that wrote anything wrote, by key
        # (None: deleted), with the pass's number, so that the echo of a
        # write read only after later passes changed the same key again is
        # still known for ours (see `expects`).
        self._written: dict[K, list[tuple[int, float, V | None]]] = {}
        self._passes: deque[tuple[int, list[K]]] = deque()
        self._writing_passes = 0

    def replace_desired(self, values: Mapping[K, V]) -> None:
        self.desired = values

    def replace_actual(self, values: Mapping[K, V]) -> None:
        """What a read of the kernel found."""
        self.actual = values

    def forget(self) -> None:
        self.actual = None
        self._written.clear()
        self._passes.clear()

    @property
    def known(self) -> bool:
        return self.actual is not None

    def pending(self) -> tuple[list[V], list[V]]:
        """(to write, to delete); everything desired when nothing is known."""
        return replace_and_delete(self.desired, self.actual or {})

    def settle(self, written: Mapping[K, V | None] | None = None, now: float = 0.0) -> None:
        """Believe that the kernel now holds what is desired. Called before
        the writes finish, so that their netlink echoes are recognised; a
        write that fails makes the owner `forget()`. `written`: what this
        pass writes, by key (None: a deletion), at monotonic time `now`."""
        self.actual = self.desired
        if not written or len(written) > ECHO_WRITES_MAX:
            return
        self._writing_passes += 1
        number = self._writing_passes
        for key, value in written.items():
            self._written.setdefault(key, []).append((number, now, value))
        self._passes.append((number, list(written)))
        while self._passes and self._passes[0][0] <= number - ECHO_PASSES:
            old, keys = self._passes.popleft()
            for key in keys:
                kept = [w for w in self._written.get(key, ()) if w[0] > old]
                if kept:
                    self._written[key] = kept
                else:
                    self._written.pop(key, None)

    def expects(self, key: K, value: V | None, now: float = 0.0) -> bool:
        """Whether a kernel event (value None: the object went) matches belief,
        or is the echo of a write of one of the last ECHO_PASSES writing passes
        made at most ECHO_SECONDS before `now`.

        The drift monitor reads echoes on its own time, and decoding them
        (pyroute2) costs more than writing them: with peers joining and
        leaving every few milliseconds it was measured three passes behind,
        so the echo of a peer's addition was read after its removal had
        settled. Judged against belief alone, that echo is drift, and a full
        pass follows. The price: somebody else writing (or deleting) exactly
        what we wrote (or deleted) within those seconds goes unseen until the
        next full pass. (Route and neighbour echoes of netlink writes are
        dropped by the monitor before this, by their port; this is for FDB
        echoes, which carry none, and for iproute2 batches.)"""
        if self.actual is None:
            return False
        current = self.actual.get(key)
        believed = current is None if value is None else current == value
        if believed:
            return True
        return any(
            written == value and now - at <= ECHO_SECONDS
            for _, at, written in self._written.get(key, ())
        )


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

    def settle(self, changes: Sequence[Change] = (), now: float = 0.0) -> None:
        """Believe the desired entries are in; `changes`: the writes that
        put them there (whose echoes may be read late, see `expects`)."""
        written: dict[str, dict[Hashable, Entry | None]] = {kind.name: {} for kind in KINDS}
        for change in changes:
            kind = KIND_OF[type(change.entry)]
            written[kind.name][kind.key(change.entry)] = (
                change.entry if change.op is Op.REPLACE else None
            )
        for name, tracker in self._trackers.items():
            tracker.settle(written[name], now)

    def changes(self) -> list[Change]:
        """The pending changes of every kind, in the safe order (plan/diff.py)."""
        pending: dict[EntryKind, tuple[list[Entry], list[Entry]]] = {
            kind: self._trackers[kind.name].pending() for kind in KINDS
        }
        return ordered_changes(pending)

    def expects(self, observed: Observed, now: float = 0.0) -> bool:
        """Whether a netlink event about an entry is our own write coming back
        (`now`: monotonic time, as given to `settle`)."""
        entry = observed.entry
        kind = KIND_OF.get(type(entry)) if entry is not None else None
        if kind is None:
            return False
        tracker = self._trackers[kind.name]
        if observed.foreign:
            # Somebody else's entry: none of ours unless it replaced ours.
            return tracker.actual is not None and kind.key(entry) not in tracker.actual
        value = entry if observed.present else None
        return tracker.expects(kind.key(entry), value, now)
