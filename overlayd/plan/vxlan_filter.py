"""The VXLAN allow-list, rendered as data: which sources may send this host
VXLAN, and the nftables objects that say so.

The kernel's VXLAN socket takes any UDP datagram to the VXLAN port, from
anyone, and the VTEP hands the frame inside to the bridge: without a
filter, any host that can reach us could put frames on the containers'
bridge with any source address. So overlayd keeps, in its own table
(`ip overlayd`, beside the egress chains):

    counter vxlan_dropped   named: rewriting the chain keeps its count
    set     vxlan_peers     type ipv4_addr: the public IPs of the peers we
                            tunnel to (the ones with FDB entries)
    chain   vxlan_in        type filter hook prerouting priority raw,
                            so before conntrack and before the socket:
        ip daddr <our public IP> udp dport <Port> @th,96,24 <VNI>
            ip saddr @vxlan_peers accept
        udp dport <Port> fib daddr type { local, broadcast, multicast }
            counter name "vxlan_dropped" drop

`@th,96,24` is the VNI: 24 bits at byte 12 of the transport header (8 of
UDP, then the VXLAN flags and reserved bytes). The drop rule covers every
address the host receives on, not only the public IP, because the VXLAN
socket listens on all of them: a frame sent to the bridge's gateway
address, to a broadcast or multicast address, or to 127.0.0.1 reaches the
VTEP just the same (checked on this kernel). Peers only ever send to our
public IP, so the accept rule names it.

Peers come and go as set elements, one `nft -f` transaction per change,
whose size depends on what changed; only a change of the rules themselves
(our public IP, the port, the VNI) or somebody's edit rewrites the chain,
and then only the chain.

Everything here is parameterised by the address family (`Family`): the
IPv6 VTEP (dual-stack: it sends from the underlay's IPv6 address, to the
peers' PublicIPv6) gets the same objects in our `ip6` table, with an
`ipv6_addr` set of the peers' IPv6 addresses, accepting VXLAN to our
DeviceSpec.local_ip6 and dropping any other VXLAN to an address of ours.
The two families' lists are kept by two instances of the same manager, one
transaction each: a peer's IPv4 and IPv6 addresses are independent
elements, each in place before that family's FDB entry for the peer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from overlayd.model import IPV4, DeviceSpec, Family, IPAddress
from overlayd.plan.desired import PeerPlan
from overlayd.plan.egress import TABLE
from overlayd.plan.nftables import ObjectKey, nft_family, table_text

SET = "vxlan_peers"
CHAIN = "vxlan_in"
COUNTER = "vxlan_dropped"
ACCEPT_COMMENT = "VXLAN from a current peer"
DROP_COMMENT = "any other VXLAN to this host"
# Our objects in the table, in the order they are listed and created.
KEYS: tuple[ObjectKey, ...] = (f"counter {COUNTER}", f"set {SET}", f"chain {CHAIN}")


@dataclass(frozen=True, slots=True)
class FilterSpec:
    """What the rules depend on: our public IP (of the family), the VXLAN
    port and the VNI."""

    local_ip: IPAddress
    port: int
    vni: int
    family: Family = IPV4

    @property
    def table_family(self) -> str:
        return nft_family(self.family)

    @property
    def address_type(self) -> str:
        return "ipv4_addr" if self.family.version == 4 else "ipv6_addr"

    @property
    def match(self) -> str:
        """nft's name for the network header's fields (`ip saddr`, `ip6 saddr`)."""
        return nft_family(self.family)


def filter_spec(spec: DeviceSpec, family: Family = IPV4) -> FilterSpec | None:
    """The filter this host needs for `family`'s VTEP; None without one
    (host-gw: no VXLAN; no IPv6 VTEP without IPv6)."""
    local = spec.local_ip6 if family.version == 6 else spec.local_ip
    if not spec.vtep_for(family) or local is None:
        return None
    return FilterSpec(local_ip=local, port=spec.port, vni=spec.vni, family=family)


def allowed_sources(peers: PeerPlan) -> frozenset[IPAddress]:
    """The tunnelled peers' public IPs: direct (host-gw, DirectRouting)
    peers send no VXLAN and get no element."""
    return frozenset(peer.public_ip for peer in peers.tunneled)


def _rules(f: FilterSpec) -> list[str]:
    return [
        f"{f.match} daddr {f.local_ip} udp dport {f.port} @th,96,24 {f.vni:#x}"
        f' {f.match} saddr @{SET} accept comment "{ACCEPT_COMMENT}"',
        f"udp dport {f.port} fib daddr type {{ local, broadcast, multicast }}"
        f' counter name "{COUNTER}" drop comment "{DROP_COMMENT}"',
    ]


def _hook() -> str:
    return "type filter hook prerouting priority raw; policy accept;"


def set_block(f: FilterSpec) -> str:
    """The set's definition as `nft -t` lists it."""
    return f"\tset {SET} {{\n\t\ttype {f.address_type}\n\t}}"


