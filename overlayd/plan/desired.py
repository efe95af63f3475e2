"""Desired kernel state: what this host's devices and per-peer entries must be.

How the data plane works (host A, subnet 10.244.1.0/24; peer B, subnet
10.244.2.0/24 at public IP 192.0.2.12):

    ovl0   bridge with 10.244.1.1/24; containers hang off it
    ovl.1  the VTEP (vxlan id 1, local = A's public IP, learning off), a port
           of ovl0; its MAC is A's VtepMAC, advertised in A's lease
    route  10.244.2.0/24 via 10.244.2.0 dev ovl0 onlink
    neigh  10.244.2.0 lladdr <B's VtepMAC> dev ovl0 permanent
    fdb    <B's VtepMAC> dev ovl.1 master static           bridge: out of the VTEP port
    fdb    <B's VtepMAC> dev ovl.1 dst 192.0.2.12 self permanent  VTEP: to host B

A packet from a container on A to one on B is routed by A onto ovl0 with
B's VtepMAC as destination; the bridge sends it out of the VTEP port, the
VTEP encapsulates it to B. On B the frame's destination is B's own VTEP MAC,
so B's bridge hands it to B's IP stack, which routes it to the container.
The next hop is the peer subnet's network address and the MAC is the peer's
VtepMAC exactly as flannel's vxlan backend does, so hosts programmed by
flannel and by overlayd reach each other from the same leases. Entries are
per peer host, not per container.

Both MACs are derived from the subnet, so they stay the same for a lease
across restarts and reboots and peers never see them change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network

from overlayd.model import (
    IPV4,
    IPV6,
    BridgeFdb,
    DeviceSpec,
    EntrySet,
    Family,
    IPAddress,
    IPNetwork,
    Lease,
    Neighbour,
    NetworkConfig,
    Peer,
    Route,
    RouteKey,
    TunnelFdb,
    route_key,
)
from overlayd.plan.ipam import gateway_address


def stable_mac(role: str, subnet: IPv4Network | IPv6Network, vni: int) -> str:
    """A locally administered unicast MAC that depends only on its inputs."""
    digest = bytearray(hashlib.sha256(f"{role}|{subnet}|{vni}".encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return ":".join(f"{octet:02x}" for octet in digest)


# The VTEP is named VTEP_PREFIX + VNI, flannel-style (flannel.<VNI>).
VTEP_PREFIX = "ovl."


def vtep_name(vni: int) -> str:
    return f"{VTEP_PREFIX}{vni}"


# The IPv6 VTEP, flannel-style (flannel-v6.<VNI>): "ovl-v6." and a VNI of up
# to eight digits fit IFNAMSIZ.
VTEP6_PREFIX = "ovl-v6."


def vtep6_name(vni: int) -> str:
    return f"{VTEP6_PREFIX}{vni}"


def max_overlay_mtu(config: NetworkConfig, underlay_mtu: int, family: Family = IPV4) -> int:
    """The largest MTU containers can have over an underlay of `family`:
    host-gw adds no header."""
    if config.backend.type == "host-gw":
        return underlay_mtu
    return underlay_mtu - family.vxlan_overhead


def overlay_mtu(config: NetworkConfig, underlay_mtu: int, family: Family = IPV4) -> int:
    """The configured MTU if any, else the largest that fits."""
    if config.backend.mtu is not None:
        return config.backend.mtu
    return max_overlay_mtu(config, underlay_mtu, family)


def tunnel_families(config: NetworkConfig, own: Lease) -> tuple[Family, ...]:
    """The underlay families this host's tunnels use: both VTEPs share the
    bridge, so the containers' MTU must fit the costlier (IPv6's 70 bytes,
    not flannel's 50: flannel #1781)."""
    return (IPV4, IPV6) if config.ipv6 is not None and own.has_ipv6 else (IPV4,)


def dual_stack_mtu(config: NetworkConfig, underlay_mtu: int, own: Lease) -> int:
    """The containers' MTU: the configured one, else the largest that fits
    every tunnel this host uses."""
    return min(overlay_mtu(config, underlay_mtu, f) for f in tunnel_families(config, own))


def device_spec(
    *,
    config: NetworkConfig,
    own: Lease,
    bridge: str,
    underlay_ifindex: int,
    underlay_mtu: int,
    underlay: str = "",
) -> DeviceSpec:
    vxlan = config.backend.type == "vxlan"
    dual = IPV6 in tunnel_families(config, own)
    subnet6 = own.ipv6_subnet if dual else None
    return DeviceSpec(
        bridge=bridge,
        bridge_mac=stable_mac("bridge", own.subnet, own.vni),
        gateway=IPv4Interface((gateway_address(own.subnet), own.subnet.prefixlen)),
        vtep=vtep_name(own.vni) if vxlan else "",
        vtep_mac=own.vtep_mac,
        vni=own.vni,
        port=config.backend.port,
        local_ip=own.public_ip,
        underlay_ifindex=underlay_ifindex,
        mtu=dual_stack_mtu(config, underlay_mtu, own),
        underlay=underlay,
        gateway6=(
            IPv6Interface((subnet6.network_address + 1, subnet6.prefixlen))
            if subnet6 is not None
            else None
        ),
        vtep6=vtep6_name(own.vni) if vxlan and dual else "",
        vtep6_mac=own.vtep_mac_v6 if vxlan and dual else "",
        local_ip6=own.public_ipv6 if dual else None,
    )


