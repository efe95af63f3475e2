"""Network policy: the `inet overlayd_policy` table (plan/policy_rules.py)
from the policies and endpoints under overlayd's prefix.

Desired state is the pure ruleset over every usable policy and endpoint
(bad documents and registrations are skipped with one warning each, never
half-applied); an endpoint is usable when its host holds a lease and its
addresses lie in that lease's subnets. What the kernel holds is believed:
a light pass writes `policy_transaction(believed, desired)`, which for a
container starting or stopping is a few `add element`/`delete element`
statements, one per set it is in. A check pass reads the sets back and
puts back any element somebody changed; a full pass, or a failure, makes
the table afresh in one transaction, its counters carrying the values the
old table's held (read while the ruleset is made), so that `nft list` and
the bench see no counter go back to 0. Packets counted in the moment
between that read and the new table are lost.

While any policy exists, bridge netfilter must be on, or traffic between
two containers of one host would never meet the forward hook; the manager
turns it on itself before the first rule goes in, since the sysctl
manager looks only on check passes. For IPv6 too on a host without IPv6
in the cluster: its containers' link-local traffic is judged all the same.

The endpoints are the pass's selection (managers/endpoints.py), shared
with the services manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from overlayd.daemon.managers import Level, PassContext
from overlayd.daemon.managers.endpoints import EndpointProjection
from overlayd.dataplane import DataplanePort
from overlayd.errors import OverlaydError
from overlayd.model import Observed
from overlayd.plan.policy import PolicyCache, stored_policies
from overlayd.plan.policy_inputs import gwbridge_subnets, local_subnets
from overlayd.plan.policy_model import Endpoint, Policy
from overlayd.plan.policy_rules import (
    EMPTY,
    Count,
    LocalSubnets,
    PolicyRuleset,
    element_repairs,
    listed_counters,
    listed_counts,
    listed_elements,
    listed_ports,
    policy_ruleset,
    policy_transaction,
    with_endpoints,
)
from overlayd.surfaces.telemetry import Telemetry

log = logging.getLogger("overlayd.daemon.loop")


class PolicyManager:
    name = "policy"

    def __init__(
        self, dataplane: DataplanePort, telemetry: Telemetry, endpoints: EndpointProjection
    ) -> None:
        self._dataplane = dataplane
        self._telemetry = telemetry
        self.believed: PolicyRuleset | None = None
        self._bridge_netfilter = False  # turned on (and believed on) for our rules
        self._policies: PolicyCache = {}  # each document parsed once
        self._policy_rejections: dict[str, str] = {}
        self._endpoints = endpoints
        self._warned: dict[str, str] = {}
        self._repaired = 0  # set element statements a check pass had to put back
        # The last ruleset made, with what it was made from (see _desired).
        self._last: (
            tuple[
                tuple[tuple[int, ...], LocalSubnets],
                PolicyRuleset,
                dict[str, Endpoint],
                list[Policy],
            ]
            | None
        ) = None
        # This pass's transaction under way, and what it makes true once
        # nft took it (see finish); a failed pass's, until it ends.
        self._pending: tuple[asyncio.Task[None] | None, PolicyRuleset, int, int] | None = None
        self._unfinished: asyncio.Task[None] | None = None
        self.written = PolicyWritten(self)

    async def sync(self, context: PassContext) -> None:
        inputs = context.inputs
        if self._unfinished is not None:
            # A failed pass's transaction still running: done (or refused)
            # before this pass writes, so that nft never applies an older
            # table after a newer one. Believed or not, this pass is full.
            with contextlib.suppress(Exception):
                await self._unfinished
            self._unfinished = None
        if (
            not inputs.raw_policies
            and self.believed is not None
            and self.believed.empty
            and context.level < Level.FULL
        ):
            # No policy, and none in the kernel: nothing to judge, so no
            # endpoint needs reading either (a light pass at 5,000 peers must
            # not pay for a feature nobody uses).
            self._telemetry.policy_enforced(
                policies=0, endpoints=len(inputs.raw_endpoints), revision=inputs.revision
            )
            return
        policies = self._usable_policies(inputs.raw_policies, inputs.own_prefix)
        counts = self._read_counts(context) if policies else None
        try:
            await self._plan_and_write(context, policies, counts)
        finally:
            # The pass failed before it needed them: nothing left running or unseen.
            if counts is not None and not counts.done():
                counts.cancel()
            elif counts is not None and not counts.cancelled():
                counts.exception()

    def _read_counts(self, context: PassContext) -> asyncio.Task[str | None] | None:
        """When this pass will make the table afresh and one may be there:
        its counters' listing, read by nft while the ruleset is made (nft
        takes 0.25 s at 500 policies and 10,000 endpoints: it fetches the
        whole table first)."""
        believed = self.believed
        if believed is not None and (believed.empty or context.level < Level.FULL):
            return None
        return asyncio.create_task(self._dataplane.policy_counters())

    async def _plan_and_write(
        self,
        context: PassContext,
        policies: list[Policy],
        counts: asyncio.Task[str | None] | None,
    ) -> None:
        inputs = context.inputs
        if policies:
            selection = await self._endpoints.selection(context)
            self._warn({**self._rejected_policies(), **selection.rejected})
            local = local_subnets(inputs.own, gwbridge_subnets(inputs.egress))
            desired = self._desired(policies, selection.endpoints, local, context.level)
            endpoints = len(selection.endpoints)
        else:
            # No usable policy: no table, whatever the endpoints, so none is
            # read (a full pass, at start, would parse 10,000 registrations
            # for nothing: 0.15 s). A bad registration is told of once a
            # policy makes it matter.
            self._warn(self._rejected_policies())
            desired, self._last = EMPTY, None
            endpoints = len(inputs.raw_endpoints)
        if not desired.empty and (not self._bridge_netfilter or context.level >= Level.CHECK):
            context.remade_all(
                "sysctl",
                await self._dataplane.ensure_bridge_netfilter(ipv6=True),
            )
            self._bridge_netfilter = True
        self._repaired = 0
        statements = await self._statements(context, desired, counts)
        # Written while the managers up to `written` (PolicyWritten) make
        # sure of the devices, sysctls and egress rules and plan the VXLAN
        # allow-lists: nft takes a quarter of a second for a whole table of
        # 10,000 endpoints and 500 policies, in a process of its own.
        write = asyncio.create_task(self._write(statements)) if statements else None
        self._pending = (write, desired, len(policies), endpoints)
        if write is not None:
            await asyncio.sleep(0)  # nft started now, not at the next manager's wait

    async def _write(self, statements: list[str]) -> None:
        await self._dataplane.apply_policy(statements)

    async def finish(self, context: PassContext) -> None:
        """Wait for the pass's transaction (PolicyWritten); then, and only
        then, believe it: a refused transaction changed nothing."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        write, desired, policies, endpoints = pending
        if write is not None:
            await write
        if self._repaired:
            context.remade.append(
                ("nftables", f"policy table: {self._repaired} set element statement(s) put back")
            )
        self.believed = desired
        self._telemetry.policy_enforced(
            policies=policies, endpoints=endpoints, revision=context.inputs.revision
        )

    def _desired(
        self,
        policies: list[Policy],
        endpoints: tuple[Endpoint, ...],
        local: LocalSubnets,
        level: Level,
    ) -> PolicyRuleset:
        """The ruleset: moved by the endpoints that changed when only they
        did (the selection hands back the same Endpoint object for an
        unchanged registration), made from scratch otherwise, and on a full
        pass. A check pass keeps the moved ruleset too: its job is the
        kernel's drift, which it finds by listing; making the ruleset again
        cost as much as the listing itself (0.06 s at 500 policies and 400
        endpoints, 0.37 s at 10,000 endpoints) on every resync, for a value
        with_endpoints already gives (tests/unit/test_policy_rules.py holds
        the two equal)."""
        basis = (tuple(map(id, policies)), local)
        kept = self._last
        if kept is not None and level < Level.FULL and kept[0] == basis:
            before = kept[2]
            now = {e.key: e for e in endpoints}
            gone = [e for key, e in before.items() if now.get(key) is not e]
            came = [e for key, e in now.items() if before.get(key) is not e]
            desired = with_endpoints(kept[1], gone, came) if gone or came else kept[1]
        else:
            try:
                desired = policy_ruleset(policies, endpoints, local)
            except ValueError as exc:
                # Two names that would share nft names: nothing half-applied;
                # the table stays as it was until the documents are fixed.
                raise OverlaydError(f"policies not applied: {exc}") from exc
            now = {e.key: e for e in endpoints}
        # The policies are kept too, so that their ids stay theirs.
        self._last = (basis, desired, now, policies)
        return desired

    async def _statements(
        self,
        context: PassContext,
        desired: PolicyRuleset,
        counts: asyncio.Task[str | None] | None,
    ) -> list[str]:
        believed = self.believed
        if context.level >= Level.FULL or believed is None:
            return policy_transaction(None, desired, await self._carried(counts))
        if context.level >= Level.CHECK:
            listing = await self._dataplane.policy_listing()
            if listing is None:
                if believed.empty:
                    return policy_transaction(EMPTY, desired)
                return policy_transaction(None, desired)
            self._telemetry.policy_counters(listed_counters(listing), believed.counters)
            repairs = element_repairs(believed, listed_elements(listing), listed_ports(listing))
            if repairs is None:
                self._repaired = 1  # a set of ours went: the whole table again
                return policy_transaction(None, desired, listed_counts(listing))
            self._repaired = len(repairs)
            return repairs + policy_transaction(believed, desired)
        return policy_transaction(believed, desired)

    @staticmethod
    async def _carried(counts: asyncio.Task[str | None] | None) -> dict[str, Count]:
        """The old table's counts (none when there was no table, or its
        listing could not be read: the counters then start from 0, which
        the metric's base absorbs, rather than fail the pass)."""
        if counts is None:
            return {}
        try:
            listing = await counts
            return listed_counts(listing) if listing is not None else {}
        except (OSError, ValueError) as exc:
            log.warning("event=policy_counters_unread error=%r", exc)
            return {}

    def _usable_policies(self, raw: Mapping[str, bytes], own_prefix: str) -> list[Policy]:
        policies, self._policy_rejections = stored_policies(raw, own_prefix, self._policies)
        return policies

    def _rejected_policies(self) -> dict[str, str]:
        return self._policy_rejections

    def _warn(self, rejected: Mapping[str, str]) -> None:
        # One warning per bad document or registration (again if its reason changes).
        for key, reason in rejected.items():
            if self._warned.get(key) != reason:
                log.warning("event=policy_input_skipped key=%s reason=%r", key, reason)
        self._warned = dict(rejected)

    def expects(self, observed: Observed) -> bool:
        return False  # nftables sends no netlink event we listen to

    def forget(self) -> None:
        if self._pending is not None:
            write = self._pending[0]
            if write is not None and not write.done():
                self._unfinished = write
            elif write is not None and not write.cancelled():
                write.exception()  # seen: the pass failed anyway
            self._pending = None
        self.believed = None
        self._bridge_netfilter = False
        self._last = None
        self._endpoints.forget()


class PolicyWritten:
    """The barrier after which a pass may open new paths (the VXLAN
    allow-list's additions, peer entries, services): the policy transaction
    that PolicyManager started is in force. The managers between the two
    make sure of the devices, sysctls and egress rules (see
    standard_managers) and otherwise only read, plan and restrict (the
    allow-lists' own chains, which drop), so that a policy selecting an
    endpoint is still in force before any new path to it is, as when the
    transaction was awaited in place; on a cold start its nft run overlaps
    their work."""

    name = "policy-write"

    def __init__(self, policy: PolicyManager) -> None:
        self._policy = policy

    async def sync(self, context: PassContext) -> None:
        await self._policy.finish(context)

    def expects(self, observed: Observed) -> bool:
        return False

    def forget(self) -> None:
        pass  # the PolicyManager's