def render_objects(f: FilterSpec) -> str:
    """Our objects as `nft -t list table` prints them (counter without its
    values, set without its elements; see plan/nftables.py)."""
    blocks = [
        f"\tcounter {COUNTER} {{\n\t}}",
        set_block(f),
        "\n".join(
            [f"\tchain {CHAIN} {{", f"\t\t{_hook()}", *(f"\t\t{r}" for r in _rules(f)), "\t}"]
        ),
    ]
    return table_text(f.table_family, TABLE, blocks)


def render_install(f: FilterSpec, *, recreate_set: bool = False) -> str:
    """An `nft -f` script that puts the counter, set and chain in place in one
    transaction. The counter and the set are only created when missing (an
    `add` of an existing one changes nothing: the count and the elements
    stay); the chain is deleted and made again, so whatever was done to it
    by hand goes, and no packet sees it half made. `recreate_set`: the set
    exists with another definition and must be made again (its elements
    are then re-added by the manager)."""
    where = f"{f.table_family} {TABLE}"
    lines = [
        f"table {where}",
        f"add counter {where} {COUNTER}",
        f"add chain {where} {CHAIN}",  # so that the delete below cannot fail
        f"delete chain {where} {CHAIN}",
    ]
    if recreate_set:
        lines.append(f"delete set {where} {SET}")
    lines += [
        f"add set {where} {SET} {{ type {f.address_type}; }}",
        f"add chain {where} {CHAIN} {{ {_hook()} }}",
        *(f"add rule {where} {CHAIN} {rule}" for rule in _rules(f)),
    ]
    return "\n".join(lines) + "\n"


def render_removal(present: Iterable[ObjectKey], family: Family = IPV4) -> str:
    """An `nft -f` script deleting those of our objects that exist: the
    chain first, since it refers to the set and the counter."""
    where = f"{nft_family(family)} {TABLE}"
    keys = set(present)
    lines = [
        f"delete {key.split()[0]} {where} {key.split()[1]}" for key in reversed(KEYS) if key in keys
    ]
    return "\n".join(lines) + "\n" if lines else ""


@dataclass(frozen=True, slots=True)
class ElementChanges:
    add: tuple[IPAddress, ...]
    delete: tuple[IPAddress, ...]

    def __bool__(self) -> bool:
        return bool(self.add or self.delete)


def element_changes(desired: frozenset[IPAddress], actual: frozenset[IPAddress]) -> ElementChanges:
    """What turns `actual` into `desired`, each part sorted (stable scripts)."""
    return ElementChanges(tuple(sorted(desired - actual)), tuple(sorted(actual - desired)))


def render_elements(f: FilterSpec, changes: ElementChanges) -> str:
    """One `nft -f` transaction: at most one add and one delete statement,
    each naming only the elements that change."""
    where = f"{f.table_family} {TABLE} {SET}"
    lines = []
    if changes.add:
        lines.append(f"add element {where} {{ {', '.join(map(str, changes.add))} }}")
    if changes.delete:
        lines.append(f"delete element {where} {{ {', '.join(map(str, changes.delete))} }}")
    return "\n".join(lines) + "\n" if lines else ""
