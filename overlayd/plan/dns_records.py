"""DNS records: what the per-host DNS responder (surfaces/dns.py) answers,
as a pure projection of services, their backends and the cluster's
endpoints. No wire format here (the server uses dnspython for that) and no
I/O: one dict from a lowercased owner name to what the name holds, built in
one pass and never changed after, so that the daemon can rebuild it on
every change and swap the server's reference atomically.

Under the domain D (default `overlay.internal`):

    <service>.D                  A/AAAA  the service's VIPs
    tasks.<service>.D            A/AAAA  its backends' addresses (may be none)
    _<port>._<proto>.<service>.D SRV     0 100 <port> <service>.D, for each
                                         named port (as Kubernetes does)
    <container>.D                A/AAAA  the endpoint's addresses
    <reversed address>.in-addr.arpa / .ip6.arpa
                                 PTR     <service>.D for a VIP,
                                         <container>.D for an endpoint address

Decisions, where the inputs allow more than one reading:
- A name that is not a valid DNS label (RFC 1123: letters, digits, inner
  hyphens, at most 63; Docker allows `_` and `.` in container names) gets no
  record; the rest of its service or endpoint is still used.
- A service and a container with the same name: the service keeps the name
  (a stable VIP is what a client wants); the container still has its PTR.
- Two endpoints with the same name (the same container name on two
  hosts): the name holds both endpoints' addresses, as Docker swarm answers.
- Addresses are kept in the order given (a service's backends are sorted
  by endpoint key), not sorted: sorting 10,000 names' addresses at every
  rebuild costs more than it is worth, and clients shuffle anyway.
- `tasks.<service>` with no backends exists with no addresses (NOERROR, no
  answer), because the service exists; the same for an address family the
  name has no address of.
- Names between the domain and a record (`_tcp.<service>.D`, D itself)
  exist with no records (RFC 8020: an empty non-terminal is not NXDOMAIN).
- `reverse_zones`: networks (the cluster and service networks) whose
  reverse names the responder answers itself, NXDOMAIN for an address
  without a record, instead of asking the upstream resolvers; other
  reverse names without a record are not ours.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from types import MappingProxyType

from overlayd.model import IPAddress, IPNetwork
from overlayd.plan.policy_model import Endpoint
from overlayd.plan.service_model import Service

DEFAULT_DOMAIN = "overlay.internal"
# Short, so that a departed endpoint does not linger in clients' caches;
# CoreDNS's kubernetes plugin answers with 5 s too.
DEFAULT_TTL = 5
# SRV priority and weight, as CoreDNS writes them for a service.
SRV_PRIORITY = 0
SRV_WEIGHT = 100
TASKS_LABEL = "tasks"
MAX_NAME_LENGTH = 253  # text form, without the trailing dot
# Room under the domain for `tasks.<63-character service>.`.
MAX_DOMAIN_LENGTH = MAX_NAME_LENGTH - len(TASKS_LABEL) - 65

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def valid_label(text: str) -> bool:
    """One hostname label (RFC 1123), in any case."""
    return _LABEL.fullmatch(text.lower()) is not None


def normalize(name: str) -> str:
    """The key a name is looked up by: lowercase, no trailing dot."""
    return name.lower().rstrip(".")


def reverse_name(address: IPAddress) -> str:
    """`1.0.96.10.in-addr.arpa`, or the 32 nibbles of an IPv6 address."""
    return address.reverse_pointer


def address_of_reverse_name(name: str) -> IPAddress | None:
    """The address a full-length reverse name stands for (`name` already
    normalized); None for any other name, a partial one included."""
    if name.endswith(".in-addr.arpa"):
        labels = name[: -len(".in-addr.arpa")].split(".")
        if len(labels) != 4 or not all(
            label.isdigit() and len(label) <= 3 and int(label) < 256 and str(int(label)) == label
            for label in labels
        ):
            return None
        return IPv4Address(".".join(reversed(labels)))
    if name.endswith(".ip6.arpa"):
        labels = name[: -len(".ip6.arpa")].split(".")
        if len(labels) != 32 or not all(
            len(label) == 1 and label in "0123456789abcdef" for label in labels
        ):
            return None
        return IPv6Address(int("".join(reversed(labels)), 16))
    return None


@dataclass(frozen=True, slots=True)
class Srv:
    priority: int
    weight: int
    port: int
    target: str  # normalized


@dataclass(frozen=True, slots=True)
class NameRecords:
    """What one name holds; all empty for a name that exists without
    records (an empty non-terminal, a service without backends)."""

    addresses: tuple[IPAddress, ...] = ()  # both families, in the order given
    srv: tuple[Srv, ...] = ()
    ptr: tuple[str, ...] = ()  # normalized target names, sorted


EMPTY = NameRecords()


PointerKey = int | bytes


def pointer_key(address: IPAddress) -> PointerKey:
    """The key of an address in DnsRecords.pointers: an IPv4 address's
    integer, an IPv6 address's 16 bytes. Not the IPAddress itself: its hash
    (the integer modulo 2**61 - 1) collides wholesale for IPv6 addresses
    that differ in a /64 subnet id and the host part (10,000 such addresses,
    562 distinct hashes), which made this map five times slower to build."""
    return int(address) if isinstance(address, IPv4Address) else address.packed


@dataclass(frozen=True, slots=True)
class DnsRecords:
    """Every name the responder answers for, in plain maps built once:
    forward names by normalized name, reverse names by the address they
    stand for (so that a rebuild never spells out 32-nibble names it may
    never be asked). A name exists when it is a key of `addresses` or
    `srv` (empty non-terminals and the apex are keys of `addresses` with no
    address)."""

    domain: str  # normalized
    ttl: int
    addresses: Mapping[str, tuple[IPAddress, ...]]
    srv: Mapping[str, tuple[Srv, ...]]
    pointers: Mapping[PointerKey, tuple[str, ...]]  # normalized targets
    reverse_zones: tuple[IPNetwork, ...] = ()
    skipped: tuple[str, ...] = field(default=(), compare=False)  # names given no record

    def lookup(self, name: str) -> NameRecords | None:
        """What `name` (any case, trailing dot or not) holds; None when it
        does not exist here."""
        key = normalize(name)
        found = self.addresses.get(key)
        if found is not None:
            return NameRecords(addresses=found) if found else EMPTY
        srv = self.srv.get(key)
        if srv is not None:
            return NameRecords(srv=srv)
        if key.endswith(".arpa"):
            address = address_of_reverse_name(key)
            if address is not None:
                targets = self.pointers.get(pointer_key(address))
                if targets is not None:
                    return NameRecords(ptr=targets)
        return None

    def names(self) -> set[str]:
        """Every forward name that exists (for tests and diagnosis)."""
        return set(self.addresses) | set(self.srv)

    def authoritative(self, name: str) -> bool:
        """Whether a name without records is known not to exist (NXDOMAIN
        from us) rather than someone else's to answer."""
        key = normalize(name)
        if key == self.domain or key.endswith("." + self.domain):
            return True
        if not self.reverse_zones:
            return False
        address = address_of_reverse_name(key)
        return address is not None and any(address in net for net in self.reverse_zones)


