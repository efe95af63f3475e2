"""What the daemon tells the outside about itself: Prometheus metrics, the
status that `overlayctl status` shows, and health and readiness. Events
(lease and peer changes, drift repairs) go out through the event bus and
peer changes of surfaces/events.py, which this record feeds.

The agent and the reconciler report facts here; the HTTP endpoint, the
control socket and the MQTT publisher only read. Nothing in this module
does I/O: metrics are in-memory counters until somebody scrapes them.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, Metric

from overlayd import __version__
from overlayd.model import IPV4, Change, Entry, Family, Lease, kind_of
from overlayd.plan.desired import PeerMoves, PeerPlan
from overlayd.plan.policy_rules import CounterOwner
from overlayd.surfaces.events import EventBus, EventListener, PeerChanges, peer_view

# A pass is "stuck" (healthz fails, the watchdog starves) after this long.
STUCK_PASS_SECONDS = 120.0
# The heartbeat task ticks every second; healthz allows a few missed ticks.
HEARTBEAT_STALE_SECONDS = 10.0


def entry_kind(entry: Entry) -> str:
    return kind_of(entry).name


@dataclass
class LastPass:
    at: float  # wall clock
    ok: bool
    full: bool
    changes: int
    seconds: float
    error: str | None
    level: str = ""


class DroppedPackets:
    """`overlayd_vxlan_dropped_packets_total`, read from the kernel's named
    counters when scraped (through `reader`, which the agent sets; it runs in
    the metrics thread, never on the event loop, and gives each family's
    counter by table family, "ip" and "ip6"). The figure is their sum. A
    kernel count starts again from 0 only if somebody deletes its counter
    (the rules are rewritten around it, never through it); each family's
    part of the figure exported here never goes down, so a rate over it
    stays true across that too."""

    NAME = "overlayd_vxlan_dropped_packets"
    HELP = "VXLAN packets dropped because they came from no current peer or had another VNI"

    def __init__(self) -> None:
        self.reader: Callable[[], Mapping[str, int] | None] | None = None
        self._lock = threading.Lock()
        # Per counter: what its earlier incarnations counted, and its last reading.
        self._base: dict[str, int] = {}
        self._last: dict[str, int] = {}

    def value(self) -> int | None:
        reader = self.reader
        if reader is None:
            return None
        # Read under the lock too: two scrapes at once (the server answers in
        # threads) must not apply their readings out of order, which would
        # look like a reset and count everything twice.
        with self._lock:
            readings = reader()
            for name, now in (readings or {}).items():
                last = self._last.get(name)
                if last is not None and now < last:
                    self._base[name] = self._base.get(name, 0) + last
                self._last[name] = now
            if not self._last:
                return None
            return sum(self._base.values()) + sum(self._last.values())

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.NAME, self.HELP)

    def collect(self) -> Iterator[Metric]:
        value = self.value()
        if value is not None:
            yield CounterMetricFamily(self.NAME, self.HELP, value=value)


class PolicyPackets:
    """`overlayd_policy_packets_total{policy,direction,verdict}`: the
    policy table's named counters as the last check pass read them (they
    count the packets judged, which are connections' first packets). A
    count that goes down (the table was made afresh) adds its last value to
    a base, so the exported figure never goes down."""

    NAME = "overlayd_policy_packets"
    HELP = "Packets judged by network policy (first packets of connections), by verdict"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._base: dict[tuple[str, str, str], int] = {}
        self._last: dict[tuple[str, str, str], int] = {}

    def update(self, readings: Mapping[tuple[str, str, str], int]) -> None:
        with self._lock:
            for labels, now in readings.items():
                last = self._last.get(labels)
                if last is not None and now < last:
                    self._base[labels] = self._base.get(labels, 0) + last
                self._last[labels] = now

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.NAME, self.HELP, labels=["policy", "direction", "verdict"])

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            self.NAME, self.HELP, labels=["policy", "direction", "verdict"]
        )
        with self._lock:
            for labels, now in sorted(self._last.items()):
                family.add_metric(list(labels), now + self._base.get(labels, 0))
        yield family


class DnsCounts(Protocol):
    """What one DNS server counts (surfaces/dns.DnsCounters), read only."""

    @property
    def responses(self) -> Mapping[str, int]: ...
    @property
    def rate_limited(self) -> int: ...
    @property
    def malformed_dropped(self) -> int: ...
    @property
    def forwarded(self) -> int: ...
    @property
    def forward_failures(self) -> int: ...
    @property
    def truncated(self) -> int: ...
    @property
    def errors(self) -> int: ...


class DnsQueries:
    """The DNS responder's counters, summed over its servers (one per
    gateway address), read at scrape time from `source` (set by the agent
    when it serves DNS):

    - `overlayd_dns_responses_total{rcode}`: answers sent;
    - `overlayd_dns_dropped_total{reason}`: queries dropped unanswered,
      `rate_limited` (a client over its rate) or `malformed` (not a query);
    - `overlayd_dns_forwarded_total{outcome}`: names passed upstream, `ok`
      or `failed` (answered SERVFAIL);
    - `overlayd_dns_truncated_total`, `overlayd_dns_errors_total` (a bug
      caught at the protocol's edge)."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[DnsCounts]] | None = None

    def describe(self) -> Iterator[Metric]:
        return iter(())  # registered before any server exists: collected lazily

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        counts = list(self.source())
        responses = CounterMetricFamily(
            "overlayd_dns_responses", "DNS answers sent, by rcode", labels=["rcode"]
        )
        by_rcode: dict[str, int] = {}
        for c in counts:
            for rcode, n in c.responses.items():
                by_rcode[rcode] = by_rcode.get(rcode, 0) + n
        for rcode, n in sorted(by_rcode.items()):
            responses.add_metric([rcode], n)
        yield responses
        dropped = CounterMetricFamily(
            "overlayd_dns_dropped", "DNS queries dropped unanswered", labels=["reason"]
        )
        dropped.add_metric(["rate_limited"], sum(c.rate_limited for c in counts))
        dropped.add_metric(["malformed"], sum(c.malformed_dropped for c in counts))
        yield dropped
        forwarded = CounterMetricFamily(
            "overlayd_dns_forwarded", "DNS queries forwarded upstream", labels=["outcome"]
        )
        failed = sum(c.forward_failures for c in counts)
        forwarded.add_metric(["ok"], max(0, sum(c.forwarded for c in counts) - failed))
        forwarded.add_metric(["failed"], failed)
        yield forwarded
        yield CounterMetricFamily(
            "overlayd_dns_truncated",
            "DNS answers sent truncated (TC)",
            value=sum(c.truncated for c in counts),
        )
        yield CounterMetricFamily(
            "overlayd_dns_errors",
            "DNS queries whose handling failed (answered SERVFAIL or dropped)",
            value=sum(c.errors for c in counts),
        )


@dataclass
class Telemetry:
    """Metrics, status and events of one daemon."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    started_at: float = field(default_factory=time.time)
    lease: Lease | None = None
    lease_key: str = ""
    lease_expires_at: float | None = None  # monotonic
    mode: str = ""
    egress: str = ""
    vxlan_filter: str = "on"  # the setting: on or off
    ipv6_peers: int | None = None  # peers with IPv6 entries; None before a dual-stack pass
    settings: dict[str, Any] = field(default_factory=dict)
    last_pass: LastPass | None = None
    drift_repairs: Counter[str] = field(default_factory=Counter)
    skipped: dict[str, str] = field(default_factory=dict)
    subnet_file_written: bool = False
    first_reconcile_ok: bool = False
    heartbeat: float = field(default_factory=time.monotonic)
    pass_started: float | None = None  # monotonic, while a pass runs
    bus: EventBus = field(default_factory=EventBus)
    # When the etcd client certificate in use expires (Unix time), if any.
    etcd_cert_not_after: Callable[[], float | None] = lambda: None

    def __post_init__(self) -> None:
        self._peer_changes = PeerChanges(self.bus)
        # The VXLAN allow-list of each family (by IP version): its size (None:
        # no filter) and why it is not in place although it should be.
        self._allow: dict[int, tuple[int | None, str | None]] = {}
        r = self.registry
        self.m_lease_ttl = Gauge(
            "overlayd_lease_ttl_seconds",
            "Seconds until this host's subnet lease expires unless renewed",
            registry=r,
        )
        self.m_lease_ttl.set_function(self._lease_ttl)
        self.m_peers = Gauge(
            "overlayd_peers", "Peer hosts programmed, by path", ["path"], registry=r
        )
        self.m_ipv6_peers = Gauge(
            "overlayd_ipv6_peers",
            "Peer hosts with IPv6 entries (dual-stack), by path",
            ["path"],
            registry=r,
        )
        self.m_reconcile = Histogram(
            "overlayd_reconcile_duration_seconds",
            "Duration of reconcile passes (light: after an etcd event; check: devices, sysctls"
            " and rules compared too; full: kernel entries re-read)",
            ["pass_type"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.m_passes = PromCounter(
            "overlayd_reconcile_passes", "Reconcile passes, by result", ["result"], registry=r
        )
        self.m_changes = PromCounter(
            "overlayd_changes_applied",
            "Kernel entries written or removed, by kind and operation",
            ["kind", "op"],
            registry=r,
        )
        self.m_drift = PromCounter(
            "overlayd_drift_repaired",
            "Things somebody else changed that overlayd put back, by kind",
            ["kind"],
            registry=r,
        )
        self.m_reconnects = PromCounter(
            "overlayd_etcd_reconnects",
            "Times the etcd watch was resumed after a failure",
            registry=r,
        )
        self.m_watch_lag = Gauge(
            "overlayd_watch_lag_seconds",
            "From an etcd event's arrival to the end of the pass that programmed it (last event)",
            registry=r,
        )
        self.m_skipped = Gauge(
            "overlayd_leases_skipped", "Peer leases skipped as invalid or unusable", registry=r
        )
        self.m_ready = Gauge("overlayd_ready", "1 when /readyz would answer 200", registry=r)
        self.m_ready.set_function(lambda: 1.0 if self.ready()[0] else 0.0)
        self.m_mqtt_dropped = PromCounter(
            "overlayd_mqtt_events_dropped",
            "MQTT events dropped because the broker was out of reach and the queue was full",
            registry=r,
        )
        self.m_cert_expiry = Gauge(
            "overlayd_etcd_client_certificate_expiry_timestamp_seconds",
            "When the etcd client certificate in use expires (0 without one)",
            registry=r,
        )
        self.m_cert_expiry.set_function(lambda: self.etcd_cert_not_after() or 0.0)
        self.m_vxlan_allowed = Gauge(
            "overlayd_vxlan_allowed_peers",
            "Addresses in the VXLAN allow-lists (the tunnelled peers' public IPs, both families)",
            registry=r,
        )
        self.dropped = DroppedPackets()
        r.register(self.dropped)
        self.policy_packets = PolicyPackets()
        r.register(self.policy_packets)
        self.dns = DnsQueries()
        r.register(self.dns)
        self.m_policies = Gauge(
            "overlayd_policies", "Network policies in force on this host", registry=r
        )
        self.m_endpoints = Gauge(
            "overlayd_endpoints", "Endpoints (containers) known to this host's policy", registry=r
        )
        self.m_policy_revision = Gauge(
            "overlayd_policy_revision",
            "The etcd revision of overlayd's keys the last successful pass enforced",
            registry=r,
        )
        self.policy: dict[str, int] = {}
        self.m_peers.labels("vxlan").set(0)
        self.m_peers.labels("direct").set(0)

    # --- facts reported by the agent and the reconciler --------------------

    def _lease_ttl(self) -> float:
        if self.lease_expires_at is None:
            return 0.0
        return max(0.0, self.lease_expires_at - time.monotonic())

    def lease_acquired(self, lease: Lease, key: str, ttl: float) -> None:
        changed = self.lease is not None and self.lease != lease
        self.lease, self.lease_key = lease, key
        self.lease_expires_at = time.monotonic() + ttl
        view = peer_view(lease, direct=False)
        del view["path"]
        self.emit("lease_acquired", {"key": key, **view, "changed": changed})

    def lease_renewed(self, ttl: float) -> None:
        self.lease_expires_at = time.monotonic() + ttl
        self.emit("lease_renewed", {"key": self.lease_key, "ttl": ttl})

    def lease_lost(self, reason: str) -> None:
        self.lease_expires_at = None
        self.emit("lease_lost", {"key": self.lease_key, "reason": reason})

    def etcd_reconnected(self) -> None:
        self.m_reconnects.inc()

    def watch_lag(self, seconds: float) -> None:
        self.m_watch_lag.set(seconds)

    def pass_started_now(self) -> None:
        self.pass_started = time.monotonic()

    def pass_finished(
        self,
        *,
        ok: bool,
        full: bool,
        seconds: float,
        changes: Sequence[Change] = (),
        error: str | None = None,
        level: str | None = None,
    ) -> None:
        """`level`: light, check or full; by default full or light by `full`."""
        self.pass_started = None
        self.m_reconcile.labels(level or ("full" if full else "light")).observe(seconds)
        self.m_passes.labels("ok" if ok else "failed").inc()
        for change in changes:
            self.m_changes.labels(entry_kind(change.entry), change.op.value).inc()
        kind = level or ("full" if full else "light")
        self.last_pass = LastPass(time.time(), ok, full, len(changes), seconds, error, kind)
        if ok:
            self.first_reconcile_ok = True

    def drift_repaired(self, kind: str, what: str, count: int = 1) -> None:
        self.drift_repairs[kind] += count
        self.m_drift.labels(kind).inc(count)
        self.emit("drift_repaired", {"kind": kind, "what": what, "count": count})

    def entries_drifted(self, changes: Iterable[Change]) -> None:
        kinds = Counter(entry_kind(c.entry) for c in changes)
        for kind, count in sorted(kinds.items()):
            self.drift_repaired(kind, f"{count} {kind} entries put back", count)

    def leases_skipped(self, rejected: Mapping[str, str]) -> None:
        self.skipped = dict(rejected)
        self.m_skipped.set(len(rejected))

    def peers_programmed(
        self,
        tunneled: Sequence[Lease],
        direct: Sequence[Lease],
        *,
        plan: PeerPlan | None = None,
        moved: PeerMoves | None = None,
    ) -> None:
        """The peers after a successful pass; emits added/changed/removed.
        `plan` and `moved` (the plan they are of, and how it moved from the
        last one) let a light pass touch only the peers that moved."""
        self._peer_changes.update(tunneled, direct, plan=plan, moved=moved)
        self.m_peers.labels("vxlan").set(len(tunneled))
        self.m_peers.labels("direct").set(len(direct))

    def ipv6_peers_programmed(self, tunneled: int, direct: int) -> None:
        """The peers that have IPv6 entries, after a successful pass."""
        self.ipv6_peers = tunneled + direct
        self.m_ipv6_peers.labels("vxlan").set(tunneled)
        self.m_ipv6_peers.labels("direct").set(direct)

    def vxlan_filter_ok(self, allowed: int, family: Family = IPV4) -> None:
        self._allow_is(family, allowed, None)

    def vxlan_filter_failed(self, reason: str, family: Family = IPV4) -> None:
        self._allow_is(family, None, reason)

    def vxlan_filter_absent(self, family: Family = IPV4) -> None:
        """Off by setting, or nothing to filter (no VTEP of this family)."""
        self._allow_is(family, None, None)

    def _allow_is(self, family: Family, allowed: int | None, problem: str | None) -> None:
        self._allow[family.version] = (allowed, problem)
        self.m_vxlan_allowed.set(self.vxlan_allowed or 0)

    @property
    def vxlan_allowed(self) -> int | None:
        """The allow-lists' size, both families; None: no filter anywhere."""
        sizes = [size for size, _ in self._allow.values() if size is not None]
        return sum(sizes) if sizes else None

    @property
    def vxlan_filter_problem(self) -> str | None:
        """Why a VXLAN filter is not in place although it should be, if so
        (an IPv6 one's reason says so)."""
        problems = [
            problem if version == 4 else f"IPv{version}: {problem}"
            for version, (_, problem) in sorted(self._allow.items())
            if problem is not None
        ]
        return "; ".join(problems) or None

    @property
    def peers(self) -> dict[str, dict[str, Any]]:
        return self._peer_changes.peers

    @property
    def listeners(self) -> list[EventListener]:
        return self.bus.listeners

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    # --- what readers see ---------------------------------------------------

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        self.bus.emit(kind, payload)

    def healthy(self) -> tuple[bool, str]:
        now = time.monotonic()
        if now - self.heartbeat > HEARTBEAT_STALE_SECONDS:
            return False, f"event loop stalled for {now - self.heartbeat:.0f} s"
        if self.pass_started is not None and now - self.pass_started > STUCK_PASS_SECONDS:
            return False, f"reconcile pass running for {now - self.pass_started:.0f} s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if self.lease is None or self.lease_expires_at is None:
            return False, "no lease held"
        if not self.subnet_file_written:
            return False, "subnet file not written yet"
        if not self.first_reconcile_ok:
            return False, "first reconcile has not succeeded yet"
        if self.vxlan_filter_problem is not None:
            return False, f"VXLAN filter not installed: {self.vxlan_filter_problem}"
        return True, "ok"

    def status(self) -> dict[str, Any]:
        lease = None
        if self.lease is not None:
            lease = {
                "key": self.lease_key,
                **peer_view(self.lease, direct=False),
                "expires_in_seconds": round(self._lease_ttl(), 1)
                if self.lease_expires_at is not None
                else None,
            }
            del lease["path"]
        last = None
        if self.last_pass is not None:
            p = self.last_pass
            last = {
                "at": p.at,
                "ago_seconds": round(time.time() - p.at, 1),
                "ok": p.ok,
                "full": p.full,
                "level": p.level,
                "changes": p.changes,
                "seconds": round(p.seconds, 4),
                "error": p.error,
            }
        ready, why = self.ready()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "mode": self.mode,
            "egress": self.egress,
            "vxlan_filter": {
                "setting": self.vxlan_filter,
                "allowed_peers": self.vxlan_allowed,
                "problem": self.vxlan_filter_problem,
            },
            "lease": lease,
            "peers": len(self.peers),
            "ipv6_peers": self.ipv6_peers,
            "last_reconcile": last,
            "drift_repairs": dict(sorted(self.drift_repairs.items())),
            "skipped_leases": dict(sorted(self.skipped.items())),
            "policy": self.policy,
            "ready": ready,
            "ready_reason": why,
            "settings": self.settings,
        }

    def policy_enforced(self, *, policies: int, endpoints: int, revision: int) -> None:
        self.policy = {"policies": policies, "endpoints": endpoints, "revision": revision}
        self.m_policies.set(policies)
        self.m_endpoints.set(endpoints)
        self.m_policy_revision.set(revision)

    def policy_counters(
        self, counts: Mapping[str, int], owners: Mapping[str, CounterOwner]
    ) -> None:
        """The policy table's counters by name, with whose they are."""
        readings: dict[tuple[str, str, str], int] = {}
        for name, count in counts.items():
            owner = owners.get(name)
            if owner is not None:
                readings[(owner.policy, owner.direction.value, owner.verdict)] = count
        self.policy_packets.update(readings)

    def peer_list(self) -> list[dict[str, Any]]:
        return [self.peers[k] for k in sorted(self.peers, key=subnet_order)]


def subnet_order(subnet: str) -> tuple[int, ...]:
    """Sort key for subnets written as text: numerically, not as strings."""
    address, _, length = subnet.partition("/")
    return (*map(int, address.split(".")), int(length or 0))
