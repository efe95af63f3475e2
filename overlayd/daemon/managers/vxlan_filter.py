"""The VXLAN allow-list: the set of the tunnelled peers' public IPs and the
rules that accept VXLAN only from them (see plan/vxlan_filter.py for the
kernel objects and why), one `VxlanAllowList` per address family: the IPv4
one keeps table `ip overlayd` for the IPv4 VTEP, the IPv6 one table `ip6
overlayd` for the IPv6 VTEP, with the peers' PublicIPv6 addresses. Each
takes its family's peers from the pass's plan of that family, and each
finds nothing to do (and removes what it finds) when the host has no VTEP
of its family.

The set must change on both sides of the peer entries, so one state
(`VxlanAllowList`) is run by two managers, placed around PeerEntryManager
in `daemon.loop.standard_managers`:

    admit  before the entries: on check and full passes, the rules are
           compared with the kernel and put back if needed, and the set's
           elements are read back; on every pass, new peers' addresses are
           added. A peer is in the set before its FDB entry exists, so its
           first frames are not dropped.
    prune  after the entries: departed peers' addresses are removed, once
           nothing sends to them any more.

Both see the same peers: the pass's one plan (`PeerProjection`). Elements
are believed like entries: a light pass diffs against belief and writes
one `nft -f` transaction naming only what changed. nftables changes send
no event the daemon listens to, so a check pass reads the set back; an
element deleted or added by hand is drift, put back (or removed) there.

If the rules cannot be installed, the daemon does not pretend: it logs an
error once per reason, /readyz answers 503 with the reason, and the rest
of the pass (devices, entries) goes on, so the overlay keeps working while
the operator looks. Every pass tries again. Rules written before may
still be in the kernel meanwhile, dropping VXLAN from anyone outside the
set, so while the set exists its elements go on following the peers. An
element change that fails, on the other hand, fails the pass like any
other write: it is retried in full, and no FDB entry is written for a
peer whose address is not in the set.
"""

from __future__ import annotations

import logging

from overlayd.daemon.managers import Level, PassContext
from overlayd.daemon.managers.peers import PeerProjection
from overlayd.dataplane import DataplanePort
from overlayd.dataplane.nft import NftError
from overlayd.model import IPV4, Family, IPAddress, Observed
from overlayd.plan.vxlan_filter import (
    SET,
    ElementChanges,
    FilterSpec,
    element_changes,
    filter_spec,
)
from overlayd.surfaces.telemetry import Telemetry

log = logging.getLogger("overlayd.daemon.loop")


