"""A lab host whose kernel is programmed the way flannel's vxlan backend
programs it, with plain iproute2 commands and no overlayd: an L3 VTEP
`flannel.<VNI>` holding the network address of its subnet as a /32, a `cni0`
bridge for its containers, and per peer a route via the peer subnet's
network address onlink, a permanent neighbour entry and an FDB entry.

It exists to prove that overlayd hosts and flannel hosts interoperate from
the same leases in etcd. It is programmed once, from the leases present when
it is added (flannel itself would keep following them).
"""

from __future__ import annotations

import random
from ipaddress import IPv4Network

from overlayd.config import parse_network_config
from overlayd.errors import LeaseError
from overlayd.lab import netns
from overlayd.lab.lab import PREFIX, Container, Lab
from overlayd.model import Lease, NetworkConfig
from overlayd.plan.ipam import gateway_address, pick_subnet
from overlayd.plan.leases import (
    config_key,
    parse_lease,
    parse_subnet_key,
    render_lease,
    subnet_key,
)
from overlayd.store.etcd import EtcdStore


def _random_mac(rng: random.Random) -> str:
    octets = [rng.randrange(256) for _ in range(6)]
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


def _cluster(lab: Lab) -> tuple[NetworkConfig, list[Lease]]:
    async def read(store: EtcdStore) -> tuple[bytes | None, dict[str, bytes]]:
        config, _ = await store.get(config_key(PREFIX))
        leases, _ = await store.get_prefix(f"{PREFIX}/subnets/")
        return config, leases

    config_raw, raw = lab.etcd(read)
    assert config_raw is not None
    leases: list[Lease] = []
    for key, value in raw.items():
        try:
            leases.append(parse_lease(parse_subnet_key(key, PREFIX), value))
        except LeaseError:
            continue
    return parse_network_config(config_raw), leases


def add_flannel_style_host(lab: Lab, host: int) -> Container:
    """Lease a subnet, build the host's devices, attach one container, and
    program the peers known at this moment."""
    ns = lab.host_ns(host)
    public_ip = lab.host_address(host)
    config, leases = _cluster(lab)
    subnet = pick_subnet(config, [p.subnet for p in leases])
    vni, port = config.backend.vni, config.backend.port
    mac = _random_mac(random.Random())
    lease = Lease(subnet=subnet, public_ip=public_ip, vni=vni, vtep_mac=mac)
    lab.etcd(lambda s: s.put(subnet_key(PREFIX, subnet), render_lease(lease)))

    lab.attach_host_namespace(host)
    vtep = f"flannel.{vni}"
    netns.ip(
        ns,
        "link",
        "add",
        vtep,
        "address",
        mac,
        "mtu",
        "1450",
        "type",
        "vxlan",
        "id",
        str(vni),
        "local",
        str(public_ip),
        "dev",
        "eth0",
        "dstport",
        str(port),
        "nolearning",
    )
    netns.ip(ns, "addr", "add", f"{subnet.network_address}/32", "dev", vtep)
    netns.ip(ns, "link", "set", vtep, "up")
    gateway = gateway_address(subnet)
    netns.ip(ns, "link", "add", "cni0", "mtu", "1450", "type", "bridge")
    netns.ip(ns, "addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", "cni0")
    netns.ip(ns, "link", "set", "cni0", "up")
    netns.in_ns(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    program_flannel_peers(lab, host)
    return lab.add_container_by_hand(host, 1, bridge="cni0", subnet=subnet, mtu=1450)


def program_flannel_peers(lab: Lab, host: int) -> None:
    """(Re)program a flannel-style host's entries for every other lease, as
    flannel's vxlan backend does: neighbour and FDB first, then the route."""
    ns, own_ip = lab.host_ns(host), lab.host_address(host)
    config, leases = _cluster(lab)
    vtep = f"flannel.{config.backend.vni}"
    for peer in leases:
        if peer.public_ip == own_ip:
            continue
        hop = peer.subnet.network_address
        netns.ip(
            ns,
            "neigh",
            "replace",
            str(hop),
            "lladdr",
            peer.vtep_mac,
            "dev",
            vtep,
            "nud",
            "permanent",
        )
        netns.sh(
            [
                "bridge",
                "-n",
                ns,
                "fdb",
                "replace",
                peer.vtep_mac,
                "dev",
                vtep,
                "dst",
                str(peer.public_ip),
                "self",
                "permanent",
            ]
        )
        netns.ip(ns, "route", "replace", str(peer.subnet), "via", str(hop), "dev", vtep, "onlink")


def flannel_subnet(lab: Lab, host: int) -> IPv4Network:
    """The subnet of a flannel-style host, read back from its cni0 bridge."""
    out = netns.ip(lab.host_ns(host), "-4", "-o", "addr", "show", "dev", "cni0")
    return IPv4Network(out.split()[3], strict=False)
