"""Network policy as nftables objects: the ruleset a host enforces for its
own endpoints, and the one atomic `nft -f` transaction that moves the
kernel from one ruleset to the next.

Pure: policies, endpoints and this host's subnets in, text out. Parsing
policy documents and the verdict for one packet are plan/policy.py's; the
value types are plan/policy_model.py's.

Where. One table of its own, `table inet overlayd_policy`: `inet` so that
one table judges both families with the same sets and chains, and apart
from `ip overlayd`/`ip6 overlayd` (egress, VXLAN allow-list) so that a
policy transaction never touches those tables and theirs never touch this
one. With no policy at all the table is deleted: no policy costs no
per-packet work.

Which packets. With br_netfilter on (bridge-nf-call-iptables and
-ip6tables = 1, which the daemon keeps on while policies exist), a frame
bridged between two containers of this host passes the inet forward hook
like a packet routed to or from a container on another host. So the
policy is one base chain on the forward hook, `forward` (priority filter -
10, ahead of the egress table's `forward` chain at filter), which judges
egress and then ingress:

    ct state established,related accept      replies always pass (and
                                              ICMP errors about allowed flows)
    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept
    jump egress                               while some policy isolates egress
    jump ingress                              while some policy isolates ingress

Why one base chain and not one per direction (as this table had first): every packet of
a judged flow, the established ones too, enters every base chain of the
hook and meets its first rule. With two, an established packet cost two
base-chain entries and two `ct state` matches per host, four per round
trip across two hosts, and with 500 policies ping's round trip was ~8 us
(5.6 %) slower than without policies (lab policycost); one base chain
halves that work. The direction chains are regular chains:

    egress:
    ip6 saddr fe80::/10 jump egress_link_local   see "Link-local" below
    ip saddr != { <our subnet>, <gwbridge subnet> } return
    ip6 saddr != { <our subnet6>, <gwbridge subnet6> } return
                                              only our own endpoints are judged
                                              (`meta nfproto ipv6 return` on a
                                              host without IPv6)
    jump egress_policies                      per policy P isolating egress:
                                              ip saddr @<P's selector> jump <P's chain>
    jump egress_deny                          per policy P isolating egress:
                                              ip saddr @<P's selector> counter drop

and ingress the same with daddr, `accept` for `return`, and a last rule
`accept`. A policy's chain holds one rule per (peer, family) of its rules,
ending in `counter name "<P>_<direction>_allow"` and the verdict of an
allow; a packet no rule allows returns, tries the next policy, and meets
the deny chain, where the first policy that selects its endpoint counts
and drops it. An endpoint selected by no policy falls through and passes.

The verdicts, and why: an `accept` anywhere in these chains ends the
base chain, so egress, which ingress must still judge, never accepts: a
packet it lets pass returns (to the base chain, which jumps to ingress),
and an egress allow in a policy chain is `goto ingress` (`accept` while
no policy isolates ingress: nothing is left to judge). A goto replaces
the policy chain on nft's chain stack, so a return from ingress would go
on in the dispatch chain that called it: ingress therefore never returns.
Its last rule accepts, and being the last judgement, its accepts (and its
policy chains' allows, `accept`) end the base chain as the base chain's
policy would. So the first allowing policy of a direction ends that
direction, as the first selecting policy's deny drops, as before. (A
packet-mark bit, set by an allow, tested by the dispatch rules, cleared
on the way out of each direction, would do the same with more rules and
with state that routing and other tables see; the goto needs neither.)
The cost: an egress policy chain names `ingress`, so the first policy
isolating ingress (or the last one going) rewrites the egress policy
chains, and policy_transaction flushes every chain it deletes before it
deletes any (an egress policy chain going may still name `ingress`).

Gwbridge egress mode. A container's traffic to the outside world leaves
by its second interface, on the gwbridge, with that interface's address as
its source (masqueraded only after this hook, in postrouting). So the
container's gwbridge addresses are part of its endpoint here: overlay-cni
registers them, this host puts them in the sets beside the overlay
addresses, and the gwbridge's subnets count as local subnets above. Egress
policy then judges the way out like the overlay (an ipBlock of the outside
world allows or refuses it), and ingress policy judges a published port
DNATed to the gwbridge address as one DNATed to the overlay address. Why
addresses rather than the container's gwbridge port: the inet forward hook
sees the bridge, not its port, for a packet routed off a bridge, while the
source address is there for every packet; and an address in the same sets
costs nothing new: an endpoint's addresses of one family are one set
element statement whatever their number, so a container starting still
writes a constant number of statements. Only this host knows and uses
them: every host's gwbridge has the same subnet (172.18.0.0/16 by
default), so another host's gwbridge addresses would name containers of
its own (plan/endpoints.py drops them when reading). Nothing else changes:
the gwbridge's isolation and its masquerade are the egress table's, and
traffic between containers still goes by their overlay addresses, never
NATed.

Link-local. Containers of one host share the bridge (and in gwbridge
mode the gwbridge), and every IPv6 interface has an fe80:: address, which
no registration names and no subnet holds: without more, an isolated
endpoint would answer anyone on the bridge who knows its link-local
address. The address is not what
identifies a container in such traffic (it is made by the container's
kernel, and may be anything): its link-layer address is, the source
address of the frame it sends and the destination of the frames it
receives. So an endpoint registers its interfaces' MACs (overlay and
gwbridge), a third set per policy selector holds the MACs of this host's
endpoints it
selects (`type ether_addr`), and a packet whose local side is link-local
goes to its direction's link-local chain instead of the subnet checks:

    icmpv6 type { RS, RA, MLD messages } return   the link's own control
                                                 messages (NS and NA pass
                                                 in the base chain; ingress:
                                                 accept)
    ether saddr @<P's selector, MACs> jump <P's chain>   per policy P
    ether saddr @<P's selector, MACs> counter drop        per policy P

(ingress: ether daddr). So a link-local packet meets the same policy
chains as any other: a peer given by a selector never matches it (a
peer's link-local address is in no set), an ipBlock matches it when it
holds fe80::/10, and a rule for any peer allows it. An endpoint that is
not isolated, or not registered, is not in the MAC sets and passes, as
for its other addresses. Ingress first drops a unicast link-local
destination in a multicast or broadcast frame: no stack sends one, and it
would reach an isolated endpoint without naming its MAC. This holds on a
host without IPv6 in the cluster too: its containers have fe80::
addresses all the same, so bridge netfilter for IPv6 stays on as well.
(The gwbridge MAC matters there: the egress table's isolation of the
gwbridge is per family, and such a host has no IPv6 egress table, so
containers reach each other's eth1 by link-local.)

Decisions, and why:

- No `ct state invalid drop`. Conntrack calls neighbour solicitations and
  advertisements invalid (it never tracks them), and a drop would apply to
  every endpoint, selected or not, while an unselected endpoint must be
  untouched. An invalid packet is judged by the policies like a new one.
- Neighbour discovery always passes: an advertisement is a unicast packet
  between two containers' addresses (invalid to conntrack, so not a
  "reply"); judging it would cut a container selected for ingress off from
  every neighbour it asked, replies to its own connections included. ARP is
  not IP and never reaches these chains.
- One set per distinct selector (LabelSelector.canonical()) and family,
  `type ipv4_addr`/`ipv6_addr`, holding the addresses of every endpoint in
  the cluster that the selector selects (and this host's endpoints'
  gwbridge addresses): it says both which local endpoints a policy applies
  to and which peers a `from`/`to` selector allows; and per policy
  selector a set of this host's endpoints' MACs (`_mac`). A container
  starting or stopping changes set elements only, one `add
  element`/`delete element` statement per set it is in, never a rule: the
  transaction's size does not depend on how many endpoints exist.
- A rule's port list (more than one port or range) is a named set, one
  per distinct list, that every rule with that list refers to (`tcp dport
  @ports_...`; `type inet_service`, or `inet_proto . inet_service` for
  several protocols; `flags interval`), not an anonymous set in each rule.
  The kernel names every new anonymous set by scanning all the table's
  sets, and a rule finds a set by walking the list of them, so that
  anonymous sets cost superlinearly: the cold-start table of the lab's
  500 synthetic policies and 10,000 endpoints (620 port lists, 30
  distinct) took nft 0.39 s with anonymous sets and 0.28 s with shared
  ones; 500 policies with 500 distinct lists 0.83 s and 0.59 s (median of
  5 to 8, fresh namespaces). A port set's name comes from its elements,
  which therefore never change; it goes with the last rule naming it, and
  a check pass that finds one changed makes the table afresh (the rules
  that name it are only ever written whole). A single port or range stays
  in the rule, as does a list of protocols without ports (`meta l4proto {
  tcp, udp }`).
- Names from a readable part and a hash of the real name (policy name,
  canonical selector, port list): valid nft identifiers of bounded length
  whatever the name; the real name is in the chain's or set's comment.
- Counters only, no drop log: a `log group` line helps only where
  something reads the group (ulogd, `tcpdump -i nflog:N`), which a host
  does not have by default, and its group number may be another program's.
  Per-policy allow and deny counters answer "which policy drops", and
  `overlayctl policy check SRC DST PORT/PROTO` answers why, from the same
  model. The counters count the packets judged, that is the first packets
  of connections (later ones pass as established), so they count flows more
  than bytes.

What is not judged here:

- Traffic between a container and its own host (the host's addresses, the
  bridge's gateway) does not cross the forward hook at all (input and
  output hooks), so it is always allowed, as in Kubernetes (health checks).
- A packet from or to an address outside this host's subnets (and its
  gwbridge's): another host's endpoints are judged on their own host
  (ingress on the destination's host, egress on the source's).
- Multicast and broadcast to containers (a group is no endpoint's
  address, and a flooded frame names no endpoint's MAC); what an isolated
  endpoint sends to a group is judged as egress like anything it sends.
- A container that forges its source address or MAC (a raw socket) to
  pass as another, or as no endpoint: the sets say who an address or MAC
  belongs to, not who may use it.

A port published with DNAT (portmap, Docker's -p) to a container's overlay
address is judged by the container's ingress policies, with the outside
client's address as the source: allow it with an ipBlock, as in
Kubernetes.

Use: policy_ruleset() makes the ruleset from scratch; with_endpoints()
moves it by the endpoints that changed (a container event: milliseconds
with 10,000 endpoints); policy_transaction(before, after) gives the
statements, and script() their `nft -f` input; render_ruleset() shows the
table (diagnose, golden files); terse_listing() (compared through
unordered_sets()), listed_elements(), listed_ports(), listed_counters() and
listed_counts() read the kernel's listings back; element_repairs() turns a
drifted set back; policy_counter_names() names each counter's policy,
direction and verdict for the metrics.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    collapse_addresses,
    ip_address,
)
from operator import itemgetter
from typing import Any, Literal, NamedTuple

from overlayd.model import IPAddress, IPNetwork
from overlayd.plan.policy_model import (
    Direction,
    Endpoint,
    EndpointIndex,
    IpBlock,
    LabelSelector,
    MacAddress,
    Policy,
    PortRange,
    Protocol,
    Rule,
    SelectorPeer,
)

TABLE = "overlayd_policy"
WHERE = f"inet {TABLE}"

AddressType = Literal["ipv4_addr", "ipv6_addr", "ether_addr"]
PortType = Literal["inet_service", "inet_proto . inet_service"]
Element = IPAddress | MacAddress  # of a set
Verdict = Literal["allow", "deny"]

# The one base chain, its hook, and per direction which address of a packet
# is the local endpoint's (the other one is the peer's).
BASE = "forward"
_HOOK = "type filter hook forward priority filter - 10; policy accept;"
_LOCAL_FIELD = {Direction.EGRESS: "saddr", Direction.INGRESS: "daddr"}
_PEER_FIELD = {Direction.EGRESS: "daddr", Direction.INGRESS: "saddr"}
_WORD = {Direction.EGRESS: "egress", Direction.INGRESS: "ingress"}
LINK_LOCAL = IPv6Network("fe80::/10")
# What a container's stack sends from (or to) a link-local address to keep
# its link working, beside neighbour solicitations and advertisements,
# which the base chain lets through for every address: router
# solicitations and advertisements, and multicast listener discovery
# (RFC 4861, RFC 3810). None carries data. nft lists them in type order.
_LINK_CONTROL = (
    "icmpv6 type { mld-listener-query, mld-listener-report, mld-listener-done,"
    " nd-router-solicit, nd-router-advert, mld2-listener-report }"
)
# A unicast link-local destination in a frame to a group (the group bit of
# the destination MAC): no stack sends one, and it would reach an isolated
# endpoint without naming its MAC.
_GROUP_FRAME = "ether daddr & 01:00:00:00:00:00 == 01:00:00:00:00:00 drop"
# set_name's versions: 4, 6, and 0 for MACs.
_SET_TYPE: Mapping[int, AddressType] = {4: "ipv4_addr", 6: "ipv6_addr", 0: "ether_addr"}
# The directions in the order the base chain judges them; each direction's
# chains are rendered in this order too.
DIRECTIONS = (Direction.EGRESS, Direction.INGRESS)

_PROTOCOLS = (Protocol.TCP, Protocol.UDP, Protocol.SCTP)  # rendering order
_ANY_PORT = (0, 65535)

# Names: a readable part of at most READABLE characters and HASH hex digits
# of sha256 of the real name; the longest name is under 50 characters (nft
# allows 255). 40 bits make an accidental clash between two names with the
# same readable part negligible; a clash is refused, never merged.
READABLE = 16
HASH = 10
COMMENT = 128  # characters kept of a comment (the kernel keeps up to 255 bytes)
_UNSAFE = re.compile(r"[^A-Za-z0-9]+")


@dataclass(frozen=True, slots=True)
class LocalSubnets:
    """This host's subnets: the endpoints whose packets it judges. In
    gwbridge egress mode also the gwbridge's subnets (`gwbridge`, one per
    family), where its endpoints' second interfaces have their addresses."""

    subnet: IPv4Network
    subnet6: IPv6Network | None = None
    gwbridge: tuple[IPNetwork, ...] = ()

    def networks(self, version: int) -> tuple[IPNetwork, ...]:
        """The local networks of one family, in address order."""
        found = [n for n in (self.subnet, self.subnet6, *self.gwbridge) if n is not None]
        return tuple(sorted((n for n in found if n.version == version), key=lambda n: int(n[0])))

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(v for v in (4, 6) if self.networks(v))


