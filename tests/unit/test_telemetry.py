"""Telemetry: peer events, readiness, health and the metrics it exposes."""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from prometheus_client import generate_latest

from overlayd.model import IPV6, Change, Lease, Op, Route
from overlayd.surfaces.telemetry import Telemetry


def lease(n: int, ip: str = "192.0.2.20", mac: str = "02:00:00:00:00:01") -> Lease:
    return Lease(IPv4Network(f"10.1.{n}.0/24"), IPv4Address(ip), 1, mac)


def recorder(t: Telemetry) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    t.listeners.append(lambda kind, payload: events.append((kind, payload)))
    return events


def test_peer_changes_become_added_changed_and_removed_events() -> None:
    t = Telemetry()
    events = recorder(t)
    t.peers_programmed([lease(1), lease(2)], [])
    assert sorted(k for k, _ in events) == ["peer_added", "peer_added"]
    events.clear()
    t.peers_programmed([lease(1, ip="192.0.2.99")], [])
    kinds = {(k, p["subnet"]) for k, p in events}
    assert kinds == {("peer_changed", "10.1.1.0/24"), ("peer_removed", "10.1.2.0/24")}
    changed = next(p for k, p in events if k == "peer_changed")
    assert changed["before"]["public_ip"] == "192.0.2.20"
    assert changed["public_ip"] == "192.0.2.99"


def test_unchanged_peers_emit_nothing() -> None:
    t = Telemetry()
    t.peers_programmed([lease(1)], [])
    events = recorder(t)
    t.peers_programmed([lease(1)], [])
    assert events == []


def test_ready_needs_lease_subnet_file_and_a_successful_first_pass() -> None:
    t = Telemetry()
    assert t.ready() == (False, "no lease held")
    t.lease_acquired(lease(5), "/k", 60)
    assert not t.ready()[0]
    t.subnet_file_written = True
    assert t.ready() == (False, "first reconcile has not succeeded yet")
    t.pass_finished(ok=False, full=True, seconds=0.1, error="boom")
    assert not t.ready()[0]
    t.pass_finished(ok=True, full=True, seconds=0.1)
    assert t.ready() == (True, "ok")
    t.lease_lost("expired")
    assert t.ready() == (False, "no lease held")


def test_health_fails_when_the_loop_stalls_or_a_pass_hangs() -> None:
    t = Telemetry()
    assert t.healthy()[0]
    t.heartbeat = time.monotonic() - 60
    assert "stalled" in t.healthy()[1]
    t.beat()
    t.pass_started = time.monotonic() - 1000
    assert "reconcile pass running" in t.healthy()[1]


def test_metrics_count_changes_by_kind_and_drift_repairs() -> None:
    t = Telemetry()
    route = Route(IPv4Network("10.1.1.0/24"), IPv4Address("10.1.1.0"))
    t.pass_finished(ok=True, full=False, seconds=0.003, changes=[Change(Op.REPLACE, route)])
    t.entries_drifted([Change(Op.REPLACE, route)])
    t.drift_repaired("nftables", "recreated table")
    t.leases_skipped({"/k": "bad"})
    text = generate_latest(t.registry).decode()
    assert 'overlayd_changes_applied_total{kind="route",op="replace"} 1.0' in text
    assert 'overlayd_drift_repaired_total{kind="route"} 1.0' in text
    assert 'overlayd_drift_repaired_total{kind="nftables"} 1.0' in text
    assert 'overlayd_reconcile_duration_seconds_count{pass_type="light"} 1.0' in text
    assert "overlayd_leases_skipped 1.0" in text
    assert t.status()["drift_repairs"] == {"nftables": 1, "route": 1}


def test_a_failing_listener_does_not_stop_the_others() -> None:
    t = Telemetry()

    def broken(kind: str, payload: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    t.listeners.append(broken)
    events = recorder(t)
    t.lease_renewed(30)
    assert [k for k, _ in events] == ["lease_renewed"]


def test_the_vxlan_metrics_never_go_down_when_the_kernel_counter_starts_again() -> None:
    t = Telemetry()
    text = generate_latest(t.registry).decode()
    assert "overlayd_vxlan_allowed_peers 0.0" in text
    assert "overlayd_vxlan_dropped_packets_total " not in text  # no filter, no figure
    # The ip table's counter: 3 means it was deleted and made again; None:
    # nft could not be asked. The ip6 table's counts on its own and starts
    # again too; the figure is their sum and never goes down.
    readings: list[dict[str, int] | None] = [
        {"ip": 5},
        {"ip": 12, "ip6": 2},
        {"ip": 3, "ip6": 2},
        None,
        {"ip": 4, "ip6": 1},
    ]
    t.dropped.reader = lambda: readings.pop(0) if readings else {"ip": 4, "ip6": 1}
    seen = []
    for _ in range(5):
        text = generate_latest(t.registry).decode()
        line = next(
            x for x in text.splitlines() if x.startswith("overlayd_vxlan_dropped_packets_total")
        )
        seen.append(float(line.split()[-1]))
    assert seen == [5.0, 14.0, 17.0, 17.0, 19.0]
    t.vxlan_filter_ok(7)
    assert "overlayd_vxlan_allowed_peers 7.0" in generate_latest(t.registry).decode()
    assert t.status()["vxlan_filter"] == {"setting": "on", "allowed_peers": 7, "problem": None}
    # Dual-stack: the allowed addresses of both families add up.
    t.vxlan_filter_ok(5, IPV6)
    assert "overlayd_vxlan_allowed_peers 12.0" in generate_latest(t.registry).decode()
    t.vxlan_filter_absent(IPV6)
    assert t.vxlan_allowed == 7


def test_ready_fails_naming_why_while_the_vxlan_filter_is_not_installed() -> None:
    t = Telemetry()
    t.lease_acquired(lease(5), "/k", 60)
    t.subnet_file_written = True
    t.pass_finished(ok=True, full=True, seconds=0.1)
    assert t.ready() == (True, "ok")
    t.vxlan_filter_failed("nft refused the ruleset: no fib support")
    assert t.ready() == (
        False,
        "VXLAN filter not installed: nft refused the ruleset: no fib support",
    )
    t.vxlan_filter_ok(2)
    assert t.ready() == (True, "ok")
