"""The etcd mirror against a dictionary store: it lists, watches, resumes
after etcd goes away without missing an event, re-lists after compaction
and tells subscribers the difference, and survives a subscriber's bug."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from overlayd.store.mirror import Mirror
from tests.unit.fake_store import FakeStore, eventually

FLANNEL = "/coreos.com/network"
OWN = "/overlayd"


@pytest.fixture
async def running() -> AsyncIterator[tuple[FakeStore, Mirror, list[tuple[str, bytes | None]]]]:
    store = FakeStore()
    await store.put(f"{FLANNEL}/config", b"{}")
    await store.put(f"{FLANNEL}/subnets/10.1.1.0-24", b"a")
    await store.put(f"{OWN}/endpoints/h1/c1", b"e")
    reconnects: list[int] = []
    mirror = Mirror(store, [FLANNEL, OWN], on_reconnect=lambda: reconnects.append(1))
    await mirror.load()
    seen: list[tuple[str, bytes | None]] = []
    mirror.subscribe(f"{FLANNEL}/subnets/", lambda key, value: seen.append((key, value)))
    task = asyncio.create_task(mirror.run())
    try:
        yield store, mirror, seen
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_load_lists_every_prefix_and_collections_follow_changes(
    running: tuple[FakeStore, Mirror, list[tuple[str, bytes | None]]],
) -> None:
    store, mirror, seen = running
    leases = mirror.collection(f"{FLANNEL}/subnets/")
    assert dict(leases) == {f"{FLANNEL}/subnets/10.1.1.0-24": b"a"}
    assert mirror.get(f"{OWN}/endpoints/h1/c1") == b"e"
    await store.put(f"{FLANNEL}/subnets/10.1.2.0-24", b"b")
    await store.delete(f"{FLANNEL}/subnets/10.1.1.0-24")
    await store.put(f"{FLANNEL}/config", b"{ }")
    await eventually(lambda: len(seen) == 2)
    assert dict(leases) == {f"{FLANNEL}/subnets/10.1.2.0-24": b"b"}
    assert seen == [
        (f"{FLANNEL}/subnets/10.1.2.0-24", b"b"),
        (f"{FLANNEL}/subnets/10.1.1.0-24", None),
    ]
    await eventually(lambda: mirror.get(f"{FLANNEL}/config") == b"{ }")


async def test_a_broken_watch_resumes_after_the_last_revision_and_misses_nothing(
    running: tuple[FakeStore, Mirror, list[tuple[str, bytes | None]]],
) -> None:
    store, mirror, seen = running
    await store.put(f"{FLANNEL}/subnets/10.1.2.0-24", b"b")
    await eventually(lambda: len(seen) == 1)
    last = mirror.revision
    await store.fail_watches()
    # Written while the mirror's watch is broken (etcd restarting).
    await store.put(f"{FLANNEL}/subnets/10.1.3.0-24", b"c")
    await eventually(lambda: len(seen) == 2)
    assert seen[-1] == (f"{FLANNEL}/subnets/10.1.3.0-24", b"c")
    resumed = [rev for prefix, rev in store.watch_calls if prefix == f"{FLANNEL}/"]
    assert resumed[-1] == last + 1


async def test_a_compacted_revision_relists_and_reports_the_difference_as_events(
    running: tuple[FakeStore, Mirror, list[tuple[str, bytes | None]]],
) -> None:
    store, mirror, seen = running
    relisted: list[int] = []
    mirror.on_relist.append(lambda: relisted.append(1))
    await store.fail_watches()
    # While away: one lease goes, one comes, and the history is compacted.
    await store.delete(f"{FLANNEL}/subnets/10.1.1.0-24")
    await store.put(f"{FLANNEL}/subnets/10.1.4.0-24", b"d")
    store.compacted = store.revision
    await eventually(lambda: len(relisted) == 2 and len(seen) == 2)  # both prefixes re-listed
    assert sorted(seen, key=str) == sorted(
        [(f"{FLANNEL}/subnets/10.1.1.0-24", None), (f"{FLANNEL}/subnets/10.1.4.0-24", b"d")],
        key=str,
    )
    assert dict(mirror.collection(f"{FLANNEL}/subnets/")) == {
        f"{FLANNEL}/subnets/10.1.4.0-24": b"d"
    }
    # And it watches on from the listing's revision.
    await store.put(f"{FLANNEL}/subnets/10.1.5.0-24", b"e")
    await eventually(lambda: len(seen) == 3)


async def test_a_failing_subscriber_does_not_stop_the_others_or_the_watch(
    running: tuple[FakeStore, Mirror, list[tuple[str, bytes | None]]],
) -> None:
    store, mirror, seen = running

    def broken(key: str, value: bytes | None) -> None:
        raise ValueError("a consumer's bug")

    mirror.subscribe(f"{FLANNEL}/", broken)
    await store.put(f"{FLANNEL}/subnets/10.1.2.0-24", b"b")
    await store.put(f"{FLANNEL}/subnets/10.1.3.0-24", b"c")
    await eventually(lambda: len(seen) == 2)


def test_a_prefix_outside_the_watched_ones_is_refused() -> None:
    mirror = Mirror(FakeStore(), [FLANNEL])
    with pytest.raises(ValueError, match="none of the watched prefixes"):
        mirror.collection("/elsewhere/")
