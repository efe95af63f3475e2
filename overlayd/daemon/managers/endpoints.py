"""The cluster's usable endpoints, selected once per pass for every
manager that needs them (network policy, services), so that all of them
judge the same containers and none parses a registration twice.

An endpoint is usable when its host holds a lease and its addresses lie
in that lease's subnets (plan/endpoints.select_endpoints); this host's
own endpoints are read with its gwbridge's subnets, so that their gwbridge
addresses and MACs are kept (plan/policy_rules.py says why). The hosts are
moved by the lease selection's delta, like the peer plans.
"""

from __future__ import annotations

from collections.abc import Mapping

from overlayd.daemon.managers import PassContext
from overlayd.daemon.managers.peers import PeerProjection
from overlayd.model import IPV4, Lease
from overlayd.plan.egress import EgressSpec
from overlayd.plan.endpoints import EndpointCache, EndpointSelection, host_id, select_endpoints
from overlayd.plan.policy_inputs import gwbridge_subnets, own_host_subnets
from overlayd.plan.policy_model import HostSubnets


class EndpointProjection:
    def __init__(self, projection: PeerProjection) -> None:
        self._projection = projection
        self._cache: EndpointCache = {}
        self._host_map: dict[str, HostSubnets] = {}
        self._hosts_generation = -1
        self._hosts_own: tuple[Lease, EgressSpec] | None = None
        # The selection made in the current pass, and that pass's context.
        self._made: tuple[PassContext, EndpointSelection] | None = None

    async def selection(self, context: PassContext) -> EndpointSelection:
        """The usable endpoints and the rejected keys, made on the pass's
        first call and handed to later ones."""
        if self._made is not None and self._made[0] is context:
            return self._made[1]
        inputs = context.inputs
        hosts = await self._hosts(context)
        made = select_endpoints(inputs.raw_endpoints, inputs.own_prefix, hosts, cache=self._cache)
        self._made = (context, made)
        return made

    async def _hosts(self, context: PassContext) -> Mapping[str, HostSubnets]:
        """The hosts whose endpoints count: ours, and every peer whose lease
        the selection keeps (an endpoint of a host without a lease is
        rejected). Moved by the selection's delta like the peer plans."""
        await self._projection.plan(context, IPV4)
        selected = context.selected
        own, egress = context.inputs.own, context.inputs.egress
        if selected is None:
            return {host_id(own.subnet): own_host_subnets(own, gwbridge_subnets(egress))}
        delta = selected.delta
        if (
            delta is not None
            and self._hosts_generation == selected.generation - 1
            and self._hosts_own == (own, egress)
        ):
            for lease in delta.removed:
                self._host_map.pop(host_id(lease.subnet), None)
            for lease in delta.added:
                self._host_map[host_id(lease.subnet)] = HostSubnets(lease.subnet, lease.ipv6_subnet)
        else:
            self._host_map = {
                host_id(lease.subnet): HostSubnets(lease.subnet, lease.ipv6_subnet)
                for lease in selected.selection.peers
            }
        self._host_map[host_id(own.subnet)] = own_host_subnets(own, gwbridge_subnets(egress))
        self._hosts_generation, self._hosts_own = selected.generation, (own, egress)
        return self._host_map

    def forget(self) -> None:
        self._hosts_generation = -1
        self._made = None