class NftSet(NamedTuple):
    """A named set: its type, its elements, a comment with the selector, and
    the selector itself (for with_endpoints; not written to nft)."""

    type: AddressType
    elements: frozenset[Element]
    comment: str
    selector: LabelSelector = LabelSelector()

    def members(self, endpoint: Endpoint) -> tuple[Element, ...]:
        """What `endpoint` puts in this set when the selector selects it."""
        if self.type == "ether_addr":
            return endpoint.macs
        version = 4 if self.type == "ipv4_addr" else 6
        return tuple(
            a for a in (*endpoint.addresses, *endpoint.gwbridge_addresses) if a.version == version
        )


class PortSet(NamedTuple):
    """A named set of ports (`inet_service`), or of protocol . port pairs,
    that every rule matching the same port list refers to; its elements as
    nft takes and lists them (ranges merged), in render order. Its name
    comes from its elements, which therefore never change."""

    type: PortType
    elements: tuple[str, ...]
    comment: str


class Chain(NamedTuple):
    """A chain's rules, in order; `hook` for a base chain; `comment` names
    the policy a policy chain belongs to."""

    rules: tuple[str, ...]
    comment: str = ""
    hook: str = ""


class Count(NamedTuple):
    """A named counter's values, carried into a table made afresh."""

    packets: int
    bytes: int


