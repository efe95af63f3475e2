"""A `Store` in a dictionary, for unit tests of the mirror and the lease
keeper: revisions, leases with TTLs the test expires by hand, create-if-absent,
and watches that the test can break (etcd going away) or compact."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from overlayd.store.base import KeyEvent, StoreUnavailable, WatchCompacted


class FakeStore:
    def __init__(self) -> None:
        self.values: dict[str, tuple[bytes, int, int]] = {}  # key -> value, mod rev, lease
        self.revision = 1
        self.history: list[KeyEvent] = []
        self.compacted = 0  # revisions up to this one are gone
        self.down = False
        self.leases: dict[int, int] = {}  # id -> ttl (0: expired)
        self._next_lease = 100
        self._changed = asyncio.Condition()
        self.watch_calls: list[tuple[str, int]] = []
        self._epoch = 0  # bumped to break every open watch

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("fake etcd is down")

    async def _record(self, key: str, value: bytes | None, lease: int = 0) -> None:
        self.revision += 1
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = (value, self.revision, lease)
        self.history.append(KeyEvent(key, value, self.revision))
        async with self._changed:
            self._changed.notify_all()

    async def fail_watches(self) -> None:
        """Break every open watch, as an etcd restart does."""
        self._epoch += 1
        async with self._changed:
            self._changed.notify_all()

    async def expire(self, lease_id: int) -> None:
        """The lease's TTL ran out: its keys go."""
        self.leases[lease_id] = 0
        for key, (_, _, lease) in list(self.values.items()):
            if lease == lease_id:
                await self._record(key, None)

    async def close(self) -> None:
        pass

    async def get(self, key: str) -> tuple[bytes | None, int]:
        self._check()
        found = self.values.get(key)
        return (found[0] if found else None), self.revision

    async def get_prefix(self, prefix: str) -> tuple[dict[str, bytes], int]:
        self._check()
        return {k: v[0] for k, v in self.values.items() if k.startswith(prefix)}, self.revision

    async def get_prefix_revisions(self, prefix: str) -> tuple[dict[str, tuple[bytes, int]], int]:
        self._check()
        found = {k: (v[0], v[1]) for k, v in self.values.items() if k.startswith(prefix)}
        return found, self.revision

    async def get_with_revision(self, key: str) -> tuple[bytes, int] | None:
        self._check()
        found = self.values.get(key)
        return (found[0], found[1]) if found else None

    async def put(self, key: str, value: str | bytes) -> None:
        self._check()
        await self._record(key, value.encode() if isinstance(value, str) else value)

    async def put_revision(self, key: str, value: str | bytes) -> int:
        await self.put(key, value)
        return self.revision

    async def put_bound(self, key: str, value: bytes, lease_id: int) -> int:
        self._check()
        await self._record(key, value, lease_id)
        return self.revision

    async def get_with_lease(self, key: str) -> tuple[bytes, int, int] | None:
        self._check()
        found = self.values.get(key)
        return found if found else None

    async def replace_bound(self, key: str, value: bytes, mod_revision: int) -> bool:
        self._check()
        found = self.values.get(key)
        if found is None or found[1] != mod_revision:
            return False
        await self._record(key, value, found[2])
        return True

    async def put_many(self, items: Sequence[tuple[str, str]]) -> None:
        for key, value in items:
            await self.put(key, value)

    async def delete(self, key: str) -> bool:
        self._check()
        if key not in self.values:
            return False
        await self._record(key, None)
        return True

    async def delete_revision(self, key: str) -> int | None:
        return self.revision if await self.delete(key) else None

    async def grant(self, ttl: int) -> int:
        self._check()
        self._next_lease += 1
        self.leases[self._next_lease] = ttl
        return self._next_lease

    async def refresh(self, lease_id: int) -> int:
        self._check()
        return self.leases.get(lease_id, 0)

    async def revoke(self, lease_id: int) -> None:
        await self.expire(lease_id)

    def _in_range(self, absent: tuple[str, str] | None, but: str = "") -> bool:
        return absent is not None and any(
            absent[0] <= k < absent[1] and k != but for k in self.values
        )

    async def create(
        self, key: str, value: str, lease_id: int, *, absent: tuple[str, str] | None = None
    ) -> bool:
        self._check()
        if key in self.values or self._in_range(absent):
            return False
        await self._record(key, value.encode(), lease_id)
        return True

    async def _record_all(self, changes: Sequence[tuple[str, bytes | None]]) -> int:
        """Several changes at one revision, as one etcd transaction makes them."""
        self.revision += 1
        for key, value in changes:
            if value is None:
                self.values.pop(key, None)
            else:
                self.values[key] = (value, self.revision, 0)
            self.history.append(KeyEvent(key, value, self.revision))
        async with self._changed:
            self._changed.notify_all()
        return self.revision

    async def create_all(self, items: Sequence[tuple[str, str]]) -> int | None:
        self._check()
        if any(key in self.values for key, _ in items):
            return None
        return await self._record_all([(k, v.encode()) for k, v in items])

    async def delete_if_unchanged(self, revisions: Mapping[str, int]) -> int | None:
        self._check()
        for key, revision in revisions.items():
            found = self.values.get(key)
            if found is None or found[1] != revision:
                return None
        return await self._record_all([(k, None) for k in revisions])

    async def rekey(
        self,
        old_key: str,
        mod_revision: int,
        key: str,
        value: str,
        lease_id: int,
        *,
        absent: tuple[str, str] | None = None,
    ) -> bool:
        self._check()
        found = self.values.get(old_key)
        if found is None or found[1] != mod_revision or key in self.values:
            return False
        if self._in_range(absent, but=old_key):
            return False
        await self._record(old_key, None)
        await self._record(key, value.encode(), lease_id)
        return True

    async def take_over(self, key: str, value: str, lease_id: int, mod_revision: int) -> bool:
        self._check()
        found = self.values.get(key)
        if found is None or found[1] != mod_revision:
            return False
        await self._record(key, value.encode(), lease_id)
        return True

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[KeyEvent]:
        self._check()
        self.watch_calls.append((prefix, start_revision))
        if start_revision <= self.compacted:
            raise WatchCompacted(f"revision {start_revision} was compacted")
        sent = start_revision - 1
        epoch = self._epoch

        def fresh() -> list[KeyEvent]:
            return [e for e in self.history if e.revision > sent and e.key.startswith(prefix)]

        while True:
            for event in fresh():
                sent = event.revision
                yield event
            async with self._changed:
                await self._changed.wait_for(lambda: self._epoch != epoch or bool(fresh()))
            if self._epoch != epoch:
                raise StoreUnavailable("fake etcd restarted")


async def eventually(condition: Callable[[], bool], within: float = 30.0) -> None:
    """Poll until `condition()` holds (the code under test runs as a task);
    fail after a deadline generous enough for a loaded machine."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - polling is the point
            await asyncio.sleep(0.005)
