"""From the mirror's raw values under overlayd's prefix to what a host
enforces: the usable policies and endpoints, and why the others are not
used. The daemon's policy manager and `overlayctl diagnose`/`policy check`
call these same functions, so that they agree on what is in force."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from overlayd.model import Lease
from overlayd.plan.endpoints import EndpointCache, EndpointSelection, host_id, select_endpoints
from overlayd.plan.policy import stored_policies
from overlayd.plan.policy_model import HostSubnets, Policy
from overlayd.plan.policy_rules import LocalSubnets, PolicyRuleset, policy_ruleset


def endpoint_hosts(own: Lease, peers: Iterable[Lease]) -> dict[str, HostSubnets]:
    """The hosts whose endpoints count: ours and the usable peers' (an
    endpoint of a host without a lease is rejected)."""
    hosts = {host_id(lease.subnet): HostSubnets(lease.subnet, lease.ipv6_subnet) for lease in peers}
    hosts[host_id(own.subnet)] = HostSubnets(own.subnet, own.ipv6_subnet)
    return hosts


def enforced_ruleset(
    raw_policies: Mapping[str, bytes],
    raw_endpoints: Mapping[str, bytes],
    own_prefix: str,
    own: Lease,
    peers: Iterable[Lease],
    cache: EndpointCache | None = None,
) -> tuple[PolicyRuleset, list[Policy], EndpointSelection, dict[str, str]]:
    """The ruleset a host holding `own` must have (from scratch), with the
    usable policies and endpoints and every skipped input's reason.
    ValueError for two policies whose names would share nft names."""
    policies, rejected = stored_policies(raw_policies, own_prefix)
    selection = select_endpoints(raw_endpoints, own_prefix, endpoint_hosts(own, peers), cache=cache)
    local = LocalSubnets(own.subnet, own.ipv6_subnet)
    ruleset = policy_ruleset(policies, selection.endpoints, local)
    return ruleset, policies, selection, {**rejected, **selection.rejected}
