"""Which peer leases are usable, per address family, and how that changes.

`select_peers` is the rule, applied to every lease at once: a lease is
rejected when its key or value is malformed, its subnet lies outside the
network or overlaps this host's own, its VNI or backend differs from ours,
or its public address or a VTEP MAC is ours; of leases that conflict with
each other (overlapping subnets, one IPv6 subnet claimed twice, one IPv6
VTEP MAC used twice) only one, or none, is kept.

`PeerSelector` keeps a selection across the reconcile loop's passes. When
the leases that changed since the last pass conflict with no other lease,
the first group of checks decides them alone, so it updates its selection
by deciding only those leases, and says which peers went and came
(`SelectionDelta`), which lets each family's plan change by as little
(plan/cluster.py). What stays proportional to the number of leases is
C-level work: finding the changed keys by set operations, copying tuples.
Whenever a conflict is in sight, or the network or our own lease changed,
it applies the whole rule again; so does every pass while any two leases
conflict (a stale lease overlapping another, say), until one of them goes.
The property test in tests/unit/test_incremental_plan.py holds both ways
to the same answer (as sets: the kept way lists peers in the order they
came, the rule by subnet).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from overlayd.errors import LeaseError
from overlayd.journaled import JournaledDict
from overlayd.model import FamilyPeer, Lease, NetworkConfig, ipv6_view
from overlayd.plan.leases import parse_lease_key, read_lease


@dataclass(frozen=True, slots=True)
class Rejected:
    """A lease that is not used, and why (for one warning, not one per pass)."""

    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class PeerSelection:
    peers: tuple[Lease, ...]
    rejected: tuple[Rejected, ...]
    # Dual-stack (empty unless this host has an IPv6 lease): the peers'
    # IPv6 views, the leases whose IPv6 half is not used and why, and the
    # keys of usable peers that have no IPv6 at all (reached over IPv4 only).
    peers6: tuple[FamilyPeer, ...] = ()
    rejected6: tuple[Rejected, ...] = ()
    without_ipv6: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SelectionDelta:
    """The peers that left and joined a selection since the previous one,
    per family (a changed peer is both)."""

    removed: tuple[Lease, ...] = ()
    added: tuple[Lease, ...] = ()
    removed6: tuple[FamilyPeer, ...] = ()
    added6: tuple[FamilyPeer, ...] = ()


@dataclass(frozen=True, slots=True)
class Selected:
    """One selection of `PeerSelector`'s: its number, and its delta from the
    one before (None: made by the whole rule), so that a plan kept across
    passes can tell whether the delta starts where it stands."""

    selection: PeerSelection
    generation: int
    delta: SelectionDelta | None


@dataclass(frozen=True, slots=True)
class _Parsed:
    """One lease value, parsed once: the lease or why it is unusable, its
    IPv4 range as integers, and its IPv6 view or why there is none."""

    value: bytes
    lease: Lease | None
    reason: str = ""
    first: int = 0
    last: int = 0
    peer6: FamilyPeer | None = None
    reason6: str | None = None
    # The IPv6 view's range, prefix length and address as integers: a pass
    # over thousands of peers compares these, never ipaddress objects
    # (whose comparisons cost microseconds each).
    first6: int = 0
    last6: int = 0
    prefixlen6: int = 0
    public6: int = 0


ParseCache = dict[str, _Parsed]


def _parse(key: str, value: bytes, etcd_prefix: str) -> _Parsed:
    try:
        subnet, subnet6 = parse_lease_key(key, etcd_prefix)
        lease, reason6 = read_lease(subnet, subnet6, value)
    except LeaseError as exc:
        return _Parsed(value, None, str(exc))
    first, last = int(subnet.network_address), int(subnet.broadcast_address)
    peer6 = ipv6_view(lease, key)
    if peer6 is None:
        return _Parsed(value, lease, "", first, last, None, reason6)
    net6 = peer6.subnet
    return _Parsed(
        value,
        lease,
        "",
        first,
        last,
        peer6,
        reason6,
        int(net6.network_address),
        int(net6.broadcast_address),
        net6.prefixlen,
        int(peer6.public_ip),
    )


def _parse_cached(key: str, value: bytes, etcd_prefix: str, cache: ParseCache | None) -> _Parsed:
    """Parse a lease, reusing the result for an unchanged value: with
    thousands of peers, a pass must not parse every JSON value again (and
    an unchanged lease keeps the same objects, which the entry memo needs)."""
    if cache is None:
        return _parse(key, value, etcd_prefix)
    hit = cache.get(key)
    if hit is None or hit.value != value:
        hit = cache[key] = _parse(key, value, etcd_prefix)
    return hit


class _Own:
    """The verdict on this host's own lease: neither a peer nor rejected (a
    sentinel, so that no reason text, not even an empty one, can mean it)."""


_OWN = _Own()


@dataclass(frozen=True, slots=True)
class _Basis:
    """What the checks of a lease on its own compare with, as integers:
    ipaddress's own overlap tests cost microseconds each."""

    network: IPv4Network
    net_first: int
    net_last: int
    own_subnet: IPv4Network | None
    own_first: int
    own_last: int
    own_public: IPv4Address | None
    own_macs: frozenset[str]
    vni: int
    backend: str

    @classmethod
    def of(cls, config: NetworkConfig, own: Lease | None) -> _Basis:
        network = config.network
        return cls(
            network,
            int(network.network_address),
            int(network.broadcast_address),
            own.subnet if own is not None else None,
            int(own.subnet.network_address) if own is not None else -1,
            int(own.subnet.broadcast_address) if own is not None else -1,
            own.public_ip if own is not None else None,
            frozenset({own.vtep_mac, own.vtep_mac_v6} - {""}) if own is not None else frozenset(),
            config.backend.vni,
            config.backend.type,
        )

    def verdict(self, parsed: _Parsed) -> str | _Own | None:
        """None for a candidate peer, `_OWN` for our own lease, otherwise
        why the lease is rejected."""
        lease, first, last = parsed.lease, parsed.first, parsed.last
        if lease is None:
            return parsed.reason
        subnet = lease.subnet
        if first < self.net_first or last > self.net_last:
            return f"subnet {subnet} is outside Network {self.network}"
        if self.own_subnet is not None:
            if first == self.own_first and last == self.own_last:
                return _OWN
            if first <= self.own_last and self.own_first <= last:
                return f"subnet {subnet} overlaps this host's {self.own_subnet}"
            if lease.public_ip == self.own_public:
                return f"PublicIP {lease.public_ip} is this host's own address"
        if lease.backend_type != self.backend:
            return f"BackendType {lease.backend_type} differs from the network's {self.backend}"
        if self.backend == "vxlan" and lease.vni != self.vni:
            return f"VNI {lease.vni} differs from the network's {self.vni}"
        if lease.vtep_mac and lease.vtep_mac in self.own_macs:
            # Our VTEPs' MACs are the bridge's local entries: a static
            # entry for one on the IPv4 VTEP would send our own ingress
            # out of the tunnel.
            return f"VtepMAC {lease.vtep_mac} is one of this host's VTEPs'"
        return None


