"""Network policy and endpoint values: what a policy document and an
endpoint registration mean once validated (Kubernetes NetworkPolicy
semantics, for containers of any engine).

Parsing untrusted documents into these types is plan/policy.py's job, the
verdict for a packet too; rendering them into nftables is
plan/policy_rules.py's. Everything here is an immutable value with the one
piece of behaviour every part needs: whether a selector selects a set of
labels.

Keys under overlayd's own prefix (`/overlayd` by default, never flannel's):

    <own>/endpoints/<host>/<id>   an endpoint; <host> is the flannel subnet
                                  id of the host's lease ("10.244.1.0-24"),
                                  <id> the container (CNI) or endpoint
                                  (Docker) id; bound to the host's etcd lease
    <own>/policies/<name>         a policy document (canonical JSON)
    <own>/status/<host>           the etcd revision the host has enforced
"""

from __future__ import annotations

import enum
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from overlayd.model import IPAddress, IPNetwork

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


class Operator(enum.Enum):
    """matchExpressions operators, spelled as Kubernetes spells them."""

    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()  # empty for Exists and DoesNotExist

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator is Operator.IN:
            return labels.get(self.key) in self.values
        if self.operator is Operator.NOT_IN:
            # Kubernetes: NotIn also selects an object without the key.
            return labels.get(self.key) not in self.values
        if self.operator is Operator.EXISTS:
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """matchLabels and matchExpressions, ANDed; the empty selector selects
    every endpoint."""

    match_labels: tuple[tuple[str, str], ...] = ()  # sorted by key
    match_expressions: tuple[Requirement, ...] = ()  # sorted by (key, operator, values)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in self.match_labels) and all(
            requirement.matches(labels) for requirement in self.match_expressions
        )

    def canonical(self) -> str:
        """A stable text for the selector: equal selectors, however written,
        give the same text (and share one nftables set)."""
        labels = ",".join(f"{k}={v}" for k, v in self.match_labels)
        expressions = ",".join(
            f"{r.key} {r.operator.value} ({','.join(sorted(r.values))})"
            for r in self.match_expressions
        )
        return f"{{{labels}}}{{{expressions}}}"


