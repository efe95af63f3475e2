"""This host's status key, `<own>/status/<host>`: the revision of
overlayd's keys (policies, endpoints) its last successful pass put in
force, bound to the host's etcd lease, so that `overlayctl policy wait`
can tell when every live host enforces a change. Kubernetes has no such
signal.

Written by one task, after passes, never in one: a pass must not wait for
etcd, and a burst of passes costs one write of the newest revision.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from overlayd.backoff import sleep_backoff
from overlayd.store.base import Store, StoreUnavailable

log = logging.getLogger(__name__)


def status_prefix(own_prefix: str) -> str:
    return f"{own_prefix.rstrip('/')}/status/"


def status_key(own_prefix: str, host: str) -> str:
    return status_prefix(own_prefix) + host


class StatusPublisher:
    def __init__(
        self,
        store: Store,
        *,
        key: Callable[[], str],
        lease_id: Callable[[], int],
        hostname: str,
    ) -> None:
        self._store = store
        self._key = key
        self._lease_id = lease_id
        self._hostname = hostname
        self._wanted: dict[str, Any] | None = None
        self._published: tuple[str, int, int] | None = None  # key, lease, revision
        self._due = asyncio.Event()

    def enforced(self, revision: int, policy: dict[str, int]) -> None:
        """A pass put `revision` in force (called after every successful pass)."""
        self._wanted = {
            "revision": revision,
            "time": round(time.time(), 3),
            "hostname": self._hostname,
            "policies": policy.get("policies", 0),
            "endpoints": policy.get("endpoints", 0),
        }
        if self._published != (self._key(), self._lease_id(), revision):
            self._due.set()

    async def run(self) -> None:
        attempt = 0
        while True:
            await self._due.wait()
            self._due.clear()
            wanted = self._wanted
            if wanted is None:
                continue
            key, lease_id = self._key(), self._lease_id()
            try:
                await self._store.put_bound(key, json.dumps(wanted).encode(), lease_id)
            except StoreUnavailable as exc:
                attempt += 1
                log.debug("event=status_write_failed error=%r", exc)
                self._due.set()  # the newest state, once etcd is back
                await sleep_backoff(attempt)
                continue
            attempt = 0
            self._published = (key, lease_id, int(wanted["revision"]))