# What the IPv6 checks of a kept lease on its own say.
_WITHOUT = "without"  # no IPv6 half at all: reached over IPv4 only
_REJECTED6 = "rejected"
_CANDIDATE6 = "candidate"


@dataclass(frozen=True, slots=True)
class _Basis6:
    network: IPv6Network
    net_first: int
    net_last: int
    own_subnet: IPv6Network
    own_first: int
    own_last: int
    own_public: int
    subnet_len: int

    @classmethod
    def of(cls, config: NetworkConfig, own: Lease | None) -> _Basis6 | None:
        """None when this host has no IPv6 lease: nothing is selected for IPv6."""
        if config.ipv6 is None or own is None or not own.has_ipv6:
            return None
        assert own.ipv6_subnet is not None
        network, mine = config.ipv6.network, own.ipv6_subnet
        return cls(
            network,
            int(network.network_address),
            int(network.broadcast_address),
            mine,
            int(mine.network_address),
            int(mine.broadcast_address),
            int(own.public_ipv6) if own.public_ipv6 is not None else -1,
            config.ipv6.subnet_len,
        )

    def verdict(self, parsed: _Parsed) -> tuple[str, str]:
        """(`_WITHOUT`, ""), (`_REJECTED6`, why) or (`_CANDIDATE6`, "")."""
        peer = parsed.peer6
        if peer is None:
            if parsed.reason6 is not None:
                return _REJECTED6, parsed.reason6
            return _WITHOUT, ""
        first, last = parsed.first6, parsed.last6
        if first < self.net_first or last > self.net_last:
            return _REJECTED6, f"IPv6 subnet {peer.subnet} is outside IPv6Network {self.network}"
        if parsed.prefixlen6 != self.subnet_len:
            # A shorter prefix would capture other hosts' subnets.
            return (
                _REJECTED6,
                f"IPv6 subnet {peer.subnet} is not a /{self.subnet_len} (IPv6SubnetLen)",
            )
        if first <= self.own_last and self.own_first <= last:
            return _REJECTED6, f"IPv6 subnet {peer.subnet} overlaps this host's {self.own_subnet}"
        if parsed.public6 == self.own_public:
            return _REJECTED6, f"PublicIPv6 {peer.public_ip} is this host's own address"
        return _CANDIDATE6, ""


