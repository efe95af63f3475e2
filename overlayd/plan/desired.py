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
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from overlayd.model import (
    VXLAN_OVERHEAD,
    BridgeFdb,
    DeviceSpec,
    EntrySet,
    Lease,
    Neighbour,
    NetworkConfig,
    Route,
    RouteKey,
    TunnelFdb,
    route_key,
)
from overlayd.plan.ipam import gateway_address


def stable_mac(role: str, subnet: IPv4Network, vni: int) -> str:
    """A locally administered unicast MAC that depends only on its inputs."""
    digest = bytearray(hashlib.sha256(f"{role}|{subnet}|{vni}".encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return ":".join(f"{octet:02x}" for octet in digest)


def vtep_name(vni: int) -> str:
    return f"ovl.{vni}"


def overlay_mtu(config: NetworkConfig, underlay_mtu: int) -> int:
    """The configured MTU if any, else the underlay's minus the VXLAN overhead."""
    if config.backend.mtu is not None:
        return config.backend.mtu
    return underlay_mtu - VXLAN_OVERHEAD


def device_spec(
    *,
    config: NetworkConfig,
    own: Lease,
    bridge: str,
    underlay_ifindex: int,
    underlay_mtu: int,
) -> DeviceSpec:
    return DeviceSpec(
        bridge=bridge,
        bridge_mac=stable_mac("bridge", own.subnet, own.vni),
        gateway=IPv4Interface((gateway_address(own.subnet), own.subnet.prefixlen)),
        vtep=vtep_name(own.vni),
        vtep_mac=own.vtep_mac,
        vni=own.vni,
        port=config.backend.port,
        local_ip=own.public_ip,
        underlay_ifindex=underlay_ifindex,
        mtu=overlay_mtu(config, underlay_mtu),
    )


def next_hop(subnet: IPv4Network) -> IPv4Address:
    """flannel's convention: the peer subnet's network address."""
    return subnet.network_address


# A peer's four entries, with their route and neighbour keys precomputed.
PeerEntries = tuple["Lease", Route, Neighbour, TunnelFdb, BridgeFdb, RouteKey, int]
EntryMemo = dict[int, PeerEntries]


def peer_entries(peer: Lease) -> PeerEntries:
    hop = next_hop(peer.subnet)
    return (
        peer,
        Route(dst=peer.subnet, gateway=hop),
        Neighbour(ip=hop, mac=peer.vtep_mac),
        TunnelFdb(mac=peer.vtep_mac, remote=peer.public_ip),
        BridgeFdb(mac=peer.vtep_mac),
        route_key(peer.subnet),
        int(hop),
    )


def desired_entries(peers: Iterable[Lease], *, memo: EntryMemo | None = None) -> EntrySet:
    """The route, neighbour and two FDB entries of every peer.

    `memo` (keyed by the lease object's id, checked by identity) lets a pass
    reuse the entries of leases it has seen before instead of building them
    again, which matters with thousands of peers."""
    routes: dict[RouteKey, Route] = {}
    neighbours: dict[int, Neighbour] = {}
    tunnel: dict[str, TunnelFdb] = {}
    bridge: dict[str, BridgeFdb] = {}
    fresh: EntryMemo = {}
    for peer in peers:
        found = memo.get(id(peer)) if memo is not None else None
        if found is None or found[0] is not peer:
            found = peer_entries(peer)
        fresh[id(peer)] = found
        _, route, neighbour, tunnel_fdb, bridge_fdb, rkey, nkey = found
        routes[rkey] = route
        neighbours[nkey] = neighbour
        tunnel[tunnel_fdb.mac] = tunnel_fdb
        bridge[bridge_fdb.mac] = bridge_fdb
    if memo is not None:
        memo.clear()
        memo.update(fresh)
    return EntrySet(routes=routes, neighbours=neighbours, tunnel_fdb=tunnel, bridge_fdb=bridge)