class CounterOwner(NamedTuple):
    policy: str
    direction: Direction
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class PolicyRuleset:
    """Everything in `table inet overlayd_policy`, each kind in creation
    order. `chains`: policy chains, then the dispatch, deny and link-local
    chains that jump to them, then the direction chains and last the base
    chain. The sets: port sets first, then address sets, then MAC sets
    (each kind by name), since the kernel finds a rule's set by walking
    the table's sets from the first made: port sets are named by the most
    rules, MAC sets only by the link-local chains (0.04 s of the 0.3 s nft
    took for the cold-start table of the lab's 500 policies, against
    sorting them all by name). Empty: no table at all."""

    sets: Mapping[str, NftSet]
    chains: Mapping[str, Chain]
    counters: Mapping[str, CounterOwner]
    port_sets: Mapping[str, PortSet] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.chains


EMPTY = PolicyRuleset({}, {}, {})


# --- names -------------------------------------------------------------------


def _readable(text: str, fallback: str) -> str:
    word = _UNSAFE.sub("_", text).strip("_")[:READABLE].rstrip("_")
    return word or fallback


def _digest(text: str) -> str:
    # surrogatepass: a name decoded from JSON may hold a lone surrogate.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:HASH]


def policy_key(name: str) -> str:
    """The stem of a policy's chain and counter names."""
    return f"p_{_readable(name, 'x')}_{_digest(name)}"


def set_name(selector: LabelSelector, version: int) -> str:
    """The set of the selector's addresses of one family (version 4 or 6),
    or with version 0 of its MACs."""
    canonical = selector.canonical()
    kind = f"v{version}" if version else "mac"
    return f"s_{_readable(canonical, 'all')}_{_digest(canonical)}_{kind}"


def port_set_name(ports: PortSet) -> str:
    """A port set's name, from its elements: rules with the same port list
    share one set."""
    listed = ", ".join(ports.elements)
    return f"ports_{_readable(listed, 'x')}_{_digest(f'{ports.type} {listed}')}"