@dataclass(frozen=True, slots=True)
class _Full:
    """The rule's answer, with what keeping it across passes needs."""

    selection: PeerSelection
    kept: list[tuple[str, _Parsed]]
    # Some lease lost to another (overlap, a double claim, a MAC in use)
    # or two peers share an IPv4 VtepMAC: a change there can re-decide
    # other leases, which only the whole rule gets right.
    conflicts: bool


def _select(
    config: NetworkConfig,
    own: Lease | None,
    raw_leases: Mapping[str, bytes],
    etcd_prefix: str,
    cache: ParseCache | None,
) -> _Full:
    basis = _Basis.of(config, own)
    candidates: list[tuple[int, int, str, _Parsed]] = []
    rejected: list[Rejected] = []
    for key, value in raw_leases.items():
        parsed = _parse_cached(key, value, etcd_prefix, cache)
        reason = basis.verdict(parsed)
        if reason is None:
            candidates.append((parsed.first, parsed.last, key, parsed))
        elif not isinstance(reason, _Own):
            rejected.append(Rejected(key=key, reason=reason))
    conflicts = False
    # By start, then the larger (shorter prefix) first.
    candidates.sort(key=lambda c: (c[0], -c[1]))
    peers: list[Lease] = []
    kept: list[tuple[str, _Parsed]] = []
    kept_last = -1
    for first, last, key, parsed in candidates:
        assert parsed.lease is not None
        # Sorted by start: a lease overlaps a kept one only if it starts
        # before the end of the last kept one (kept leases never overlap).
        if first <= kept_last:
            reason = f"subnet {parsed.lease.subnet} overlaps the lease for {peers[-1].subnet}"
            rejected.append(Rejected(key=key, reason=reason))
            conflicts = True
            continue
        peers.append(parsed.lease)
        kept.append((key, parsed))
        kept_last = last
    if cache is not None and len(cache) > len(raw_leases):
        for gone in set(cache) - set(raw_leases):
            del cache[gone]
    if config.backend.type == "vxlan":
        macs = [lease.vtep_mac for lease in peers if lease.vtep_mac]
        conflicts = conflicts or len(set(macs)) != len(macs)
    selection = PeerSelection(
        peers=tuple(peers), rejected=tuple(sorted(rejected, key=lambda r: r.key))
    )
    basis6 = _Basis6.of(config, own)
    if basis6 is None or own is None:
        return _Full(selection, kept, conflicts)
    selection, conflicts6 = _select_ipv6(basis6, own, selection, kept)
    return _Full(selection, kept, conflicts or conflicts6)


