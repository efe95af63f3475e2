"""A write's netlink echo that is read only after later passes changed the
same entry again is still recognised as ours (no false drift, no needless
full pass), for ECHO_PASSES writing passes; anything else is still drift."""

from __future__ import annotations

from ipaddress import ip_address

from overlayd.model import Change, EntrySet, Neighbour, Observed, Op
from overlayd.plan.tracker import ECHO_PASSES, EntryTracker

ENTRY = Neighbour(ip_address("10.244.7.0"), "02:00:00:0a:0b:01")
OTHER_MAC = Neighbour(ip_address("10.244.7.0"), "02:00:00:0a:0b:99")


def echo(present: bool, entry: Neighbour = ENTRY) -> Observed:
    return Observed(present, entry, f"neigh {entry.ip}")


def pass_(tracker: EntryTracker, desired: EntrySet, changes: list[Change]) -> None:
    tracker.replace_desired(desired)
    tracker.settle(changes)


def test_a_late_echo_of_an_addition_after_the_removal_is_ours() -> None:
    tracker = EntryTracker()
    tracker.replace_actual(EntrySet())
    with_entry = EntrySet.of([ENTRY])
    pass_(tracker, with_entry, [Change(Op.REPLACE, ENTRY)])
    pass_(tracker, EntrySet(), [Change(Op.DELETE, ENTRY)])
    # Read now: the addition's echo (then the removal's), both ours.
    assert tracker.expects(echo(True))
    assert tracker.expects(echo(False))
    # The same key with a value nobody wrote is drift (positive control).
    assert not tracker.expects(echo(True, OTHER_MAC))


def test_echoes_older_than_the_remembered_passes_are_drift() -> None:
    tracker = EntryTracker()
    tracker.replace_actual(EntrySet())
    pass_(tracker, EntrySet.of([ENTRY]), [Change(Op.REPLACE, ENTRY)])
    pass_(tracker, EntrySet(), [Change(Op.DELETE, ENTRY)])
    # A pass that writes nothing does not age what was written ...
    pass_(tracker, EntrySet(), [])
    assert tracker.expects(echo(True))
    # ... passes that write something else do, ECHO_PASSES of them.
    for n in range(ECHO_PASSES - 2):  # the removal was one of them
        other = Neighbour(ip_address("10.245.0.0") + n, "02:00:00:0a:0c:01")
        pass_(tracker, EntrySet.of([other]), [Change(Op.REPLACE, other)])
    assert tracker.expects(echo(True))
    last = Neighbour(ip_address("10.246.0.0"), "02:00:00:0a:0c:01")
    pass_(tracker, EntrySet.of([last]), [Change(Op.REPLACE, last)])
    assert not tracker.expects(echo(True))
    assert tracker.expects(echo(False))  # absent, as believed


def test_a_pass_with_very_many_writes_is_not_remembered() -> None:
    tracker = EntryTracker()
    tracker.replace_actual(EntrySet())
    many = [Neighbour(ip_address("10.247.0.0") + n, "02:00:00:0a:0d:01") for n in range(1100)]
    pass_(tracker, EntrySet.of(many), [Change(Op.REPLACE, e) for e in many])
    pass_(tracker, EntrySet(), [Change(Op.DELETE, ENTRY)])
    assert not tracker.expects(echo(True, many[0]))
    assert tracker.expects(echo(False, many[0]))


def test_forgetting_forgets_the_writes_too() -> None:
    tracker = EntryTracker()
    tracker.replace_actual(EntrySet())
    pass_(tracker, EntrySet.of([ENTRY]), [Change(Op.REPLACE, ENTRY)])
    tracker.forget()
    tracker.replace_actual(EntrySet())
    assert not tracker.expects(echo(True))


def test_a_remembered_write_older_than_echo_seconds_is_drift() -> None:
    """A peer that went and came back an hour ago: somebody deleting its
    entry now is drift, not the echo of our old deletion."""
    tracker = EntryTracker()
    tracker.replace_actual(EntrySet())
    with_entry = EntrySet.of([ENTRY])
    tracker.replace_desired(EntrySet())
    tracker.replace_desired(with_entry)
    tracker.settle([Change(Op.REPLACE, ENTRY)], now=100.0)
    tracker.replace_desired(EntrySet())
    tracker.settle([Change(Op.DELETE, ENTRY)], now=101.0)
    tracker.replace_desired(with_entry)
    tracker.settle([Change(Op.REPLACE, ENTRY)], now=102.0)
    # Within seconds, the deletion's echo read late is ours ...
    assert tracker.expects(echo(False), now=103.0)
    # ... an hour later it is somebody else's (and the entry is believed in).
    assert not tracker.expects(echo(False), now=102.0 + 3600)
    assert tracker.expects(echo(True), now=102.0 + 3600)  # as believed
