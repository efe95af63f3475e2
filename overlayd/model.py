"""Frozen value types shared by the pure core and the adapters.

Everything here is plain data: the cluster's network config, a subnet lease,
and the kernel entries overlayd owns. Constructors trust their input; the
validating `parse_*` functions live in `config.py` and `plan/leases.py`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_network,
)
from typing import Any, Protocol

DEFAULT_VNI = 1
# Linux's historical VXLAN port, which flannel uses by default on Linux.
DEFAULT_VXLAN_PORT = 8472

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class Family:
    """An address family, as every family-specific step needs it: dual-stack
    runs the same plan and the same managers once per family with one of
    these, instead of a copied IPv6 branch of every function."""

    version: int
    netlink: int  # AF_INET or AF_INET6 as netlink numbers it
    iproute2_flag: str
    # Outer IP header + UDP (8) + VXLAN (8) + inner Ethernet (14).
    vxlan_overhead: int
    any_network: str  # the default route's destination

    def network(self, text: str) -> IPNetwork:
        """A route destination as iproute2 prints it ("default" included)."""
        if text == "default":
            text = self.any_network
        return ip_network(text if "/" in text else f"{text}/{32 if self.version == 4 else 128}")

    def address(self, text: str | int) -> IPAddress:
        return IPv4Address(text) if self.version == 4 else IPv6Address(text)


IPV4 = Family(4, 2, "-4", 20 + 30, "0.0.0.0/0")
IPV6 = Family(6, 10, "-6", 40 + 30, "::/0")
# The IPv4 figure, which is all flannel's schema has had until dual-stack.
VXLAN_OVERHEAD = IPV4.vxlan_overhead
# Private route protocol number: marks the routes overlayd owns, so that it
# never deletes a route somebody else added (see /etc/iproute2/rt_protos).
ROUTE_PROTOCOL = 77


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """The `Backend` object of the network config."""

    type: str = "vxlan"
    vni: int = DEFAULT_VNI
    port: int = DEFAULT_VXLAN_PORT
    mtu: int | None = None
    direct_routing: bool = False


@dataclass(frozen=True, slots=True)
class Ipv6Config:
    """The IPv6 half of a dual-stack network config (flannel's `EnableIPv6`,
    `IPv6Network`, `IPv6SubnetLen`, `IPv6SubnetMin`, `IPv6SubnetMax`)."""

    network: IPv6Network
    subnet_len: int
    subnet_min: IPv6Address
    subnet_max: IPv6Address


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """The cluster-wide network config (flannel's schema), defaults applied."""

    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend: BackendConfig = field(default_factory=BackendConfig)
    ipv6: Ipv6Config | None = None  # None unless EnableIPv6
    # Where service VIPs come from (overlayd's `ServiceNetwork` and
    # `IPv6ServiceNetwork`; flannel ignores them); None: no services.
    service_network: IPv4Network | None = None
    service_network6: IPv6Network | None = None

    @property
    def service_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        """The service networks the config has, IPv4 first."""
        return tuple(n for n in (self.service_network, self.service_network6) if n is not None)


@dataclass(frozen=True, slots=True)
class Lease:
    """One host's subnet lease, as stored in etcd in flannel's format."""

    subnet: IPv4Network
    public_ip: IPv4Address
    vni: int
    vtep_mac: str
    backend_type: str = "vxlan"
    # The IPv6 half of a dual-stack lease (flannel's key suffix
    # `&fd00:10:244:1::-64`, `PublicIPv6`, `BackendV6Data.VtepMAC`); absent
    # for a host without IPv6, which peers then reach over IPv4 only.
    ipv6_subnet: IPv6Network | None = None
    public_ipv6: IPv6Address | None = None
    vtep_mac_v6: str = ""

    @property
    def has_ipv6(self) -> bool:
        return self.ipv6_subnet is not None and self.public_ipv6 is not None


class Peer(Protocol):
    """A peer as one address family's data plane sees it: its subnet, the
    address its tunnel goes to, and its VTEP. A `Lease` is the IPv4 view of
    itself; `FamilyPeer` is the IPv6 view of a dual-stack lease."""

    @property
    def subnet(self) -> IPNetwork: ...

    @property
    def public_ip(self) -> IPAddress: ...

    @property
    def vni(self) -> int: ...

    @property
    def vtep_mac(self) -> str: ...

    @property
    def backend_type(self) -> str: ...


@dataclass(frozen=True, slots=True)
class FamilyPeer:
    """The IPv6 half of a peer's dual-stack lease, shaped like a lease so
    that the same plan serves both families."""

    subnet: IPv6Network
    public_ip: IPv6Address
    vni: int
    vtep_mac: str
    backend_type: str
    key: str  # the lease's etcd key, for warnings


def ipv6_view(lease: Lease, key: str) -> FamilyPeer | None:
    """The peer as the IPv6 data plane sees it; None for a v4-only lease."""
    if lease.ipv6_subnet is None or lease.public_ipv6 is None:
        return None
    return FamilyPeer(
        lease.ipv6_subnet, lease.public_ipv6, lease.vni, lease.vtep_mac_v6, lease.backend_type, key
    )


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """The two devices overlayd owns on a host and how they must look."""

    bridge: str
    bridge_mac: str
    gateway: IPv4Interface
    vtep: str  # "" in host-gw mode: no tunnel
    vtep_mac: str
    vni: int
    port: int
    local_ip: IPv4Address
    underlay_ifindex: int
    mtu: int
    underlay: str = ""
    # Dual-stack: the bridge's IPv6 gateway, and the second VTEP (flannel's
    # `flannel-v6.<VNI>`), another port of the same bridge, with its own MAC,
    # sending from the underlay's IPv6 address. Empty/None without IPv6.
    gateway6: IPv6Interface | None = None
    vtep6: str = ""
    vtep6_mac: str = ""
    local_ip6: IPv6Address | None = None

    def vtep_for(self, family: Family) -> str:
        """The VTEP that carries `family`'s traffic ("" if none)."""
        return self.vtep6 if family.version == 6 else self.vtep


@dataclass(frozen=True, slots=True)
class Underlay:
    """The interface tunnel traffic leaves by, as found at start."""

    name: str
    ifindex: int
    mtu: int
    address: IPv4Address
    address6: IPv6Address | None = None  # --public-ipv6, or its first global one


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """How a network device looks now (what `overlayctl diagnose` checks)."""

    name: str
    kind: str
    mtu: int
    up: bool
    master: str | None


@dataclass(frozen=True, slots=True)
class Route:
    """`route <dst> via <gateway> dev <bridge> onlink proto ROUTE_PROTOCOL`
    through the tunnel, or, with `direct` (host-gw, DirectRouting),
    `route <dst> via <peer's public IP> dev <underlay> proto ROUTE_PROTOCOL`."""

    dst: IPNetwork
    gateway: IPAddress
    direct: bool = False


@dataclass(frozen=True, slots=True)
class Neighbour:
    """`neigh <ip> lladdr <mac> dev <bridge> nud permanent`."""

    ip: IPAddress
    mac: str


@dataclass(frozen=True, slots=True)
class TunnelFdb:
    """`fdb <mac> dev <vtep> dst <remote> self permanent`: which host."""

    mac: str
    remote: IPAddress


@dataclass(frozen=True, slots=True)
class BridgeFdb:
    """`fdb <mac> dev <vtep> master static`: which bridge port."""

    mac: str


Entry = Route | Neighbour | TunnelFdb | BridgeFdb


# Keys as the kernel keys the entries, in plain ints: hashing ipaddress
# objects costs microseconds each, and a pass over thousands of peers hashes
# tens of thousands of keys.
RouteKey = tuple[int, int]


def route_key(dst: IPNetwork) -> RouteKey:
    return (int(dst.network_address), dst.prefixlen)


@dataclass(frozen=True, slots=True)
class EntryKind:
    """What every part of overlayd needs to know about one kind of entry, so
    that none of them switches on the entry's type: the name (log and metric
    label), its key as the kernel keys it, and its words in a log line.

    `layer` orders changes: an entry may depend on entries of lower layers
    (a route on its neighbour and FDB entries), so additions go up the layers
    and deletions come down, with the top layer's deletions first, so that
    nothing ever points at something missing."""

    name: str
    type: type[Entry]
    key: Callable[[Any], Hashable]
    describe: Callable[[Any], str]
    layer: int
    # The entry's address family (4 or 6) as its addresses say; 0 when it
    # has none (a bridge FDB entry).
    family: Callable[[Any], int] = lambda e: 0


def _describe_route(entry: Route) -> str:
    how = " direct=yes" if entry.direct else ""
    return f"kind=route dst={entry.dst} via={entry.gateway}{how}"


KINDS: tuple[EntryKind, ...] = (
    EntryKind(
        "fdb_tunnel",
        TunnelFdb,
        lambda e: e.mac,
        lambda e: f"kind=fdb_tunnel mac={e.mac} remote={e.remote}",
        layer=0,
        family=lambda e: e.remote.version,
    ),
    EntryKind(
        "fdb_bridge", BridgeFdb, lambda e: e.mac, lambda e: f"kind=fdb_bridge mac={e.mac}", 1
    ),
    EntryKind(
        "neigh",
        Neighbour,
        lambda e: int(e.ip),
        lambda e: f"kind=neigh ip={e.ip} mac={e.mac}",
        layer=2,
        family=lambda e: e.ip.version,
    ),
    EntryKind(
        "route",
        Route,
        lambda e: route_key(e.dst),
        _describe_route,
        layer=3,
        family=lambda e: e.dst.version,
    ),
)
KIND_OF: Mapping[type, EntryKind] = {kind.type: kind for kind in KINDS}


def kind_of(entry: Entry) -> EntryKind:
    return KIND_OF[type(entry)]


def describe(entry: Entry) -> str:
    return KIND_OF[type(entry)].describe(entry)


# The attribute of EntrySet that holds each kind.
_FIELD = {
    "route": "routes",
    "neigh": "neighbours",
    "fdb_tunnel": "tunnel_fdb",
    "fdb_bridge": "bridge_fdb",
}


@dataclass(frozen=True, slots=True)
class EntrySet:
    """The per-peer kernel entries, keyed the way the kernel keys them."""

    routes: Mapping[RouteKey, Route] = field(default_factory=dict)
    neighbours: Mapping[int, Neighbour] = field(default_factory=dict)
    tunnel_fdb: Mapping[str, TunnelFdb] = field(default_factory=dict)
    bridge_fdb: Mapping[str, BridgeFdb] = field(default_factory=dict)

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> EntrySet:
        tables: dict[str, dict[Hashable, Entry]] = {kind.name: {} for kind in KINDS}
        for entry in entries:
            kind = KIND_OF[type(entry)]
            tables[kind.name][kind.key(entry)] = entry
        return cls.from_tables(tables)

    @classmethod
    def from_tables(cls, tables: Mapping[str, Mapping[Any, Any]]) -> EntrySet:
        return cls(**{_FIELD[name]: table for name, table in tables.items()})

    def table(self, kind: EntryKind) -> Mapping[Any, Entry]:
        table: Mapping[Any, Entry] = getattr(self, _FIELD[kind.name])
        return table

    def get(self, entry: Entry) -> Entry | None:
        """Our entry with the same key as `entry`, if any."""
        kind = KIND_OF[type(entry)]
        return self.table(kind).get(kind.key(entry))

    def __len__(self) -> int:
        return len(self.routes) + len(self.neighbours) + len(self.tunnel_fdb) + len(self.bridge_fdb)

    def __or__(self, other: EntrySet) -> EntrySet:
        """Both sets in one, e.g. the two families' entries for a report;
        the keys of the two families never meet (a route or neighbour key
        holds its address's integer, an FDB key a MAC only one VTEP uses)."""
        return EntrySet.of(
            [*self.all(), *other.all()],
        )

    def all(self) -> list[Entry]:
        return [
            *self.routes.values(),
            *self.neighbours.values(),
            *self.tunnel_fdb.values(),
            *self.bridge_fdb.values(),
        ]


class Op(enum.Enum):
    REPLACE = "replace"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Change:
    op: Op
    entry: Entry


@dataclass(frozen=True, slots=True)
class LinkFacts:
    """A device as a netlink link message describes it: what the device
    manager compares with what it made."""

    name: str
    mac: str
    mtu: int
    master: str | None  # the master's name when it is one of ours, else None
    up: bool


@dataclass(frozen=True, slots=True)
class Observed:
    """One netlink event about something we may own: an entry that appeared
    (`present`) or went, or (entry None) a change to one of our devices, with
    the device's facts when the event carried them (`link`)."""

    present: bool
    entry: Entry | None = None
    detail: str = ""
    link: LinkFacts | None = None
    # Not an entry of ours (another route protocol, a dynamic neighbour, a
    # learned FDB entry), but keyed like one: drift only if it sits where we
    # believe one of ours is, i.e. somebody replaced ours with it.
    foreign: bool = False
    # The address family the event is about (4 or 6), when the monitor can
    # tell from the device (a bridge FDB entry carries no address); 0 when
    # it cannot, and then the entry's own addresses say.
    family: int = 0

    def family_version(self) -> int:
        """4 or 6, or 0 when neither the event nor its entry says."""
        if self.family or self.entry is None:
            return self.family
        return KIND_OF[type(self.entry)].family(self.entry)