def select_peers(
    config: NetworkConfig,
    own: Lease | None,
    raw_leases: Mapping[str, bytes],
    etcd_prefix: str,
    *,
    cache: ParseCache | None = None,
) -> PeerSelection:
    """Turn every raw `<prefix>/subnets/*` key and value into usable peers
    (see the module's docstring for the rule). Of two peer leases that
    overlap, the one with the lower address (then the shorter prefix)
    wins; the other is rejected. O(n log n), so that thousands of peers
    stay cheap. The IPv6 halves of the usable leases go through the same
    rules (`_select_ipv6`) when this host has IPv6."""
    return _select(config, own, raw_leases, etcd_prefix, cache).selection


def _select_ipv6(
    basis6: _Basis6, own: Lease, selection: PeerSelection, kept: list[tuple[str, _Parsed]]
) -> tuple[PeerSelection, bool]:
    """The IPv6 halves of the usable peers, by the IPv4 rules: inside
    IPv6Network, not overlapping ours or each other's, not our own address,
    and (both VTEPs being ports of one bridge) a VtepMAC that no other VTEP
    we forward to, or our own, uses. Also whether any lease lost to another."""
    macs_in_use = {own.vtep_mac, own.vtep_mac_v6} | {p.vtep_mac for p in selection.peers}
    rejected: list[Rejected] = []
    without: list[str] = []
    candidates: list[tuple[int, int, FamilyPeer]] = []
    for key, parsed in kept:
        verdict, reason = basis6.verdict(parsed)
        if verdict == _WITHOUT:
            without.append(key)
        elif verdict == _REJECTED6:
            rejected.append(Rejected(key=key, reason=reason))
        else:
            assert parsed.peer6 is not None
            candidates.append((parsed.first6, parsed.last6, parsed.peer6))
    # All of one length now: two claims of one IPv6 subnet are the same
    # subnet, and neither host may have it (which one is right cannot be
    # told from here; routing it to either could hijack the other's).
    claims: dict[int, int] = {}
    for first, _, _ in candidates:
        claims[first] = claims.get(first, 0) + 1
    candidates.sort(key=lambda c: (c[0], -c[1]))
    peers6: list[FamilyPeer] = []
    kept_last = -1
    conflicts = False
    for first, last, peer in candidates:
        if claims[first] > 1:
            reason = f"IPv6 subnet {peer.subnet} is claimed by {claims[first]} leases"
        elif first <= kept_last:
            reason = f"IPv6 subnet {peer.subnet} overlaps the lease for {peers6[-1].subnet}"
        elif peer.vtep_mac and peer.vtep_mac in macs_in_use:
            reason = f"BackendV6Data.VtepMAC {peer.vtep_mac} is already another VTEP's"
        else:
            macs_in_use.add(peer.vtep_mac)
            peers6.append(peer)
            kept_last = last
            continue
        rejected.append(Rejected(key=peer.key, reason=reason))
        conflicts = True
    return (
        PeerSelection(
            peers=selection.peers,
            rejected=selection.rejected,
            peers6=tuple(peers6),
            rejected6=tuple(sorted(rejected, key=lambda r: r.key)),
            without_ipv6=tuple(without),
        ),
        conflicts,
    )


