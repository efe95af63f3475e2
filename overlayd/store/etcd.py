"""The etcd adapter: the only module that imports aetcd.

It implements `store.base.Store`: bytes and revisions, with aetcd's and
gRPC's types hidden; callers get `StoreUnavailable` for "etcd cannot be
reached right now, try again", `StoreRefused` (a kind of it) for "etcd or
our own credentials refuse the connection: TLS or authentication", and
`WatchCompacted` for "re-list, then watch from the new revision".

TLS and authentication, and why a subclass of aetcd's client: aetcd 1.0.0
is the asyncio etcd v3 client we measured (FACTS.md), but it always dials
`grpc.aio.insecure_channel` (TLS was removed upstream and its TLS pull
request is unmerged) and authenticates once, never renewing the token. No
other maintained asyncio etcd v3 client does better (etcd3-py and
python-etcd3 are synchronous and unmaintained). `_Client` below replaces
only aetcd's `connect()`: it opens a `grpc.aio.secure_channel` with
`grpc.ssl_channel_credentials` when the endpoints are https, authenticates
when a user is given, and then sets up aetcd's own stubs and watcher, so
every other call is aetcd's. Everything else is done here, around it:

- certificate rotation: gRPC cannot swap a channel's certificate, so when
  the files change on disk (`follow_credentials`) a new client is built and
  the old one closed; open watches end and the mirror resumes them from the
  last revision it saw, so no event is missed;
- token renewal: a call refused for an invalid or expired auth token (etcd
  forgets simple tokens after `--auth-token-ttl` idle seconds and on every
  restart) reconnects, which authenticates again, and is tried once more;
- several https endpoints: gRPC checks a server's certificate against the
  channel's one authority, so one channel cannot span several members with
  TLS; the store keeps one endpoint at a time and moves to the next when
  the current one is unreachable (plain http keeps gRPC's own failover).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from ipaddress import AddressValueError, IPv4Address
from typing import Any
from urllib.parse import urlsplit

# gRPC's C core prints TLS failures on stderr as OpenSSL codes; the errors
# raised here say the same with the setting named. GRPC_VERBOSITY=error
# brings its lines back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import aetcd
import aetcd.client
import aetcd.exceptions
import aetcd.watcher
import grpc
from aetcd import rpc

from overlayd.errors import ConfigError
from overlayd.store.access import EtcdAccess, TlsMaterial, file_stamp, load_tls
from overlayd.store.base import KeyEvent, StoreRefused, StoreUnavailable, WatchCompacted

__all__ = [
    "EtcdAccess",
    "EtcdStore",
    "KeyEvent",
    "StoreRefused",
    "StoreUnavailable",
    "WatchCompacted",
    "grpc_target",
    "grpc_targets",
]

log = logging.getLogger(__name__)

CREDENTIAL_POLL_SECONDS = 1.0


def _host_target(host: str, port: int) -> str:
    try:
        IPv4Address(host)
    except AddressValueError:
        return f"dns:{host}:{port}"
    return f"ipv4:{host}:{port}"


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


def grpc_targets(access: EtcdAccess) -> list[str]:
    """The targets the store dials in turn: one for plain endpoints (gRPC
    fails over inside it), one per endpoint with TLS (see the docstring)."""
    if not access.tls:
        return [grpc_target(access.endpoints)]
    targets = []
    for endpoint in access.endpoints:
        parts = urlsplit(endpoint)
        assert parts.hostname is not None and parts.port is not None
        targets.append(_host_target(parts.hostname, parts.port))
    return targets


_TRANSIENT = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.InternalError,
)

# Request builders only (no connection): usable with whichever client is current.
_TX = aetcd.client.Transactions()

_CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2_000,
    # gRPC refuses a response over 4 MiB by default, and a daemon reads its
    # whole prefix in one range: 10,000 services with 20,000 endpoints are
    # 6.8 MB, and the daemon could never start. etcd's own Go client allows
    # 2 GiB - 1 (clientv3's defaultMaxCallRecvMsgSize); so do we.
    "grpc.max_receive_message_length": 2**31 - 1,
}


class _Watcher(aetcd.watcher.Watcher):  # type: ignore[misc]  # aetcd has no type hints
    """aetcd's watcher, told about watches etcd cancels.

    etcd refuses a watch it will not serve (an expired auth token, no read
    permission) by answering "created" and "canceled" together, and may
    cancel a running one. aetcd 1.0.0 ignores `canceled`: the watch would
    wait forever for events that never come. Here the reason becomes the
    watch's error, so the store reconnects or reports it."""

    async def _handle_response(self, response: Any) -> None:
        if not response.canceled or response.compact_revision != 0:
            await super()._handle_response(response)  # compaction: aetcd's own error
            return
        error = aetcd.exceptions.ClientError(
            f"etcd canceled the watch: {response.cancel_reason or 'no reason given'}"
        )
        async with self._lock:
            if response.created and self._new_callback is not None:
                self._new_callback.error = error
                self._new_callback_ready.notify_all()
                return
            # A cancel we asked for finds no callback left: nothing to tell.
            callback = self._callbacks.pop(response.watch_id, None)
        if callback is not None:
            await self._process_callback(callback, error)


