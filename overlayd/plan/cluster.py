"""From the cluster's leases to the entries this host must hold, per address
family: the one function that both the reconcile loop and `overlayctl
diagnose` use, so that the diagnosis compares the kernel with exactly what a
pass would write.

The leases are selected once (`select_peers` checks both halves of every
dual-stack lease); each family's plan is then the same function over that
family's view of the peers.

`FamilyPlanner` keeps one family's plan across the reconcile loop's passes:
given the peers that left and joined (`SelectionDelta`), it changes the
plan by their entries alone and says which entry changes that makes, so
that a peer joining a cluster of thousands costs the Python work of one
peer (plus C-level copies of the tables), not a plan and a diff of
thousands. Anything else is `family_plan` again."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace

from immutables import Map, MapMutation

from overlayd.model import (
    IPV4,
    KIND_OF,
    KINDS,
    BridgeFdb,
    Change,
    Entry,
    EntryKind,
    EntrySet,
    Family,
    FamilyPeer,
    IPAddress,
    IPNetwork,
    Lease,
    Neighbour,
    NetworkConfig,
    Peer,
    Route,
    TunnelFdb,
)
from overlayd.plan.desired import (
    EntryMemo,
    PeerEntries,
    PeerMoves,
    PeerPlan,
    Routing,
    desired_entries,
    peer_entries,
    plan_peers,
)
from overlayd.plan.diff import ordered_changes
from overlayd.plan.leases import lease_key
from overlayd.plan.selection import (
    ParseCache,
    PeerSelection,
    Selected,
    SelectionDelta,
    select_peers,
)
from overlayd.plan.vxlan_filter import allowed_sources


@dataclass(frozen=True, slots=True)
class ClusterPlan:
    desired: EntrySet
    peers: PeerPlan
    rejected: Mapping[str, str]  # etcd key -> why the lease gets no entries (of this family)
    # IPv6 plan only: keys of usable peers that have no IPv6 (reached over IPv4).
    without_ipv6: tuple[str, ...] = ()
    # The tunnelled peers' public addresses: the VXLAN allow-list (direct
    # peers send no VXLAN).
    sources: frozenset[IPAddress] = frozenset()
    # Made from the previous plan (`base`) by a delta: the entry changes
    # that turn base.desired into desired. None: made from scratch.
    delta: tuple[Change, ...] | None = None
    base: EntrySet | None = None
    moved: PeerMoves | None = None  # with a delta: the peers that left and joined


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
    peers: Sequence[Peer] = selection.peers if family is IPV4 else selection.peers6
    plan = plan_peers(peers, Routing.of(config, onlink))
    rejected = _rejected_with_unreachable(selection, family, plan, etcd_prefix, underlay)
    desired = desired_entries(plan.tunneled, direct=plan.direct, memo=memo)
    without = selection.without_ipv6 if family is not IPV4 else ()
    return ClusterPlan(desired, plan, rejected, without, allowed_sources(plan))


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


def _unreachable(peer: Peer, family: Family, underlay: str) -> str:
    public = "PublicIP" if family is IPV4 else "PublicIPv6"
    return (
        f"{public} {peer.public_ip} is not on {underlay or 'the underlay'}'s"
        " link: host-gw cannot route to it, so it gets no route"
    )


def _rejected_with_unreachable(
    selection: PeerSelection, family: Family, peers: PeerPlan, etcd_prefix: str, underlay: str
) -> dict[str, str]:
    rejected = _rejected_of(selection, family)
    for stuck in peers.unreachable:
        rejected[_key(stuck, etcd_prefix)] = _unreachable(stuck, family, underlay)
    return rejected


def _rejected_of(selection: PeerSelection, family: Family) -> dict[str, str]:
    chosen = selection.rejected if family is IPV4 else selection.rejected6
    return {r.key: r.reason for r in chosen}


class FamilyPlanner:
    """One family's plan, kept across passes and moved by selection deltas.

    Its state is the last plan (peers by how they are reached, the entry
    tables, the allow-list's sources with a count of peers behind each) and
    the selection generation it stands at. A delta that starts there, under
    the same routing, moves it; anything else is `family_plan` again. The
    tables of a plan are never changed once handed out: the entry manager
    believes the kernel holds them, so a move works on copies."""

    def __init__(self, family: Family) -> None:
        self.family = family
        self._memo: EntryMemo = {}  # id(peer) -> its entries
        self._plan: ClusterPlan | None = None
        self._routing: Routing | None = None
        self._generation = -1
        self._how: dict[int, int] = {}  # id(peer) -> 0 tunneled, 1 direct, 2 unreachable
        self._groups: tuple[dict[int, Peer], dict[int, Peer], dict[int, Peer]] = ({}, {}, {})
        self._sources: dict[IPAddress, int] = {}

    def plan(
        self,
        selected: Selected,
        config: NetworkConfig,
        onlink: Sequence[IPNetwork],
        etcd_prefix: str,
        *,
        underlay: str = "",
    ) -> ClusterPlan:
        routing = Routing.of(config, onlink)
        selection, delta = selected.selection, selected.delta
        if (
            delta is not None
            and self._plan is not None
            and self._generation == selected.generation - 1
            and routing == self._routing
        ):
            planned = self._move(selection, delta, routing, etcd_prefix, underlay)
        else:
            planned = family_plan(
                selection,
                self.family,
                config,
                onlink,
                etcd_prefix,
                underlay=underlay,
                memo=self._memo,
            )
            # Persistent tables (immutables.Map, a hash array mapped trie):
            # a move then derives the next tables in O(changes log n)
            # instead of copying thousands of entries per kind, which had
            # cost about 0.5 ms per family per light pass at 5,000 peers.
            planned = replace(
                planned,
                desired=EntrySet.from_tables(
                    {kind.name: Map(planned.desired.table(kind)) for kind in KINDS}
                ),
            )
            self._reset(planned, routing)
        self._plan = planned
        self._generation = selected.generation
        return planned

    def forget(self) -> None:
        self._plan = None

    def _reset(self, planned: ClusterPlan, routing: Routing) -> None:
        self._routing = routing
        peers = planned.peers
        self._groups = tuple(  # type: ignore[assignment]
            {id(peer): peer for peer in group}
            for group in (peers.tunneled, peers.direct, peers.unreachable)
        )
        self._how = {key: how for how, group in enumerate(self._groups) for key in group}
        self._sources = {}
        for peer in peers.tunneled:
            self._sources[peer.public_ip] = self._sources.get(peer.public_ip, 0) + 1

    def _entries(self, peer: Peer, direct: bool) -> PeerEntries:
        found = self._memo.get(id(peer))
        if found is None or found[0] is not peer or found[1] is not direct:
            found = self._memo[id(peer)] = peer_entries(peer, direct=direct)
        return found

    def _move(
        self,
        selection: PeerSelection,
        delta: SelectionDelta,
        routing: Routing,
        etcd_prefix: str,
        underlay: str,
    ) -> ClusterPlan:
        assert self._plan is not None
        base = self._plan.desired
        removed, added = (
            (delta.removed, delta.added) if self.family is IPV4 else (delta.removed6, delta.added6)
        )
        if not removed and not added:
            kept = self._plan
            return ClusterPlan(
                base,
                kept.peers,
                _rejected_with_unreachable(
                    selection, self.family, kept.peers, etcd_prefix, underlay
                ),
                selection.without_ipv6 if self.family is not IPV4 else (),
                kept.sources,
                (),
                base,
                PeerMoves(kept.peers, (), ()),
            )
        tables: dict[str, MapMutation[Hashable, Entry]] = {
            kind.name: _persistent(base.table(kind)).mutate() for kind in KINDS
        }
        touched: dict[str, set[Hashable]] = {kind.name: set() for kind in KINDS}
        left: list[tuple[Peer, bool]] = []
        joined: list[tuple[Peer, bool]] = []
        for peer in removed:
            how = self._how.pop(id(peer))
            del self._groups[how][id(peer)]
            if how == 2:
                continue
            left.append((peer, how == 1))
            if how == 0:
                behind = self._sources[peer.public_ip] - 1
                if behind:
                    self._sources[peer.public_ip] = behind
                else:
                    del self._sources[peer.public_ip]
            for kind, key, _ in _keyed(self._entries(peer, how == 1)):
                tables[kind.name].pop(key, None)
                touched[kind.name].add(key)
            self._memo.pop(id(peer), None)
        for peer in added:
            how = _how(plan_peers((peer,), routing))
            self._how[id(peer)] = how
            self._groups[how][id(peer)] = peer
            if how == 2:
                continue
            joined.append((peer, how == 1))
            if how == 0:
                self._sources[peer.public_ip] = self._sources.get(peer.public_ip, 0) + 1
            for kind, key, entry in _keyed(self._entries(peer, how == 1)):
                tables[kind.name][key] = entry
                touched[kind.name].add(key)
        pending: dict[EntryKind, tuple[list[Entry], list[Entry]]] = {}
        for kind in KINDS:
            old, new = base.table(kind), tables[kind.name]
            write: list[Entry] = []
            drop: list[Entry] = []
            for key in touched[kind.name]:
                before, after = old.get(key), new.get(key)
                if after is None:
                    if before is not None:
                        drop.append(before)
                elif before is None or (before is not after and before != after):
                    write.append(after)
            pending[kind] = (write, drop)
        tunneled, direct, unreachable = (tuple(group.values()) for group in self._groups)
        peers = PeerPlan(tunneled, direct, unreachable)
        return ClusterPlan(
            EntrySet.from_tables({name: table.finish() for name, table in tables.items()}),
            peers,
            _rejected_with_unreachable(selection, self.family, peers, etcd_prefix, underlay),
            selection.without_ipv6 if self.family is not IPV4 else (),
            frozenset(self._sources),
            tuple(ordered_changes(pending)),
            base,
            PeerMoves(self._plan.peers, tuple(left), tuple(joined)),
        )


def _persistent(table: Mapping[Hashable, Entry]) -> Map[Hashable, Entry]:
    return table if isinstance(table, Map) else Map(table)


def _how(plan: PeerPlan) -> int:
    return 0 if plan.tunneled else 1 if plan.direct else 2


KIND_ROUTE, KIND_NEIGH, KIND_TUNNEL, KIND_BRIDGE = (
    KIND_OF[kind] for kind in (Route, Neighbour, TunnelFdb, BridgeFdb)
)


def _keyed(entries: PeerEntries) -> list[tuple[EntryKind, Hashable, Entry]]:
    """A peer's entries with their kinds and keys (the kernel's keys)."""
    _, _, route, neighbour, tunnel_fdb, bridge_fdb, route_at, neighbour_at = entries
    found: list[tuple[EntryKind, Hashable, Entry]] = [(KIND_ROUTE, route_at, route)]
    if neighbour is not None and tunnel_fdb is not None and bridge_fdb is not None:
        found += [
            (KIND_NEIGH, neighbour_at, neighbour),
            (KIND_TUNNEL, tunnel_fdb.mac, tunnel_fdb),
            (KIND_BRIDGE, bridge_fdb.mac, bridge_fdb),
        ]
    return found