def chain_name(policy: str, direction: Direction) -> str:
    return f"{policy_key(policy)}_{_WORD[direction]}"


def counter_name(policy: str, direction: Direction, verdict: Verdict) -> str:
    return f"{policy_key(policy)}_{_WORD[direction]}_{verdict}"


def _comment(text: str) -> str:
    """Printable ASCII without quotes or backslashes (nft's quoted strings
    have no escapes), at most COMMENT characters."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        clean = text  # the common case, without a look at each character
    else:
        clean = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)
    return clean if len(clean) <= COMMENT else clean[: COMMENT - 3] + "..."


def _dispatch(direction: Direction) -> str:
    return f"{_WORD[direction]}_policies"


def _deny(direction: Direction) -> str:
    return f"{_WORD[direction]}_deny"


def _link_local(direction: Direction) -> str:
    return f"{_WORD[direction]}_link_local"


def _passed(direction: Direction) -> str:
    """The verdict for a packet this direction lets pass: egress returns it
    to the base chain, which goes on to ingress; ingress, the last
    judgement, accepts it (ending the base chain as its policy would)."""
    return "return" if direction is Direction.EGRESS else "accept"


def _allowed(direction: Direction, ingress: bool) -> str:
    """The verdict of a policy chain's allow: an egress allow goes straight
    on to the ingress judgement while some policy isolates ingress (`goto`:
    the chain `ingress` never returns, so nothing of egress runs after it);
    otherwise nothing is left to judge and the packet is accepted."""
    return "goto ingress" if direction is Direction.EGRESS and ingress else "accept"


def _outside(ip: str, field: str, networks: Sequence[IPNetwork], verdict: str) -> str:
    """A packet whose `field` lies in none of `networks` passes."""
    if len(networks) == 1:
        return f"{ip} {field} != {networks[0]} {verdict}"
    return f"{ip} {field} != {{ {', '.join(map(str, networks))} }} {verdict}"


# --- selection ---------------------------------------------------------------


# --- rendering ---------------------------------------------------------------


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, overlapping and adjacent ranges joined: nft refuses
    overlapping intervals in one set."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


class _PortMatch(NamedTuple):
    """A rule's port match: `words`, followed by `@<the set>` when `ports`
    is given (a list of more than one element)."""

    words: str
    ports: PortSet | None = None


def _ports(ports: tuple[PortRange, ...] | None) -> _PortMatch | None:
    """The match for a rule's ports: "" for every port and protocol, None
    for a rule that matches nothing (an empty tuple, as `any(())`)."""
    if ports is None:
        return _PortMatch("")
    by_protocol: dict[Protocol, list[tuple[int, int]]] = {}
    for entry in ports:
        span = (
            _ANY_PORT
            if entry.first is None
            else (entry.first, entry.last if entry.last is not None else entry.first)
        )
        by_protocol.setdefault(entry.protocol, []).append(span)
    if not by_protocol:
        return None
    merged = {p: _merge(by_protocol[p]) for p in _PROTOCOLS if p in by_protocol}
    names = {p: p.value.lower() for p in merged}
    if len(merged) == 1:
        ((protocol, spans),) = merged.items()
        name = names[protocol]
        if spans == [_ANY_PORT]:
            return _PortMatch(f"meta l4proto {name}")
        if len(spans) == 1:
            return _PortMatch(f"{name} dport {_span(*spans[0])}")
        listed = tuple(_span(*s) for s in spans)
        return _PortMatch(f"{name} dport", PortSet("inet_service", listed, _port_comment(listed)))
    if all(spans == [_ANY_PORT] for spans in merged.values()):
        return _PortMatch(f"meta l4proto {{ {', '.join(names.values())} }}")
    pairs = tuple(f"{names[p]} . {_span(*s)}" for p, spans in merged.items() for s in spans)
    return _PortMatch(
        "meta l4proto . th dport",
        PortSet("inet_proto . inet_service", pairs, _port_comment(pairs)),
    )


def _port_comment(elements: Sequence[str]) -> str:
    return _comment(f"ports {', '.join(elements)}")


def _ip(version: int) -> str:
    return "ip" if version == 4 else "ip6"


def _excepts(block: IpBlock) -> list[str] | None:
    """The block's excepts that cut into it, collapsed (nft refuses
    overlapping intervals in one set); None when one holds the whole block."""
    cidr = block.cidr
    if isinstance(cidr, IPv4Network):
        inside4 = [e for e in block.excepts if isinstance(e, IPv4Network) and e.overlaps(cidr)]
        if any(cidr.subnet_of(e) for e in inside4):
            return None
        return [str(n) for n in collapse_addresses(inside4)]
    inside6 = [e for e in block.excepts if isinstance(e, IPv6Network) and e.overlaps(cidr)]
    if any(cidr.subnet_of(e) for e in inside6):
        return None
    return [str(n) for n in collapse_addresses(inside6)]


def _block(block: IpBlock, field: str, version: int) -> str | None:
    """The match for an ipBlock on `field`; None when it holds no address
    of `version` (another family, or excepted whole)."""
    excepts = _excepts(block)
    if block.cidr.version != version or excepts is None:
        return None
    ip = _ip(version)
    parts = []
    if block.cidr.prefixlen:
        parts.append(f"{ip} {field} {block.cidr}")
    elif not excepts:
        parts.append(f"meta nfproto ipv{version}")  # 0.0.0.0/0, ::/0: the whole family
    if len(excepts) == 1:
        parts.append(f"{ip} {field} != {excepts[0]}")
    elif excepts:
        parts.append(f"{ip} {field} != {{ {', '.join(excepts)} }}")
    return " ".join(parts)


def _members(endpoints: Sequence[Endpoint], kind: AddressType) -> list[frozenset[Element]]:
    """NftSet.members of every endpoint for a set of type `kind`, as sets,
    in one loop without a call per endpoint: a cold start asks for 10,000."""
    if kind == "ether_addr":
        return [frozenset(e.macs) for e in endpoints]
    family = IPv4Address if kind == "ipv4_addr" else IPv6Address
    return [
        frozenset([a for a in (*e.addresses, *e.gwbridge_addresses) if type(a) is family])
        for e in endpoints
    ]


class _Builder:
    """Collects the sets the rules refer to while rendering them."""

    def __init__(self, endpoints: Sequence[Endpoint], local: LocalSubnets) -> None:
        self.index = EndpointIndex(endpoints)
        self.local = local
        self.versions = local.versions  # asked for every set and rule: made once
        self.sets: dict[str, NftSet] = {}
        self.port_sets: dict[str, PortSet] = {}
        self._selected: dict[str, list[int]] = {}
        self._names: dict[tuple[LabelSelector, int], str] = {}
        # Per set type, what each endpoint puts in such a set (NftSet.members),
        # made once: a set's elements are then the union of these, which
        # reuses their hashes instead of hashing every address again (an
        # address is in several sets; ipaddress hashes in Python).
        self._members: dict[AddressType, list[frozenset[Element]]] = {}

    def _members_of(self, s: NftSet) -> list[frozenset[Element]]:
        found = self._members.get(s.type)
        if found is None:
            found = self._members[s.type] = _members(self.index.endpoints, s.type)
        return found

    def set_for(self, selector: LabelSelector, version: int) -> str:
        """The set of the selector's endpoints' addresses of `version`, or
        with version 0 of their MACs, made on first use."""
        name = self._names.get((selector, version))
        if name is not None:
            return name
        name = self._names[(selector, version)] = set_name(selector, version)
        if name not in self.sets:
            canonical = selector.canonical()
            selected = self._selected.get(canonical)
            if selected is None:
                selected = self._selected[canonical] = self.index.select_indices(selector)
            kind = _SET_TYPE[version]
            empty = NftSet(kind, frozenset(), _comment(f"selector {canonical}"), selector)
            members = self._members_of(empty)
            if len(selected) > 1:
                elements = frozenset[Element]().union(*itemgetter(*selected)(members))
            else:
                elements = members[selected[0]] if selected else frozenset()
            self.sets[name] = empty._replace(elements=elements)
        return name

    def port_match(self, rule: Rule) -> str | None:
        """The rule's port match (see _ports), its port set made on first
        use; ValueError for two port lists whose sets would share a name."""
        match = _ports(rule.ports)
        if match is None or match.ports is None:
            return None if match is None else match.words
        name = port_set_name(match.ports)
        known = self.port_sets.setdefault(name, match.ports)
        if known != match.ports:
            raise ValueError(
                f"the port lists {known.elements} and {match.ports.elements}"
                f" have the same nft set name {name}"
            )
        return f"{match.words} @{name}"

    def peer_matches(self, rule: Rule, direction: Direction) -> list[str]:
        """One match per (peer, family) of the rule; [""] for anywhere."""
        if rule.peers is None:
            return [""]
        field = _PEER_FIELD[direction]
        found = []
        for peer in rule.peers:
            for version in self.versions:
                if isinstance(peer, SelectorPeer):
                    found.append(f"{_ip(version)} {field} @{self.set_for(peer.selector, version)}")
                elif (match := _block(peer, field, version)) is not None:
                    found.append(match)
        return found

    def policy_chain(self, policy: Policy, direction: Direction, ingress: bool) -> tuple[str, ...]:
        """`ingress`: some policy isolates ingress (see _allowed)."""
        allow = counter_name(policy.name, direction, "allow")
        verdict = _allowed(direction, ingress)
        rules: dict[str, None] = {}  # ordered, without repeats
        for rule in policy.rules(direction):
            ports = self.port_match(rule)
            if ports is None:
                continue
            for peer in self.peer_matches(rule, direction):
                words = (peer, ports, f'counter name "{allow}" {verdict}')
                rules[" ".join(w for w in words if w)] = None
        return tuple(rules)

    def direction_chain(self, direction: Direction, dispatch: bool) -> tuple[str, ...]:
        local = _LOCAL_FIELD[direction]
        passed = _passed(direction)
        rules = [f"ip6 {local} {LINK_LOCAL} jump {_link_local(direction)}"]
        if 6 not in self.versions:
            rules.append(f"meta nfproto ipv6 {passed}")
        for version in self.versions:
            rules.append(_outside(_ip(version), local, self.local.networks(version), passed))
        if dispatch:
            rules.append(f"jump {_dispatch(direction)}")
        rules.append(f"jump {_deny(direction)}")
        if direction is Direction.INGRESS:
            rules.append("accept")  # never returns: an egress allow comes by goto
        return tuple(rules)


def _base_chain(directions: Iterable[Direction]) -> tuple[str, ...]:
    return (
        "ct state established,related accept",
        "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept",
        *(f"jump {_WORD[d]}" for d in directions),
    )


def policy_ruleset(
    policies: Sequence[Policy], endpoints: Sequence[Endpoint], local: LocalSubnets
) -> PolicyRuleset:
    """The ruleset enforcing `policies` for this host's endpoints (those in
    `local`), with every endpoint of the cluster in the sets. Deterministic:
    the same inputs, in any order, give the same ruleset. ValueError for two
    policies of one name, or two names (or port lists) that would share nft
    names."""
    ordered = sorted(policies, key=lambda p: p.name)
    keys: dict[str, str] = {}
    for policy in ordered:
        key = policy_key(policy.name)
        if key in keys:
            raise ValueError(
                f"policies {keys[key]!r} and {policy.name!r} have the same nft name {key}"
            )
        keys[key] = policy.name
    build = _Builder(endpoints, local)
    policy_chains: dict[str, Chain] = {}
    counters: dict[str, CounterOwner] = {}
    dispatch: dict[Direction, list[str]] = {d: [] for d in DIRECTIONS}
    deny: dict[Direction, list[str]] = {d: [] for d in DIRECTIONS}
    # The link-local chains' dispatch and deny rules, by MAC.
    link_dispatch: dict[Direction, list[str]] = {d: [] for d in DIRECTIONS}
    link_deny: dict[Direction, list[str]] = {d: [] for d in DIRECTIONS}
    ingress = any(Direction.INGRESS in p.types for p in ordered)
    for policy in ordered:
        for direction in DIRECTIONS:
            if direction not in policy.types:
                continue
            local_field = _LOCAL_FIELD[direction]
            selected = [
                f"{_ip(v)} {local_field} @{build.set_for(policy.selector, v)}"
                for v in build.versions
            ]
            by_mac = f"ether {local_field} @{build.set_for(policy.selector, 0)}"
            rules = build.policy_chain(policy, direction, ingress)
            if rules:
                chain = chain_name(policy.name, direction)
                comment = _comment(f"policy {policy.name} {_WORD[direction]}")
                policy_chains[chain] = Chain(rules, comment)
                counters[counter_name(policy.name, direction, "allow")] = CounterOwner(
                    policy.name, direction, "allow"
                )
                dispatch[direction] += [f"{match} jump {chain}" for match in selected]
                link_dispatch[direction].append(f"{by_mac} jump {chain}")
            drop = counter_name(policy.name, direction, "deny")
            counters[drop] = CounterOwner(policy.name, direction, "deny")
            deny[direction] += [f'{match} counter name "{drop}" drop' for match in selected]
            link_deny[direction].append(f'{by_mac} counter name "{drop}" drop')
    chains = dict(sorted(policy_chains.items()))
    for direction in DIRECTIONS:
        if dispatch[direction]:
            chains[_dispatch(direction)] = Chain(tuple(dispatch[direction]))
        if deny[direction]:
            chains[_deny(direction)] = Chain(tuple(deny[direction]))
            first = [_GROUP_FRAME] if direction is Direction.INGRESS else []
            control = f"{_LINK_CONTROL} {_passed(direction)}"
            link = [*first, control, *link_dispatch[direction], *link_deny[direction]]
            chains[_link_local(direction)] = Chain(tuple(link))
    isolated = [d for d in DIRECTIONS if deny[d]]  # some policy isolates it
    for direction in isolated:
        rules = build.direction_chain(direction, bool(dispatch[direction]))
        chains[_WORD[direction]] = Chain(rules)
    if isolated:
        chains[BASE] = Chain(_base_chain(isolated), hook=_HOOK)
    return PolicyRuleset(
        dict(sorted(build.sets.items(), key=lambda item: (item[1].type == "ether_addr", item[0]))),
        chains,
        dict(sorted(counters.items())),
        dict(sorted(build.port_sets.items())),
    )


def _held(s: NftSet, endpoints: Iterable[Endpoint]) -> set[Element]:
    """The addresses (or MACs) of `endpoints` that belong in `s`."""
    return {a for e in endpoints if s.selector.matches(e.labels) for a in s.members(e)}


def with_endpoints(
    ruleset: PolicyRuleset, gone: Iterable[Endpoint], came: Iterable[Endpoint]
) -> PolicyRuleset:
    """The ruleset after the endpoints `gone` (as they were) left and `came`
    (as they are now) arrived; an endpoint whose labels or addresses changed
    is in both. The same ruleset as policy_ruleset over the new endpoints,
    for the cost of the changed endpoints times the sets instead of all
    endpoints: only set elements depend on endpoints. Assumes, as IPAM
    makes sure, that no two endpoints share an address."""
    gone, came = list(gone), list(came)
    sets = dict(ruleset.sets)
    for name, s in ruleset.sets.items():
        drop, add = _held(s, gone), _held(s, came)
        if drop or add:
            sets[name] = s._replace(elements=(s.elements - drop) | add)
    return replace(ruleset, sets=sets)


def policy_counter_names(ruleset: PolicyRuleset) -> Mapping[str, CounterOwner]:
    """Counter name -> (policy, direction, verdict), for the metrics."""
    return ruleset.counters


# --- text --------------------------------------------------------------------


_OCTETS = [str(octet) for octet in range(256)]


def _elements(addresses: Collection[Element]) -> str:
    """A set's elements as nft takes and lists them, in address order."""
    if all(type(a) is IPv4Address for a in addresses):
        # The common case, formatted here from a table of the octets' texts:
        # a cold start writes tens of thousands, and ipaddress's str() takes
        # five times as long.
        o = _OCTETS
        return ", ".join(
            [
                f"{o[i >> 24]}.{o[i >> 16 & 255]}.{o[i >> 8 & 255]}.{o[i & 255]}"
                for i in sorted(map(int, addresses))
            ]
        )
    return ", ".join(map(str, sorted(addresses, key=int)))