class _Client(aetcd.Client):  # type: ignore[misc]  # aetcd has no type hints
    """aetcd's client with a TLS channel and a token (see the module docstring)."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None,
        username: str | None,
        password: str | None,
        timeout: float,
    ) -> None:
        # aetcd joins host and port as f"{host}:{port}"; splitting our target
        # at its last colon lets it pass any gRPC target through unchanged.
        host, port = target.rsplit(":", 1)
        super().__init__(
            host=host,
            port=port,
            username=username,
            password=password,
            timeout=timeout,
            options=_CHANNEL_OPTIONS,
        )
        self._credentials = credentials
        self._is_connecting: bool = False
        self.auth_disabled = False

    async def connect(self) -> None:
        """aetcd's connect, with `secure_channel` when credentials are given."""
        if self._connected.is_set():
            return
        if self._is_connecting:
            # Another caller is connecting; if it fails, this one would wait
            # forever on aetcd's event: an outage to retry, like any other.
            try:
                await asyncio.wait_for(self._connected.wait(), self._timeout)
            except TimeoutError:
                raise aetcd.exceptions.ConnectionTimeoutError(
                    "no connection to etcd within the timeout"
                ) from None
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            options = list(self._options.items())
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(target, self._credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(target, options=options)
            self.channel = channel
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(channel)
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                try:
                    reply = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                    self.metadata = (("token", reply.token),)
                except grpc.aio.AioRpcError as exc:
                    # A password for an etcd without authentication: flannel
                    # goes on too; say so once, then work without a token.
                    if "authentication is not enabled" not in (exc.details() or ""):
                        raise
                    self.auth_disabled = True
            self.kvstub = rpc.KVStub(channel)
            self.clusterstub = rpc.ClusterStub(channel)
            self.leasestub = rpc.LeaseStub(channel)
            self.maintenancestub = rpc.MaintenanceStub(channel)
            self._watcher = _Watcher(
                rpc.WatchStub(channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        except BaseException:
            with contextlib.suppress(Exception):
                if self.channel is not None:
                    await self.channel.close()
            self._init_channel_attrs()
            raise
        finally:
            self._is_connecting = False


def _describe(operation: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """An operation as an error names it: the call and the key it touched."""
    keys = [a for a in args if isinstance(a, bytes)][:1]
    for op in kwargs.get("success") or ():
        key = getattr(op, "key", None)
        if isinstance(key, bytes):
            keys.append(key)
            break
    names = {"get_prefix": "read", "put": "write", "delete": "delete", "transaction": "write"}
    verb = names.get(operation, operation)
    return f"{verb} {keys[0].decode(errors='replace')}" if keys else verb


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _token_expired(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, aetcd.exceptions.UnauthenticatedError) or (
        "invalid auth token" in text or "auth token is expired" in text
    )


class EtcdStore:
    """A connection to etcd, rooted at nothing: keys are absolute strings."""

    def __init__(self, access: EtcdAccess | Sequence[str], *, timeout: float = 5.0) -> None:
        if not isinstance(access, EtcdAccess):
            access = EtcdAccess(endpoints=tuple(access))
        self.access = access
        self._timeout = timeout
        self._targets = grpc_targets(access)
        self._index = 0
        # Read and checked now, so that a bad file stops a start with the
        # setting named; later changes are picked up by follow_credentials.
        self._material: TlsMaterial | None = load_tls(access) if access.tls else None
        self._client = self._new_client()
        self._refusal: str | None = None  # the refusal last logged, to log it once
        self._reconnect_lock = asyncio.Lock()

    @property
    def target(self) -> str:
        return self._targets[self._index]

    @property
    def material(self) -> TlsMaterial | None:
        """The TLS files now in use (None without TLS)."""
        return self._material

    def _new_client(self) -> _Client:
        credentials = None
        if self._material is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self._material.ca,
                private_key=self._material.key,
                certificate_chain=self._material.cert,
            )
        return _Client(
            self.target,
            credentials=credentials,
            username=self.access.username,
            password=self.access.password,
            timeout=self._timeout,
        )

    async def _reconnect(self, old: _Client, why: str, *, next_target: bool = False) -> None:
        """Replace `old` (unless another caller already did) with a new client."""
        async with self._reconnect_lock:
            if self._client is not old:
                return
            if next_target:
                self._index = (self._index + 1) % len(self._targets)
            self._client = self._new_client()
            log.info("event=etcd_reconnect target=%s why=%r", self.target, why)
        with contextlib.suppress(Exception):
            await old.close()

    async def follow_credentials(self, interval: float = CREDENTIAL_POLL_SECONDS) -> None:
        """Reload the TLS files when they change on disk, until cancelled.

        A change is used once the files read back whole and consistent (a
        new certificate with the old key is a rotation half done: it is
        tried again on the next poll, and reported only if it stays so)."""
        if self._material is None:
            return
        reported: str | None = None
        unsettled = 0
        while True:
            await asyncio.sleep(interval)
            if file_stamp(self.access.credential_files) == self._material.stamp:
                unsettled = 0
                continue
            try:
                material = load_tls(self.access)
            except ConfigError as exc:
                unsettled += 1
                if unsettled >= 3 and str(exc) != reported:
                    reported = str(exc)
                    log.error(
                        "event=etcd_credentials_unusable error=%r keeping=current_connection",
                        reported,
                    )
                continue
            unsettled, reported = 0, None
            self._material = material
            log.info(
                "event=etcd_credentials_reloaded subject=%r not_after=%s",
                material.cert_subject,
                material.cert_not_after.isoformat() if material.cert_not_after else None,
            )
            await self._reconnect(self._client, "credentials changed on disk")

    def _refused(self, exc: BaseException, what: str = "") -> StoreRefused | None:
        """A refusal, named by the setting that causes it, or None if `exc`
        is an ordinary outage."""
        text = str(exc)
        access = self.access
        where = f"etcd at {self.target}"
        if "CERTIFICATE_VERIFY_FAILED" in text:
            trust = f"etcd-cafile {access.cafile}" if access.cafile else "the system's CAs"
            return StoreRefused(
                f"{where}: its server certificate is not signed by {trust}, or has expired"
            )
        if "Hostname Verification" in text:
            return StoreRefused(
                f"{where}: its server certificate does not name the address dialled"
                " (it needs it among its subject alternative names)"
            )
        if "WRONG_VERSION_NUMBER" in text:
            return StoreRefused(f"{where} does not speak TLS: use http:// in etcd-endpoints")
        if "TSI_DATA_CORRUPTED" in text or "Unwrap failed" in text or "_ALERT_" in text:
            if access.certfile is None:
                return StoreRefused(
                    f"{where} requires a client certificate: set etcd-certfile and etcd-keyfile"
                )
            return StoreRefused(
                f"{where} refused the client certificate etcd-certfile {access.certfile}"
                " (signed by a CA it does not trust, or expired)"
            )
        if "authentication failed" in text:
            return StoreRefused(
                f"{where} refused user {access.username!r}:"
                f" wrong etcd-username or {access.password_setting}"
            )
        if "user name is empty" in text or "user name not found" in text:
            return StoreRefused(
                f"{where} has authentication on and no user for this client: use a client"
                " certificate whose CN is an etcd user (etcd-certfile), or etcd-username and"
                " etcd-password-file"
            )
        if "permission denied" in text:
            who = access.username or (
                self._material.cert_subject if self._material is not None else None
            )
            to = f"{who or 'this client'}" + (f" to {what}" if what else "")
            return StoreRefused(f"{where}: permission denied for {to}")
        return None

    def _failed(self, exc: BaseException, what: str) -> StoreUnavailable:
        refusal = self._refused(exc, what)
        if refusal is not None:
            # Logged once per cause, whichever member said it.
            cause = str(refusal).replace(self.target, "")
            if cause != self._refusal:
                self._refusal = cause
                log.error("event=etcd_refused error=%r", str(refusal))
            return refusal
        hint = ""
        if not self.access.tls and "Socket closed" in str(exc):
            # What a TLS-only etcd answers plain gRPC: etcd cannot be told
            # from one that went away, so it stays an outage, with a hint.
            hint = " (if this etcd serves TLS, use https:// endpoints)"
        return StoreUnavailable(f"etcd {what} at {self.target}: {exc}{hint}")

    def _succeeded(self) -> None:
        if self._refusal is not None:
            log.info("event=etcd_accepted target=%s after=%r", self.target, self._refusal)
            self._refusal = None
        if self._client.auth_disabled:
            self._client.auth_disabled = False
            log.warning("event=etcd_auth_not_enabled user=%r", self.access.username)

    async def check_access(self, key: str) -> None:
        """Read `key` from the first endpoint that answers. A refusal is
        raised only when every endpoint refuses (one member with a bad
        certificate must not stop a start that another can serve); an
        outage of any of them is raised as such, to be waited out."""
        refusals: list[StoreRefused] = []
        for _ in self._targets:
            try:
                await self.get(key)
                return
            except StoreRefused as exc:
                refusals.append(exc)  # _call moved on to the next endpoint
        raise refusals[0]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.close()

    async def __aenter__(self) -> EtcdStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, operation: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one aetcd call (named by its method), translating its errors,
        renewing an expired token and moving to the next TLS endpoint."""
        for attempt in range(2):
            client = self._client
            try:
                result = await getattr(client, operation)(*args, **kwargs)
            except asyncio.CancelledError:
                if client is not self._client and not _being_cancelled():
                    # gRPC cancels the calls of a channel that is closed; here
                    # that is our rotation, not the caller's cancellation.
                    raise StoreUnavailable(f"etcd connection renewed during {operation}") from None
                raise
            except aetcd.exceptions.ClientError as exc:
                if client is not self._client:
                    # The channel was replaced (a rotation) while this call ran.
                    raise StoreUnavailable(f"etcd connection renewed during {operation}") from exc
                if _token_expired(exc) and attempt == 0:
                    await self._reconnect(client, "auth token expired or invalid")
                    continue
                failure = self._failed(exc, _describe(operation, args, kwargs))
                if isinstance(exc, _TRANSIENT) and len(self._targets) > 1:
                    await self._reconnect(client, str(exc)[:120], next_target=True)
                raise failure from exc
            self._succeeded()
            return result
        raise AssertionError("unreachable")

    async def get(self, key: str) -> tuple[bytes | None, int]:
        """The value (None if absent) and the store's revision."""
        result = await self._call("get_prefix", key.encode())
        revision = int(result.header.revision) if result.header else 0
        for kv in result:
            if kv.key == key.encode():
                return bytes(kv.value), revision
        return None, revision

    async def get_prefix(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """All keys under `prefix` and the revision they were read at."""
        result = await self._call("get_prefix", prefix.encode())
        values = {kv.key.decode(errors="replace"): bytes(kv.value) for kv in result}
        return values, int(result.header.revision)

    async def get_prefix_revisions(self, prefix: str) -> tuple[dict[str, tuple[bytes, int]], int]:
        """All keys under `prefix`, each with its mod revision, and the
        revision they were read at."""
        result = await self._call("get_prefix", prefix.encode())
        values = {
            kv.key.decode(errors="replace"): (bytes(kv.value), int(kv.mod_revision))
            for kv in result
        }
        return values, int(result.header.revision)

    async def get_with_revision(self, key: str) -> tuple[bytes, int] | None:
        """The value and its mod revision, or None if absent."""
        result = await self._call("get_prefix", key.encode())
        for kv in result:
            if kv.key == key.encode():
                return bytes(kv.value), int(kv.mod_revision)
        return None

    async def put(self, key: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else value
        await self._call("put", key.encode(), data)

    async def put_revision(self, key: str, value: str | bytes) -> int:
        """put, and the revision of the write."""
        data = value.encode() if isinstance(value, str) else value
        result = await self._call("put", key.encode(), data)
        return int(result.header.revision)

    async def put_many(self, items: Sequence[tuple[str, str]]) -> None:
        """Several puts in one transaction (etcd allows 128 operations in one)."""
        tx = _TX
        await self._call(
            "transaction",
            compare=[],
            success=[tx.put(k.encode(), v.encode()) for k, v in items],
            failure=[],
        )

    async def put_bound(self, key: str, value: bytes, lease_id: int) -> int:
        result = await self._call("put", key.encode(), value, lease=lease_id)
        return int(result.header.revision)

    async def get_with_lease(self, key: str) -> tuple[bytes, int, int] | None:
        result = await self._call("get_prefix", key.encode())
        for kv in result:
            if kv.key == key.encode():
                return bytes(kv.value), int(kv.mod_revision), int(kv.lease)
        return None

    async def replace_bound(self, key: str, value: bytes, mod_revision: int) -> bool:
        # aetcd's put has no ignore_lease (its request builder drops it), so
        # the lease is read with the value and put back explicitly; the
        # compare makes sure both are still the ones read.
        found = await self.get_with_lease(key)
        if found is None or found[1] != mod_revision:
            return False
        tx = _TX
        succeeded, _ = await self._call(
            "transaction",
            compare=[tx.mod(key.encode()) == mod_revision],
            success=[tx.put(key.encode(), value, lease=found[2] or None)],
            failure=[],
        )
        return bool(succeeded)

    async def delete(self, key: str) -> bool:
        result = await self._call("delete", key.encode())
        return bool(result and result.deleted)

    async def delete_revision(self, key: str) -> int | None:
        """delete, and the revision of the deletion (None: no such key)."""
        result = await self._call("delete", key.encode())
        if not result or not result.deleted:
            return None
        return int(result.header.revision)

    async def grant(self, ttl: int) -> int:
        lease = await self._call("lease", ttl)
        return int(lease.id)

    async def refresh(self, lease_id: int) -> int:
        """Keep a lease alive; returns its new TTL, 0 when it has expired."""
        reply = await self._call("refresh_lease", lease_id)
        return int(reply.TTL) if reply is not None else 0

    async def revoke(self, lease_id: int) -> None:
        await self._call("revoke_lease", lease_id)

    async def create(
        self, key: str, value: str, lease_id: int, *, absent: tuple[str, str] | None = None
    ) -> bool:
        """Put the key bound to the lease only if it does not exist, nor any
        key in the range `absent` ([start, end)); atomic. (etcd compares a
        range key by key, and an empty range as one absent key.)"""
        tx = _TX
        compare = [tx.create(key.encode()) == 0]
        if absent is not None:
            compare.append(tx.create(absent[0].encode(), range_end=absent[1].encode()) == 0)
        succeeded, _ = await self._call(
            "transaction",
            compare=compare,
            success=[tx.put(key.encode(), value.encode(), lease=lease_id)],
            failure=[],
        )
        return bool(succeeded)

    async def create_all(self, items: Sequence[tuple[str, str]]) -> int | None:
        """Put every key only if none of them exists, in one transaction (at
        most 128 keys, etcd's default limit); the revision of the write, or
        None when some key existed and nothing was written."""
        tx = _TX
        succeeded, responses = await self._call(
            "transaction",
            compare=[tx.create(k.encode()) == 0 for k, _ in items],
            success=[tx.put(k.encode(), v.encode()) for k, v in items],
            failure=[],
        )
        if not succeeded:
            return None
        return int(responses[0].response_put.header.revision) if responses else 0

    async def delete_if_unchanged(self, revisions: Mapping[str, int]) -> int | None:
        """Delete every key, in one transaction, only if each still has the
        mod revision given; the revision of the deletion, or None when some
        key changed (or went) and nothing was deleted."""
        tx = _TX
        succeeded, responses = await self._call(
            "transaction",
            compare=[tx.mod(k.encode()) == rev for k, rev in revisions.items()],
            success=[tx.delete(k.encode()) for k in revisions],
            failure=[],
        )
        if not succeeded:
            return None
        return int(responses[0].response_delete_range.header.revision) if responses else 0

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
        tx = _TX
        compare = [tx.mod(old_key.encode()) == mod_revision, tx.create(key.encode()) == 0]
        if absent is not None:
            # The range on both sides of the old key.
            start, end = absent
            after = old_key + "\0"
            compare.append(tx.create(start.encode(), range_end=old_key.encode()) == 0)
            compare.append(tx.create(after.encode(), range_end=end.encode()) == 0)
        succeeded, _ = await self._call(
            "transaction",
            compare=compare,
            success=[
                tx.delete(old_key.encode()),
                tx.put(key.encode(), value.encode(), lease=lease_id),
            ],
            failure=[],
        )
        return bool(succeeded)

    async def take_over(self, key: str, value: str, lease_id: int, mod_revision: int) -> bool:
        """Rebind an existing key to our lease if nobody changed it meanwhile."""
        tx = _TX
        succeeded, _ = await self._call(
            "transaction",
            compare=[tx.mod(key.encode()) == mod_revision],
            success=[tx.put(key.encode(), value.encode(), lease=lease_id)],
            failure=[],
        )
        return bool(succeeded)

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[KeyEvent]:
        """Events under `prefix` from `start_revision` on, until an error.

        Ends with StoreUnavailable when the connection is replaced (a
        rotation, a token renewal, another endpoint), so that the caller
        resumes from the last revision it saw, on the new connection."""
        client = self._client
        try:
            watch = await client.watch_prefix(prefix.encode(), start_revision=start_revision)
            self._succeeded()
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
        except asyncio.CancelledError:
            if client is not self._client and not _being_cancelled():
                ended = f"etcd watch of {prefix} ended (connection renewed)"
                raise StoreUnavailable(ended) from None
            raise
        except aetcd.exceptions.ClientError as exc:
            if client is self._client:
                if _token_expired(exc):
                    await self._reconnect(client, "auth token expired or invalid")
                elif isinstance(exc, _TRANSIENT) and len(self._targets) > 1:
                    await self._reconnect(client, str(exc)[:120], next_target=True)
            raise self._failed(exc, f"watch {prefix}") from exc
        # aetcd ends a watch quietly when its client is closed.
        raise StoreUnavailable(f"etcd watch of {prefix} ended (connection renewed)")
