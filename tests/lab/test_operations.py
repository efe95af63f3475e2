"""Running overlayd like real infrastructure, in the lab: overlayctl against
live daemons, metrics and health, logs, MQTT events through a real
mosquitto, systemd's notify protocol, and overlay-cni invoked as a runtime
invokes it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from ipaddress import IPv4Address, IPv4Network, ip_interface
from pathlib import Path
from typing import Any

import pytest

from overlayd.lab import netns
from overlayd.lab.lab import Lab, LabSettings
from overlayd.model import Lease
from overlayd.plan.leases import render_lease, subnet_key
from tests.conftest import CONVERGE, SESSION_TAG, needs_root, wait_until
from tests.lab.fakes import lab_network
from tests.lab.probes import http_get

pytestmark = [needs_root, pytest.mark.lab]

PREFIX = "/coreos.com/network"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(f"{SESSION_TAG}o")
    try:
        lab.up(2, config=lab_network(), settings=LabSettings(mqtt=True, resync_seconds=2.0))
        yield lab
    finally:
        lab.down()


def subscribe(lab: Lab, path: Path) -> subprocess.Popen[bytes]:
    """`overlayctl events --json` in the broker's namespace, into a file."""
    with path.open("w") as out:
        return subprocess.Popen(
            netns.module_argv(
                lab.mqtt_ns, "overlayd.cli.ctl", "events", "--json", "--mqtt-url", lab.mqtt_url
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="module")
def events(lab: Lab) -> Iterator[Path]:
    """`overlayctl events --json`, running from the start, into a file."""
    path = lab.state_dir / "events.jsonl"
    proc = subscribe(lab, path)
    try:
        wait_until(lambda: path.read_text().count('"online": true') >= 2)
        yield path
    finally:
        proc.kill()
        proc.wait()


def messages(path: Path) -> list[dict[str, Any]]:
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def ctl(lab: Lab, host: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        netns.module_argv(
            lab.host_ns(host),
            "overlayd.cli.ctl",
            *args,
            "--control-socket",
            str(lab.control_socket(host)),
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def diagnose(lab: Lab, host: int) -> tuple[int, list[dict[str, Any]]]:
    proc = ctl(lab, host, "diagnose", "--json", *lab.etcd_flags(host), "--iface", "eth0",
               "--subnet-file", str(lab.subnet_file(host)))  # fmt: skip
    return proc.returncode, json.loads(proc.stdout)["findings"]


def test_status_shows_the_lease_mode_peers_and_last_reconcile(lab: Lab) -> None:
    proc = ctl(lab, 1, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["lease"]["subnet"] == str(lab.subnet(1))
    assert status["lease"]["public_ip"] == "192.0.2.11"
    assert 0 < status["lease"]["expires_in_seconds"] <= 60
    assert status["mode"] == "vxlan" and status["egress"] == "gwbridge"
    assert status["peers"] == 1 and status["ready"] is True
    assert status["last_reconcile"]["ok"] is True
    human = ctl(lab, 1, "status").stdout
    assert f"subnet          {lab.subnet(1)}" in human
    assert "ready           yes" in human
    # One peer, one address of it per family in the allow-lists.
    allowed = len(lab.families())
    assert status["vxlan_filter"] == {"setting": "on", "allowed_peers": allowed, "problem": None}
    assert f"vxlan filter    on, {allowed} peer address(es) allowed" in human


def test_peers_lists_the_other_host_as_programmed(lab: Lab) -> None:
    proc = ctl(lab, 1, "peers")
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["SUBNET", "PUBLIC", "IP", "VTEP", "MAC", "PATH"]
    assert len(rows) == 1 and rows[0].split()[:2] == [str(lab.subnet(2)), "192.0.2.12"]
    assert rows[0].split()[3] == "vxlan"


def lab_ctl(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """`overlayctl lab ctl ...` from the root namespace, as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "overlayd.cli.ctl", "lab", "ctl", "--name", lab.name, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_lab_ctl_runs_overlayctl_in_the_host_against_its_daemon(lab: Lab) -> None:
    proc = lab_ctl(lab, "h1", "--", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["lease"]["subnet"] == str(lab.subnet(1))
    assert status["lease"]["public_ip"] == "192.0.2.11"
    # No etcd flags given: the host daemon's endpoints and prefix reach
    # overlayctl too, so commands that read etcd work as well.
    proc = lab_ctl(lab, "h2", "--", "leases", "--json")
    assert proc.returncode == 0, proc.stderr
    assert {r["subnet"] for r in json.loads(proc.stdout)} == {
        str(lab.subnet(1)),
        str(lab.subnet(2)),
    }


def test_lab_ctl_names_a_host_that_is_not_there(lab: Lab) -> None:
    proc = lab_ctl(lab, "h9", "--", "status")
    assert proc.returncode == 1
    assert f"lab {lab.name!r} has no host 'h9'" in proc.stderr
    assert proc.stdout == ""


def test_leases_lists_every_host_from_etcd(lab: Lab) -> None:
    proc = ctl(lab, 1, "leases", "--json", *lab.etcd_flags(1))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert {r["subnet"] for r in rows} == {str(lab.subnet(1)), str(lab.subnet(2))}
    assert all(r["status"] == "ok" for r in rows)


def test_metrics_health_and_readiness_are_served_on_loopback(lab: Lab) -> None:
    assert http_get(lab, 1, "/healthz") == (200, "ok\n")
    assert http_get(lab, 1, "/readyz") == (200, "ok\n")
    code, text = http_get(lab, 1, "/metrics")
    assert code == 200
    assert 'overlayd_peers{path="vxlan"} 1.0' in text
    assert "overlayd_ready 1.0" in text
    listening = netns.in_ns(lab.host_ns(1), "ss", "-Htln", "( sport = :9469 )")
    assert [line.split()[3] for line in listening.splitlines()] == ["127.0.0.1:9469"]


def test_logs_say_nothing_in_steady_state(lab: Lab) -> None:
    log = lab.daemon_log(1)
    before = log.read_text()
    time.sleep(5)  # two full resyncs (every 2 s here) and a few MQTT status refreshes
    assert log.read_text() == before
    for line in before.splitlines():
        assert line.startswith("ts=") and " level=" in line and " event=" in line, line


def test_drift_is_repaired_counted_and_published(lab: Lab, events: Path) -> None:
    peer = str(lab.subnet(2))
    netns.ip(lab.host_ns(1), "route", "del", peer)
    wait_until(lambda: peer in netns.ip(lab.host_ns(1), "route"))
    status = json.loads(ctl(lab, 1, "status", "--json").stdout)
    assert status["drift_repairs"].get("route", 0) >= 1
    assert 'overlayd_drift_repaired_total{kind="route"}' in http_get(lab, 1, "/metrics")[1]
    wait_until(
        lambda: any(
            m.get("event") == "drift_repaired" and m["host"] == "192.0.2.11"
            for m in messages(events)
        ),
    )


def test_overlayctl_check_reaches_every_peer_from_a_cni_probe(lab: Lab) -> None:
    probe = f"ovl-{SESSION_TAG}o-probe"
    proc = ctl(lab, 1, "check", "--json", "--probe-name", probe, "--expect-hosts", "2",
               *lab.etcd_flags(1), "--subnet-file", str(lab.subnet_file(1)))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] and [p["subnet"] for p in result["peers"]] == [str(lab.subnet(2))]
    assert probe not in netns.list_namespaces()


def test_a_new_host_s_lease_and_peer_events_reach_mqtt_and_its_death_too(
    lab: Lab, events: Path
) -> None:
    lab.attach_host_namespace(3)
    lab.start_daemon(3, "--log-format", "json")
    lab.wait_ready(3)
    subnet = str(lab.subnet(3))

    def seen(event: str, host: str) -> bool:
        return any(
            m.get("event") == event and m["host"] == host and m.get("subnet") == subnet
            for m in messages(events)
        )

    wait_until(lambda: seen("lease_acquired", "192.0.2.13"))
    wait_until(lambda: seen("peer_added", "192.0.2.11") and seen("peer_added", "192.0.2.12"))
    # The JSON log format: every line one object.
    lines = lab.daemon_log(3).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert any(r.get("event") == "ready" and r.get("subnet") == subnet for r in records)
    # Killed without a goodbye: the broker publishes the last will.
    lab.stop_daemon(3, signal.SIGKILL)
    wait_until(
        lambda: any(
            m["topic"].endswith("192.0.2.13/status")
            and m["online"] is False
            and m["reason"] == "connection lost"
            for m in messages(events)
        ),
    )


def test_the_broker_being_down_never_blocks_the_daemon(lab: Lab, events: Path) -> None:
    lab.stop_mqtt()
    lease = Lease(IPv4Network("10.244.250.0/24"), IPv4Address("192.0.2.99"), 1, "02:00:00:00:fa:01")
    key = subnet_key(PREFIX, lease.subnet)
    lab.etcd(lambda s: s.put(key, render_lease(lease)))
    # The broker stays down throughout: a daemon that waited for it before
    # programming (or answering) would never get here.
    wait_until(lambda: "10.244.250.0/24" in netns.ip(lab.host_ns(1), "route"))
    assert json.loads(ctl(lab, 1, "status", "--json").stdout)["ready"] is True
    lab.etcd(lambda s: s.delete(key))
    wait_until(lambda: "10.244.250.0/24" not in netns.ip(lab.host_ns(1), "route"))
    assert not netns.pids_in(lab.mqtt_ns), "the broker was meant to be down all along"
    # The broker comes back: the daemon reconnects by itself and says it is online.
    lab.start_mqtt()
    subscriber_log = lab.state_dir / "events-again.jsonl"
    proc = subscribe(lab, subscriber_log)
    try:
        wait_until(
            lambda: any(
                m["topic"].endswith("192.0.2.11/status") and m["online"]
                for m in messages(subscriber_log)
            ),
        )
    finally:
        proc.kill()
        proc.wait()


def test_diagnose_reports_what_is_broken_in_plain_words(lab: Lab) -> None:
    code, findings = diagnose(lab, 2)
    assert code == 0, findings
    ns = lab.host_ns(2)
    mtu = lab.mtu(2)  # 1450, or 1430 when dual-stack (it must fit the IPv6 tunnel too)
    lab.stop_daemon(2)
    peer = str(lab.subnet(1))
    netns.ip(ns, "route", "del", peer)
    netns.in_ns(ns, "ethtool", "-K", "ovl.1", "tx", "off")
    netns.in_ns(ns, "iptables", "-A", "INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP")
    netns.in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    netns.ip(ns, "link", "set", "ovl0", "mtu", "1400")
    code, findings = diagnose(lab, 2)
    failed = {f["check"]: f["detail"] for f in findings if not f["ok"]}
    assert code == 1
    assert "is overlayd running?" in failed["daemon"]
    assert f"missing route to {peer}" in failed["kernel entries"]
    assert "tx checksum offload is off on ovl.1" in failed["offload"]
    assert "a rule drops UDP port 8472" in failed["firewall"]
    assert "IPv4 forwarding is off" in failed["forwarding"]
    assert f"MTU 1400, expected {mtu}" in failed["device ovl0"]
    # The daemon repairs what it owns; the operator's offload and firewall stay.
    lab.start_daemon(2)
    wait_until(lambda: peer in netns.ip(ns, "route"))
    wait_until(lambda: diagnose(lab, 2)[1][0]["ok"])
    code, findings = diagnose(lab, 2)
    assert sorted(f["check"] for f in findings if not f["ok"]) == ["firewall", "offload"]
    netns.in_ns(ns, "ethtool", "-K", "ovl.1", "tx", "on")
    netns.in_ns(ns, "iptables", "-D", "INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP")
    assert diagnose(lab, 2)[0] == 0


def test_network_show_and_set_validate_before_writing(lab: Lab, tmp_path: Path) -> None:
    endpoint = ["--etcd-endpoints", lab.etcd_endpoint]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "overlayd.cli.ctl", "network", *args, *endpoint],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    shown = run("show", "--json")
    assert shown.returncode == 0, shown.stderr
    current = json.loads(shown.stdout)["config"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**current, "SubnetLen": "24"}))
    refused = run("set", str(bad))
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith("overlayctl: SubnetLen")
    moved = tmp_path / "moved.json"
    elsewhere = {k: v for k, v in current.items() if k not in ("SubnetMin", "SubnetMax")}
    moved.write_text(json.dumps({**elsewhere, "Network": "10.99.0.0/16"}))
    refused = run("set", str(moved))
    assert refused.returncode == 1 and "would not fit the new config" in refused.stderr
    assert "--force" in refused.stderr
    same = tmp_path / "same.json"
    same.write_text(json.dumps(current))
    dry = run("set", str(same), "--dry-run")
    assert dry.returncode == 0 and "not written" in dry.stdout
    assert run("set", str(same)).returncode == 0
    assert json.loads(run("show", "--json").stdout)["config"] == current


def test_systemd_sees_ready_after_the_first_reconcile_and_a_fed_watchdog(
    lab: Lab, tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    host = 4
    lab.attach_host_namespace(host)
    received: list[tuple[float, str, bool]] = []  # (when, message, subnet file present)
    lab.start_daemon(host, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
    deadline = time.monotonic() + CONVERGE
    try:
        while time.monotonic() < deadline:
            try:
                data = sock.recv(4096).decode()
            except TimeoutError:
                continue
            received.append((time.monotonic(), data, lab.subnet_file(host).exists()))
            if sum("WATCHDOG=1" in m for _, m, _ in received) >= 4 and any(
                "READY=1" in m for _, m, _ in received
            ):
                break
        lab.stop_daemon(host)
        stop_deadline = time.monotonic() + CONVERGE
        while time.monotonic() < stop_deadline:
            try:
                received.append((time.monotonic(), sock.recv(4096).decode(), True))
            except TimeoutError:
                continue
            if "STOPPING=1" in received[-1][1]:
                break
    finally:
        sock.close()
    texts = [m for _, m, _ in received]
    ready = [(m, present) for _, m, present in received if "READY=1" in m]
    assert len(ready) == 1, texts
    assert ready[0][1], "READY came before the subnet file was written"
    assert "STATUS=subnet " in ready[0][0]
    before_ready = texts[: texts.index(ready[0][0])]
    assert any("STATUS=leasing a subnet" in m for m in before_ready), texts
    assert sum("WATCHDOG=1" in m for m in texts) >= 4
    assert "STOPPING=1" in texts[-1]


def test_overlay_cni_add_check_del_as_a_runtime_invokes_it(lab: Lab) -> None:
    ns = f"{lab.host_ns(1)}c9"
    netns.add_namespace(ns)
    try:
        cni_add_check_del(lab, ns)
    finally:
        netns.delete_namespace(ns)


def answers_ping(ns: str, address: str) -> bool:
    return " 0% packet loss" in netns.in_ns(ns, "ping", "-c", "1", "-W", "1", address, check=False)


def cni_add_check_del(lab: Lab, ns: str) -> None:
    result = lab.cni(1, "ADD", ns) or {}
    names = [i["name"] for i in result["interfaces"]]
    assert names[0] == "ovl0" and names[2] == "eth0" and names[3] == "ovl_gwbridge"
    assert names[5] == "eth1"
    # One address per family of the lab on each of eth0 and eth1.
    versions = [f.version for f in lab.families()]
    on = {
        index: sorted(
            ip_interface(ip["address"]).version for ip in result["ips"] if ip["interface"] == index
        )
        for index in (2, 5)
    }
    assert on == {2: versions, 5: versions}, result["ips"]
    overlay_ips = [ip["address"].split("/")[0] for ip in result["ips"] if ip["interface"] == 2]
    routes = netns.ip(ns, "route")
    assert "default via 172.18.0.1 dev eth1" in routes
    assert "10.244.0.0/16 via" in routes and "dev eth0" in routes
    if lab.dual_stack:
        routes6 = netns.ip(ns, "-6", "route")
        assert "fd00:10:244::/56 via" in routes6 and "default via" in routes6, routes6
    peer = lab.containers()[-1] if lab.containers()[-1].host != 1 else lab.containers()[0]
    for family in lab.families():
        wait_until(partial(answers_ping, ns, str(peer.address_of(family))))
    check = {**lab.cni_config(1), "prevResult": result}
    assert lab.cni(1, "CHECK", ns, check) is None
    netns.ip(ns, "addr", "flush", "dev", "eth1")
    with pytest.raises(Exception, match="Failed to match addr"):
        lab.cni(1, "CHECK", ns, check)
    reserved = [lab.state_dir / "h1" / "cni" / "ipam" / "overlay" / ip for ip in overlay_ips]
    assert all(r.exists() for r in reserved)
    assert lab.cni(1, "DEL", ns) is None
    assert not any(r.exists() for r in reserved)
    assert netns.ip(ns, "-br", "link").split()[0] == "lo"
    assert lab.cni(1, "DEL", ns) is None  # twice is fine


def test_overlay_cni_refuses_to_attach_before_overlayd_is_ready(lab: Lab, tmp_path: Path) -> None:
    ns = f"{lab.host_ns(1)}c8"
    netns.add_namespace(ns)
    try:
        config = {**lab.cni_config(1), "subnetFile": str(tmp_path / "absent.env")}
        with pytest.raises(Exception, match='"code": 11'):
            lab.cni(1, "ADD", ns, config)
        assert netns.ip(ns, "-br", "link").split()[0] == "lo"
    finally:
        netns.delete_namespace(ns)
