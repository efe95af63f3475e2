"""From the mirror's raw values under overlayd's prefix to what a host
enforces: the usable policies and endpoints, and why the others are not
used. The daemon's policy manager and `overlayctl diagnose`/`policy check`
call these same functions, so that they agree on what is in force.

The host that judges is the one whose endpoints' gwbridge addresses and
MACs count (plan/policy_rules.py says why); `local_subnets` and
`own_host_subnets` say so, from its lease and egress settings."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from overlayd.model import IPNetwork, Lease
from overlayd.plan.egress import EgressSpec
from overlayd.plan.endpoints import EndpointCache, EndpointSelection, host_id, select_endpoints
from overlayd.plan.policy import stored_policies
from overlayd.plan.policy_model import HostSubnets, Policy
from overlayd.plan.policy_rules import LocalSubnets, PolicyRuleset, policy_ruleset


def gwbridge_subnets(egress: EgressSpec | None) -> tuple[IPNetwork, ...]:
    """The gwbridge's subnets in gwbridge egress mode (the IPv6 one only
    while the cluster has an IPv6 network, as the gwbridge gets it)."""
    if egress is None or egress.mode != "gwbridge":
        return ()
    found: list[IPNetwork] = []
    if egress.gwbridge_subnet is not None:
        found.append(egress.gwbridge_subnet)
    if egress.gwbridge_subnet6 is not None and egress.cluster6 is not None:
        found.append(egress.gwbridge_subnet6)
    return tuple(found)


def own_host_subnets(own: Lease, gwbridge: tuple[IPNetwork, ...] = ()) -> HostSubnets:
    """This host (with its gwbridge's subnets), as the reader of its own
    endpoints' registrations."""
    return HostSubnets(own.subnet, own.ipv6_subnet, own=True, gwbridge=gwbridge)


def local_subnets(own: Lease, gwbridge: tuple[IPNetwork, ...] = ()) -> LocalSubnets:
    """The subnets whose packets this host judges."""
    return LocalSubnets(own.subnet, own.ipv6_subnet, gwbridge)


def endpoint_hosts(
    own: Lease, peers: Iterable[Lease], gwbridge: tuple[IPNetwork, ...] = ()
) -> dict[str, HostSubnets]:
    """The hosts whose endpoints count: ours and the usable peers' (an
    endpoint of a host without a lease is rejected)."""
    hosts = {host_id(lease.subnet): HostSubnets(lease.subnet, lease.ipv6_subnet) for lease in peers}
    hosts[host_id(own.subnet)] = own_host_subnets(own, gwbridge)
    return hosts


def enforced_ruleset(
    raw_policies: Mapping[str, bytes],
    raw_endpoints: Mapping[str, bytes],
    own_prefix: str,
    own: Lease,
    peers: Iterable[Lease],
    cache: EndpointCache | None = None,
    gwbridge: tuple[IPNetwork, ...] = (),
) -> tuple[PolicyRuleset, list[Policy], EndpointSelection, dict[str, str]]:
    """The ruleset a host holding `own` (and a gwbridge with the subnets
    `gwbridge`, in gwbridge egress mode) must have (from scratch), with the
    usable policies and endpoints and every skipped input's reason.
    ValueError for two policies whose names would share nft names."""
    policies, rejected = stored_policies(raw_policies, own_prefix)
    hosts = endpoint_hosts(own, peers, gwbridge)
    selection = select_endpoints(raw_endpoints, own_prefix, hosts, cache=cache)
    local = local_subnets(own, gwbridge)
    ruleset = policy_ruleset(policies, selection.endpoints, local)
    return ruleset, policies, selection, {**rejected, **selection.rejected}