class VxlanAllowList:
    """The allow-list's state; its two managers are `admit` and `prune`."""

    def __init__(
        self,
        dataplane: DataplanePort,
        telemetry: Telemetry,
        projection: PeerProjection,
        *,
        enabled: bool = True,
        family: Family = IPV4,
    ) -> None:
        self._dataplane = dataplane
        self._telemetry = telemetry
        self._projection = projection
        self.enabled = enabled
        self.family = family
        # What we believe the set holds; None: not known (read it back).
        self.believed: frozenset[IPAddress] | None = None
        self._problem: str | None = None
        # The pass whose admit ran, the filter it used and the sources it wanted.
        self._pending: tuple[PassContext, FilterSpec, frozenset[IPAddress]] | None = None
        self.admit = _Admit(self)
        self.prune = _Prune(self)

    async def run_admit(self, context: PassContext) -> None:
        self._pending = None
        f = filter_spec(context.inputs.spec, self.family) if self.enabled else None
        if f is None:
            await self._absent(context)
            return
        looks = context.level >= Level.CHECK or self.believed is None
        if looks and not await self._install(context, f):
            return
        assert self.believed is not None
        planned = await self._projection.plan(context, self.family)
        desired = planned.sources
        new = element_changes(desired, self.believed).add
        if new:
            # Written by the next `FilterWrites`, with the other family's, in
            # one nft run; believed now (a failed write fails the pass, and a
            # failed pass forgets every belief).
            context.filter_writes.append((f, ElementChanges(new, ())))
            self.believed = self.believed | frozenset(new)
        self._pending = (context, f, desired)

    async def run_prune(self, context: PassContext) -> None:
        pending, self._pending = self._pending, None
        if pending is None or pending[0] is not context or self.believed is None:
            return
        _, f, desired = pending
        gone = element_changes(desired, self.believed).delete
        if gone:
            context.filter_writes.append((f, ElementChanges((), gone)))
            self.believed = self.believed - frozenset(gone)
        if self._problem is None:
            self._telemetry.vxlan_filter_ok(len(self.believed), self.family)

    async def _install(self, context: PassContext, f: FilterSpec) -> bool:
        """Rules in place and the set read back; False when there is no set
        to keep in step (nft refused, and no set of ours exists)."""
        try:
            done = await self._dataplane.ensure_vxlan_filter(f)
            actual = await self._dataplane.vxlan_filter_sources(f)
            if actual is None:
                raise NftError(f"set {SET} is missing right after it was made")
        except NftError as exc:
            self._failed(str(exc))
            # Rules we wrote before may still be in the kernel, dropping VXLAN
            # from whoever is not in the set: while the set exists, keep it in
            # step with the peers, so that a new peer is not cut off.
            try:
                self.believed = await self._dataplane.vxlan_filter_sources(f)
            except NftError:
                self.believed = None
            return self.believed is not None
        if self._problem is not None:
            log.warning(
                "event=vxlan_filter_installed family=ipv%d after=%r",
                self.family.version,
                self._problem,
            )
            self._problem = None
        if done is not None:
            context.remade.append(("nftables", done))
        elif self.believed is not None and actual != self.believed:
            # Nobody but us writes the set: any difference is somebody's edit.
            missing, extra = len(self.believed - actual), len(actual - self.believed)
            context.remade.append(
                ("nftables", f"set {SET}: {missing} element(s) missing, {extra} not ours")
            )
        self.believed = actual
        return True

    async def _absent(self, context: PassContext) -> None:
        """No filter wanted (off, or no VTEP): remove ours if it is there."""
        self.believed = None
        self._problem = None
        if context.level >= Level.CHECK:
            done = await self._dataplane.remove_vxlan_filter(self.family)
            if done is not None:
                context.remade.append(("nftables", done))
        self._telemetry.vxlan_filter_absent(self.family)

    def _failed(self, reason: str) -> None:
        if reason != self._problem:
            log.error(
                "event=vxlan_filter_failed family=ipv%d error=%r effect=%r",
                self.family.version,
                reason,
                "VXLAN is not filtered; /readyz fails until the rules are in place",
            )
        self._problem = reason
        self._telemetry.vxlan_filter_failed(reason, self.family)

    def forget(self) -> None:
        self.believed = None
        self._pending = None


class FilterWrites:
    """Writes the allow-list element changes the admit (or prune) managers
    of both families queued, in one `nft -f` transaction: every nft run
    costs a process and nft's own look at the table, which with thousands
    of elements is most of what a peer joining costs, and a dual-stack
    host would otherwise pay it twice."""

    def __init__(self, dataplane: DataplanePort, step: str) -> None:
        self._dataplane = dataplane
        self.name = f"vxlan-allow-{step}-write"

    async def sync(self, context: PassContext) -> None:
        writes, context.filter_writes = context.filter_writes, []
        if writes:
            await self._dataplane.update_vxlan_filters(writes)

    def expects(self, observed: Observed) -> bool:
        return False

    def forget(self) -> None:
        pass  # nothing believed: the allow-lists hold the beliefs


def _name(step: str, family: Family) -> str:
    # The IPv4 names are those from before dual-stack.
    return f"vxlan-allow-{step}" + ("" if family.version == 4 else f"-v{family.version}")


class _Admit:
    def __init__(self, state: VxlanAllowList) -> None:
        self._state = state
        self.name = _name("admit", state.family)

    async def sync(self, context: PassContext) -> None:
        await self._state.run_admit(context)

    def expects(self, observed: Observed) -> bool:
        return False  # nftables sends no netlink event we listen to

    def forget(self) -> None:
        self._state.forget()


class _Prune:
    def __init__(self, state: VxlanAllowList) -> None:
        self._state = state
        self.name = _name("prune", state.family)

    async def sync(self, context: PassContext) -> None:
        await self._state.run_prune(context)

    def expects(self, observed: Observed) -> bool:
        return False

    def forget(self) -> None:
        self._state.forget()