def validate_domain(domain: str) -> str:
    """The normalized domain; ValueError unless it is one or more valid
    labels."""
    key = normalize(domain)
    if not key or len(key) > MAX_DOMAIN_LENGTH or not all(map(valid_label, key.split("."))):
        raise ValueError(
            f"DNS domain {domain!r} is not a dotted list of hostname labels"
            f" of at most {MAX_DOMAIN_LENGTH} characters"
        )
    if key == "arpa" or key.endswith(".arpa"):
        raise ValueError(f"DNS domain {domain!r} is inside the reverse-mapping tree")
    return key


def build_records(
    services: Iterable[Service],
    backends: Mapping[str, Sequence[Endpoint]],
    endpoints: Iterable[Endpoint],
    *,
    domain: str = DEFAULT_DOMAIN,
    ttl: int = DEFAULT_TTL,
    reverse_zones: Sequence[IPNetwork] = (),
) -> DnsRecords:
    """The records for a cluster: `backends` by service name (what
    service_model.backends_by_service gives), `endpoints` all of the
    cluster's. Linear in the inputs, and cheap per endpoint (one dict entry
    for its name, one per address for PTR), since the daemon rebuilds on
    every change."""
    zone = validate_domain(domain)
    suffix = "." + zone
    skipped: list[str] = []
    addresses: dict[str, tuple[IPAddress, ...]] = {zone: ()}
    pointers: dict[PointerKey, tuple[str, ...]] = {}
    shared_pointers: set[PointerKey] = set()
    srv: dict[str, list[Srv]] = {}

    def point(address: IPAddress, name: str) -> None:
        key = int(address) if isinstance(address, IPv4Address) else address.packed
        targets = pointers.get(key)
        if targets is None:
            pointers[key] = (name,)
        else:
            pointers[key] = (*targets, name)
            shared_pointers.add(key)

    for service in services:
        label = service.name.lower()
        if not valid_label(label):
            skipped.append(service.name)
            continue
        name = label + suffix
        addresses[name] = service.vips
        for vip in service.vips:
            point(vip, name)
        # In the order of the backends (service_model.backends sorts them).
        addresses[f"{TASKS_LABEL}.{name}"] = tuple(
            a for endpoint in backends.get(service.name, ()) for a in endpoint.addresses
        )
        for port in service.ports:
            if not port.name:
                continue
            owner = f"_{port.name.lower()}._{port.protocol.value.lower()}.{name}"
            if not valid_label(port.name) or len(owner) > MAX_NAME_LENGTH:
                skipped.append(f"{service.name}/{port.name}")
                continue
            srv.setdefault(owner, []).append(Srv(SRV_PRIORITY, SRV_WEIGHT, port.port, name))
    services_named = set(addresses)

    # The hot loop (one pass per endpoint, 10,000 of them at every change):
    # an endpoint's address tuple is used as it is; a name several
    # endpoints share gets their addresses in the order given.
    for endpoint in endpoints:
        label = endpoint.name.lower()
        if not valid_label(label):
            skipped.append(endpoint.name)
            continue
        name = label + suffix
        for address in endpoint.addresses:
            point(address, name)
        if name in services_named:
            continue
        found = addresses.get(name)
        addresses[name] = endpoint.addresses if found is None else found + endpoint.addresses

    for key in shared_pointers:
        pointers[key] = tuple(sorted(set(pointers[key])))
    names_srv: dict[str, tuple[Srv, ...]] = {}
    for name, records in srv.items():
        names_srv[name] = tuple(sorted(set(records), key=lambda s: s.port))
        # The empty non-terminal between the SRV owner and the service.
        addresses.setdefault(name.split(".", 1)[1], ())
    return DnsRecords(
        domain=zone,
        ttl=ttl,
        addresses=MappingProxyType(addresses),
        srv=MappingProxyType(names_srv),
        pointers=MappingProxyType(pointers),
        reverse_zones=tuple(reverse_zones),
        skipped=tuple(skipped),
    )
