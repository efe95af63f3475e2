"""A lab host whose kernel is programmed the way flannel's vxlan backend
programs it, with plain iproute2 commands and no overlayd, and whose lease
is written and read the way flannel writes and reads it (its own key
pattern and JSON here, not overlayd's parser): interop is proven against
flannel's format, not against overlayd's idea of it.

Per family the host has (IPv4 always; IPv6 when the cluster's config
enables it and the host is not made IPv4-only):

    flannel.<VNI>      vxlan id VNI local <PublicIP> dstport <Port> nolearning,
                       the IPv4 VtepMAC, <subnet network>/32 on it
    flannel-v6.<VNI>   vxlan id VNI local <PublicIPv6> dstport <Port> nolearning,
                       its own IPv6 VtepMAC, <v6 subnet network>/128 on it
    cni0               bridge for its containers, both subnets' gateways (.1, ::1)

and per peer lease that has the family (flannel's order: neighbour, FDB,
then the route, which would otherwise make the kernel solicit the next hop):

    neigh  <peer subnet network> lladdr <peer VtepMAC> dev <vtep> nud permanent
    fdb    <peer VtepMAC> dev <vtep> dst <peer PublicIP(v6)> self permanent
    route  <peer subnet> via <peer subnet network> dev <vtep> onlink

A peer whose lease has no IPv6 half gets IPv4 entries only, as flannel does.

Its lease is flannel's dual-stack one: key `10.244.1.0-24&fd00:10:244:1::-64`,
value `{"PublicIP":..,"PublicIPv6":..,"BackendType":"vxlan","BackendData":
{"VNI":..,"VtepMAC":..},"BackendV6Data":{"VNI":..,"VtepMAC":..}}` (Go's
json.Marshal of flannel's LeaseAttrs: that field order, no spaces,
`"PublicIPv6":null` and no BackendV6Data on an IPv4-only host).

It exists to prove that overlayd hosts and flannel hosts interoperate from
the same leases in etcd. It is programmed from the leases present when it is
added, and again on `program_flannel_peers` (flannel itself would keep
following them).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from overlayd.config import parse_network_config
from overlayd.lab import netns
from overlayd.lab.lab import PREFIX, Container, Lab
from overlayd.lab.topology import host_address6
from overlayd.model import IPV4, IPV6, Family, NetworkConfig
from overlayd.plan.ipam import pick_subnet
from overlayd.plan.leases import config_key, subnets_prefix
from overlayd.store.etcd import EtcdStore

# flannel's pkg/subnet ParseSubnetKey pattern (its dots are unescaped there;
# escaped here, which only refuses keys flannel would misread).
FLANNEL_KEY = re.compile(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")
UNDERLAY_MTU = 1500  # the lab's veths


@dataclass(frozen=True, slots=True)
class Half:
    """One family's half of a flannel lease: the subnet, where its tunnel
    ends and the VTEP's MAC there."""

    subnet: IPv4Network | IPv6Network
    public_ip: IPv4Address | IPv6Address
    vtep_mac: str


@dataclass(frozen=True, slots=True)
class FlannelLease:
    v4: Half
    v6: Half | None = None

    def half(self, family: Family) -> Half | None:
        return self.v6 if family.version == 6 else self.v4


def vtep_name(family: Family, vni: int) -> str:
    return f"flannel-v6.{vni}" if family.version == 6 else f"flannel.{vni}"


def flannel_key(lease: FlannelLease) -> str:
    """flannel's MakeSubnetKey: `10.244.1.0-24`, `&fd00:10:244:1::-64` added
    when the lease has an IPv6 subnet."""
    key = f"{lease.v4.subnet.network_address}-{lease.v4.subnet.prefixlen}"
    if lease.v6 is not None:
        key += f"&{lease.v6.subnet.network_address}-{lease.v6.subnet.prefixlen}"
    return f"{subnets_prefix(PREFIX)}{key}"