def render_ruleset(ruleset: PolicyRuleset, *, elements: bool = True) -> str:
    """The whole table as nft text, in nft's listing layout (counters
    without values); also valid `nft -f` input. "" for no policies. Without
    `elements` it is exactly what terse_listing makes of `nft -t list table
    inet overlayd_policy` while the kernel holds this ruleset."""
    if ruleset.empty:
        return ""
    blocks = [f"\tcounter {name} {{\n\t}}" for name in ruleset.counters]
    for name, ports in ruleset.port_sets.items():
        lines = [f"\tset {name} {{", f"\t\ttype {ports.type}", "\t\tflags interval"]
        lines.append(f'\t\tcomment "{ports.comment}"')
        if elements:
            lines.append(f"\t\telements = {{ {', '.join(ports.elements)} }}")
        blocks.append("\n".join([*lines, "\t}"]))
    for name, s in ruleset.sets.items():
        lines = [f"\tset {name} {{", f"\t\ttype {s.type}", f'\t\tcomment "{s.comment}"']
        if s.elements and elements:
            lines.append(f"\t\telements = {{ {_elements(s.elements)} }}")
        blocks.append("\n".join([*lines, "\t}"]))
    blocks += [chain_block(name, chain) for name, chain in ruleset.chains.items()]
    return f"table {WHERE} {{\n" + "\n\n".join(blocks) + "\n}\n"


