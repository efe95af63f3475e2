"""This host's endpoints: the containers that overlay-cni (through the
control socket) and the Docker plugin register, kept in etcd and on disk.

The keys (`<own>/endpoints/<host>/<id>`) are bound to the host's etcd
lease, so a dead host's endpoints vanish with it. The daemon writes them,
not the CNI plugin, because the daemon holds that lease. A lease ends in
more ways than the host dying (it expires while etcd is away, a restarted
daemon takes its subnet over with a new one), so every registration is
also a file under the state directory, and whenever the lease changes all
of them are written again, bound to the new one. Labels an operator set in
etcd since (`overlayctl endpoint label`) are kept: etcd's labels win over
the file's, and the file follows them.

A registration returns only once a pass has put the new endpoint in force
on this host (policy sets included): a container never runs unprotected by
a policy that selects it.

A request may also name the container's gwbridge addresses
(`gwbridge_addresses`, in gwbridge egress mode) and its overlay
and gwbridge interfaces' MACs (`macs`); they are checked against this host's gwbridge
subnets, as the policy manager reads them (plan/policy_inputs.own_host_subnets).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Protocol

from overlayd.errors import EndpointError, OverlaydError
from overlayd.model import Lease
from overlayd.plan.egress import EgressSpec
from overlayd.plan.endpoints import (
    MAX_ENDPOINT_BYTES,
    check_labels,
    endpoint_key,
    host_id,
    parse_endpoint,
    parse_endpoint_key,
    render_endpoint,
)
from overlayd.plan.policy_inputs import gwbridge_subnets, own_host_subnets
from overlayd.plan.policy_model import Endpoint
from overlayd.store.base import Store

log = logging.getLogger(__name__)

# How long a registration waits for a pass to put it in force.
ENFORCE_TIMEOUT_SECONDS = 10.0


class Enforcer(Protocol):
    async def wait_enforced(self, revision: int) -> None: ...


class EndpointRegistry:
    def __init__(
        self,
        store: Store,
        *,
        own_prefix: str,
        state_dir: Path,
        own: Callable[[], Lease],
        lease_id: Callable[[], int],
        enforcer: Enforcer,
        hostname: str = "",
        egress: Callable[[], EgressSpec | None] = lambda: None,
    ) -> None:
        self._store = store
        self._own_prefix = own_prefix
        self._dir = state_dir
        self._own = own
        self._lease_id = lease_id
        self._enforcer = enforcer
        self._hostname = hostname or os.uname().nodename
        self._egress = egress

    # --- requests (control socket, Docker plugin) -----------------------------

    async def register(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Validate, write to etcd and disk, wait until in force here."""
        endpoint = self._endpoint_of(request)
        value = render_endpoint(endpoint)
        self._write_file(endpoint.id, value)
        try:
            revision = await self._store.put_bound(endpoint.key, value, self._lease_id())
        except BaseException:
            # Not registered: the runtime undoes the container, and a later
            # republish must not bring it back.
            self._file(endpoint.id).unlink(missing_ok=True)
            raise
        try:
            async with asyncio.timeout(ENFORCE_TIMEOUT_SECONDS):
                await self._enforcer.wait_enforced(revision)
        except TimeoutError:
            raise OverlaydError(
                f"endpoint {endpoint.name} is registered (revision {revision}) but no pass"
                f" put it in force within {ENFORCE_TIMEOUT_SECONDS:g} s"
            ) from None
        log.info(
            "event=endpoint_registered key=%s name=%s addresses=%s revision=%d",
            endpoint.key,
            endpoint.name,
            ",".join(map(str, endpoint.addresses)),
            revision,
        )
        return {"key": endpoint.key, "revision": revision}

    async def unregister(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Remove an endpoint (CNI DEL); removing an unknown one is no error."""
        endpoint_id = _text(request, "id", 128)
        key = endpoint_key(self._own_prefix, host_id(self._own().subnet), endpoint_id)
        self._file(endpoint_id).unlink(missing_ok=True)
        existed = await self._store.delete(key)
        if existed:
            log.info("event=endpoint_unregistered key=%s", key)
        return {"key": key, "existed": existed}

    # --- keeping them --------------------------------------------------------

    async def republish(self) -> int:
        """Write every endpoint on disk to etcd again, bound to the current
        lease (after a new lease, and at start); returns how many."""
        written = 0
        for path in sorted(self._dir.glob("*.json")) if self._dir.is_dir() else []:
            try:
                endpoint = self._endpoint_of(json.loads(path.read_bytes()), path.stem)
            except (OverlaydError, ValueError) as exc:
                # The lease moved to another subnet (the container's address is
                # not ours any more), or the file is damaged: drop it, loudly.
                log.warning("event=endpoint_dropped file=%s reason=%r", path, str(exc))
                path.unlink(missing_ok=True)
                continue
            value = render_endpoint(endpoint)
            await self._store.put_bound(endpoint.key, value, self._lease_id())
            written += 1
        if written:
            log.info("event=endpoints_republished count=%d", written)
        return written

    def etcd_changed(self, key: str, value: bytes | None) -> None:
        """A change under our host's endpoints in etcd: an operator's new
        labels become the file's, so that a republish keeps them. Only
        valid labels of a valid key of ours: anything else in etcd is
        skipped by every reader (with a warning, by the policy manager),
        and must neither raise here nor reach a file, where the next
        republish would refuse it and drop the container's registration."""
        if value is None or len(value) > MAX_ENDPOINT_BYTES:
            return
        try:
            _, endpoint_id = parse_endpoint_key(key, self._own_prefix)
            path = self._file(endpoint_id)
        except EndpointError:
            return
        if not path.exists():
            return
        try:
            stored = json.loads(path.read_bytes())
            current = json.loads(value)
        except (ValueError, RecursionError):
            return
        if not isinstance(current, dict) or not isinstance(stored, dict):
            return
        try:
            labels = check_labels(current.get("labels", {}), "labels")
        except EndpointError:
            return
        if labels != stored.get("labels"):
            stored["labels"] = labels
            self._write_file(endpoint_id, json.dumps(stored).encode())

    # --- helpers -------------------------------------------------------------

    def _endpoint_of(self, request: Mapping[str, Any], endpoint_id: str | None = None) -> Endpoint:
        """The endpoint a request (or a file) describes, validated exactly as
        every reader validates it (parse_endpoint), against our own subnets."""
        if not isinstance(request, Mapping):
            raise EndpointError("the request is not an object")
        own = self._own()
        host = host_id(own.subnet)
        endpoint_id = endpoint_id or _text(request, "id", 128)
        addresses = request.get("addresses")
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise EndpointError("addresses: must be a list of addresses")
        labels = request.get("labels", {})
        registered = request.get("registered", time.time())
        draft = {
            "name": request.get("name") or endpoint_id,
            "host": host,
            "hostname": request.get("hostname") or self._hostname,
            "addresses": [str(ip_address(a)) if _is_address(a) else a for a in addresses],
            "labels": labels,
            "registered": registered,
        }
        # Absent stays absent (an older overlay-cni, the Docker plugin's
        # docker_gwbridge); present is checked by parse_endpoint.
        for optional in ("gwbridge_addresses", "macs"):
            if request.get(optional) is not None:
                draft[optional] = request[optional]
        key = endpoint_key(self._own_prefix, host, endpoint_id)
        subnets = {host: own_host_subnets(own, gwbridge_subnets(self._egress()))}
        return parse_endpoint(key, json.dumps(draft).encode(), self._own_prefix, subnets)

    def _file(self, endpoint_id: str) -> Path:
        if not endpoint_id or "/" in endpoint_id or endpoint_id.startswith("."):
            raise EndpointError(f"id: {endpoint_id!r} is not an endpoint id")
        return self._dir / f"{endpoint_id}.json"

    def _write_file(self, endpoint_id: str, value: bytes) -> None:
        path = self._file(endpoint_id)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = path.with_suffix(".tmp")
        partial.write_bytes(value)
        os.replace(partial, path)


def _text(request: Mapping[str, Any], name: str, limit: int) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise EndpointError(f"{name}: must be a string of 1 to {limit} characters")
    return value


def _is_address(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True
