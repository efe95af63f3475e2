"""The per-peer entries: for every peer lease, a route, a neighbour and two
FDB entries through the tunnel, or one direct route (see plan/desired.py);
one manager per address family, the IPv6 one over the IPv6 halves of
dual-stack leases (nothing at all while this host has no IPv6 lease).

Desired state comes from the cluster plan over the mirror's leases, the
same pure function `overlayctl diagnose` uses. Actual state is believed
(`EntryTracker`) and read back from the kernel only on a full pass, so a
peer joining a cluster of thousands costs a plan and a diff of what
changed, not a dump of every entry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from overlayd.daemon.managers import Level, PassContext
from overlayd.dataplane import DataplanePort
from overlayd.dataplane.entries import ApplyResult
from overlayd.model import IPV4, Change, DeviceSpec, EntrySet, Family, IPNetwork, Lease, Observed
from overlayd.plan.cluster import ClusterPlan, FamilyPlanner
from overlayd.plan.diff import diff
from overlayd.plan.selection import PeerSelector
from overlayd.plan.tracker import EntryTracker
from overlayd.surfaces.telemetry import Telemetry

log = logging.getLogger("overlayd.daemon.loop")


class PeerProjection:
    """The peers of a pass: the cluster plan over the mirror's leases, made
    once per pass and shared by every manager that needs it (the VXLAN
    allow-list on both sides of the entries, and the entries).

    Kept across passes (plan/selection.py, plan/cluster.py): a light pass
    moves the selection and each family's plan by the leases that changed,
    so that one peer joining thousands costs about one peer's work; a check
    or full pass applies the whole rule again."""

    def __init__(self, dataplane: DataplanePort) -> None:
        self._dataplane = dataplane
        self._selector = PeerSelector()
        self._planners: dict[int, FamilyPlanner] = {}
        # Per family (by version): the underlay's connected networks.
        self._onlink: dict[int, tuple[IPNetwork, ...]] = {}

    async def plan(self, context: PassContext, family: Family = IPV4) -> ClusterPlan:
        found = context.planned.get(family.version)
        if found is not None:
            return found
        inputs = context.inputs
        onlink = self._onlink.get(family.version)
        if context.level >= Level.CHECK or onlink is None:
            # Which peers are on our link decides direct routes; the underlay's
            # addresses also send events, which make the next pass a full one.
            onlink = self._onlink[family.version] = tuple(
                await self._dataplane.connected_networks(inputs.spec.underlay_ifindex, family)
            )
        if context.selected is None:
            context.selected = self._selector.select(
                inputs.config,
                inputs.own,
                inputs.raw_leases,
                inputs.etcd_prefix,
                full=context.level >= Level.CHECK,
            )
        planner = self._planners.get(family.version)
        if planner is None:
            planner = self._planners[family.version] = FamilyPlanner(family)
        planned = context.planned[family.version] = planner.plan(
            context.selected,
            inputs.config,
            onlink,
            inputs.etcd_prefix,
            underlay=inputs.spec.underlay,
        )
        return planned

    def forget(self) -> None:
        """Plan from scratch next time (after a failed pass)."""
        self._selector.forget()
        for planner in self._planners.values():
            planner.forget()


class PeerEntryManager:
    """The entries of one address family."""

    def __init__(
        self,
        dataplane: DataplanePort,
        telemetry: Telemetry,
        projection: PeerProjection | None = None,
        family: Family = IPV4,
    ) -> None:
        self._dataplane = dataplane
        self._telemetry = telemetry
        self.family = family
        self.name = "peers" if family is IPV4 else f"peers{family.version}"
        self.tracker = EntryTracker()
        self._projection = projection or PeerProjection(dataplane)
        self._warned: dict[str, str] = {}
        self._warned_without: set[str] = set()

    async def sync(self, context: PassContext) -> None:
        inputs, family = context.inputs, self.family
        planned = await self._projection.plan(context, family)
        self._warn_rejected(planned.rejected)
        self._warn_without_ipv6(planned.without_ipv6)
        if family is IPV4:
            self._telemetry.leases_skipped(planned.rejected)
        prior = self.tracker.believed()
        if context.level >= Level.FULL or prior is None:
            self.tracker.replace_actual(await self._dataplane.read_entries(inputs.spec, family))
        self.tracker.replace_desired(planned.desired)
        base = planned.base
        if planned.delta is not None and base is not None and self.tracker.believes(base):
            # A light pass's plan moved by the leases that changed, from the
            # very tables we believe the kernel holds: its delta is the diff.
            changes = list(planned.delta)
        else:
            changes = self.tracker.changes()
        # Believed before it is true, so that the netlink events of our own
        # changes, which may arrive while the batch still runs, are
        # recognised as ours.
        self.tracker.settle(changes, time.monotonic())
        # Written by EntryWrites, with the other family's, after this.
        context.entry_writes.append(
            QueuedEntries(self, changes, planned, prior if context.level >= Level.FULL else None)
        )

    def written(self, context: PassContext, queued: QueuedEntries, result: ApplyResult) -> None:
        """After the write of what `sync` queued: report it, or fail the pass."""
        changes, planned = queued.changes, queued.planned
        if changes:
            context.changes += changes
            if queued.prior is not None:
                # What the kernel lost or gained behind our back, as opposed
                # to what the cluster changed since the last pass.
                wanted = set(diff(planned.desired, queued.prior))
                self._telemetry.entries_drifted(c for c in changes if c not in wanted)
            if result.failed:
                raise RuntimeError("; ".join(result.failed[:5]))
        peers = planned.peers
        if self.family is IPV4:
            context.peers = len(peers.tunneled) + len(peers.direct)
            # The IPv4 plan's peers are the leases themselves.
            self._telemetry.peers_programmed(
                cast(Sequence[Lease], peers.tunneled),
                cast(Sequence[Lease], peers.direct),
                plan=peers,
                moved=planned.moved,
            )
        else:
            context.peers6 = len(peers.tunneled) + len(peers.direct)
            self._telemetry.ipv6_peers_programmed(len(peers.tunneled), len(peers.direct))

    def _warn_rejected(self, rejected: Mapping[str, str]) -> None:
        # One warning per bad lease (and again only if its reason changes).
        event = "lease_skipped" if self.family is IPV4 else "lease_ipv6_skipped"
        for key, reason in rejected.items():
            if self._warned.get(key) != reason:
                log.warning("event=%s key=%s reason=%r", event, key, reason)
        self._warned = dict(rejected)

    def _warn_without_ipv6(self, keys: tuple[str, ...]) -> None:
        """Once per peer: a v4-only peer in a dual-stack network is reached
        over IPv4 and gets no IPv6 entries."""
        for key in keys:
            if key not in self._warned_without:
                log.warning(
                    "event=peer_without_ipv6 key=%s effect=%r",
                    key,
                    "reached over IPv4 only; no IPv6 entries",
                )
        self._warned_without = set(keys)

    def expects(self, observed: Observed) -> bool:
        # An event about the other family's entries is that manager's to
        # judge: "nothing of mine there" must not excuse it (the loop takes
        # any manager's word). The drift monitor tells the family of bridge
        # FDB events by their VTEP; the others carry addresses.
        version = observed.family_version()
        if version and version != self.family.version:
            return False
        return self.tracker.expects(observed, time.monotonic())

    def forget(self) -> None:
        self.tracker.forget()
        self._projection.forget()


@dataclass(frozen=True, slots=True)
class QueuedEntries:
    """One family's entry changes of a pass, waiting for `EntryWrites`."""

    manager: PeerEntryManager
    changes: Sequence[Change]
    planned: ClusterPlan
    prior: EntrySet | None  # on a full pass: what was believed before it


