"""The one etcd watcher: an in-memory copy of every key under the prefixes
overlayd cares about, kept current.

Nothing else in the daemon lists or watches etcd. Consumers either read a
collection (a live dictionary of the keys under one prefix, e.g. all
leases) or subscribe to a prefix and are called with (key, value) for each
change, value None for a deletion. The hard parts of watching are done here,
once:

- each root prefix is listed, then watched from the listing's revision + 1;
- a broken watch (etcd restarting, a member failing) resumes from the last
  revision seen, after a jittered backoff, so no event is missed;
- a compacted start revision means the history is gone: the root is listed
  again and the difference from what we held is delivered as ordinary
  events (a key that vanished meanwhile arrives as a deletion), then the
  `on_relist` hooks run, so consumers that keep derived state can re-check.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial

from overlayd.backoff import sleep_backoff
from overlayd.journaled import JournaledDict
from overlayd.store.base import Store, StoreUnavailable, WatchCompacted, retry_unavailable

log = logging.getLogger(__name__)

Subscriber = Callable[[str, bytes | None], None]


class Mirror:
    """The current values under `roots` (each a key prefix ending in "/")."""

    def __init__(
        self,
        store: Store,
        roots: Sequence[str],
        *,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._roots = tuple(
            dict.fromkeys(root if root.endswith("/") else root + "/" for root in roots)
        )
        self._revisions: dict[str, int] = dict.fromkeys(self._roots, 0)
        self._values: dict[str, dict[str, bytes]] = {root: {} for root in self._roots}
        self._collections: list[tuple[str, JournaledDict]] = []
        self._subscribers: list[tuple[str, Subscriber]] = []
        self._on_reconnect = on_reconnect
        self.on_relist: list[Callable[[], None]] = []

    @property
    def revision(self) -> int:
        """The newest revision the mirror has seen, over all roots."""
        return max(self._revisions.values(), default=0)

    def revision_of(self, prefix: str) -> int:
        """The newest revision seen under the root that holds `prefix`: what
        the mirror's values there reflect. (The newest over all roots could
        be ahead of a root whose watch has not delivered an event yet.)"""
        return self._revisions[self._root_of(prefix)]

    def _root_of(self, prefix: str) -> str:
        for root in self._roots:
            if prefix.startswith(root):
                return root
        raise ValueError(f"{prefix} is under none of the watched prefixes {list(self._roots)}")

    def get(self, key: str) -> bytes | None:
        return self._values[self._root_of(key)].get(key)

    def collection(self, prefix: str) -> Mapping[str, bytes]:
        """A dictionary of the keys under `prefix`, kept current by the mirror
        (the same object for the mirror's life: read it, never write it). It
        notes its changes (`JournaledDict`), so a reader can find what
        changed since it last looked without comparing every key."""
        root = self._root_of(prefix)
        for known, values in self._collections:
            if known == prefix:
                return values
        values = JournaledDict(
            (k, v) for k, v in self._values[root].items() if k.startswith(prefix)
        )
        self._collections.append((prefix, values))
        return values

    def subscribe(self, prefix: str, subscriber: Subscriber) -> Callable[[], None]:
        """Call `subscriber(key, value)` for every later change under `prefix`
        (a subscriber added before `load` hears of every key listed); returns
        what ends the subscription."""
        self._root_of(prefix)
        entry = (prefix, subscriber)
        self._subscribers.append(entry)
        return lambda: self._subscribers.remove(entry)

    async def load(self) -> None:
        """List every root (waiting, with backoff, until etcd answers)."""
        for root in self._roots:
            await self._list(root)

    async def _list(self, root: str) -> None:
        values, revision = await retry_unavailable(
            f"list {root}", partial(self._store.get_prefix, root)
        )
        held = self._values[root]
        for key in [k for k in held if k not in values]:
            self._apply(root, key, None)
        for key, value in values.items():
            if held.get(key) != value:
                self._apply(root, key, value)
        self._revisions[root] = revision

    def _apply(self, root: str, key: str, value: bytes | None) -> None:
        held = self._values[root]
        if value is None:
            if held.pop(key, None) is None:
                return  # deleting what we never had: nothing changed
        else:
            held[key] = value
        for prefix, values in self._collections:
            if key.startswith(prefix):
                if value is None:
                    values.pop(key, None)
                else:
                    values[key] = value
        for prefix, subscriber in self._subscribers:
            if key.startswith(prefix):
                try:
                    subscriber(key, value)
                except Exception:  # one consumer's bug must not stop the watch
                    log.exception("event=subscriber_failed key=%s", key)

    async def run(self) -> None:
        """Watch every root until cancelled."""
        async with asyncio.TaskGroup() as group:
            for root in self._roots:
                group.create_task(self._watch(root), name=f"watch {root}")

    async def _watch(self, root: str) -> None:
        attempt = 0
        while True:
            try:
                async for event in self._store.watch_prefix(root, self._revisions[root] + 1):
                    if attempt:
                        attempt = 0
                        if self._on_reconnect is not None:
                            self._on_reconnect()
                    self._revisions[root] = max(self._revisions[root], event.revision)
                    self._apply(root, event.key, event.value)
            except WatchCompacted:
                log.warning(
                    "event=watch_compacted prefix=%s revision=%d; listing again",
                    root,
                    self._revisions[root],
                )
                await self._list(root)
                for hook in self.on_relist:
                    hook()
            except StoreUnavailable as exc:
                if attempt == 0:
                    log.warning(
                        "event=watch_interrupted prefix=%s resume_from=%d error=%r",
                        root,
                        self._revisions[root] + 1,
                        str(exc)[:200],
                    )
                await sleep_backoff(attempt)
                attempt += 1
