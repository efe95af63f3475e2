"""etcd over mutual TLS and with authentication, against a real etcd on
loopback started with --client-cert-auth and auth enabled: leases work over
mutual TLS; every wrong credential is refused with the setting named (each
next to a credential that works); a certificate rotated on disk is used
without a restart and a watch across the rotation misses nothing; an
expired auth token is renewed, for calls and for watches."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from overlayd.config import parse_network_config
from overlayd.daemon.leasing import SubnetLeaser
from overlayd.errors import ConfigError
from overlayd.lab.pki import Authority, issue, make_authority
from overlayd.store.access import EtcdAccess
from overlayd.store.etcd import EtcdStore, StoreRefused, StoreUnavailable
from overlayd.store.mirror import Mirror
from tests.conftest import CONVERGE
from tests.integration.conftest import RunningEtcd, etcdctl, start_etcd, stop_etcd
from tests.unit.fake_store import eventually

CONFIG = parse_network_config('{"Network": "10.244.0.0/16"}')
PREFIX = "/sec/network"
ROOT_PASSWORD = "root-secret"
ALICE_PASSWORD = "alice-secret"
MISNAMED = "127.0.0.3"


@dataclass(frozen=True)
class SecureEtcd:
    etcd: RunningEtcd
    pki: Path
    authority: Authority

    def access(self, cn: str, **overrides: object) -> EtcdAccess:
        """Mutual TLS as the user `cn` (a client certificate issued for it)."""
        values: dict[str, object] = {
            "endpoints": (self.etcd.client,),
            "cafile": self.authority.cert,
            "certfile": self.pki / f"{cn}.pem",
            "keyfile": self.pki / f"{cn}-key.pem",
        }
        values.update(overrides)
        return EtcdAccess(**values)  # type: ignore[arg-type]


def _setup_auth(client: str, auth: tuple[str, ...]) -> None:
    """Users and roles: root; h1 may write under PREFIX; reader may only
    read it; alice (a password user) may write it."""
    steps = [
        ("user", "add", f"root:{ROOT_PASSWORD}"),
        ("user", "grant-role", "root", "root"),
        ("role", "add", "net-rw"),
        ("role", "grant-permission", "net-rw", "--prefix=true", "readwrite", PREFIX + "/"),
        ("role", "add", "net-ro"),
        ("role", "grant-permission", "net-ro", "--prefix=true", "read", PREFIX + "/"),
        ("user", "add", "h1", "--no-password"),
        ("user", "grant-role", "h1", "net-rw"),
        ("user", "add", "reader", "--no-password"),
        ("user", "grant-role", "reader", "net-ro"),
        ("user", "add", f"alice:{ALICE_PASSWORD}"),
        ("user", "grant-role", "alice", "net-rw"),
        ("auth", "enable"),
    ]
    for step in steps:
        done = etcdctl(client, *step, auth=auth)
        assert done.returncode == 0, f"etcdctl {' '.join(step)}: {done.stderr}"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureEtcd]:
    pki = tmp_path_factory.mktemp("pki")
    authority = make_authority(pki / "ca")
    issue(authority, pki / "server", "etcd", ips=["127.0.0.1"], server=True, client=False)
    for cn in ("root", "h1", "reader"):
        issue(authority, pki / cn, cn)
    other = make_authority(pki / "other-ca", "another CA")
    issue(other, pki / "stranger", "h1")
    issue(
        authority,
        pki / "expired",
        "h1",
        not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30),
        not_after=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1),
    )
    root_tls = (
        f"--cacert={authority.cert}",
        f"--cert={pki / 'root.pem'}",
        f"--key={pki / 'root-key.pem'}",
    )
    etcd = start_etcd(
        lambda: tmp_path_factory.mktemp("etcd-tls"),
        scheme="https",
        extra=(
            f"--cert-file={pki / 'server.pem'}",
            f"--key-file={pki / 'server-key.pem'}",
            "--client-cert-auth",
            f"--trusted-ca-file={authority.cert}",
        ),
        auth=root_tls,
        # An address the server certificate does not name: a member whose
        # certificate is wrong for the address it is dialled by.
        also_on=(MISNAMED,),
    )
    try:
        _setup_auth(etcd.client, root_tls)
        yield SecureEtcd(etcd, pki, authority)
    finally:
        stop_etcd(etcd.proc)


def leaser(store: EtcdStore, host: int) -> SubnetLeaser:
    return SubnetLeaser(store, etcd_prefix=PREFIX, public_ip=IPv4Address(f"192.0.2.{host}"), ttl=30)


async def test_leases_are_acquired_watched_and_renewed_over_mutual_tls(
    secure: SecureEtcd,
) -> None:
    async with EtcdStore(secure.access("h1")) as store, EtcdStore(secure.access("h1")) as other:
        mirror = Mirror(store, [PREFIX])
        await mirror.load()
        leases = mirror.collection(PREFIX + "/subnets/")
        watching = asyncio.create_task(mirror.run())
        try:
            mine = await leaser(store, 11).acquire(CONFIG)
            theirs = await leaser(other, 12).acquire(CONFIG)
            await eventually(lambda: len(leases) >= 2)
            assert any(str(theirs.lease.subnet).replace("/", "-") in k for k in leases)
            assert await store.refresh(mine.lease_id) > 0
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)


async def test_a_server_certificate_from_an_unknown_ca_is_refused_naming_etcd_cafile(
    secure: SecureEtcd,
) -> None:
    wrong_ca = secure.pki / "other-ca" / "ca.pem"
    async with EtcdStore(secure.access("h1", cafile=wrong_ca)) as store:
        with pytest.raises(StoreRefused, match=f"etcd-cafile {wrong_ca}"):
            await store.get(PREFIX + "/config")
    async with EtcdStore(secure.access("h1")) as store:  # the right CA: answered
        await store.get(PREFIX + "/config")


async def test_a_client_certificate_etcd_does_not_trust_is_refused_naming_etcd_certfile(
    secure: SecureEtcd,
) -> None:
    async with EtcdStore(secure.access("stranger")) as store:
        with pytest.raises(StoreRefused, match=r"refused the client certificate etcd-certfile"):
            await store.get(PREFIX + "/config")
    async with EtcdStore(secure.access("h1", certfile=None, keyfile=None)) as store:
        with pytest.raises(StoreRefused, match="requires a client certificate"):
            await store.get(PREFIX + "/config")
    async with EtcdStore(secure.access("h1")) as store:
        await store.get(PREFIX + "/config")


async def test_a_member_whose_certificate_is_wrong_does_not_stop_a_start_another_can_serve(
    secure: SecureEtcd, caplog: pytest.LogCaptureFixture
) -> None:
    good = secure.etcd.client
    misnamed = good.replace("127.0.0.1", MISNAMED)
    async with EtcdStore(secure.access("h1", endpoints=(misnamed,))) as store:
        for _ in range(4):
            with pytest.raises(StoreRefused, match="does not name the address dialled"):
                await store.check_access(PREFIX + "/config")
    assert caplog.text.count("event=etcd_refused") == 1  # told once, not at every retry
    async with EtcdStore(secure.access("h1", endpoints=(misnamed, good))) as store:
        await store.check_access(PREFIX + "/config")  # the second member answers
        assert store.target.endswith(good.rsplit("/", 1)[1])


async def test_callers_waiting_for_a_connection_that_fails_get_an_outage_not_a_crash() -> None:
    # A user makes the first caller log in while the others wait for it.
    access = EtcdAccess(endpoints=("http://127.0.0.1:9",), username="u", password="p")
    async with EtcdStore(access, timeout=1.0) as store:
        outcomes = await asyncio.gather(
            *(store.get("/k") for _ in range(3)), return_exceptions=True
        )
    assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes


def test_an_expired_certificate_and_a_missing_key_are_refused_before_dialling(
    secure: SecureEtcd,
) -> None:
    with pytest.raises(ConfigError, match="expired on") as expired:
        EtcdStore(secure.access("expired"))
    assert expired.value.field == "etcd-certfile"
    missing = secure.pki / "no-such-key.pem"
    with pytest.raises(ConfigError, match="does not exist") as no_key:
        EtcdStore(secure.access("h1", keyfile=missing))
    assert no_key.value.field == "etcd-keyfile"
    with pytest.raises(ConfigError, match="is not the key of the certificate") as mismatch:
        EtcdStore(secure.access("h1", keyfile=secure.pki / "reader-key.pem"))
    assert mismatch.value.field == "etcd-keyfile"
    EtcdStore(secure.access("h1"))  # the matching pair passes the same checks


async def test_a_wrong_password_is_refused_naming_the_password_setting(
    secure: SecureEtcd,
) -> None:
    # Without a client certificate this etcd refuses every TLS connection, so
    # the password is tried over a connection that does carry one: etcd then
    # checks the password first (a token overrides the certificate's CN).
    wrong = secure.access(
        "reader", username="alice", password="nope", password_setting="etcd-password-file"
    )
    async with EtcdStore(wrong) as store:
        with pytest.raises(StoreRefused, match="wrong etcd-username or etcd-password-file"):
            await store.get(PREFIX + "/config")
    right = secure.access("reader", username="alice", password=ALICE_PASSWORD)
    async with EtcdStore(right) as store:
        await store.put(PREFIX + "/alice-was-here", "1")  # alice may write; reader may not


async def test_a_user_without_write_permission_is_told_so(secure: SecureEtcd) -> None:
    async with EtcdStore(secure.access("reader")) as store:
        await store.get(PREFIX + "/config")
        denied = f"permission denied for CN=reader to write {PREFIX}/config"
        with pytest.raises(StoreRefused, match=denied):
            await store.put(PREFIX + "/config", "{}")
    async with EtcdStore(secure.access("h1")) as store:
        await store.put(PREFIX + "/h1-was-here", "1")


async def test_a_certificate_rotated_on_disk_is_used_without_a_restart_and_no_event_is_missed(
    secure: SecureEtcd, tmp_path: Path
) -> None:
    # The store starts with a certificate for `reader` (may read, not write)
    # and the files are then replaced by one for `h1` (may write): a write
    # that succeeds proves the new certificate is the one in use.
    live = tmp_path / "client"
    issue(secure.authority, live, "reader")
    access = secure.access(
        "reader", certfile=live.with_name("client.pem"), keyfile=live.with_name("client-key.pem")
    )
    watched = PREFIX + "/rotation/"
    seen: list[str] = []
    async with EtcdStore(access) as store, EtcdStore(secure.access("root")) as writer:
        mirror = Mirror(store, [watched])
        mirror.subscribe(watched, lambda key, value: seen.append(key) if value else None)
        await mirror.load()
        tasks = [
            asyncio.create_task(mirror.run()),
            asyncio.create_task(store.follow_credentials()),
        ]
        written: list[str] = []
        stop = asyncio.Event()

        async def write_steadily() -> None:
            # Stopped by a flag, not cancelled: a cancelled put may land in
            # etcd without being counted here.
            for n in itertools.count():
                if stop.is_set():
                    return
                key = f"{watched}{n:05d}"
                await writer.put(key, "x")
                written.append(key)
                await asyncio.sleep(0.01)

        writing = asyncio.create_task(write_steadily())
        try:
            await eventually(lambda: len(seen) >= 20)
            with pytest.raises(StoreRefused, match="permission denied"):
                await store.put(PREFIX + "/rotated", "before")
            issue(secure.authority, live, "h1")
            rotated_at = time.monotonic()
            while True:
                try:
                    await store.put(PREFIX + "/rotated", "after")
                    break
                except StoreUnavailable:  # refused, or cut short by the rotation
                    assert time.monotonic() - rotated_at < CONVERGE, "never rotated"
                    await asyncio.sleep(0.05)
            in_use_after = time.monotonic() - rotated_at
            mark = len(written)
            await eventually(lambda: len(seen) >= mark + 20)  # the watch goes on
        finally:
            stop.set()
            await asyncio.gather(writing, return_exceptions=True)
        await eventually(lambda: len(seen) >= len(written))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(f"rotation: new certificate in use after {in_use_after:.2f} s")
    assert store.material is not None and store.material.cert_subject == "CN=h1"
    assert seen == written, "the watch missed or repeated events across the rotation"


@pytest.fixture
def password_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEtcd]:
    """Plain http with password authentication and simple tokens that
    expire after 2 idle seconds (etcd also forgets them when it restarts)."""
    etcd = start_etcd(
        lambda: tmp_path_factory.mktemp("etcd-auth"),
        extra=("--auth-token=simple", "--auth-token-ttl=2"),
    )
    try:
        _setup_auth(etcd.client, ())
        etcd.auth = (f"--user=root:{ROOT_PASSWORD}",)
        yield etcd
    finally:
        stop_etcd(etcd.proc)


async def test_an_expired_auth_token_is_renewed_for_calls_and_watches(
    password_etcd: RunningEtcd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="overlayd.store.etcd")
    access = EtcdAccess(
        endpoints=(password_etcd.client,), username="alice", password=ALICE_PASSWORD
    )
    watched = PREFIX + "/tokens/"
    seen: list[str] = []
    async with EtcdStore(access) as store:
        mirror = Mirror(store, [watched])
        mirror.subscribe(watched, lambda key, value: seen.append(key) if value else None)
        await mirror.load()
        watching = asyncio.create_task(mirror.run())
        try:
            await store.put(watched + "1", "x")
            await eventually(lambda: seen == [watched + "1"])
            await asyncio.sleep(3)  # the token expires
            await store.put(watched + "2", "x")  # renewed transparently
            # A restart forgets every token, and breaks the watch: it resumes
            # with a new token and loses nothing written meanwhile.
            password_etcd.restart()
            await store.put(watched + "3", "x")
            await eventually(lambda: seen == [watched + "1", watched + "2", watched + "3"])
            await asyncio.sleep(3)
            await store.put(watched + "4", "x")
            await eventually(lambda: len(seen) == 4)
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
    assert seen == [watched + str(n) for n in (1, 2, 3, 4)]
    assert "auth token expired or invalid" in caplog.text  # it did expire, and was renewed


async def test_a_watch_opened_after_the_token_expired_is_not_left_silent(
    password_etcd: RunningEtcd, caplog: pytest.LogCaptureFixture
) -> None:
    """aetcd runs every watch of a client over one stream, authenticated
    once. etcd refuses a new watch on it once the token has expired by
    cancelling it at creation, which aetcd 1.0.0 ignores: the watch would
    wait forever. The store must notice, renew the token and watch again."""
    caplog.set_level(logging.INFO, logger="overlayd.store.etcd")
    access = EtcdAccess(
        endpoints=(password_etcd.client,), username="alice", password=ALICE_PASSWORD
    )
    first, second = PREFIX + "/stream-a/", PREFIX + "/stream-b/"
    seen_first: list[str] = []
    seen_second: list[str] = []
    async with EtcdStore(access) as store, EtcdStore(access) as writer:
        holding = Mirror(store, [first])
        holding.subscribe(first, lambda key, value: seen_first.append(key))
        await holding.load()
        tasks = [asyncio.create_task(holding.run())]
        try:
            await writer.put(first + "1", "x")
            await eventually(lambda: seen_first == [first + "1"])  # the stream is open
            await asyncio.sleep(3)  # the token expires; the open stream carries on
            # No listing first: the watch is the first thing this mirror asks for.
            late = Mirror(store, [second])
            late.subscribe(second, lambda key, value: seen_second.append(key))
            tasks.append(asyncio.create_task(late.run()))
            await writer.put(second + "1", "x")
            await eventually(lambda: seen_second == [second + "1"])
            await writer.put(first + "2", "x")  # and the first watch still works
            await eventually(lambda: seen_first == [first + "1", first + "2"])
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    assert "etcd canceled the watch" in caplog.text or "auth token expired" in caplog.text