class Protocol(enum.Enum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


@dataclass(frozen=True, slots=True)
class PortRange:
    """One `ports` entry: a protocol, and a port or a range of ports (`port`
    and `endPort`); no port means every port of the protocol."""

    protocol: Protocol = Protocol.TCP
    first: int | None = None
    last: int | None = None  # == first for a single port

    def matches(self, protocol: Protocol, port: int) -> bool:
        if protocol is not self.protocol:
            return False
        if self.first is None or self.last is None:
            return True
        return self.first <= port <= self.last


@dataclass(frozen=True, slots=True)
class SelectorPeer:
    """Endpoints whose labels the selector selects."""

    selector: LabelSelector


@dataclass(frozen=True, slots=True)
class IpBlock:
    """Addresses in `cidr` but in none of `excepts` (all of cidr's family,
    each inside cidr)."""

    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    def contains(self, address: IPAddress) -> bool:
        if address.version != self.cidr.version or address not in self.cidr:
            return False
        return not any(address in block for block in self.excepts)


PolicyPeer = SelectorPeer | IpBlock


@dataclass(frozen=True, slots=True)
class Rule:
    """One ingress or egress rule. `peers` None: from (or to) anywhere, as a
    missing or empty `from`/`to`; `ports` None: every port and protocol."""

    peers: tuple[PolicyPeer, ...] | None = None
    ports: tuple[PortRange, ...] | None = None


class Direction(enum.Enum):
    INGRESS = "Ingress"
    EGRESS = "Egress"


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy. `types`: the directions it isolates the selected
    endpoints in (policyTypes; by Kubernetes' default Ingress, plus Egress
    when the document has egress rules). A direction in `types` with no
    rules allows nothing in that direction."""

    name: str
    selector: LabelSelector
    types: frozenset[Direction]
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()

    def rules(self, direction: Direction) -> tuple[Rule, ...]:
        return self.ingress if direction is Direction.INGRESS else self.egress


@dataclass(frozen=True, order=True, slots=True)
class MacAddress:
    """An Ethernet address, written as nft and iproute2 write it (six
    lowercase hex pairs joined by colons). An int underneath, like the
    ipaddress types, so that set elements of every type sort alike."""

    value: int

    @classmethod
    def parse(cls, text: str) -> MacAddress:
        """ValueError unless `text` is six hex pairs joined by colons."""
        lowered = text.lower()
        if not _MAC.fullmatch(lowered):
            raise ValueError(f"{text!r} is not a MAC address like 0a:58:0a:f4:01:02")
        return cls(int(lowered.replace(":", ""), 16))

    @property
    def unicast(self) -> bool:
        """The group bit (the first octet's lowest) clear, and not all zeros."""
        return self.value != 0 and not (self.value >> 40) & 1

    def __int__(self) -> int:
        return self.value

    def __str__(self) -> str:
        return ":".join(f"{(self.value >> shift) & 0xFF:02x}" for shift in range(40, -8, -8))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A container the cluster knows: registered by the host that runs it
    (overlay-cni on ADD, the Docker plugin on Join), removed on DEL, gone
    with the host's etcd lease."""

    key: str  # its etcd key
    id: str  # container or endpoint id (the key's last segment)
    host: str  # the host's lease subnet id, e.g. "10.244.1.0-24"
    name: str  # the container's name, for people and `policy check`
    addresses: tuple[IPAddress, ...]  # inside the host's subnets, one or two families
    labels: Mapping[str, str] = field(default_factory=dict)
    registered: float = 0.0  # unix time
    hostname: str = ""  # the host's name, informational
    # What only the endpoint's own host uses (a registration read by any
    # other host has them empty, see HostSubnets.own): the addresses of its
    # gwbridge interface (eth1 in gwbridge egress mode), from which its
    # traffic to the outside world leaves, and the link-layer addresses of
    # its interfaces (overlay and gwbridge), which name it in IPv6
    # link-local traffic on a bridge. They mean something on that one host
    # alone: every host's gwbridge has the same subnet, and link-local
    # traffic never leaves a bridge.
    gwbridge_addresses: tuple[IPAddress, ...] = ()
    macs: tuple[MacAddress, ...] = ()


@dataclass(frozen=True, slots=True)
class HostSubnets:
    """What an endpoint's addresses must lie in: its host's leased subnets.
    `own`: the host reading is this one, so its endpoints' gwbridge
    addresses (which must lie in `gwbridge`, its gwbridge's subnets) and
    link-layer addresses are used; other hosts' are ignored."""

    subnet: IPv4Network
    subnet6: IPv6Network | None = None
    own: bool = False
    gwbridge: tuple[IPNetwork, ...] = ()

    def holds(self, address: IPAddress) -> bool:
        network: IPNetwork | None = self.subnet if address.version == 4 else self.subnet6
        return network is not None and address in network

    def gwbridge_network(self, address: IPAddress) -> IPNetwork | None:
        """The gwbridge subnet that holds `address`, if any."""
        return next((n for n in self.gwbridge if address in n), None)


class EndpointIndex:
    """Endpoints by label, so that a selector costs the endpoints that can
    match it instead of all of them. `select` is exact: what it gives is
    what LabelSelector.matches selects, the endpoints a positive term
    (a label, `In`, `Exists`) names being read off the index and the
    negative terms (`NotIn`, `DoesNotExist`) checked one endpoint at a time."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = endpoints
        by_label: defaultdict[tuple[str, str], list[int]] = defaultdict(list)
        for i, endpoint in enumerate(endpoints):
            for pair in endpoint.labels.items():
                by_label[pair].append(i)
        self.by_label: dict[tuple[str, str], list[int]] = by_label
        # By label key, for `Exists`: made when first asked for (a cold start
        # with 10,000 endpoints spent as long on it as on by_label, for a
        # term few selectors have).
        self._by_key: dict[str, list[int]] | None = None

    def _with_key(self, key: str) -> list[int]:
        if self._by_key is None:
            by_key: defaultdict[str, list[int]] = defaultdict(list)
            for (name, _), indices in self.by_label.items():
                by_key[name] += indices
            self._by_key = {name: sorted(indices) for name, indices in by_key.items()}
        return self._by_key.get(key, [])

    def select_indices(self, selector: LabelSelector) -> list[int]:
        """The indices, ascending, of the endpoints `selector` selects."""
        terms: list[Sequence[int]] = [self.by_label.get(pair, []) for pair in selector.match_labels]
        negative = []
        for requirement in selector.match_expressions:
            if requirement.operator is Operator.IN:
                terms.append(
                    sorted(
                        {
                            i
                            for value in requirement.values
                            for i in self.by_label.get((requirement.key, value), [])
                        }
                    )
                )
            elif requirement.operator is Operator.EXISTS:
                terms.append(self._with_key(requirement.key))
            else:
                negative.append(requirement)
        pool: Sequence[int] = range(len(self.endpoints))
        if terms:
            terms.sort(key=len)
            pool = terms[0]
            if len(terms) > 1:
                pool = sorted(set(pool).intersection(*terms[1:]))
        if not negative:
            return list(pool)
        endpoints = self.endpoints
        return [i for i in pool if all(r.matches(endpoints[i].labels) for r in negative)]

    def select(self, selector: LabelSelector) -> list[Endpoint]:
        """The endpoints `selector` selects, in the order given."""
        return [self.endpoints[i] for i in self.select_indices(selector)]