def next_hop(subnet: IPNetwork) -> IPAddress:
    """flannel's convention, for both families: the peer subnet's network
    address (for IPv6 the subnet-router anycast address, which is only a
    next hop with a permanent neighbour here, never a destination)."""
    return subnet.network_address


@dataclass(frozen=True, slots=True)
class Routing:
    """How peers are reached: through the tunnel (vxlan), straight over the
    underlay (host-gw), or, with DirectRouting, straight when the peer is on
    the underlay's link and through the tunnel otherwise."""

    backend: str = "vxlan"
    direct_routing: bool = False
    onlink: tuple[IPNetwork, ...] = ()  # the underlay's connected networks (one family)

    @classmethod
    def of(cls, config: NetworkConfig, onlink: Iterable[IPNetwork] = ()) -> Routing:
        return cls(config.backend.type, config.backend.direct_routing, tuple(onlink))


@dataclass(frozen=True, slots=True)
class PeerPlan:
    """The peers of one family by how they are reached (a `Lease` is the
    IPv4 view of a peer, a `FamilyPeer` the IPv6 one)."""

    tunneled: Sequence[Peer]
    direct: Sequence[Peer]
    unreachable: Sequence[Peer]  # host-gw peers off the underlay's link: no route


@dataclass(frozen=True, slots=True)
class PeerMoves:
    """How a plan kept across passes got its peers from the plan `before`:
    the peers that left and joined, each with whether it is reached
    directly (a peer that gets no route is in neither)."""

    before: PeerPlan
    left: tuple[tuple[Peer, bool], ...]
    joined: tuple[tuple[Peer, bool], ...]


def plan_peers(peers: Sequence[Peer], routing: Routing) -> PeerPlan:
    if routing.backend == "vxlan" and not routing.direct_routing:
        return PeerPlan(tuple(peers), (), ())
    ranges = [(int(n.network_address), int(n.broadcast_address)) for n in routing.onlink]
    tunneled: list[Peer] = []
    direct: list[Peer] = []
    unreachable: list[Peer] = []
    for peer in peers:
        address = int(peer.public_ip)
        if any(first <= address <= last for first, last in ranges):
            direct.append(peer)
        elif routing.backend == "vxlan":
            tunneled.append(peer)
        else:
            # A route via an address that is not on our link would be
            # refused, or worse, black-hole the subnet: no route at all.
            unreachable.append(peer)
    return PeerPlan(tuple(tunneled), tuple(direct), tuple(unreachable))


# A peer's entries (four through the tunnel, one route when direct), with the
# route and neighbour keys precomputed.
PeerEntries = tuple[
    Peer, bool, Route, "Neighbour | None", "TunnelFdb | None", "BridgeFdb | None", RouteKey, int
]
EntryMemo = dict[int, PeerEntries]


def peer_entries(peer: Peer, *, direct: bool = False) -> PeerEntries:
    if direct:
        route = Route(dst=peer.subnet, gateway=peer.public_ip, direct=True)
        return (peer, True, route, None, None, None, route_key(peer.subnet), 0)
    hop = next_hop(peer.subnet)
    return (
        peer,
        False,
        Route(dst=peer.subnet, gateway=hop),
        Neighbour(ip=hop, mac=peer.vtep_mac),
        TunnelFdb(mac=peer.vtep_mac, remote=peer.public_ip),
        BridgeFdb(mac=peer.vtep_mac),
        route_key(peer.subnet),
        int(hop),
    )


def desired_entries(
    peers: Iterable[Peer], *, direct: Iterable[Peer] = (), memo: EntryMemo | None = None
) -> EntrySet:
    """The route, neighbour and two FDB entries of every tunneled peer, and
    the one route of every direct peer.

    `memo` (keyed by the lease object's id, checked by identity) lets a pass
    reuse the entries of leases it has seen before instead of building them
    again, which matters with thousands of peers."""
    routes: dict[RouteKey, Route] = {}
    neighbours: dict[int, Neighbour] = {}
    tunnel: dict[str, TunnelFdb] = {}
    bridge: dict[str, BridgeFdb] = {}
    fresh: EntryMemo = {}
    for is_direct, group in ((False, peers), (True, direct)):
        for peer in group:
            found = memo.get(id(peer)) if memo is not None else None
            if found is None or found[0] is not peer or found[1] is not is_direct:
                found = peer_entries(peer, direct=is_direct)
            fresh[id(peer)] = found
            _, _, route, neighbour, tunnel_fdb, bridge_fdb, rkey, nkey = found
            routes[rkey] = route
            if neighbour is not None and tunnel_fdb is not None and bridge_fdb is not None:
                neighbours[nkey] = neighbour
                tunnel[tunnel_fdb.mac] = tunnel_fdb
                bridge[bridge_fdb.mac] = bridge_fdb
    if memo is not None:
        memo.clear()
        memo.update(fresh)
    return EntrySet(routes=routes, neighbours=neighbours, tunnel_fdb=tunnel, bridge_fdb=bridge)
