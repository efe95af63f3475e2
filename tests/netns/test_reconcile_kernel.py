"""The reconcile pass on the real kernel, in a throwaway namespace: it
creates, repairs and removes exactly the entries overlayd owns."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from overlayd.config import parse_network_config
from overlayd.daemon.loop import Knowledge, Reconciler
from overlayd.dataplane import Dataplane
from overlayd.dataplane.entries import ApplyResult
from overlayd.model import Lease
from overlayd.plan.desired import device_spec, stable_mac
from overlayd.plan.egress import EgressSpec
from overlayd.plan.leases import render_lease, subnet_key
from tests.conftest import CONVERGE, needs_root

pytestmark = [needs_root, pytest.mark.root]

PREFIX = "/coreos.com/network"
CONFIG = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"VNI": 1, "Port": 8472}}')
OWN = Lease(
    IPv4Network("10.244.1.0/24"),
    IPv4Address("192.0.2.11"),
    1,
    stable_mac("vtep", IPv4Network("10.244.1.0/24"), 1),
)
B = Lease(IPv4Network("10.244.2.0/24"), IPv4Address("192.0.2.12"), 1, "02:00:00:00:00:02")
NO_EGRESS = EgressSpec("none", CONFIG.network, "ovl0", "ovl_gwbridge")
C = Lease(IPv4Network("10.244.3.0/24"), IPv4Address("192.0.2.13"), 1, "02:00:00:00:00:03")


def sh(ns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=True
    ).stdout


def jq(ns: str, *argv: str) -> list[dict[str, Any]]:
    out = sh(ns, *argv)
    return json.loads(out) if out.strip() else []


def raw(*leases: Lease) -> dict[str, bytes]:
    return {subnet_key(PREFIX, lease.subnet): render_lease(lease).encode() for lease in leases}


@pytest.fixture(params=["iproute2-batch", "netlink"])
async def host(netns: str, request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Reconciler]]:
    """A host namespace with an underlay, and a reconciler that writes its
    entries through iproute2 batches or through netlink (both paths must
    program exactly the same kernel state)."""
    sh(netns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "wire")
    sh(netns, "ip", "addr", "add", "192.0.2.11/24", "dev", "eth0")
    sh(netns, "ip", "link", "set", "eth0", "up")
    sh(netns, "ip", "link", "set", "wire", "up")
    dataplane = Dataplane.open(netns)
    dataplane.netlink_max_changes = 0 if request.param == "iproute2-batch" else 1000
    underlay = await dataplane.netlink.find_underlay("eth0", None)
    spec = device_spec(
        config=CONFIG,
        own=OWN,
        bridge="ovl0",
        underlay_ifindex=underlay.ifindex,
        underlay_mtu=underlay.mtu,
        underlay="eth0",
    )
    knowledge = Knowledge(
        config=CONFIG,
        own=OWN,
        spec=spec,
        egress=NO_EGRESS,
        etcd_prefix=PREFIX,
        raw_leases=raw(OWN, B, C),
    )
    try:
        yield netns, Reconciler(knowledge, dataplane)
    finally:
        await dataplane.close()


def routes(ns: str) -> dict[str, str]:
    return {
        r["dst"]: f"{r['gateway']} {r['dev']} {' '.join(r['flags'])}"
        for r in jq(ns, "ip", "-j", "route", "show", "proto", "77")
    }


def neighbours(ns: str) -> dict[str, str]:
    return {
        str(n["dst"]): str(n["lladdr"])
        for n in jq(ns, "ip", "-j", "neigh", "show", "dev", "ovl0", "nud", "permanent")
    }


def fdb(ns: str) -> set[str]:
    found = set()
    for e in jq(ns, "bridge", "-j", "fdb", "show", "dev", "ovl.1"):
        if e.get("dst"):
            found.add(f"{e['mac']} dst {e['dst']}")
        elif e.get("state") == "static":
            found.add(f"{e['mac']} master")
    return found


EXPECTED_ROUTES = {
    "10.244.2.0/24": "10.244.2.0 ovl0 onlink",
    "10.244.3.0/24": "10.244.3.0 ovl0 onlink",
}
EXPECTED_NEIGH = {"10.244.2.0": B.vtep_mac, "10.244.3.0": C.vtep_mac}
EXPECTED_FDB = {
    f"{B.vtep_mac} dst 192.0.2.12",
    f"{B.vtep_mac} master",
    f"{C.vtep_mac} dst 192.0.2.13",
    f"{C.vtep_mac} master",
}


async def test_first_pass_builds_devices_and_every_peer_entry(host: tuple[str, Reconciler]) -> None:
    ns, rec = host
    result = await rec.reconcile_once()
    assert result.ok and result.peers == 2 and result.changes == 8
    bridge = jq(ns, "ip", "-j", "-d", "link", "show", "ovl0")[0]
    assert bridge["address"] == rec.knowledge.spec.bridge_mac and bridge["mtu"] == 1450
    assert "10.244.1.1/24" in sh(ns, "ip", "-4", "addr", "show", "dev", "ovl0")
    vtep = jq(ns, "ip", "-j", "-d", "link", "show", "ovl.1")[0]
    data = vtep["linkinfo"]["info_data"]
    assert (data["id"], data["port"], data["local"], data["learning"]) == (
        1,
        8472,
        "192.0.2.11",
        False,
    )
    assert vtep["master"] == "ovl0" and vtep["mtu"] == 1450 and vtep["address"] == OWN.vtep_mac
    port = vtep["linkinfo"]["info_slave_data"]
    assert port["learning"] is False and port["flood"] is False
    assert routes(ns) == EXPECTED_ROUTES
    assert neighbours(ns) == EXPECTED_NEIGH
    assert fdb(ns) == EXPECTED_FDB
    assert sh(ns, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"
    assert sh(ns, "sysctl", "-n", "net.ipv4.conf.ovl0.send_redirects").strip() == "0"
    assert sh(ns, "sysctl", "-n", "net.ipv4.conf.all.send_redirects").strip() == "0"


async def test_a_second_pass_changes_nothing(host: tuple[str, Reconciler]) -> None:
    _, rec = host
    await rec.reconcile_once()
    again = await rec.reconcile_once()
    assert again.ok and again.changes == 0


async def test_entries_deleted_by_hand_are_put_back(host: tuple[str, Reconciler]) -> None:
    ns, rec = host
    await rec.reconcile_once()
    sh(ns, "ip", "route", "del", "10.244.2.0/24")
    sh(ns, "ip", "neigh", "del", "10.244.3.0", "dev", "ovl0")
    sh(ns, "bridge", "fdb", "del", B.vtep_mac, "dev", "ovl.1", "dst", "192.0.2.12", "self")
    sh(ns, "bridge", "fdb", "del", C.vtep_mac, "dev", "ovl.1", "master")
    result = await rec.reconcile_once()
    assert result.ok and result.changes == 4
    assert (routes(ns), neighbours(ns), fdb(ns)) == (EXPECTED_ROUTES, EXPECTED_NEIGH, EXPECTED_FDB)


async def test_devices_deleted_or_altered_by_hand_are_rebuilt(host: tuple[str, Reconciler]) -> None:
    ns, rec = host
    await rec.reconcile_once()
    sh(ns, "ip", "addr", "flush", "dev", "ovl0")
    sh(ns, "ip", "link", "del", "ovl.1")
    result = await rec.reconcile_once()
    assert result.ok
    assert "10.244.1.1/24" in sh(ns, "ip", "-4", "addr", "show", "dev", "ovl0")
    assert (routes(ns), neighbours(ns), fdb(ns)) == (EXPECTED_ROUTES, EXPECTED_NEIGH, EXPECTED_FDB)
    # A VTEP with the right name but the wrong VNI cannot be fixed in place.
    sh(ns, "ip", "link", "del", "ovl.1")
    sh(ns, "ip", "link", "add", "ovl.1", "type", "vxlan", "id", "9", "dstport", "4789")
    assert (await rec.reconcile_once()).ok
    vtep = jq(ns, "ip", "-j", "-d", "link", "show", "ovl.1")[0]
    assert vtep["linkinfo"]["info_data"]["id"] == 1
    assert fdb(ns) == EXPECTED_FDB


async def test_strays_on_our_devices_go_and_foreign_entries_stay(
    host: tuple[str, Reconciler],
) -> None:
    ns, rec = host
    await rec.reconcile_once()
    # Strays: ours by protocol or by device, but no lease wants them.
    sh(
        ns,
        "ip",
        "route",
        "add",
        "10.244.50.0/24",
        "via",
        "10.244.50.0",
        "dev",
        "ovl0",
        "onlink",
        "proto",
        "77",
    )
    sh(
        ns,
        "ip",
        "neigh",
        "add",
        "10.244.50.0",
        "lladdr",
        "02:00:00:00:00:50",
        "dev",
        "ovl0",
        "nud",
        "permanent",
    )
    sh(
        ns,
        "bridge",
        "fdb",
        "add",
        "02:00:00:00:00:50",
        "dev",
        "ovl.1",
        "dst",
        "192.0.2.50",
        "self",
        "permanent",
    )
    # Not ours: another protocol, another device.
    sh(ns, "ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.1", "dev", "eth0")
    sh(ns, "ip", "route", "add", "10.244.60.0/24", "via", "192.0.2.1", "dev", "eth0")
    sh(
        ns,
        "ip",
        "neigh",
        "add",
        "192.0.2.99",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "eth0",
        "nud",
        "permanent",
    )
    result = await rec.reconcile_once()
    assert result.ok and result.changes == 3
    assert (routes(ns), neighbours(ns), fdb(ns)) == (EXPECTED_ROUTES, EXPECTED_NEIGH, EXPECTED_FDB)
    assert "198.51.100.0/24 via 192.0.2.1" in sh(ns, "ip", "route")
    assert "10.244.60.0/24 via 192.0.2.1" in sh(ns, "ip", "route")
    assert "192.0.2.99 lladdr 02:00:00:00:00:99 PERMANENT" in sh(
        ns, "ip", "neigh", "show", "dev", "eth0"
    )


async def test_a_departed_peer_is_removed_and_a_changed_one_leaves_nothing_stale(
    host: tuple[str, Reconciler],
) -> None:
    ns, rec = host
    await rec.reconcile_once()
    moved_c = Lease(C.subnet, IPv4Address("192.0.2.33"), 1, "02:00:00:00:00:33")
    rec.knowledge.raw_leases = raw(OWN, moved_c)  # B left, C has a new IP and MAC
    assert (await rec.reconcile_once()).ok
    assert routes(ns) == {"10.244.3.0/24": "10.244.3.0 ovl0 onlink"}
    assert neighbours(ns) == {"10.244.3.0": "02:00:00:00:00:33"}
    assert fdb(ns) == {"02:00:00:00:00:33 dst 192.0.2.33", "02:00:00:00:00:33 master"}


async def test_a_malformed_peer_lease_programs_nothing_and_warns_once(
    host: tuple[str, Reconciler], caplog: pytest.LogCaptureFixture
) -> None:
    ns, rec = host
    rec.knowledge.raw_leases = {
        **raw(OWN, B),
        f"{PREFIX}/subnets/10.244.9.0-24": b'{"PublicIP": "127.0.0.1", "BackendData": {}}',
    }
    caplog.set_level("WARNING")
    assert (await rec.reconcile_once()).ok
    assert (await rec.reconcile_once()).ok
    assert routes(ns) == {"10.244.2.0/24": "10.244.2.0 ovl0 onlink"}
    warnings = [r for r in caplog.records if "lease_skipped" in r.getMessage()]
    assert len(warnings) == 1 and "10.244.9.0-24" in warnings[0].getMessage()


async def test_a_pass_that_fails_half_way_is_retried_until_nothing_is_missing(
    host: tuple[str, Reconciler], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel refuses a batch (here because the VTEP vanished between the
    read and the write, as it would under a concurrent delete or a lost
    netlink message): the loop re-reads everything and repairs it."""
    ns, rec = host
    real_apply = rec.dataplane.apply
    calls = 0

    async def apply_after_vtep_vanished(*args: Any, **kwargs: Any) -> ApplyResult:
        nonlocal calls
        calls += 1
        if calls == 1:
            sh(ns, "ip", "link", "del", "ovl.1")
        return await real_apply(*args, **kwargs)

    monkeypatch.setattr(rec.dataplane, "apply", apply_after_vtep_vanished)
    succeeded = asyncio.Event()
    rec.on_pass = lambda result: succeeded.set() if result.ok else None
    loop = asyncio.create_task(rec.run())
    rec.mark_dirty()
    try:
        async with asyncio.timeout(CONVERGE):
            await succeeded.wait()
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    assert calls >= 2 and rec.passes >= 2
    assert (routes(ns), neighbours(ns), fdb(ns)) == (EXPECTED_ROUTES, EXPECTED_NEIGH, EXPECTED_FDB)