def flannel_value(lease: FlannelLease, vni: int) -> str:
    """Go's json.Marshal of flannel's LeaseAttrs for a vxlan lease."""
    attrs: dict[str, object] = {
        "PublicIP": str(lease.v4.public_ip),
        "PublicIPv6": str(lease.v6.public_ip) if lease.v6 is not None else None,
        "BackendType": "vxlan",
        "BackendData": {"VNI": vni, "VtepMAC": lease.v4.vtep_mac},
    }
    if lease.v6 is not None:  # `json:",omitempty"`
        attrs["BackendV6Data"] = {"VNI": vni, "VtepMAC": lease.v6.vtep_mac}
    return json.dumps(attrs, separators=(",", ":"))


def parse_flannel_lease(key: str, value: bytes) -> FlannelLease | None:
    """A lease as flannel reads it (its key pattern, LeaseAttrs' fields);
    None for anything flannel's vxlan backend would skip."""
    match = FLANNEL_KEY.search(key)
    try:
        attrs = json.loads(value)
        if match is None or attrs.get("BackendType") != "vxlan":
            return None
        v4 = Half(
            IPv4Network(f"{match[1]}/{match[2]}"),
            IPv4Address(attrs["PublicIP"]),
            str(attrs["BackendData"]["VtepMAC"]),
        )
        v6 = None
        # flannel: EnableIPv6 for a lease is "its key has an IPv6 subnet".
        if match[3] is not None:
            v6 = Half(
                IPv6Network(f"{match[3]}/{match[4]}"),
                IPv6Address(attrs["PublicIPv6"]),
                str(attrs["BackendV6Data"]["VtepMAC"]),
            )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return FlannelLease(v4, v6)


def _random_mac(rng: random.Random) -> str:
    octets = [rng.randrange(256) for _ in range(6)]
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


def _cluster(lab: Lab) -> tuple[NetworkConfig, list[FlannelLease]]:
    async def read(store: EtcdStore) -> tuple[bytes | None, dict[str, bytes]]:
        config, _ = await store.get(config_key(PREFIX))
        leases, _ = await store.get_prefix(subnets_prefix(PREFIX))
        return config, leases

    config_raw, raw = lab.etcd(read)
    if config_raw is None:
        raise netns.LabCommandError(f"lab {lab.name!r} has no network config in etcd")
    leases = [lease for k, v in raw.items() if (lease := parse_flannel_lease(k, v)) is not None]
    return parse_network_config(config_raw), leases


def vtep_mtu(family: Family) -> int:
    """The VTEP's MTU over the lab's 1500-byte underlay: 1450 over IPv4,
    1430 over IPv6. flannel asks for underlay - 50 for both devices and the
    kernel clamps the IPv6 one to underlay - 70 (flannel #1781 is the case
    where an explicit MTU gets past that); here each says what it gets."""
    return UNDERLAY_MTU - family.vxlan_overhead