class _Kept:
    """A selection kept across passes, indexed so that one lease can be
    decided against all the others without looking at them: the kept
    peers' IPv4 ranges in order, and the MACs and IPv6 subnets in use.

    Invariant: equal, as sets, to the rule's answer over `raw`, which has
    no conflicts;
    `update` keeps it or gives up (returns None), and a given-up `_Kept`
    is thrown away."""

    def __init__(
        self, config: NetworkConfig, own: Lease | None, etcd_prefix: str, raw: Mapping[str, bytes]
    ) -> None:
        self.config, self.own, self.etcd_prefix = config, own, etcd_prefix
        self.basis = _Basis.of(config, own)
        self.basis6 = _Basis6.of(config, own)
        self.vxlan = config.backend.type == "vxlan"
        self.raw = dict(raw)
        # Where `raw` came from, if it notes its changes, and how far we read.
        self.source: JournaledDict | None = None
        self.mark = 0
        self._follow(raw)
        self.peers: dict[str, Lease] = {}
        self.parsed: dict[str, _Parsed] = {}
        self.rejected: dict[str, str] = {}
        self.peers6: dict[str, FamilyPeer] = {}
        self.rejected6: dict[str, str] = {}
        self.without: dict[str, None] = {}  # an ordered set
        self.starts: list[int] = []  # the kept IPv4 ranges' first addresses, sorted
        self.ends: dict[int, int] = {}  # first -> last
        self.macs: set[str] = set()  # the kept peers' IPv4 VtepMACs
        self.firsts6: set[int] = set()
        self.macs6: set[str] = set()
        self._selection: PeerSelection | None = None

    @classmethod
    def of(
        cls,
        full: _Full,
        config: NetworkConfig,
        own: Lease | None,
        etcd_prefix: str,
        raw: Mapping[str, bytes],
    ) -> _Kept:
        kept = cls(config, own, etcd_prefix, raw)
        selection = full.selection
        kept.rejected = {r.key: r.reason for r in selection.rejected}
        kept.rejected6 = {r.key: r.reason for r in selection.rejected6}
        kept.without = dict.fromkeys(selection.without_ipv6)
        for key, parsed in full.kept:  # sorted by start
            assert parsed.lease is not None
            kept.peers[key] = parsed.lease
            kept.parsed[key] = parsed
            kept.starts.append(parsed.first)
            kept.ends[parsed.first] = parsed.last
            if parsed.lease.vtep_mac:
                kept.macs.add(parsed.lease.vtep_mac)
        for peer in selection.peers6:
            kept.peers6[peer.key] = peer
            kept.firsts6.add(kept.parsed[peer.key].first6)
            if peer.vtep_mac:
                kept.macs6.add(peer.vtep_mac)
        kept._selection = selection
        return kept

    def matches(self, config: NetworkConfig, own: Lease | None, etcd_prefix: str) -> bool:
        return (config, own, etcd_prefix) == (self.config, self.own, self.etcd_prefix)

    def selection(self) -> PeerSelection:
        if self._selection is None:
            self._selection = PeerSelection(
                peers=tuple(self.peers.values()),
                rejected=_rejections(self.rejected),
                peers6=tuple(self.peers6.values()),
                rejected6=_rejections(self.rejected6),
                without_ipv6=tuple(self.without),
            )
        return self._selection

    def update(self, raw: Mapping[str, bytes], cache: ParseCache) -> SelectionDelta | None:
        """Move to `raw`; None when a changed lease touches another one."""
        prev = self.raw
        noted = (
            raw.changed_since(self.mark) if self.source is not None and raw is self.source else None
        )
        if noted is not None:
            changed = [key for key in noted if key in raw and prev.get(key) != raw[key]]
            gone = [key for key in noted if key not in raw and key in prev]
        else:
            # Set operations over the items and keys run in C: a Python loop
            # over thousands of leases would cost more still.
            changed = [key for key, _ in raw.items() - prev.items()]
            gone = list(prev.keys() - raw.keys())
        removed: list[Lease] = []
        removed6: list[FamilyPeer] = []
        added: list[Lease] = []
        added6: list[FamilyPeer] = []
        for key in (*gone, *changed):
            self._withdraw(key, removed, removed6)
        for key in changed:
            parsed = _parse_cached(key, raw[key], self.etcd_prefix, cache)
            if not self._admit(key, parsed, added, added6):
                return None
            prev[key] = raw[key]
        for key in gone:
            del prev[key]
            cache.pop(key, None)
        if changed or gone:
            self._selection = None
        self._follow(raw)
        return SelectionDelta(tuple(removed), tuple(added), tuple(removed6), tuple(added6))

    def _follow(self, raw: Mapping[str, bytes]) -> None:
        """`raw` is what `self.raw` now copies."""
        if isinstance(raw, JournaledDict):
            self.source, self.mark = raw, raw.mark
        else:
            self.source = None

    def _withdraw(self, key: str, removed: list[Lease], removed6: list[FamilyPeer]) -> None:
        lease = self.peers.pop(key, None)
        if lease is None:
            self.rejected.pop(key, None)
            return
        parsed = self.parsed.pop(key)
        del self.starts[bisect_left(self.starts, parsed.first)]
        del self.ends[parsed.first]
        self.macs.discard(lease.vtep_mac)
        removed.append(lease)
        peer6 = self.peers6.pop(key, None)
        if peer6 is not None:
            self.firsts6.discard(parsed.first6)
            self.macs6.discard(peer6.vtep_mac)
            removed6.append(peer6)
        self.rejected6.pop(key, None)
        self.without.pop(key, None)

    def _admit(
        self, key: str, parsed: _Parsed, added: list[Lease], added6: list[FamilyPeer]
    ) -> bool:
        """Decide one changed lease against the others; False when it
        conflicts with one (only the whole rule decides that)."""
        reason = self.basis.verdict(parsed)
        if reason is not None:
            if not isinstance(reason, _Own):
                self.rejected[key] = reason
            return True
        lease, first, last = parsed.lease, parsed.first, parsed.last
        assert lease is not None
        at = bisect_left(self.starts, first)
        if at > 0 and self.ends[self.starts[at - 1]] >= first:
            return False
        if at < len(self.starts) and self.starts[at] <= last:
            return False
        mac = lease.vtep_mac
        # A second peer with one IPv4 MAC shares its FDB entries; an IPv6
        # peer with that MAC would lose its IPv6 entries to it.
        if mac and ((self.vxlan and mac in self.macs) or mac in self.macs6):
            return False
        verdict6, reason6 = self.basis6.verdict(parsed) if self.basis6 else (_WITHOUT, "")
        peer6 = parsed.peer6
        if verdict6 == _CANDIDATE6:
            assert peer6 is not None
            mac6 = peer6.vtep_mac
            if parsed.first6 in self.firsts6:
                return False
            if mac6 and (mac6 in self.macs6 or mac6 in self.macs or mac6 == mac):
                return False
            if mac6 and mac6 in self.basis.own_macs:
                return False
        self.peers[key] = lease
        self.parsed[key] = parsed
        self.starts.insert(at, first)
        self.ends[first] = last
        if mac:
            self.macs.add(mac)
        added.append(lease)
        if self.basis6 is None:
            return True
        if verdict6 == _WITHOUT:
            self.without[key] = None
        elif verdict6 == _REJECTED6:
            self.rejected6[key] = reason6
        else:
            assert peer6 is not None
            self.peers6[key] = peer6
            self.firsts6.add(parsed.first6)
            if peer6.vtep_mac:
                self.macs6.add(peer6.vtep_mac)
            added6.append(peer6)
        return True


