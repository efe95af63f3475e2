"""The one reconcile loop: make the kernel match what the daemon knows.

Events (etcd changes through the mirror, netlink drift, the resync timer, a
failed pass) only mark the state dirty; a single task turns dirty into one
pass at a time, so passes never overlap and a burst of events costs one
pass. A pass runs the managers in their fixed order (network policy,
devices, sysctls, egress rules, VXLAN allow-list additions, services, peer
entries, allow-list removals); each computes its desired state with a pure
function and applies the difference from what it believes or reads. The
policy transaction runs while the devices, sysctls and egress rules are
made sure of and the allow-list additions planned, and is in force before
the first of them is written (managers.policy.PolicyWritten).

How much a pass looks at is its level (see managers.Level): an etcd event
asks for a light pass, the resync timer for a check, and anything that
casts doubt (a failed pass, a netlink event no manager expected, a
re-listed etcd, a new config or lease, the long full-resync period) for a
full one. A pass that fails in any way is retried, full, after a short
delay; a stray entry goes because it is not desired, not because an event
said so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from overlayd.daemon.managers import Inputs, Level, Manager, PassContext, PassInputs
from overlayd.daemon.managers.devices import DeviceManager
from overlayd.daemon.managers.egress import EgressManager
from overlayd.daemon.managers.endpoints import EndpointProjection
from overlayd.daemon.managers.peers import EntryWrites, PeerEntryManager, PeerProjection
from overlayd.daemon.managers.policy import PolicyManager
from overlayd.daemon.managers.services import ServiceManager, ServiceState
from overlayd.daemon.managers.sysctls import SysctlManager
from overlayd.daemon.managers.vxlan_filter import FilterWrites, VxlanAllowList
from overlayd.dataplane import DataplanePort
from overlayd.model import (
    IPV4,
    IPV6,
    Change,
    DeviceSpec,
    Lease,
    NetworkConfig,
    Observed,
    describe,
)
from overlayd.plan.egress import EgressSpec
from overlayd.surfaces.telemetry import Telemetry

log = logging.getLogger(__name__)

RETRY_SECONDS = 0.5
# A cold start with thousands of peers logs a count, not thousands of lines.
LOG_CHANGES_MAX = 40


@dataclass
class PassResult:
    ok: bool
    changes: int = 0
    peers: int = 0
    seconds: float = 0.0
    error: str | None = None
    level: Level = Level.FULL

    @property
    def full(self) -> bool:
        return self.level is Level.FULL


@dataclass
class Knowledge:
    """Fixed pass inputs, for tests and one-shot tools; the daemon passes its
    `HostState`, which the mirror and the lease keeper keep current."""

    config: NetworkConfig
    own: Lease
    spec: DeviceSpec
    egress: EgressSpec
    etcd_prefix: str
    raw_leases: Mapping[str, bytes] = field(default_factory=dict)
    own_prefix: str = "/overlayd"
    raw_endpoints: Mapping[str, bytes] = field(default_factory=dict)
    raw_policies: Mapping[str, bytes] = field(default_factory=dict)
    raw_services: Mapping[str, bytes] = field(default_factory=dict)
    revision: int = 0


def standard_managers(
    dataplane: DataplanePort,
    telemetry: Telemetry,
    *,
    vxlan_filter: bool = True,
    on_service_records: Callable[[ServiceState], None] | None = None,
) -> list[Manager]:
    """Today's managers, in the order a pass runs them: network policy
    first, then devices before the sysctls that name them, both before the
    rules (egress, then services), all before the entries that hang off the
    devices. The VXLAN allow-list sits on both sides of the entries: a new
    peer's address is allowed before its FDB entry is written, a departed
    peer's removed only after its entries are gone; one allow-list per
    family.

    The policy table names no device (addresses, sets and the forward
    hook), so it is made first: its `nft -f` (a quarter of a second for
    10,000 endpoints and 500 policies) then runs while the devices, sysctls
    and egress rules are made sure of and the allow-lists planned (they
    only queue their additions), and it is in force before any addition is
    written. That opens nothing sooner than before: the devices and
    forwarding, which used to be made before the policy manager ran, now
    come while its transaction runs, and every path a policy judges (an
    allow-list addition, a peer's entries, a service) still waits for it. A
    device made again raises the pass to a full one after the policy ran;
    the policy table does not depend on the devices, so its pass need not
    be full for that."""
    projection = PeerProjection(dataplane)
    endpoints = EndpointProjection(projection)
    allow = [
        VxlanAllowList(dataplane, telemetry, projection, enabled=vxlan_filter, family=family)
        for family in (IPV4, IPV6)
    ]
    policy = PolicyManager(dataplane, telemetry, endpoints)
    return [
        # First: its transaction runs while the next ones work (see above).
        policy,
        DeviceManager(dataplane),
        SysctlManager(dataplane),
        EgressManager(dataplane),
        *(a.admit for a in allow),
        # Before the peers' writes: a policy selecting an endpoint is in
        # force before any new path to it is.
        policy.written,
        # After the policy is in force: a container a new service exposes
        # is judged before the first connection through the service.
        ServiceManager(dataplane, endpoints, on_records=on_service_records),
        FilterWrites(dataplane, "admit"),
        PeerEntryManager(dataplane, telemetry, projection),
        # IPv6 entries exactly like IPv4's, over the IPv6 halves of the
        # leases; with no IPv6 lease it only removes any it finds.
        PeerEntryManager(dataplane, telemetry, projection, IPV6),
        EntryWrites(dataplane),
        *(a.prune for a in allow),
        FilterWrites(dataplane, "prune"),
    ]


class Reconciler:
    """Runs passes over the managers, one pass at a time."""

    def __init__(
        self,
        knowledge: PassInputs,
        dataplane: DataplanePort,
        telemetry: Telemetry | None = None,
        *,
        managers: Sequence[Manager] | None = None,
    ) -> None:
        self.knowledge = knowledge
        self.dataplane = dataplane
        self.telemetry = telemetry or Telemetry()
        self.managers = (
            list(managers) if managers is not None else standard_managers(dataplane, self.telemetry)
        )
        self._dirty = asyncio.Event()
        # The first pass is full anyway (nothing believed yet).
        self._level = Level.LIGHT
        self._event_at: float | None = None
        self._succeeded_once = False
        self._last_full: float | None = None  # monotonic
        self.last: PassResult | None = None
        # The inputs of the last successful full pass: what the kernel is
        # programmed for (the Docker plugin hands out only its subnet).
        self.programmed: Inputs | None = None
        self.passes = 0
        self.drift_events = 0
        self.on_pass: Callable[[PassResult], None] | None = None
        # The newest etcd revision a successful pass has put in force, and
        # who waits for one (a registering container, `policy wait`).
        self.enforced_revision = 0
        self._enforced_waiters: list[tuple[int, asyncio.Future[None]]] = []

    def mark_dirty(
        self, *, full: bool = False, check: bool = False, event_at: float | None = None
    ) -> None:
        """Ask for a pass of at least the given level. `event_at`: when the
        etcd event behind this arrived (monotonic), for the watch-lag figure."""
        wanted = Level.FULL if full else Level.CHECK if check else Level.LIGHT
        self._level = max(self._level, wanted)
        if event_at is not None and self._event_at is None:
            self._event_at = event_at
        self._dirty.set()

    def note_drift(self, observed: Observed) -> None:
        """A netlink event: our own change coming back, or somebody else's."""
        if any(manager.expects(observed) for manager in self.managers):
            return
        log.debug("event=drift_suspected what=%r", observed.detail)
        self.drift_events += 1
        self.mark_dirty(full=True)

    async def reconcile_once(self, *, full: bool = True, level: Level | None = None) -> PassResult:
        if level is None:
            level = Level.FULL if full else Level.LIGHT
        if self._last_full is None:
            level = Level.FULL  # nothing is believed before the first full pass
        started = time.monotonic()
        self.telemetry.pass_started_now()
        event_at, self._event_at = self._event_at, None
        context = PassContext(Inputs.of(self.knowledge), level)
        timings: list[str] = []  # per manager, ms: where a slow pass spends its time
        try:
            try:
                for manager in self.managers:
                    began = time.monotonic()
                    await manager.sync(context)
                    timings.append(f"{manager.name}:{(time.monotonic() - began) * 1000:.1f}")
            finally:
                # Told even when a later manager fails: it was done all the same.
                for kind, what in context.remade:
                    self._remade(kind, what)
                if context.changes:
                    self._log_changes(context.changes)
            level = context.level  # a manager may have raised it
            outcome = PassResult(
                ok=True,
                changes=len(context.changes),
                peers=context.peers,
                seconds=time.monotonic() - started,
                level=level,
            )
            if level is Level.FULL:
                self._last_full = started
                self.programmed = context.inputs
            self._succeeded_once = True
            self._enforced(context.inputs.revision)
            if event_at is not None:
                self.telemetry.watch_lag(time.monotonic() - event_at)
        except Exception as exc:  # any failure: re-read everything next pass
            log.error("event=reconcile_failed error=%r", exc)
            for manager in self.managers:
                manager.forget()
            self._last_full = None
            outcome = PassResult(
                ok=False,
                seconds=time.monotonic() - started,
                error=repr(exc),
                level=level,
            )
        log.debug(
            "event=pass level=%s ok=%s changes=%d seconds=%.4f ms=%s",
            level.name.lower(),
            outcome.ok,
            outcome.changes,
            outcome.seconds,
            ",".join(timings),
        )
        self.telemetry.pass_finished(
            ok=outcome.ok,
            full=outcome.full,
            seconds=outcome.seconds,
            changes=context.changes if outcome.ok else (),
            error=outcome.error,
            level=level.name.lower(),
        )
        self.last = outcome
        self.passes += 1
        if self.on_pass is not None:
            self.on_pass(outcome)
        return outcome

    def _enforced(self, revision: int) -> None:
        self.enforced_revision = max(self.enforced_revision, revision)
        waiting = []
        for wanted, future in self._enforced_waiters:
            if wanted <= self.enforced_revision:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((wanted, future))
        self._enforced_waiters = waiting

    async def wait_enforced(self, revision: int) -> None:
        """Return once a pass has put the etcd state of `revision` (or later)
        in force; asks for a pass meanwhile. Bound it with asyncio.timeout."""
        if revision <= self.enforced_revision:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enforced_waiters.append((revision, future))
        self.mark_dirty()
        try:
            await future
        finally:
            self._enforced_waiters = [w for w in self._enforced_waiters if w[1] is not future]

    def _log_changes(self, changes: Sequence[Change]) -> None:
        for change in changes[:LOG_CHANGES_MAX]:
            log.info("event=entry_%s %s", change.op.value, describe(change.entry))
        if len(changes) > LOG_CHANGES_MAX:
            log.info(
                "event=entries_changed count=%d (first %d listed)",
                len(changes),
                LOG_CHANGES_MAX,
            )

    def _remade(self, kind: str, what: str) -> None:
        """A device, sysctl or rule that a pass had to (re)make. Before the
        first successful pass that is set-up; afterwards somebody undid it."""
        log.info("event=%s_changed what=%r", kind, what)
        if self._succeeded_once:
            self.telemetry.drift_repaired(kind, what)

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            level, self._level = self._level, Level.LIGHT
            result = await self.reconcile_once(level=level)
            if not result.ok:
                await asyncio.sleep(RETRY_SECONDS)
                self.mark_dirty(full=True)

    async def resync_every(self, seconds: float, full_seconds: float | None = None) -> None:
        """A check every `seconds`; a full pass when none has run for
        `full_seconds` (by default, every check is full)."""
        full_seconds = seconds if full_seconds is None else full_seconds
        while True:
            await asyncio.sleep(seconds)
            last = self._last_full
            due = last is None or time.monotonic() - last >= full_seconds - seconds / 2
            self.mark_dirty(full=due, check=True)