def add_flannel_style_host(lab: Lab, host: int, *, ipv6: bool = True) -> Container:
    """Lease a subnet (and an IPv6 one in a dual-stack cluster, unless
    `ipv6` is off: an IPv4-only flannel, such as one from before
    dual-stack), build the host's devices, attach one container, and program
    the peers known at this moment."""
    ns = lab.host_ns(host)
    config, leases = _cluster(lab)
    rng = random.Random()
    subnet = pick_subnet(config, [s for p in leases if isinstance(s := p.v4.subnet, IPv4Network)])
    subnet6: IPv6Network | None = None
    if ipv6 and config.ipv6 is not None:
        taken6 = [
            s for p in leases if p.v6 is not None and isinstance(s := p.v6.subnet, IPv6Network)
        ]
        subnet6 = pick_subnet(config.ipv6, taken6)
    lease = FlannelLease(
        Half(subnet, lab.host_address(host), _random_mac(rng)),
        Half(subnet6, host_address6(host), _random_mac(rng)) if subnet6 is not None else None,
    )
    vni, port = config.backend.vni, config.backend.port
    value = flannel_value(lease, vni)
    lab.etcd(lambda s: s.put(flannel_key(lease), value))

    lab.attach_host_namespace(host, ipv6=lease.v6 is not None)
    halves = [(f, half) for f in (IPV4, IPV6) if (half := lease.half(f)) is not None]
    mtu = min(vtep_mtu(f) for f, _ in halves)  # the containers' fits every tunnel
    netns.ip(ns, "link", "add", "cni0", "mtu", str(mtu), "type", "bridge")
    for family, half in halves:
        _add_vtep(ns, family, vni, port, half)
        gateway = half.subnet.network_address + 1
        nodad = ["nodad"] if family.version == 6 else []
        cidr = f"{gateway}/{half.subnet.prefixlen}"
        netns.ip(ns, family.iproute2_flag, "addr", "add", cidr, "dev", "cni0", *nodad)
    netns.ip(ns, "link", "set", "cni0", "up")
    netns.in_ns(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    if subnet6 is not None:
        netns.in_ns(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
    program_flannel_peers(lab, host)
    return lab.add_container_by_hand(
        host, 1, bridge="cni0", subnet=subnet, mtu=mtu, subnet6=subnet6
    )


def _add_vtep(ns: str, family: Family, vni: int, port: int, own: Half) -> None:
    """flannel's newVXLANDevice and Configure(IPv6): the device, no router
    advertisements on it, the subnet's network address as a host address."""
    vtep = vtep_name(family, vni)
    netns.ip(
        ns,
        "link",
        "add",
        vtep,
        "address",
        own.vtep_mac,
        "mtu",
        str(vtep_mtu(family)),
        "type",
        "vxlan",
        "id",
        str(vni),
        "local",
        str(own.public_ip),
        "dev",
        "eth0",
        "dstport",
        str(port),
        "nolearning",
    )
    if family.version == 6:
        # Slashes: the device's name has a dot, which sysctl's dotted form splits.
        netns.in_ns(ns, "sysctl", "-q", "-w", f"net/ipv6/conf/{vtep}/accept_ra=0")
    host_prefix = own.subnet.max_prefixlen  # /32 or /128: no broadcast routes
    nodad = ["nodad"] if family.version == 6 else []
    address = f"{own.subnet.network_address}/{host_prefix}"
    netns.ip(ns, family.iproute2_flag, "addr", "add", address, "dev", vtep, *nodad)
    netns.ip(ns, "link", "set", vtep, "up")


def program_flannel_peers(lab: Lab, host: int) -> None:
    """(Re)program a flannel-style host's entries for every other lease, as
    flannel's vxlan backend does, per family the host and the peer both
    have: neighbour and FDB first, then the route."""
    ns, own_ip = lab.host_ns(host), lab.host_address(host)
    config, leases = _cluster(lab)
    own = next((p for p in leases if p.v4.public_ip == own_ip), None)
    if own is None:
        raise netns.LabCommandError(f"h{host} has no flannel lease in etcd")
    for peer in leases:
        if peer.v4.public_ip == own_ip:
            continue
        for family in (IPV4, IPV6):
            half = peer.half(family)
            if half is None or own.half(family) is None:
                continue
            _program_peer(ns, vtep_name(family, config.backend.vni), family, half)


def _program_peer(ns: str, vtep: str, family: Family, peer: Half) -> None:
    hop = str(peer.subnet.network_address)
    netns.ip(
        ns,
        family.iproute2_flag,
        "neigh",
        "replace",
        hop,
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
    netns.ip(
        ns,
        family.iproute2_flag,
        "route",
        "replace",
        str(peer.subnet),
        "via",
        hop,
        "dev",
        vtep,
        "onlink",
    )


def flannel_subnet(lab: Lab, host: int) -> IPv4Network:
    """The subnet of a flannel-style host, read back from its cni0 bridge."""
    out = netns.ip(lab.host_ns(host), "-4", "-o", "addr", "show", "dev", "cni0")
    return IPv4Network(out.split()[3], strict=False)
