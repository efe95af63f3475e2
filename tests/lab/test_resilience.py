"""Never lose the network: restarts, reboots, etcd outages and compaction,
peer churn, drift by hand, bad input and teardown, each injected into a real
lab and measured (lost packets, repair and convergence times)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlayd.lab import netns
from overlayd.lab.faults import (
    DRIFT_KINDS,
    DRIFT_KINDS_V6,
    ContinuousPing,
    owned_state,
    repair_seconds,
)
from overlayd.lab.lab import PREFIX, Container, Lab, LabSettings
from overlayd.model import Lease
from overlayd.plan.leases import render_lease
from overlayd.store.etcd import EtcdStore
from tests.conftest import CONVERGE, SESSION_TAG, needs_root, wait_until
from tests.lab.fakes import FIRST_FAKE_OCTET, lab_network

pytestmark = [needs_root, pytest.mark.lab]

TTL = 6
OUTAGE_SECONDS = float(os.environ.get("OVERLAYD_TEST_OUTAGE_SECONDS", "60"))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(f"{SESSION_TAG}r")
    try:
        lab.up(3, config=lab_network(), settings=LabSettings(lease_ttl=TTL, resync_seconds=2.0))
        yield lab
    finally:
        lab.down()


def container(lab: Lab, host: int) -> Container:
    return next(c for c in lab.containers() if c.host == host)


def routes(lab: Lab, host: int) -> set[str]:
    out = netns.ip(lab.host_ns(host), "-j", "route", "show", "proto", "77")
    return {r["dst"] for r in json.loads(out or "[]")}


def lease_of(lab: Lab, host: int) -> bytes:
    """The host's lease value; its key names both subnets in a dual-stack lab."""
    return lab.leases()[lab.lease_key(host)]


def log_count(lab: Lab, host: int, needle: str) -> int:
    return lab.daemon_log(host).read_text().count(needle)


def logged(lab: Lab, host: int, needle: str, times: int) -> bool:
    return log_count(lab, host, needle) >= times


def fake_peer(octet: int) -> tuple[str, str]:
    """A well-formed lease of a host that does not exist (no traffic goes to it)."""
    assert octet >= FIRST_FAKE_OCTET, "lab hosts may hold this subnet"
    lease = Lease(
        IPv4Network(f"10.244.{octet}.0/24"),
        IPv4Address(f"198.51.100.{octet}"),
        1,
        f"02:00:00:00:01:{octet:02x}",
    )
    return f"{PREFIX}/subnets/10.244.{octet}.0-24", render_lease(lease)


def has_route(lab: Lab, host: int, dst: str) -> bool:
    return dst in routes(lab, host)


def lacks_route(lab: Lab, host: int, dst: str) -> bool:
    return dst not in routes(lab, host)


def reaches(lab: Lab, src: Container, dst: Container) -> bool:
    return Lab.ping(src, dst, wait=0.3).ok


async def put(key: str, value: str, store: EtcdStore) -> None:
    await store.put(key, value)