def _rejections(reasons: Mapping[str, str]) -> tuple[Rejected, ...]:
    return tuple(Rejected(key=key, reason=reasons[key]) for key in sorted(reasons))


class PeerSelector:
    """`select_peers` across passes: the whole rule when asked (`full`) or
    when the leases' basis changed, otherwise an update by the changed
    leases alone, with the peers that left and joined."""

    def __init__(self) -> None:
        self._cache: ParseCache = {}
        self._kept: _Kept | None = None
        self._generation = 0

    def select(
        self,
        config: NetworkConfig,
        own: Lease | None,
        raw_leases: Mapping[str, bytes],
        etcd_prefix: str,
        *,
        full: bool = False,
    ) -> Selected:
        self._generation += 1
        kept = self._kept
        if not full and kept is not None and kept.matches(config, own, etcd_prefix):
            delta = kept.update(raw_leases, self._cache)
            if delta is not None:
                return Selected(kept.selection(), self._generation, delta)
        found = _select(config, own, raw_leases, etcd_prefix, self._cache)
        self._kept = (
            None if found.conflicts else _Kept.of(found, config, own, etcd_prefix, raw_leases)
        )
        return Selected(found.selection, self._generation, None)

    def forget(self) -> None:
        """Apply the whole rule next time."""
        self._kept = None