def chain_block(name: str, chain: Chain) -> str:
    """A chain as `nft list table` shows it inside its table (the services
    table's render shares it)."""
    lines = [f"\tchain {name} {{"]
    if chain.hook:
        lines.append(f"\t\t{chain.hook}")
    if chain.comment:
        lines.append(f'\t\tcomment "{chain.comment}"')
    lines += [f"\t\t{rule}" for rule in chain.rules]
    return "\n".join([*lines, "\t}"])


def add_chain(where: str, name: str, chain: Chain) -> str:
    """The statement that makes a chain (without its rules) in table `where`."""
    if chain.hook:
        return f"add chain {where} {name} {{ {chain.hook} }}"
    if chain.comment:
        return f'add chain {where} {name} {{ comment "{chain.comment}"; }}'
    return f"add chain {where} {name}"


def _add_chain(name: str, chain: Chain) -> str:
    return add_chain(WHERE, name, chain)


def _add_set(name: str, s: NftSet) -> str:
    return f'add set {WHERE} {name} {{ type {s.type}; comment "{s.comment}"; }}'


def _add_port_set(name: str, ports: PortSet) -> str:
    """One statement: the set with its elements (which never change)."""
    return (
        f"add set {WHERE} {name} {{ type {ports.type}; flags interval;"
        f' comment "{ports.comment}"; elements = {{ {", ".join(ports.elements)} }}; }}'
    )


