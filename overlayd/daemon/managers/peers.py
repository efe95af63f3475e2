"""The per-peer entries: for every peer lease, a route, a neighbour and two
FDB entries through the tunnel, or one direct route (see plan/desired.py).

Desired state comes from the cluster plan over the mirror's leases, the
same pure function `overlayctl diagnose` uses. Actual state is believed
(`EntryTracker`) and read back from the kernel only on a full pass, so a
peer joining a cluster of thousands costs a plan and a diff of what
changed, not a dump of every entry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from overlayd.daemon.managers import Level, PassContext
from overlayd.dataplane import DataplanePort
from overlayd.model import IPNetwork, Observed
from overlayd.plan.cluster import ClusterPlan, cluster_plan
from overlayd.plan.desired import EntryMemo
from overlayd.plan.diff import diff
from overlayd.plan.leases import ParseCache
from overlayd.plan.tracker import EntryTracker
from overlayd.surfaces.telemetry import Telemetry

log = logging.getLogger("overlayd.daemon.loop")


class PeerProjection:
    """The peers of a pass: the cluster plan over the mirror's leases, made
    once per pass and shared by every manager that needs it (the VXLAN
    allow-list on both sides of the entries, and the entries), with the
    caches that make it cheap across passes."""

    def __init__(self, dataplane: DataplanePort) -> None:
        self._dataplane = dataplane
        self._parse_cache: ParseCache = {}
        self._entry_memo: EntryMemo = {}
        self._onlink: tuple[IPNetwork, ...] | None = None

    async def plan(self, context: PassContext) -> ClusterPlan:
        if context.planned is not None:
            return context.planned
        inputs = context.inputs
        if context.level >= Level.CHECK or self._onlink is None:
            # Which peers are on our link decides direct routes; the underlay's
            # addresses also send events, which make the next pass a full one.
            self._onlink = tuple(
                await self._dataplane.connected_networks(inputs.spec.underlay_ifindex)
            )
        context.planned = cluster_plan(
            inputs.config,
            inputs.own,
            inputs.raw_leases,
            inputs.etcd_prefix,
            self._onlink,
            underlay=inputs.spec.underlay,
            cache=self._parse_cache,
            memo=self._entry_memo,
        )
        return context.planned


class PeerEntryManager:
    name = "peers"

    def __init__(
        self,
        dataplane: DataplanePort,
        telemetry: Telemetry,
        projection: PeerProjection | None = None,
    ) -> None:
        self._dataplane = dataplane
        self._telemetry = telemetry
        self.tracker = EntryTracker()
        self._projection = projection or PeerProjection(dataplane)
        self._warned: dict[str, str] = {}

    async def sync(self, context: PassContext) -> None:
        inputs = context.inputs
        planned = await self._projection.plan(context)
        self._warn_rejected(planned.rejected)
        self._telemetry.leases_skipped(planned.rejected)
        prior = self.tracker.believed()
        if context.level >= Level.FULL or prior is None:
            self.tracker.replace_actual(await self._dataplane.read_entries(inputs.spec))
        self.tracker.replace_desired(planned.desired)
        changes = self.tracker.changes()
        # Believed before it is true, so that the netlink events of our own
        # changes, which may arrive while the batch still runs, are
        # recognised as ours.
        self.tracker.settle()
        if changes:
            result = await self._dataplane.apply(changes, inputs.spec)
            context.changes += changes
            if context.level >= Level.FULL and prior is not None:
                # What the kernel lost or gained behind our back, as opposed
                # to what the cluster changed since the last pass.
                wanted = set(diff(planned.desired, prior))
                self._telemetry.entries_drifted(c for c in changes if c not in wanted)
            if result.failed:
                raise RuntimeError("; ".join(result.failed[:5]))
        peers = planned.peers
        context.peers = len(peers.tunneled) + len(peers.direct)
        self._telemetry.peers_programmed(peers.tunneled, peers.direct)

    def _warn_rejected(self, rejected: Mapping[str, str]) -> None:
        # One warning per bad lease (and again only if its reason changes).
        for key, reason in rejected.items():
            if self._warned.get(key) != reason:
                log.warning("event=lease_skipped key=%s reason=%r", key, reason)
        self._warned = dict(rejected)

    def expects(self, observed: Observed) -> bool:
        return self.tracker.expects(observed)

    def forget(self) -> None:
        self.tracker.forget()
