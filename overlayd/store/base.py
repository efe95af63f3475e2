"""What the rest of overlayd may ask of etcd, as a Protocol, and the two
conditions every caller handles: "not reachable right now" and "your watch
revision was compacted". The etcd adapter implements it; unit tests of the
mirror and the lease keeper implement it with a dictionary."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from overlayd.backoff import sleep_backoff
from overlayd.errors import OverlaydError

T = TypeVar("T")
log = logging.getLogger("overlayd")


class StoreUnavailable(OverlaydError):
    """etcd did not answer; the caller retries with backoff."""


class StoreRefused(StoreUnavailable):
    """etcd refuses us, or we refuse it: TLS or authentication. The message
    names the setting at fault. Fatal when a daemon starts; while it runs,
    retried like an outage (the files may be fixed on disk meanwhile)."""


class WatchCompacted(OverlaydError):
    """The watch's start revision was compacted away; list again."""


@dataclass(frozen=True, slots=True)
class KeyEvent:
    key: str
    value: bytes | None  # None: the key was deleted (or its lease expired)
    revision: int


class Store(Protocol):
    """A key-value store with revisions, leases and create-if-absent."""

    async def close(self) -> None: ...

    async def get(self, key: str) -> tuple[bytes | None, int]:
        """The value (None if absent) and the store's revision."""
        ...

    async def get_prefix(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """All keys under `prefix` and the revision they were read at."""
        ...

    async def get_with_revision(self, key: str) -> tuple[bytes, int] | None:
        """The value and its mod revision, or None if absent."""
        ...

    async def get_prefix_revisions(self, prefix: str) -> tuple[dict[str, tuple[bytes, int]], int]:
        """All keys under `prefix`, each with its mod revision, and the
        revision they were read at."""
        ...

    async def put(self, key: str, value: str | bytes) -> None: ...

    async def put_revision(self, key: str, value: str | bytes) -> int:
        """put, and the revision of the write."""
        ...

    async def put_many(self, items: Sequence[tuple[str, str]]) -> None: ...

    async def put_bound(self, key: str, value: bytes, lease_id: int) -> int:
        """Put the key bound to the lease (it goes when the lease does);
        returns the revision of the write."""
        ...

    async def get_with_lease(self, key: str) -> tuple[bytes, int, int] | None:
        """The value, its mod revision and the id of the lease it is bound to
        (0: none), or None if absent."""
        ...

    async def replace_bound(self, key: str, value: bytes, mod_revision: int) -> bool:
        """Write a new value to an existing key if nobody changed it since
        `mod_revision`, keeping the lease it is bound to; atomic."""
        ...

    async def delete(self, key: str) -> bool: ...

    async def delete_revision(self, key: str) -> int | None:
        """delete, and the revision of the deletion (None: no such key)."""
        ...

    async def grant(self, ttl: int) -> int: ...

    async def refresh(self, lease_id: int) -> int:
        """Keep a lease alive; returns its new TTL, 0 when it has expired."""
        ...

    async def revoke(self, lease_id: int) -> None: ...

    async def create(
        self, key: str, value: str, lease_id: int, *, absent: tuple[str, str] | None = None
    ) -> bool:
        """Put the key bound to the lease only if it does not exist, nor any
        key in the range `absent` ([start, end)); atomic."""
        ...

    async def create_all(self, items: Sequence[tuple[str, str]]) -> int | None:
        """Put every key only if none of them exists, atomically; the
        revision of the write, or None when some key existed."""
        ...

    async def delete_if_unchanged(self, revisions: Mapping[str, int]) -> int | None:
        """Delete every key only if each still has the mod revision given,
        atomically; the revision of the deletion, or None otherwise."""
        ...

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
        """Replace `old_key` (if nobody changed it meanwhile) by `key`, bound
        to the lease, in one transaction, if no key but `old_key` exists in
        the range `absent` (which holds both) and `key` does not exist."""
        ...

    async def take_over(self, key: str, value: str, lease_id: int, mod_revision: int) -> bool:
        """Rebind an existing key to our lease if nobody changed it meanwhile."""
        ...

    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[KeyEvent]:
        """Events under `prefix` from `start_revision` on, until an error."""
        ...


async def retry_unavailable(
    what: str, call: Callable[[], Awaitable[T]], *, refusal_is_fatal: bool = False
) -> T:
    """Call until etcd answers, backing off with jitter between attempts.
    With `refusal_is_fatal`, a refusal (TLS, authentication) is raised at
    once instead: what a daemon wants when it starts."""
    attempt = 0
    while True:
        try:
            return await call()
        except StoreRefused:
            if refusal_is_fatal:
                raise
            await sleep_backoff(attempt)
            attempt += 1
        except StoreUnavailable as exc:
            if attempt % 10 == 0:
                log.warning("event=etcd_unavailable during=%s error=%r", what, str(exc)[:200])
            await sleep_backoff(attempt)
            attempt += 1