def policy_transaction(
    before: PolicyRuleset | None,
    after: PolicyRuleset,
    counts: Mapping[str, Count] | None = None,
) -> list[str]:
    """The `nft -f` statements, one transaction, that turn `before` into
    `after`. `before` None: unknown, the table is made afresh (whether or
    not it exists), its counters starting from `counts` (what the old table
    held, listed_counts(): a pass that remakes the table must not set the
    figures back to 0). Otherwise only what changed, in an order nft
    accepts: new counters and sets (with their elements) before the rules
    that use them; one add and one delete statement per set whose elements
    changed, however many; new chains declared before any rule jumps to
    them; changed chains flushed and refilled (the dispatch and deny chains
    only when the policies or their selectors changed, since their rules
    depend on nothing else); gone chains, then gone sets and counters, deleted
    after the rules that referred to them. `after` empty: the table goes."""
    if after.empty:
        if before is None:
            return [f"table {WHERE}", f"delete table {WHERE}"]
        return [] if before.empty else [f"delete table {WHERE}"]
    if before is None or before.empty:
        return [f"table {WHERE}", f"delete table {WHERE}", *_create(after, counts or {})]
    out = [f"add counter {WHERE} {name}" for name in after.counters if name not in before.counters]
    out += [
        _add_port_set(name, ports)
        for name, ports in after.port_sets.items()
        if name not in before.port_sets
    ]
    for name, s in after.sets.items():
        old = before.sets.get(name)
        if old is s:  # untouched by with_endpoints: nothing to compare
            continue
        if old is None or old.type != s.type:
            if old is not None:  # never happens with our names; kept honest
                out.append(f"delete set {WHERE} {name}")
            out.append(_add_set(name, s))
            if s.elements:
                out.append(f"add element {WHERE} {name} {{ {_elements(s.elements)} }}")
            continue
        if added := s.elements - old.elements:
            out.append(f"add element {WHERE} {name} {{ {_elements(added)} }}")
        if gone := old.elements - s.elements:
            out.append(f"delete element {WHERE} {name} {{ {_elements(gone)} }}")
    changed = []
    for name, chain in after.chains.items():
        old_chain = before.chains.get(name)
        if old_chain is None:
            out.append(_add_chain(name, chain))
            changed.append(name)
        elif old_chain is not chain and old_chain != chain:
            out.append(f"flush chain {WHERE} {name}")
            changed.append(name)
    for name in changed:
        out += [f"add rule {WHERE} {name} {rule}" for rule in after.chains[name].rules]
    # Every gone chain is flushed before any is deleted, so that all their
    # rules' references go first: an egress policy chain refers to
    # `ingress` (goto), made after it. Then referrers before what they
    # refer to: base chain, direction chains, dispatch chains, policy
    # chains (the reverse of their creation order).
    gone_chains = [name for name in reversed(list(before.chains)) if name not in after.chains]
    out += [f"flush chain {WHERE} {name}" for name in gone_chains]
    out += [f"delete chain {WHERE} {name}" for name in gone_chains]
    out += [f"delete set {WHERE} {name}" for name in before.sets if name not in after.sets]
    out += [
        f"delete set {WHERE} {name}" for name in before.port_sets if name not in after.port_sets
    ]
    out += [
        f"delete counter {WHERE} {name}" for name in before.counters if name not in after.counters
    ]
    return out


def _create(ruleset: PolicyRuleset, counts: Mapping[str, Count]) -> list[str]:
    out = [f"add table {WHERE}"]
    for name in ruleset.counters:
        count = counts.get(name)
        if count is None or count == (0, 0):
            out.append(f"add counter {WHERE} {name}")
        else:
            out.append(
                f"add counter {WHERE} {name} {{ packets {count.packets} bytes {count.bytes} }}"
            )
    out += [_add_port_set(name, ports) for name, ports in ruleset.port_sets.items()]
    for name, s in ruleset.sets.items():
        out.append(_add_set(name, s))
        if s.elements:
            out.append(f"add element {WHERE} {name} {{ {_elements(s.elements)} }}")
    out += [_add_chain(name, chain) for name, chain in ruleset.chains.items()]
    for name, chain in ruleset.chains.items():
        out += [f"add rule {WHERE} {name} {rule}" for rule in chain.rules]
    return out


def script(statements: Sequence[str]) -> str:
    """Statements as one `nft -f` input."""
    return "".join(f"{line}\n" for line in statements)


# --- what the kernel holds ---------------------------------------------------