async def delete(key: str, store: EtcdStore) -> bool:
    return await store.delete(key)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_daemon_restart_loses_no_packet_and_rebuilds_nothing(
    lab: Lab, sig: signal.Signals
) -> None:
    subnet, subnet6, lease = lab.subnet(1), lab.subnet6(1), lease_of(lab, 1)
    assert subnet6 is not None
    before = owned_state(lab, 1)
    monitor = subprocess.Popen(
        ["ip", "-n", lab.host_ns(1), "monitor", "link", "route", "neigh"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with (
            ContinuousPing(container(lab, 1), container(lab, 2)) as out,
            ContinuousPing(container(lab, 2), container(lab, 1)) as back,
        ):
            time.sleep(0.5)
            lab.restart_daemon(1, sig)
            time.sleep(0.5)
            there, returned = out.stop(), back.stop()
    finally:
        monitor.terminate()
        events, _ = monitor.communicate(timeout=5)
    assert there.sent > 100 and there.lost == 0, there
    assert returned.sent > 100 and returned.lost == 0, returned
    # The same subnets, the same VtepMACs (both are in the lease).
    assert lab.subnet(1) == subnet and lab.subnet6(1) == subnet6
    assert lease_of(lab, 1) == lease
    assert owned_state(lab, 1) == before
    torn = [
        line
        for line in events.splitlines()
        if line.startswith("Deleted")
        and ("proto 77" in line or "PERMANENT" in line or "ovl" in line.split(" state")[0])
    ]
    assert torn == [], torn


def test_a_rebooted_host_comes_back_with_the_same_subnet_and_mac(lab: Lab) -> None:
    subnet, subnet6, lease = lab.subnet(3), lab.subnet6(3), lease_of(lab, 3)
    assert subnet6 is not None
    peers_before = {h: owned_state(lab, h) for h in (1, 2)}
    lab.remove_host(3)  # namespace, containers, devices and /run/subnet.env all gone
    lab.add_host(3)
    assert lab.subnet(3) == subnet and lab.subnet6(3) == subnet6
    assert lease_of(lab, 3) == lease
    for h in (1, 2):
        assert owned_state(lab, h) == peers_before[h]  # the peers needed no change
    for family in lab.families():
        assert all(r.ok for r in lab.check(timeout=CONVERGE, family=family))


def restart_with(lab: Lab, host: int, *args: str) -> None:
    """Restart the host's daemon with extra flags (the last of a repeated flag
    wins) and wait until it is ready again."""
    readies = log_count(lab, host, "event=ready")
    lab.stop_daemon(host)
    lab.start_daemon(host, *args)
    wait_until(
        lambda: log_count(lab, host, "event=ready") > readies or not lab.daemon_running(host)
    )
    assert lab.daemon_running(host), lab.daemon_log(host).read_text()[-3000:]


@pytest.fixture(scope="class")
def h1_without_resync(lab: Lab) -> Iterator[None]:
    """h1's daemon with its resync put off by an hour, for one class of tests."""
    restart_with(lab, 1, "--resync-seconds", "3600")
    try:
        yield
    finally:
        restart_with(lab, 1)


@pytest.mark.usefixtures("h1_without_resync")
class TestDriftByHand:
    """Drift by hand is repaired from the netlink events alone: h1's resync is
    put off while these run, so no repair can come from it. (How fast a
    repair is, is a benchmark's business: `overlayctl lab faults`.)"""

    # The IPv6 kinds: the same entries of the IPv6 half (route, neighbour,
    # both FDB entries on the IPv6 VTEP, that VTEP, strays), same test.
    @pytest.mark.parametrize("kind", DRIFT_KINDS + DRIFT_KINDS_V6)
    def test_is_repaired_from_netlink_events(self, lab: Lab, kind: str) -> None:
        for _ in range(3):
            repair_seconds(lab, 1, kind, timeout=CONVERGE)
        for family in lab.families():
            assert all(r.ok for r in lab.check(timeout=CONVERGE, family=family))


def test_drift_without_netlink_events_is_repaired_by_the_resync(lab: Lab) -> None:
    ns = lab.host_ns(2)
    netns.in_ns(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
    wait_until(lambda: netns.in_ns(ns, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1")


def test_an_etcd_outage_loses_nothing_and_a_waiting_host_joins_when_it_ends(lab: Lab) -> None:
    leases = lab.leases()
    with ContinuousPing(container(lab, 1), container(lab, 2)) as ping:
        lab.stop_etcd()
        lab.attach_host_namespace(4)  # a host that boots during the outage
        lab.start_daemon(4)
        time.sleep(OUTAGE_SECONDS)
        assert all(r.ok for r in lab.check(timeout=CONVERGE))  # the data plane carried on
        lab.start_etcd()
        lab.wait_ready(4, timeout=CONVERGE)
        for index in range(1, lab.settings().containers_per_host + 1):
            lab.add_container(4, index)
        new = container(lab, 4)
        for h in (1, 2, 3):
            wait_until(partial(reaches, lab, container(lab, h), new))
        count = ping.stop()
    assert count.lost == 0, count
    after = lab.leases()
    for key, value in leases.items():
        assert after.get(key) == value  # every lease survived the outage unchanged
    for h in (1, 2, 3):
        assert log_count(lab, h, "event=lease_changed") == 0
        assert log_count(lab, h, "event=lease_expired") == 0


def test_a_compacted_watch_revision_leads_to_a_full_relist(lab: Lab) -> None:
    daemon = netns.pids_in(lab.host_ns(1))
    key, value = fake_peer(201)
    for pid in daemon:
        os.kill(pid, signal.SIGSTOP)
    try:
        lab.etcd(lambda s: s.put(key, value))
        lab.stop_etcd()
        lab.start_etcd()
        for i in range(2):
            lab.etcd(partial(put, f"{PREFIX}/lab-filler", str(i)))
        revision = lab.etcd(lambda s: s.get(f"{PREFIX}/lab-filler"))[1]
        lab.etcdctl("compact", str(revision))
    finally:
        for pid in daemon:
            os.kill(pid, signal.SIGCONT)
    wait_until(lambda: log_count(lab, 1, "event=watch_compacted") >= 1)
    wait_until(lambda: "10.244.201.0/24" in routes(lab, 1))
    assert lab.daemon_running(1)
    lab.etcd(lambda s: s.delete(key))
    wait_until(lambda: "10.244.201.0/24" not in routes(lab, 1))


def test_a_dead_hosts_entries_go_after_the_ttl_and_come_back_with_it(lab: Lab) -> None:
    gone = str(lab.subnet(2))
    lab.stop_daemon(2, signal.SIGKILL)  # dies without a word; its lease runs out
    for h in (1, 3):
        wait_until(partial(lacks_route, lab, h, gone))
    lab.start_daemon(2)
    lab.wait_ready(2, timeout=CONVERGE)
    assert str(lab.subnet(2)) == gone  # the subnet file brought the same subnet back
    for h in (1, 3):
        wait_until(partial(has_route, lab, h, gone))
    assert all(r.ok for r in lab.check(timeout=CONVERGE))


def test_a_peer_that_left_while_a_daemon_was_down_is_cleaned_when_it_returns(lab: Lab) -> None:
    key, value = fake_peer(202)
    lab.etcd(lambda s: s.put(key, value))
    wait_until(lambda: "10.244.202.0/24" in routes(lab, 1))
    lab.stop_daemon(1)
    lab.etcd(lambda s: s.delete(key))
    time.sleep(0.5)
    assert "10.244.202.0/24" in routes(lab, 1)  # nobody home to remove it
    lab.start_daemon(1)
    wait_until(lambda: "10.244.202.0/24" not in routes(lab, 1))


def test_bad_input_is_skipped_with_one_warning_and_never_programmed(lab: Lab) -> None:
    bad = {
        f"{PREFIX}/subnets/10.244.210.0-24": "{not json",
        f"{PREFIX}/subnets/10.244.211.0-24": json.dumps(
            {
                "PublicIP": "127.0.0.1",
                "BackendType": "vxlan",
                "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:00:01"},
            }
        ),
        f"{PREFIX}/subnets/10.244.212.0-24": json.dumps(
            {
                "PublicIP": "198.51.100.7",
                "BackendType": "vxlan",
                "BackendData": {"VNI": 1, "VtepMAC": "01:00:5e:00:00:01"},
            }
        ),
        f"{PREFIX}/subnets/10.244.213.0-24": json.dumps(
            {
                "PublicIP": "198.51.100.8",
                "BackendType": "vxlan",
                "BackendData": {"VNI": 99, "VtepMAC": "02:00:00:00:00:08"},
            }
        ),
        f"{PREFIX}/subnets/10.99.0.0-24": fake_peer(214)[1],
        f"{PREFIX}/subnets/nonsense": "x" * 100_000,
    }
    hosts = lab.hosts()
    before = {h: log_count(lab, h, "event=lease_skipped") for h in hosts}
    good_config = lab.etcd(lambda s: s.get(f"{PREFIX}/config"))[0]
    assert good_config is not None
    try:
        for key, value in bad.items():
            lab.etcd(partial(put, key, value))
        for h in hosts:
            wait_until(partial(logged, lab, h, "event=lease_skipped", before[h] + len(bad)))
        two_resync_passes(lab, hosts)  # which must not warn again
        for h in hosts:
            assert lab.daemon_running(h)
            assert log_count(lab, h, "event=lease_skipped") - before[h] == len(bad)
            peers = {str(lab.subnet(p)) for p in hosts if p != h}
            assert routes(lab, h) == peers  # the real peers' routes, nothing of the bad leases
        bad_config = '{"Network": "10.0.0.0/16", "SubnetLen": 31}'
        lab.etcd(lambda s: s.put(f"{PREFIX}/config", bad_config))
        for h in hosts:
            wait_until(partial(logged, lab, h, "event=config_rejected", 1))
        two_resync_passes(lab, hosts)
        for h in hosts:
            assert log_count(lab, h, "event=config_rejected") == 1
        failed = [f"{r.src.ns}->{r.dst.ns}" for r in lab.check(timeout=CONVERGE) if not r.ok]
        assert not failed, failed  # the last good config still rules
    finally:
        # Even after a failure: the later tests need a sound cluster.
        lab.etcd(lambda s: s.put(f"{PREFIX}/config", good_config))
        for key in bad:
            lab.etcd(partial(delete, key))


def last_resync_pass_at(lab: Lab, host: int) -> float:
    """When the host's daemon finished its last pass of the resync timer (a
    check or a full pass; wall clock), from `overlayctl status`; 0 if the
    last pass was a light one."""
    proc = subprocess.run(
        netns.module_argv(
            lab.host_ns(host),
            "overlayd.cli.ctl",
            "status",
            "--json",
            "--control-socket",
            str(lab.control_socket(host)),
        ),
        capture_output=True,
        text=True,
        timeout=CONVERGE,
        check=True,
    )
    last = json.loads(proc.stdout)["last_reconcile"]
    return float(last["at"]) if last and last["level"] in ("check", "full") else 0.0


def two_resync_passes(lab: Lab, hosts: list[int]) -> None:
    """Until every host's daemon has run two passes of its resync timer from now."""
    for _ in range(2):
        since = time.time()
        for h in hosts:
            wait_until(partial(lambda host, t: last_resync_pass_at(lab, host) > t, h, since))


def test_teardown_removes_all_it_made_and_nothing_else(lab: Lab) -> None:
    ns = lab.host_ns(3)
    netns.ip(ns, "route", "add", "198.51.100.0/24", "via", "192.0.2.1")  # not ours
    subnet = str(lab.subnet(3))
    lab.stop_daemon(3)
    proc = subprocess.run(
        netns.module_argv(
            ns,
            "overlayd.cli.daemon",
            "--teardown",
            *lab.etcd_flags(3),
            "--iface",
            "eth0",
            "--subnet-file",
            str(lab.subnet_file(3)),
        ),
        capture_output=True,
        text=True,
        timeout=CONVERGE,
    )
    assert proc.returncode == 0, proc.stderr
    links = netns.ip(ns, "-o", "link")
    assert "ovl0" not in links and "ovl.1" not in links and "ovl_gwbridge" not in links
    assert netns.in_ns(ns, "nft", "list", "tables").strip() == ""
    assert not lab.subnet_file(3).exists()
    assert not any(subnet.split("/")[0] in k for k in lab.leases())
    assert "198.51.100.0/24 via 192.0.2.1" in netns.ip(ns, "route")
    for h in (1, 2):
        wait_until(partial(lacks_route, lab, h, subnet))


def test_overlayctl_leave_releases_the_lease_on_purpose(lab: Lab) -> None:
    subnet = str(lab.subnet(2))
    lab.stop_daemon(2)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "overlayd.cli.ctl",
            "leave",
            "--etcd-endpoints",
            lab.etcd_endpoint,
            "--subnet-file",
            str(lab.subnet_file(2)),
        ],
        capture_output=True,
        text=True,
        timeout=CONVERGE,
    )
    assert proc.returncode == 0 and "released" in proc.stdout, proc.stdout + proc.stderr
    wait_until(lambda: subnet not in routes(lab, 1))


def test_three_member_etcd_losing_the_daemons_member_loses_nothing() -> None:
    lab = Lab(f"{SESSION_TAG}e")
    try:
        lab.up(2, config=lab_network(), settings=LabSettings(lease_ttl=TTL, etcd_members=3))
        lease = lease_of(lab, 1)

        index = lab.etcd_member_in_use(1)
        with ContinuousPing(container(lab, 1), container(lab, 2)) as ping:
            lab.stop_etcd(index)
            key, value = fake_peer(203)
            lab.etcd(lambda s: s.put(key, value))
            wait_until(lambda: "10.244.203.0/24" in routes(lab, 1))
            time.sleep(2 * TTL)  # renewals must go on through another member
            count = ping.stop()
        assert count.lost == 0, count
        assert lease_of(lab, 1) == lease
        assert lab.etcd_member_in_use(1) != index
    finally:
        lab.down()
