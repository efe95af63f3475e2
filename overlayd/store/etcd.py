"""The etcd adapter: the only module that imports aetcd.

It implements `store.base.Store`: bytes and revisions, with aetcd's and
gRPC's types hidden; callers get `StoreUnavailable` for "etcd cannot be
reached right now, try again" and `WatchCompacted` for "re-list, then watch
from the new revision".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from ipaddress import AddressValueError, IPv4Address
from typing import Any
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions

from overlayd.store.base import KeyEvent, StoreUnavailable, WatchCompacted

__all__ = ["EtcdStore", "KeyEvent", "StoreUnavailable", "WatchCompacted", "grpc_target"]


def grpc_target(endpoints: Sequence[str]) -> str:
    """One gRPC target for all endpoints.

    gRPC fails over between the addresses of an `ipv4:` target by itself, so
    a cluster given as several IP endpoints needs no client-side rotation.
    Host names are resolved by gRPC's `dns:` resolver, one name only.
    """
    hosts: list[tuple[str, int]] = []
    for endpoint in endpoints:
        parts = urlsplit(endpoint)
        if parts.scheme == "unix":
            if len(endpoints) != 1:
                raise ValueError("a unix:// etcd endpoint cannot be mixed with others")
            return f"unix:{parts.netloc}{parts.path}"
        assert parts.hostname is not None and parts.port is not None
        hosts.append((parts.hostname, parts.port))
    try:
        for host, _ in hosts:
            IPv4Address(host)
    except AddressValueError:
        if len(hosts) != 1:
            raise ValueError("several etcd endpoints must be given as IP addresses") from None
        return f"dns:{hosts[0][0]}:{hosts[0][1]}"
    return "ipv4:" + ",".join(f"{host}:{port}" for host, port in hosts)


_TRANSIENT = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.InternalError,
)


class EtcdStore:
    """A connection to etcd, rooted at nothing: keys are absolute strings."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 5.0) -> None:
        target = grpc_target(endpoints)
        # aetcd joins host and port as f"{host}:{port}"; splitting our target
        # at its last colon lets it pass any gRPC target through unchanged.
        host, port = target.rsplit(":", 1)
        self._client = aetcd.Client(
            host=host,
            port=port,
            timeout=timeout,
            options={
                "grpc.keepalive_time_ms": 10_000,
                "grpc.keepalive_timeout_ms": 5_000,
                "grpc.keepalive_permit_without_calls": 1,
                "grpc.initial_reconnect_backoff_ms": 200,
                "grpc.max_reconnect_backoff_ms": 2_000,
            },
        )
        self.target = target

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.close()

    async def __aenter__(self) -> EtcdStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except _TRANSIENT as exc:
            raise StoreUnavailable(f"etcd at {self.target}: {exc}") from exc

    async def get(self, key: str) -> tuple[bytes | None, int]:
        """The value (None if absent) and the store's revision."""
        result = await self._call(self._client.get_prefix(key.encode()))
        revision = int(result.header.revision) if result.header else 0
        for kv in result:
            if kv.key == key.encode():
                return bytes(kv.value), revision
        return None, revision

    async def get_prefix(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """All keys under `prefix` and the revision they were read at."""
        result = await self._call(self._client.get_prefix(prefix.encode()))
        values = {kv.key.decode(errors="replace"): bytes(kv.value) for kv in result}
        return values, int(result.header.revision)

    async def get_with_revision(self, key: str) -> tuple[bytes, int] | None:
        """The value and its mod revision, or None if absent."""
        result = await self._call(self._client.get_prefix(key.encode()))
        for kv in result:
            if kv.key == key.encode():
                return bytes(kv.value), int(kv.mod_revision)
        return None

    async def put(self, key: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else value
        await self._call(self._client.put(key.encode(), data))

    async def put_many(self, items: Sequence[tuple[str, str]]) -> None:
        """Several puts in one transaction (etcd allows 128 operations in one)."""
        tx = self._client.transactions
        await self._call(
            self._client.transaction(
                compare=[], success=[tx.put(k.encode(), v.encode()) for k, v in items], failure=[]
            )
        )

    async def delete(self, key: str) -> bool:
        result = await self._call(self._client.delete(key.encode()))
        return bool(result and result.deleted)

    async def grant(self, ttl: int) -> int:
        lease = await self._call(self._client.lease(ttl))
        return int(lease.id)

    async def refresh(self, lease_id: int) -> int:
        """Keep a lease alive; returns its new TTL, 0 when it has expired."""
        reply = await self._call(self._client.refresh_lease(lease_id))
        return int(reply.TTL) if reply is not None else 0

    async def revoke(self, lease_id: int) -> None:
        await self._call(self._client.revoke_lease(lease_id))

    async def create(self, key: str, value: str, lease_id: int) -> bool:
        """Put the key bound to the lease only if it does not exist; atomic."""
        tx = self._client.transactions
        succeeded, _ = await self._call(
            self._client.transaction(
                compare=[tx.create(key.encode()) == 0],
                success=[tx.put(key.encode(), value.encode(), lease=lease_id)],
                failure=[],
            )
        )
        return bool(succeeded)

    async def take_over(self, key: str, value: str, lease_id: int, mod_revision: int) -> bool:
        """Rebind an existing key to our lease if nobody changed it meanwhile."""
        tx = self._client.transactions
        succeeded, _ = await self._call(
            self._client.transaction(
                compare=[tx.mod(key.encode()) == mod_revision],
                success=[tx.put(key.encode(), value.encode(), lease=lease_id)],
                failure=[],
            )
        )
        return bool(succeeded)

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[KeyEvent]:
        """Events under `prefix` from `start_revision` on, until an error."""
        try:
            watch = await self._client.watch_prefix(prefix.encode(), start_revision=start_revision)
            try:
                async for event in watch:
                    kind = event.kind
                    yield KeyEvent(
                        key=event.kv.key.decode(errors="replace"),
                        value=None if kind == "DELETE" else bytes(event.kv.value),
                        revision=int(event.kv.mod_revision),
                    )
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(watch.cancel())
        except aetcd.exceptions.RevisionCompactedError as exc:
            raise WatchCompacted(f"revision {start_revision} was compacted") from exc
        except _TRANSIENT as exc:
            raise StoreUnavailable(f"etcd watch at {self.target}: {exc}") from exc
