"""From the cluster's leases to the entries this host must hold: the one
function that both the reconcile loop and `overlayctl diagnose` use, so that
the diagnosis compares the kernel with exactly what a pass would write."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from overlayd.model import EntrySet, IPNetwork, Lease, NetworkConfig
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
    onlink: Sequence[IPNetwork],
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