def _items(listing: str | bytes | Mapping[str, Any]) -> list[Mapping[str, Any]]:
    data = json.loads(listing) if isinstance(listing, str | bytes) else listing
    items = data.get("nftables", [])
    return [item for item in items if isinstance(item, Mapping)]


def terse_listing(listing: str) -> str:
    """`nft -t list table inet overlayd_policy` (no set elements) without
    the counters' values, which are not state we write: for a check pass to
    compare with render_ruleset(ruleset, elements=False) as plain text."""
    return "".join(
        line for line in listing.splitlines(keepends=True) if not line.startswith("\t\tpackets ")
    )


_INLINE_SET = re.compile(r"\{ ([^{}\n]*) \}")


def unordered_sets(text: str) -> str:
    """A table's text (render_ruleset's, or terse_listing's of the kernel)
    with the elements of every anonymous set in a rule sorted, so that two
    texts compare equal when their rules match the same packets. nft lists
    those elements in an order of its own, not as written: nftables 1.0.6
    lists `meta l4proto . th dport { tcp . 6379, udp . 53 }` as `{ udp .
    53, tcp . 6379 }` (a concatenation without ranges goes by its key's
    bytes read as one little-endian number: port 256 before port 53), one
    with ranges as written, and single values by value."""
    return _INLINE_SET.sub(lambda m: "{ " + ", ".join(sorted(m[1].split(", "))) + " }", text)


def comparable(text: str) -> str:
    """A table's text as `unordered_sets` makes it, with its top-level
    blocks (sets, chains, counters) in sorted order: nft lists them in the
    order they were made, which after incremental transactions is not the
    order render_ruleset writes (a set made by a later policy change comes
    last). The order of rules inside a chain is kept: it matters."""
    blocks: list[list[str]] = []
    outside: list[str] = []
    current: list[str] | None = None
    for line in unordered_sets(text).splitlines():
        if current is None and line.startswith("\t") and not line.startswith("\t\t"):
            current = [line]
            if line.rstrip().endswith("}"):
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
            if line == "\t}":
                blocks.append(current)
                current = None
        elif line.strip():
            outside.append(line)
    return "\n".join([*outside, *("\n".join(b) for b in sorted(blocks))])


def _our_sets(listing: str | bytes | Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for item in _items(listing):
        s = item.get("set")
        if isinstance(s, Mapping) and s.get("table") == TABLE and s.get("family") == "inet":
            yield s


def listed_elements(listing: str | bytes | Mapping[str, Any]) -> dict[str, frozenset[Element]]:
    """Set name -> elements, for the address and MAC sets in `nft -j list
    table inet overlayd_policy` (or `list sets`): for a check pass to
    compare with the ruleset's sets."""
    found: dict[str, frozenset[Element]] = {}
    for s in _our_sets(listing):
        if _port_set(s):
            continue  # listed_ports'
        values: list[Element] = []
        mac = s.get("type") == "ether_addr"
        for elem in s.get("elem", []):
            # A plain value, or {"elem": {"val": ..., ...}} when it has options.
            value = elem.get("elem", {}).get("val") if isinstance(elem, Mapping) else elem
            values.append(MacAddress.parse(value) if mac else ip_address(value))
        found[str(s["name"])] = frozenset(values)
    return found


def _port_set(listed: Mapping[str, Any]) -> bool:
    return listed.get("type") in ("inet_service", ["inet_proto", "inet_service"])


def _port_text(value: object) -> str:
    """A port set element as the render writes it: 80, 8000-8080, tcp . 80."""
    if isinstance(value, Mapping):
        if isinstance(span := value.get("range"), list) and len(span) == 2:
            return f"{span[0]}-{span[1]}"
        if isinstance(parts := value.get("concat"), list):
            return " . ".join(map(_port_text, parts))
    return str(value)


def listed_ports(listing: str | bytes | Mapping[str, Any]) -> dict[str, frozenset[str]]:
    """Set name -> elements as text, for the port sets in the same listings."""
    return {
        str(s["name"]): frozenset(map(_port_text, s.get("elem", [])))
        for s in _our_sets(listing)
        if _port_set(s)
    }


def listed_counters(listing: str | bytes | Mapping[str, Any]) -> dict[str, int]:
    """Counter name -> packets, from `nft -j list counters table inet
    overlayd_policy` (or a table listing)."""
    return {name: count.packets for name, count in listed_counts(listing).items()}


def listed_counts(listing: str | bytes | Mapping[str, Any]) -> dict[str, Count]:
    """Counter name -> packets and bytes, as listed_counters reads them.
    A counter whose values are not whole numbers of at least 0 is left out:
    it would start again from 0 rather than carry garbage into a rule."""
    found = {}
    for item in _items(listing):
        c = item.get("counter")
        if isinstance(c, Mapping) and c.get("table") == TABLE and c.get("family") == "inet":
            packets, octets = c.get("packets", 0), c.get("bytes", 0)
            if _count(packets) and _count(octets):
                found[str(c["name"])] = Count(packets, octets)
    return found


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


def element_repairs(
    ruleset: PolicyRuleset,
    listed: Mapping[str, frozenset[Element]],
    ports: Mapping[str, frozenset[str]],
) -> list[str] | None:
    """The statements that put the listed sets' elements back to the
    ruleset's ([] when they match); None when a set is missing, or a port
    set (`ports`, from listed_ports) differs, so that only a whole new table
    (policy_transaction(None, ...)) will do: port sets are part of the
    rules, which nothing but a new table rewrites."""
    if any(ports.get(name) != frozenset(p.elements) for name, p in ruleset.port_sets.items()):
        return None
    out: list[str] = []
    for name, s in ruleset.sets.items():
        have = listed.get(name)
        if have is None:
            return None
        if missing := s.elements - have:
            out.append(f"add element {WHERE} {name} {{ {_elements(missing)} }}")
        if extra := have - s.elements:
            out.append(f"delete element {WHERE} {name} {{ {_elements(extra)} }}")
    return out
