"""From the cluster's leases to the entries this host must hold: the one
function that both the reconcile loop and `overlayctl diagnose` use, so that
the diagnosis compares the kernel with exactly what a pass would write."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from typing import cast

from overlayd.model import EntrySet, Lease, NetworkConfig
from overlayd.plan.desired import EntryMemo, PeerPlan, Routing, desired_entries, plan_peers
from overlayd.plan.leases import ParseCache, select_peers, subnet_key


@dataclass(frozen=True, slots=True)
class ClusterPlan:
    desired: EntrySet
    peers: PeerPlan
    rejected: Mapping[str, str]  # etcd key -> why the lease gets no entries


def cluster_plan(
    config: NetworkConfig,
    own: Lease,
    raw_leases: Mapping[str, bytes],
    etcd_prefix: str,
    onlink: Sequence[IPv4Network],
    *,
    underlay: str = "",
    cache: ParseCache | None = None,
    memo: EntryMemo | None = None,
) -> ClusterPlan:
    selection = select_peers(config, own, raw_leases, etcd_prefix, cache=cache)
    plan = plan_peers(selection.peers, Routing.of(config, onlink))
    rejected = {r.key: r.reason for r in selection.rejected}
    for peer in plan.unreachable:
        rejected[subnet_key(etcd_prefix, peer.subnet)] = (
            f"PublicIP {peer.public_ip} is not on {underlay or 'the underlay'}'s"
            " link: host-gw cannot route to it, so it gets no route"
        )
    desired = desired_entries(plan.tunneled, direct=plan.direct, memo=memo)
    return ClusterPlan(desired, plan, rejected)


def ipv6_peers_stub(plan: ClusterPlan) -> ClusterPlan:
    """STUB (v6-egress branch), until cluster_plan makes a plan per family:
    the IPv6 VXLAN allow-list needs only the tunnelled peers with an IPv6
    half, their `public_ip` being the peer's PublicIPv6, which is what the
    per-family plan of IPV6 gives. No entries, no rejections."""
    tunneled = tuple(
        replace(peer, public_ip=cast(IPv4Address, peer.public_ipv6))
        for peer in plan.peers.tunneled
        if peer.has_ipv6
    )
    return ClusterPlan(EntrySet(), PeerPlan(tunneled, (), ()), {})