class EntryWrites:
    """Writes the entry changes both families' managers queued, the two
    families at once: a cold start's thousands go through one iproute2
    batch per family and tool, and the IPv6 batches need not wait for the
    IPv4 ones (the daemon only waits for the processes, which run on other
    CPUs). A light pass's few go through netlink, one batch per family."""

    name = "entry-writes"

    def __init__(self, dataplane: DataplanePort) -> None:
        self._dataplane = dataplane

    async def sync(self, context: PassContext) -> None:
        queued, context.entry_writes = context.entry_writes, []
        spec = context.inputs.spec
        results = await asyncio.gather(
            *(self._apply(q, spec) for q in queued), return_exceptions=True
        )
        failure: BaseException | None = None
        for item, result in zip(queued, results, strict=True):
            try:
                if isinstance(result, BaseException):
                    raise result
                item.manager.written(context, item, result)
            except Exception as exc:  # the other family's report still counts
                failure = failure or exc
        if failure is not None:
            raise failure

    async def _apply(self, queued: QueuedEntries, spec: DeviceSpec) -> ApplyResult:
        if not queued.changes:
            return ApplyResult(0, ())
        return await self._dataplane.apply(queued.changes, spec, queued.manager.family)

    def expects(self, observed: Observed) -> bool:
        return False  # the family managers judge their entries' events

    def forget(self) -> None:
        pass  # nothing believed
