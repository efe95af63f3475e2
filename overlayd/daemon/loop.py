"""The one reconcile loop: make the kernel match what the agent knows.

Events (etcd watch, the resync timer, a failed apply) only mark the state
dirty; a single task turns dirty into one pass at a time, so passes never
overlap and a burst of events costs one pass:

    desired = desired_entries(usable peers)       pure
    actual  = read_entries(devices)               I/O, only what we own
    changes = diff(desired, actual)               pure
    apply(changes)                                I/O, idempotent, ordered

A pass that fails in any way is retried after a short delay; a stray entry
goes because it is not desired, not because an event said so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from overlayd.dataplane import Dataplane, entries, sysctl
from overlayd.model import (
    Change,
    DeviceSpec,
    Entry,
    EntrySet,
    Lease,
    Neighbour,
    NetworkConfig,
    Observed,
    Route,
    TunnelFdb,
)
from overlayd.plan.cluster import cluster_plan
from overlayd.plan.desired import EntryMemo
from overlayd.plan.diff import diff, expected
from overlayd.plan.egress import EgressSpec
from overlayd.plan.leases import ParseCache
from overlayd.surfaces.telemetry import Telemetry

log = logging.getLogger(__name__)

RETRY_SECONDS = 0.5
# A cold start with thousands of peers logs a count, not thousands of lines.
LOG_CHANGES_MAX = 40


def describe(entry: Entry) -> str:
    if isinstance(entry, Route):
        how = " direct=yes" if entry.direct else ""
        return f"kind=route dst={entry.dst} via={entry.gateway}{how}"
    if isinstance(entry, Neighbour):
        return f"kind=neigh ip={entry.ip} mac={entry.mac}"
    if isinstance(entry, TunnelFdb):
        return f"kind=fdb_tunnel mac={entry.mac} remote={entry.remote}"
    return f"kind=fdb_bridge mac={entry.mac}"


@dataclass
class PassResult:
    ok: bool
    changes: int = 0
    peers: int = 0
    seconds: float = 0.0
    error: str | None = None
    full: bool = True


@dataclass
class Knowledge:
    """What the agent knows; the watch and the leaser write it."""

    config: NetworkConfig
    own: Lease
    spec: DeviceSpec
    egress: EgressSpec
    etcd_prefix: str
    raw_leases: dict[str, bytes] = field(default_factory=dict)


class Reconciler:
    """Runs passes, one at a time. A full pass checks devices, sysctls and
    rules and re-reads the entries from the kernel; a light pass (after an
    etcd event) diffs against what the last pass left in the kernel, so that
    one peer joining a cluster of thousands costs milliseconds. Anything that
    casts doubt on that belief (a netlink event that is not our own change
    coming back, a failed pass, the resync timer) makes the next pass full."""

    def __init__(
        self, knowledge: Knowledge, dataplane: Dataplane, telemetry: Telemetry | None = None
    ) -> None:
        self.knowledge = knowledge
        self.telemetry = telemetry or Telemetry()
        self._event_at: float | None = None
        self.dataplane = dataplane
        self._netns = dataplane.netns
        self._dirty = asyncio.Event()
        # The first pass is full anyway (nothing believed yet).
        self._full = False
        self._believed: EntrySet | None = None
        self._parse_cache: ParseCache = {}
        self._entry_memo: EntryMemo = {}
        self._onlink: tuple[IPv4Network, ...] = ()
        self._warned: dict[str, str] = {}
        self.last: PassResult | None = None
        self.passes = 0
        self.drift_events = 0
        self.on_pass: Callable[[PassResult], None] | None = None

    def mark_dirty(self, *, full: bool = False, event_at: float | None = None) -> None:
        """`event_at`: when the etcd event behind this arrived (monotonic),
        for the watch-lag figure."""
        self._full = self._full or full
        if event_at is not None and self._event_at is None:
            self._event_at = event_at
        self._dirty.set()

    def note_drift(self, observed: Observed) -> None:
        """A netlink event: our own change coming back, or somebody else's."""
        if expected(observed, self._believed):
            return
        log.debug("event=drift_suspected what=%r", observed.detail)
        self.drift_events += 1
        self.mark_dirty(full=True)

    def _warn_rejected(self, rejected: Mapping[str, str]) -> None:
        # One warning per bad lease (and again only if its reason changes).
        for key, reason in rejected.items():
            if self._warned.get(key) != reason:
                log.warning("event=lease_skipped key=%s reason=%r", key, reason)
        self._warned = dict(rejected)

    async def reconcile_once(self, *, full: bool = True) -> PassResult:
        started = time.monotonic()
        self.telemetry.pass_started_now()
        event_at, self._event_at = self._event_at, None
        k = self.knowledge
        full = full or self._believed is None
        prior = self._believed
        changes: list[Change] = []
        try:
            if full:
                self._onlink = tuple(
                    await self.dataplane.netlink.connected_networks(k.spec.underlay_ifindex)
                )
            planned = cluster_plan(
                k.config,
                k.own,
                k.raw_leases,
                k.etcd_prefix,
                self._onlink,
                underlay=k.spec.underlay,
                cache=self._parse_cache,
                memo=self._entry_memo,
            )
            self._warn_rejected(planned.rejected)
            self.telemetry.leases_skipped(planned.rejected)
            if full:
                for what in await self.dataplane.netlink.ensure_devices(k.spec):
                    self._repaired("device", what)
                for what in sysctl.ensure_forwarding_and_redirects(
                    k.spec.bridge, netns=self._netns
                ):
                    self._repaired("sysctl", what)
                await self._ensure_egress(k.egress)
                actual = await entries.read_entries(k.spec, netns=self._netns)
            else:
                assert self._believed is not None
                actual = self._believed
            desired = planned.desired
            changes = diff(desired, actual)
            # Believed before it is true, so that the netlink events of our
            # own changes, which may arrive while the batch still runs, are
            # recognised as ours.
            self._believed = desired
            if changes:
                result = await self.dataplane.apply(changes, k.spec)
                self._log_changes(changes)
                if full and prior is not None:
                    # What the kernel lost or gained behind our back, as
                    # opposed to what the cluster changed since the last pass.
                    wanted = set(diff(desired, prior))
                    self.telemetry.entries_drifted(c for c in changes if c not in wanted)
                if result.failed:
                    raise RuntimeError("; ".join(result.failed[:5]))
            peers = planned.peers
            outcome = PassResult(
                ok=True,
                changes=len(changes),
                peers=len(peers.tunneled) + len(peers.direct),
                seconds=time.monotonic() - started,
                full=full,
            )
            self.telemetry.peers_programmed(peers.tunneled, peers.direct)
            if event_at is not None:
                self.telemetry.watch_lag(time.monotonic() - event_at)
        except Exception as exc:  # any failure: re-read everything next pass
            log.error("event=reconcile_failed error=%r", exc)
            self._believed = None
            outcome = PassResult(ok=False, seconds=time.monotonic() - started, error=repr(exc))
        log.debug(
            "event=pass full=%s ok=%s changes=%d seconds=%.4f",
            outcome.full,
            outcome.ok,
            outcome.changes,
            outcome.seconds,
        )
        self.telemetry.pass_finished(
            ok=outcome.ok,
            full=outcome.full,
            seconds=outcome.seconds,
            changes=changes if outcome.ok else (),
            error=outcome.error,
        )
        self.last = outcome
        self.passes += 1
        if self.on_pass is not None:
            self.on_pass(outcome)
        return outcome

    def _log_changes(self, changes: Sequence[Change]) -> None:
        for change in changes[:LOG_CHANGES_MAX]:
            log.info("event=entry_%s %s", change.op.value, describe(change.entry))
        if len(changes) > LOG_CHANGES_MAX:
            log.info(
                "event=entries_changed count=%d (first %d listed)",
                len(changes),
                LOG_CHANGES_MAX,
            )

    def _repaired(self, kind: str, what: str) -> None:
        """A device, sysctl or rule that a full pass had to (re)make. On the
        first pass that is set-up; afterwards somebody undid it."""
        log.info("event=%s_changed what=%r", kind, what)
        if self.telemetry.first_reconcile_ok:
            self.telemetry.drift_repaired(kind, what)

    async def _ensure_egress(self, egress: EgressSpec) -> None:
        if egress.mode == "gwbridge":
            gateway = egress.gwbridge_gateway
            assert gateway is not None
            for what in await self.dataplane.netlink.ensure_gwbridge(
                egress.gwbridge, gateway, egress.gwbridge_mac
            ):
                self._repaired("device", what)
            for what in sysctl.ensure_bridge_netfilter(netns=self._netns):
                self._repaired("sysctl", what)
        done = await self.dataplane.nft.ensure(egress)
        if done is not None:
            self._repaired("nftables", f"{done} (egress {egress.mode})")
        for what in await self.dataplane.forward.ensure(egress):
            self._repaired("iptables", what)

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            full, self._full = self._full, False
            result = await self.reconcile_once(full=full)
            if not result.ok:
                await asyncio.sleep(RETRY_SECONDS)
                self.mark_dirty(full=True)

    async def resync_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            self.mark_dirty(full=True)
