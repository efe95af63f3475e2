"""From the cluster's leases to the entries this host must hold, per address
family: the one function that both the reconcile loop and `overlayctl
diagnose` use, so that the diagnosis compares the kernel with exactly what a
pass would write.

The leases are selected once (`select_peers` checks both halves of every
dual-stack lease); each family's plan is then the same function over that
family's view of the peers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from overlayd.model import IPV4, EntrySet, Family, FamilyPeer, IPNetwork, Lease, NetworkConfig, Peer
from overlayd.plan.desired import EntryMemo, PeerPlan, Routing, desired_entries, plan_peers
from overlayd.plan.leases import ParseCache, PeerSelection, lease_key, select_peers


@dataclass(frozen=True, slots=True)
class ClusterPlan:
    desired: EntrySet
    peers: PeerPlan
    rejected: Mapping[str, str]  # etcd key -> why the lease gets no entries (of this family)
    # IPv6 plan only: keys of usable peers that have no IPv6 (reached over IPv4).
    without_ipv6: tuple[str, ...] = ()


def _key(peer: Peer, etcd_prefix: str) -> str:
    if isinstance(peer, FamilyPeer):
        return peer.key
    assert isinstance(peer, Lease)
    return lease_key(etcd_prefix, peer)


def family_plan(
    selection: PeerSelection,
    family: Family,
    config: NetworkConfig,
    onlink: Sequence[IPNetwork],
    etcd_prefix: str,
    *,
    underlay: str = "",
    memo: EntryMemo | None = None,
) -> ClusterPlan:
    """One family's entries from a selection of leases. `onlink`: the
    underlay's connected networks of that family (host-gw, DirectRouting)."""
    if family is IPV4:
        peers: Sequence[Peer] = selection.peers
        rejected = {r.key: r.reason for r in selection.rejected}
        public = "PublicIP"
    else:
        peers = selection.peers6
        rejected = {r.key: r.reason for r in selection.rejected6}
        public = "PublicIPv6"
    plan = plan_peers(peers, Routing.of(config, onlink))
    for peer in plan.unreachable:
        rejected[_key(peer, etcd_prefix)] = (
            f"{public} {peer.public_ip} is not on {underlay or 'the underlay'}'s"
            " link: host-gw cannot route to it, so it gets no route"
        )
    desired = desired_entries(plan.tunneled, direct=plan.direct, memo=memo)
    without = selection.without_ipv6 if family is not IPV4 else ()
    return ClusterPlan(desired, plan, rejected, without)


def cluster_plan(
    config: NetworkConfig,
    own: Lease,
    raw_leases: Mapping[str, bytes],
    etcd_prefix: str,
    onlink: Sequence[IPNetwork],
    *,
    family: Family = IPV4,
    underlay: str = "",
    cache: ParseCache | None = None,
    memo: EntryMemo | None = None,
) -> ClusterPlan:
    selection = select_peers(config, own, raw_leases, etcd_prefix, cache=cache)
    return family_plan(selection, family, config, onlink, etcd_prefix, underlay=underlay, memo=memo)
