"""Services as nftables objects: the virtual IPs and node ports a host
serves, load-balanced to the services' endpoints, and the one atomic `nft
-f` transaction that moves the kernel from one ruleset to the next.

Pure: services, their backends, this host's subnets and the cluster's
networks in, text out. The value types are plan/service_model.py's
(services) and plan/policy_model.py's (endpoints); which endpoints back a
service is service_model.backends'.

Where. Tables of their own, `table inet overlayd_services` and its shards
(below), apart from the policy table and the egress tables, so that a
service transaction never touches theirs. `inet` rather than tables per
family: the base chains, the reject chain and the masquerade mark are
written once, and a dual-stack service lives in one shard. The family is a
parameter, never a copy: every per-family object has a `_v4`/`_v6` twin
made by the same code (the maps are typed by address, so a twin is
needed; `ip daddr` in an inet table matches IPv4 packets only). With no
service at all the tables are deleted: no service costs no per-packet work.

Shards. The services' chains and their dispatch maps are spread over
SHARDS more tables, `overlayd_services_0` to `_3`, by a hash of the
service's name; the front table `overlayd_services` keeps what is shared
(the no-backend maps and chains, the hairpin sets, the masquerade). Why:
the kernel checks, on every transaction that adds a rule or a goto, every
chain reachable from the changed table's base chains, and it does so once
per base chain (nft_table_validate; both nat_prerouting and nat_output
reach every service chain). In one table of 10,000 services that check
was about 15 ms of a 28 ms change (perf, kernel 6.18), and grew with the
total. In a shard it walks a quarter of them. The price is on the first
packet of a connection only: SHARDS nat base chains per hook to pass,
each one map lookup (and a fib lookup for node ports), the first to
translate ending the walk (a nat hook stops at the first binding).

How a packet finds its service (first packet of a connection only: nat
chains see nothing else, conntrack does the rest), in each shard:

    chain nat_prerouting   type nat hook prerouting priority dstnat
        ip daddr . meta l4proto . th dport vmap @vips_v4       (and _v6)
        fib daddr type local meta nfproto ipv4 meta l4proto . th dport vmap @nodeports_v4
    chain nat_output       type nat hook output priority -100 (dstnat's
                           value; nft 1.0.6 takes the name in prerouting only)
        ip daddr . meta l4proto . th dport vmap @vips_v4       host -> VIP

One map lookup per shard, whatever the number of services: the per-packet
cost does not grow with them (kube-proxy's nftables mode does the same). Each
element jumps (`goto`) to the chain of one (service, port, family):

    chain svc_web_tcp80_<hash>_v4
        ip saddr != <cluster networks> meta mark set meta mark | MARK
        meta l4proto tcp dnat ip to numgen random mod 3 map {
            0 : 10.244.1.5 . 8080, 1 : 10.244.2.7 . 8080, 2 : ... }

Backend choice is one anonymous map in one rule, not kube-proxy's chain
per endpoint: a backend coming or going rewrites this one chain (flush and
one rule), never another service's. The first rule sends a client from
outside the cluster's networks (a host process, a routed outside client)
through the masquerade below, so that a backend on another host answers
through this host; a container's address is never rewritten, so network
policy on the backend's host judges the real client.

Session affinity (ClientIP). `dnat ip to jhash ip saddr mod 251 seed S
map { slot : backend }`: a client address hashes to one of a fixed number
of slots, and a Maglev table (Eisenbud et al., NSDI 2016) assigns slots to
backends. Chosen over kube-proxy's per-backend sets of recent clients
(`update @affinity-<ep> { ip saddr }` in a chain per endpoint, a lookup per
backend for each new connection):
- no state: nothing is written from the packet path, nothing is lost when
  the table is rewritten or the daemon restarts, and every host (same
  seed, same table from the same backends) pins a client to the same
  backend, so a node-port client is pinned whichever host it enters by;
- one rule per service, as without affinity, so the update cost stays flat;
- but the pin is not a timeout: it lasts while the backend set is
  unchanged, and a change of backends moves some clients. The Maglev table
  keeps that to about the changed share (a backend leaving moves its own
  clients and few others; `mod N` would move nearly all of them).
  `affinity_seconds` is therefore not used. Established connections are
  never moved (conntrack keeps them on their backend).

No backend. A service with no backend of a family has no chain: its VIP
and ports are elements of `noep_vips_v4` instead, and a filter chain on
the input, forward and output hooks (reject is valid only there, so not in
the nat chains) sends the first packet to `reject_chain`: a TCP reset for
TCP, ICMP port unreachable otherwise. A client gets "connection refused"
at once, not a timeout. (The packet reaches the forward hook only if this
host has a route for the VIP, as a host with a default route has; without
one the kernel's own "unreachable" answers, as fast.)

Node ports. On every local address of the host (`fib daddr type local`),
in prerouting only: connections from other machines and from containers.
(Not from the host's own processes: a source of 127.0.0.1 cannot be
forwarded.)
- Cluster: `np_..._v4` marks the packet for masquerade and goes to the
  service's chain: any backend, on any host; the masquerade makes the
  reply come back through this host.
- Local: `np_..._v4` DNATs to this host's backends only, without the mark:
  the backend sees the client's address. With backends elsewhere but none
  here the node port drops (as Kubernetes does: the client's load balancer
  should not have sent it here); with no backend anywhere it rejects.

Source translation, in `nat_postrouting` (srcnat), for exactly two kinds
of connection, never for service traffic in general:
- marked ones (node port Cluster, clients from outside the cluster's
  networks): the mark bit is cleared and the source becomes this host's
  bridge address of the family (`snat ip to 10.244.1.1`), whichever way
  the connection leaves. Not `masquerade`, which takes the address of the
  way out: to a backend on another host reached over the underlay (host-gw
  mode, DirectRouting) that is this host's underlay address, from which
  the backend's host lets no connection in (plan/egress.py: only the
  cluster's addresses open connections to containers), so such node-port
  and host connections timed out. The bridge address is a cluster address
  in every mode, the backend's answer is routed back to this host, and
  over VXLAN it is what masquerade picked anyway. (A host without a subnet
  of the family, which has no bridge address of it, masquerades.)
- hairpin: a container reaching its own service and landing on itself
  (saddr == daddr after DNAT). nft cannot compare two fields of a packet,
  so `hairpin_v4` holds the pair (e . e) for each local backend of any
  service: `ct status dnat ip saddr . ip daddr @hairpin_v4 masquerade`. The
  backend then sees the bridge's address and its reply comes back through
  the host, which undoes both translations. With bridge netfilter on (as
  the daemon keeps it while policies exist), the DNAT happens as the frame
  crosses the bridge, and the bridge sends it back out the port it came
  in by: the container's bridge port needs hairpin mode (`bridge link set
  dev <veth> hairpin on`, CNI bridge's hairpinMode), or the hairpin
  connection times out (tests/netns/test_service_kernel.py shows both).

Flat update cost. A ruleset keeps each service's objects apart
(ServiceRules: its chains, its map elements, its hairpin elements);
with_service() replaces one service's and service_transaction() compares
services by identity first, so a change costs the changed services, not
the totals: adding or removing one service, or one backend of one,
writes a fixed number of statements (element adds and deletes, one per
map touched, and the service's own chains declared, flushed, filled or
deleted) whether 100 or 30,000 services exist. The kernel is never listed
to decide a change: the previous ruleset is the belief.

Use: service_ruleset() makes a ruleset from scratch; with_service() moves
it by one service; service_transaction(before, after) gives the
statements, script() their `nft -f` input, statement_count() their number;
render_ruleset() shows the whole table (golden files), table_chains() its
chains (diagnose compares them with the kernel's, plan/service_check.py).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from overlayd.model import IPAddress, IPNetwork
from overlayd.plan.policy_model import Endpoint
from overlayd.plan.policy_rules import Chain, LocalSubnets, add_chain, chain_block, script
from overlayd.plan.service_model import Affinity, Service, ServicePort, TrafficPolicy

__all__ = [
    "AFFINITY_SEED",
    "AFFINITY_SLOTS",
    "MARK",
    "SHARDS",
    "SHARD_TABLES",
    "TABLE",
    "TABLES",
    "WHERE",
    "ServiceRules",
    "ServiceRuleset",
    "render_ruleset",
    "script",
    "service_ruleset",
    "service_transaction",
    "statement_count",
    "table_chains",
    "with_service",
]

TABLE = "overlayd_services"
WHERE = f"inet {TABLE}"
# The services' chains and dispatch maps are spread over SHARDS tables of
# their own, by a hash of the service's name (see "Shards" above).
SHARDS = 4
SHARD_TABLES = tuple(f"{TABLE}_{k}" for k in range(SHARDS))
TABLES = (TABLE, *SHARD_TABLES)
# The packet mark bit that asks nat_postrouting to masquerade. kube-proxy
# uses 0x4000 and 0x8000; this one is apart from both, and only this bit
# is set or cleared (`| MARK`, `^ MARK`), so other owners' bits survive.
MARK = 0x00200000
# jhash seed for ClientIP affinity: fixed, so every host and every rewrite
# hashes a client alike.
AFFINITY_SEED = 0x6F766C64
# Slots of the affinity table: primes (Maglev needs a prime size), the
# smallest holding at least AFFINITY_SLOTS_PER_BACKEND per backend.
AFFINITY_SLOTS = (251, 1021, 4093, 16381, 65521)
AFFINITY_SLOTS_PER_BACKEND = 5
REJECT_CHAIN = "reject_chain"
NOEP_CHAIN = "no_endpoints"
_READABLE = 16
_HASH = 10
_COMMENT = 128

# Map kinds, per family: the key type (with {addr} for the family's address
# type) and the value type.
_VIPS, _NODEPORTS, _NOEP_VIPS, _NOEP_NODEPORTS = "vips", "nodeports", "noep_vips", "noep_nodeports"
_MAP_KEYS = {
    _VIPS: "{addr} . inet_proto . inet_service",
    _NODEPORTS: "inet_proto . inet_service",
    _NOEP_VIPS: "{addr} . inet_proto . inet_service",
    _NOEP_NODEPORTS: "inet_proto . inet_service",
}
_ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}
_IP = {4: "ip", 6: "ip6"}


# The maps of the shard tables; the others (and the hairpin sets) are the
# front table's.
_SHARD_KINDS = (_VIPS, _NODEPORTS)

MapId = tuple[str, str]  # (table, map or set name)


def map_name(kind: str, version: int) -> str:
    return f"{kind}_v{version}"


def hairpin_set(version: int) -> str:
    return f"hairpin_v{version}"


def shard_of(service: str) -> int:
    """The shard a service's chains and dispatch elements live in: fixed by
    its name, so a service never moves."""
    return int(_digest(f"shard/{service}"), 16) % SHARDS


def shard_where(shard: int) -> str:
    return f"inet {SHARD_TABLES[shard]}"


def map_table(name: str, shard: int) -> str:
    """The table holding map `name` (as ServiceRules.elements names it) for
    a service of `shard`."""
    kind = name.rsplit("_v", 1)[0]
    return SHARD_TABLES[shard] if kind in _SHARD_KINDS else TABLE


# --- names -------------------------------------------------------------------


def _readable(text: str) -> str:
    word = "".join(c if c.isascii() and c.isalnum() else "_" for c in text)
    return "_".join(part for part in word.split("_") if part)[:_READABLE].rstrip("_") or "x"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH]


def _port_id(service: str, port: ServicePort) -> str:
    proto = port.protocol.value.lower()
    return f"{_readable(service)}_{proto}{port.port}_{_digest(f'{service}/{proto}/{port.port}')}"


def service_chain(service: str, port: ServicePort, version: int) -> str:
    """The chain that picks a backend for one port of a service, one family."""
    return f"svc_{_port_id(service, port)}_v{version}"


def nodeport_chain(service: str, port: ServicePort, version: int) -> str:
    """The chain a node port of a service enters by, one family."""
    return f"np_{_port_id(service, port)}_v{version}"


def _comment(text: str) -> str:
    clean = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)
    return clean if len(clean) <= _COMMENT else clean[: _COMMENT - 3] + "..."


# --- values ------------------------------------------------------------------


class ServiceRules(NamedTuple):
    """One service's objects: its chains (in creation order: a chain before
    the chains that go to it), its elements in the shared maps (map name ->
    key -> verdict), the local backend addresses it needs in the hairpin
    sets, and its shard (the table of its chains and dispatch elements)."""

    chains: Mapping[str, Chain]
    elements: Mapping[str, Mapping[str, str]]
    hairpin: frozenset[IPAddress]
    shard: int = 0


@dataclass(frozen=True, slots=True)
class ServiceRuleset:
    """Everything in `table inet overlayd_services`: the fixed objects
    (which depend on the families and networks alone) and each service's
    own. `hairpin` counts, per local backend address, the services that
    need it, so that a service leaving removes only what no other needs."""

    local: LocalSubnets
    cluster: tuple[IPNetwork, ...]
    services: Mapping[str, ServiceRules] = field(default_factory=dict)
    hairpin: Mapping[IPAddress, int] = field(default_factory=dict)

    @property
    def versions(self) -> tuple[int, ...]:
        """The families served: those of the cluster's networks."""
        return tuple(v for v in (4, 6) if any(n.version == v for n in self.cluster))

    @property
    def empty(self) -> bool:
        return not self.services

    def maps(self) -> dict[MapId, dict[str, str]]:
        """Every map's elements (key -> verdict) by (table, map), all
        services together."""
        found: dict[MapId, dict[str, str]] = {}
        for table in TABLES:
            for v in self.versions:
                for kind in _MAP_KEYS:
                    if (kind in _SHARD_KINDS) == (table != TABLE):
                        found[table, map_name(kind, v)] = {}
        for rules in self.services.values():
            for name, elements in rules.elements.items():
                found[map_table(name, rules.shard), name].update(elements)
        return found

    def hairpin_elements(self, version: int) -> list[str]:
        return [f"{a} . {a}" for a in sorted(self.hairpin, key=int) if a.version == version]


# --- rendering one service ---------------------------------------------------


def _family_address(endpoint: Endpoint, version: int) -> IPAddress | None:
    return next((a for a in endpoint.addresses if a.version == version), None)


def _target(address: IPAddress, port: int) -> str:
    return f"{address} . {port}"


def _maglev(keys: Sequence[str], size: int) -> list[int]:
    """Maglev's lookup table: slot -> index into `keys`. Every key gets
    size/len(keys) slots (give or take one), and removing or adding a key
    moves few slots of the others."""
    offsets, skips = [], []
    for key in keys:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        offsets.append(int.from_bytes(digest[:8], "big") % size)
        skips.append(int.from_bytes(digest[8:16], "big") % (size - 1) + 1)
    table = [-1] * size
    following = [0] * len(keys)
    filled = 0
    while True:
        for i in range(len(keys)):
            slot = (offsets[i] + following[i] * skips[i]) % size
            while table[slot] >= 0:
                following[i] += 1
                slot = (offsets[i] + following[i] * skips[i]) % size
            table[slot] = i
            following[i] += 1
            filled += 1
            if filled == size:
                return table


def affinity_slots(backends: int) -> int:
    """The number of slots of an affinity table for `backends` backends."""
    want = backends * AFFINITY_SLOTS_PER_BACKEND
    return next((s for s in AFFINITY_SLOTS if s >= want), AFFINITY_SLOTS[-1])


def _dnat(
    version: int,
    port: ServicePort,
    targets: Sequence[tuple[Endpoint, IPAddress]],
    affinity: Affinity,
) -> tuple[str, ...]:
    """The rules that pick a backend and DNAT to it."""
    proto = port.protocol.value.lower()
    head = f"meta l4proto {proto} dnat {_IP[version]} to"

    def direct(address: IPAddress) -> str:
        return (
            f"[{address}]:{port.target_port}" if version == 6 else f"{address}:{port.target_port}"
        )

    if len(targets) == 1:
        return (f"{head} {direct(targets[0][1])}",)
    if affinity is Affinity.CLIENT_IP:
        size = affinity_slots(len(targets))
        table = _maglev([f"{e.key} {a}" for e, a in targets], size)
        chosen = ", ".join(
            f"{slot} : {_target(targets[i][1], port.target_port)}" for slot, i in enumerate(table)
        )
        return (
            f"{head} jhash {_IP[version]} saddr mod {size} seed 0x{AFFINITY_SEED:x}"
            f" map {{ {chosen} }}",
        )
    # A cascade, not one `numgen random mod N map { ... }`: each such map is
    # an anonymous set, and the kernel names a new anonymous set by scanning
    # every set of the table, so that a table of 10,000 services took 40 s
    # to load (1.2 s as a cascade, measured with nft 1.0.6 and kernel 6.18).
    # Rule i takes 1 in N - i of the connections the rules before it left:
    # 1 in N each, with a fresh random number per rule.
    count = len(targets)
    proto_match = f"meta l4proto {proto}"
    return tuple(
        f"{proto_match} numgen random mod {count - i} 0 dnat {_IP[version]} to {direct(a)}"
        if i < count - 1
        else f"{head} {direct(a)}"
        for i, (_, a) in enumerate(targets)
    )


def _is_local(address: IPAddress, local: LocalSubnets) -> bool:
    return any(address in network for network in local.networks(address.version))


def service_rules(
    service: Service,
    backends: Sequence[Endpoint],
    local: LocalSubnets,
    cluster: Sequence[IPNetwork],
) -> ServiceRules:
    """One service's chains, map elements and hairpin needs, for every
    family of `cluster` in which it has a VIP."""
    chains: dict[str, Chain] = {}
    nodeport_chains: dict[str, Chain] = {}
    elements: dict[str, dict[str, str]] = {}
    hairpin: set[IPAddress] = set()
    ordered = sorted(backends, key=lambda e: e.key)
    for version in (4, 6):
        networks = [str(n) for n in cluster if n.version == version]
        vip = service.vip(version)
        if not networks or vip is None:
            continue
        ip = _IP[version]
        targets = [(e, a) for e in ordered if (a := _family_address(e, version)) is not None]
        here = [(e, a) for e, a in targets if _is_local(a, local)]
        hairpin.update(a for _, a in here)

        def put(kind: str, key: str, verdict: str, version: int = version) -> None:
            elements.setdefault(map_name(kind, version), {})[key] = verdict

        for port in service.ports:
            proto = port.protocol.value.lower()
            vip_key = f"{vip} . {proto} . {port.port}"
            chain = service_chain(service.name, port, version)
            rules: tuple[str, ...]
            if targets:
                outside = networks[0] if len(networks) == 1 else f"{{ {', '.join(networks)} }}"
                rules = (
                    f"{ip} saddr != {outside} meta mark set meta mark | 0x{MARK:08x}",
                    *_dnat(version, port, targets, service.affinity),
                )
                comment = _comment(f"service {service.name} {proto}/{port.port}")
                chains[chain] = Chain(rules, comment)
                put(_VIPS, vip_key, f"goto {chain}")
            else:
                put(_NOEP_VIPS, vip_key, f"goto {REJECT_CHAIN}")
            if port.node_port is None:
                continue
            np_key = f"{proto} . {port.node_port}"
            np_chain = nodeport_chain(service.name, port, version)
            comment = _comment(f"service {service.name} node port {proto}/{port.node_port}")
            if not targets:
                put(_NOEP_NODEPORTS, np_key, f"goto {REJECT_CHAIN}")
            elif service.traffic_policy is TrafficPolicy.CLUSTER:
                rules = (f"meta mark set meta mark | 0x{MARK:08x}", f"goto {chain}")
                nodeport_chains[np_chain] = Chain(rules, comment)
                put(_NODEPORTS, np_key, f"goto {np_chain}")
            elif here:
                rules = _dnat(version, port, here, service.affinity)
                nodeport_chains[np_chain] = Chain(rules, comment)
                put(_NODEPORTS, np_key, f"goto {np_chain}")
            else:
                put(_NOEP_NODEPORTS, np_key, "drop")
    return ServiceRules(
        {**chains, **nodeport_chains}, elements, frozenset(hairpin), shard_of(service.name)
    )


# --- whole rulesets ------------------------------------------------------------


def service_ruleset(
    services: Mapping[str, Service],
    backends: Mapping[str, Sequence[Endpoint]],
    local: LocalSubnets,
    cluster: Sequence[IPNetwork],
) -> ServiceRuleset:
    """The ruleset for `services` (name -> service), each with its backends
    (name -> endpoints; a missing name has none), on a host with the
    subnets `local`, in a cluster of the networks `cluster` (one per family
    served). ValueError when two services claim one VIP and port, or one
    node port (plan/service.py refuses both; a render never merges them)."""
    ruleset = ServiceRuleset(local, tuple(cluster))
    parts: dict[str, ServiceRules] = {}
    owners: dict[tuple[str, str], str] = {}
    hairpin: Counter[IPAddress] = Counter()
    for name in sorted(services):
        rules = service_rules(services[name], backends.get(name, ()), local, cluster)
        for map_, elements in rules.elements.items():
            for key in elements:
                kind = map_.replace("noep_", "")  # a VIP is one VIP, reachable or not
                if (kind, key) in owners:
                    raise ValueError(
                        f"services {owners[kind, key]!r} and {name!r} both claim {key}"
                    )
                owners[kind, key] = name
        parts[name] = rules
        hairpin.update(rules.hairpin)
    return replace(ruleset, services=parts, hairpin=dict(hairpin))


def with_service(
    ruleset: ServiceRuleset,
    name: str,
    service: Service | None,
    backends: Sequence[Endpoint] = (),
) -> ServiceRuleset:
    """The ruleset with one service (re)rendered from its definition and
    backends, or removed (service None): the cost of that service, not of
    the others. Does not check that its VIP and node ports are free (see
    service_ruleset): nft refuses a clashing element, and the caller then
    renders from scratch, which names the clash."""
    services = dict(ruleset.services)
    hairpin = dict(ruleset.hairpin)
    old = services.pop(name, None)
    if old is not None:
        for address in old.hairpin:
            hairpin[address] -= 1
            if not hairpin[address]:
                del hairpin[address]
    if service is not None:
        rules = service_rules(service, backends, ruleset.local, ruleset.cluster)
        services[name] = rules
        for address in rules.hairpin:
            hairpin[address] = hairpin.get(address, 0) + 1
    return replace(ruleset, services=services, hairpin=hairpin)


# --- the fixed objects -----------------------------------------------------------


def _bridge_address(local: LocalSubnets, version: int) -> IPAddress | None:
    """This host's bridge (gateway) address of one family: the first host
    address of its subnet (plan/ipam.gateway_address); None without one."""
    subnet = local.subnet if version == 4 else local.subnet6
    return None if subnet is None else subnet.network_address + 1


def _front_chains(versions: Sequence[int], local: LocalSubnets) -> dict[str, Chain]:
    """The front table's chains, in creation order: rejection of services
    without backends, and the source translations."""
    noep, postrouting = [], []
    for v in versions:
        ip = _IP[v]
        noep.append(f"{ip} daddr . meta l4proto . th dport vmap @{map_name(_NOEP_VIPS, v)}")
    for v in versions:
        ports = f"meta nfproto ipv{v} meta l4proto . th dport vmap"
        noep.append(f"fib daddr type local {ports} @{map_name(_NOEP_NODEPORTS, v)}")
    mark = f"0x{MARK:08x}"
    for v in versions:
        # To the bridge's address, not `masquerade` (the address of the way
        # out): see "Source translation" in the module's docstring.
        bridge = _bridge_address(local, v)
        to = "masquerade" if bridge is None else f"snat {_IP[v]} to {bridge}"
        postrouting.append(
            f"meta nfproto ipv{v} meta mark & {mark} == {mark}"
            f" meta mark set meta mark ^ {mark} {to} fully-random"
        )
    for v in versions:
        ip = _IP[v]
        postrouting.append(f"ct status dnat {ip} saddr . {ip} daddr @{hairpin_set(v)} masquerade")
    new = ("ct state new jump no_endpoints",)
    return {
        REJECT_CHAIN: Chain(("meta l4proto tcp reject with tcp reset", "reject")),
        NOEP_CHAIN: Chain(tuple(noep)),
        "nat_postrouting": Chain(
            tuple(postrouting), hook="type nat hook postrouting priority srcnat; policy accept;"
        ),
        "filter_input": Chain(
            new, hook="type filter hook input priority filter - 20; policy accept;"
        ),
        "filter_forward": Chain(
            new, hook="type filter hook forward priority filter - 20; policy accept;"
        ),
        "filter_output": Chain(
            new, hook="type filter hook output priority filter - 20; policy accept;"
        ),
    }


def _shard_chains(versions: Sequence[int]) -> dict[str, Chain]:
    """Each shard table's base chains: the dispatch to its services."""
    prerouting, output = [], []
    for v in versions:
        vips = f"{_IP[v]} daddr . meta l4proto . th dport vmap @{map_name(_VIPS, v)}"
        prerouting.append(vips)
        output.append(vips)
    for v in versions:
        ports = f"meta nfproto ipv{v} meta l4proto . th dport vmap"
        prerouting.append(f"fib daddr type local {ports} @{map_name(_NODEPORTS, v)}")
    return {
        "nat_prerouting": Chain(
            tuple(prerouting), hook="type nat hook prerouting priority dstnat; policy accept;"
        ),
        "nat_output": Chain(
            tuple(output), hook="type nat hook output priority -100; policy accept;"
        ),
    }


def _map_declarations(versions: Sequence[int], table: str) -> dict[str, str]:
    """Map and set name -> its type line, for one of the tables."""
    front = table == TABLE
    found = {}
    for v in versions:
        for kind, key in _MAP_KEYS.items():
            if (kind in _SHARD_KINDS) != front:
                found[map_name(kind, v)] = f"type {key.format(addr=_ADDR[v])} : verdict"
        if front:
            found[hairpin_set(v)] = f"type {_ADDR[v]} . {_ADDR[v]}"
    return found


def _table_chains(ruleset: ServiceRuleset, table: str) -> dict[str, Chain]:
    """One table's chains: services' first (in name order; the maps'
    elements go to them), then the fixed ones."""
    if table == TABLE:
        return _front_chains(ruleset.versions, ruleset.local)
    shard = SHARD_TABLES.index(table)
    chains: dict[str, Chain] = {}
    for name in sorted(ruleset.services):
        rules = ruleset.services[name]
        if rules.shard == shard:
            chains.update(rules.chains)
    chains.update(_shard_chains(ruleset.versions))
    return chains


# --- text --------------------------------------------------------------------


def _sorted_elements(elements: Mapping[str, str]) -> list[str]:
    return [f"{key} : {verdict}" for key, verdict in sorted(elements.items())]


def render_ruleset(ruleset: ServiceRuleset) -> str:
    """Every table as nft text in nft's listing layout (valid `nft -f`
    input too), the front table first; "" without services."""
    if ruleset.empty:
        return ""
    maps = ruleset.maps()
    tables = []
    for table in TABLES:
        blocks = []
        for name, type_line in _map_declarations(ruleset.versions, table).items():
            kind = "set" if name.startswith("hairpin_") else "map"
            lines = [f"\t{kind} {name} {{", f"\t\t{type_line}"]
            if kind == "set":
                shown = ruleset.hairpin_elements(int(name[-1]))
            else:
                shown = _sorted_elements(maps[table, name])
            if shown:
                lines.append(f"\t\telements = {{ {', '.join(shown)} }}")
            blocks.append("\n".join([*lines, "\t}"]))
        blocks += [chain_block(name, chain) for name, chain in _listed_order(ruleset, table)]
        tables.append(f"table inet {table} {{\n" + "\n\n".join(blocks) + "\n}\n")
    return "\n".join(tables)


def chain_label(table: str, chain: str) -> str:
    """How a chain is named across the services tables (diagnose): a
    shard's fixed chains share their names with every other shard's."""
    return f"{table} {chain}"


def table_chains(ruleset: ServiceRuleset) -> dict[str, Chain]:
    """Every chain of every services table by chain_label, each table's
    fixed ones first, then its services' by service name (none without
    services)."""
    if ruleset.empty:
        return {}
    return {
        chain_label(table, name): chain
        for table in TABLES
        for name, chain in _listed_order(ruleset, table)
    }


def _listed_order(ruleset: ServiceRuleset, table: str) -> list[tuple[str, Chain]]:
    """One table's chains as nft lists them: the fixed ones first (in
    creation order), then the services' by service name."""
    chains = _table_chains(ruleset, table)
    fixed = (
        _front_chains(ruleset.versions, ruleset.local)
        if table == TABLE
        else _shard_chains(ruleset.versions)
    )
    return [(n, chains[n]) for n in [*fixed, *(n for n in chains if n not in fixed)]]


def _create(ruleset: ServiceRuleset) -> list[str]:
    maps = ruleset.maps()
    out = []
    for table in TABLES:
        where = f"inet {table}"
        out.append(f"add table {where}")
        for name, type_line in _map_declarations(ruleset.versions, table).items():
            kind = "set" if name.startswith("hairpin_") else "map"
            out.append(f"add {kind} {where} {name} {{ {type_line}; }}")
        # Service chains first: the maps' elements go to them, and the fixed
        # chains refer to the maps.
        chains = _table_chains(ruleset, table)
        out += [add_chain(where, name, chain) for name, chain in chains.items()]
        for name, chain in chains.items():
            out += [f"add rule {where} {name} {rule}" for rule in chain.rules]
        for (in_table, name), elements in maps.items():
            if in_table == table and elements:
                out.append(
                    f"add element {where} {name} {{ {', '.join(_sorted_elements(elements))} }}"
                )
        if table == TABLE:
            for v in ruleset.versions:
                if shown := ruleset.hairpin_elements(v):
                    out.append(f"add element {where} {hairpin_set(v)} {{ {', '.join(shown)} }}")
    return out


def _same_base(before: ServiceRuleset, after: ServiceRuleset) -> bool:
    return before.local == after.local and before.cluster == after.cluster


def _all_deleted() -> list[str]:
    return [f"delete table inet {table}" for table in TABLES]


def _all_made_and_deleted() -> list[str]:
    """Every table deleted, whether it exists or not (`table` makes it first)."""
    return [s for table in TABLES for s in (f"table inet {table}", f"delete table inet {table}")]


def service_transaction(before: ServiceRuleset | None, after: ServiceRuleset) -> list[str]:
    """The `nft -f` statements, one transaction, that turn `before` into
    `after`. `before` None (unknown) or made for other subnets or networks:
    the tables are made afresh, whether or not they exist. Otherwise only
    the changed services' objects, in an order nft accepts: new chains
    declared, changed chains flushed, then both filled (a node port chain
    goes to its service chain, declared by then); map and set elements
    deleted, then added (one statement per map and kind, however many
    elements: a changed element is deleted and added again); gone chains
    flushed, all of them, then deleted, once nothing refers to them. The
    services are compared by identity first: an unchanged service costs a
    pointer comparison. `after` empty: the tables go."""
    if after.empty:
        if before is None:
            return _all_made_and_deleted()
        return [] if before.empty else _all_deleted()
    if before is None or before.empty or not _same_base(before, after):
        return [*_all_made_and_deleted(), *_create(after)]
    declare: list[str] = []
    fill: list[str] = []
    gone: list[tuple[str, str]] = []  # (where, chain)
    deletes: dict[MapId, list[str]] = {}
    adds: dict[MapId, list[str]] = {}
    for name in _changed(before.services, after.services):
        old = before.services.get(name)
        new = after.services.get(name)
        shard = (new or old or ServiceRules({}, {}, frozenset())).shard
        old = old or ServiceRules({}, {}, frozenset(), shard)
        new = new or ServiceRules({}, {}, frozenset(), shard)
        where = shard_where(shard)
        for chain_name, chain in new.chains.items():
            was = old.chains.get(chain_name)
            if was is None:
                declare.append(add_chain(where, chain_name, chain))
            elif was == chain:
                continue
            else:
                fill.append(f"flush chain {where} {chain_name}")
            fill += [f"add rule {where} {chain_name} {rule}" for rule in chain.rules]
        gone += [(where, c) for c in old.chains if c not in new.chains]
        for map_ in sorted({*old.elements, *new.elements}):
            was_elements, now = old.elements.get(map_, {}), new.elements.get(map_, {})
            at = (map_table(map_, shard), map_)
            for key, verdict in was_elements.items():
                if now.get(key) != verdict:
                    deletes.setdefault(at, []).append(key)
            for key, verdict in now.items():
                if was_elements.get(key) != verdict:
                    adds.setdefault(at, []).append(f"{key} : {verdict}")
    for v in after.versions:
        at = (TABLE, hairpin_set(v))
        left = [a for a in before.hairpin if a.version == v and a not in after.hairpin]
        came = [a for a in after.hairpin if a.version == v and a not in before.hairpin]
        if left:
            deletes.setdefault(at, []).extend(f"{a} . {a}" for a in sorted(left, key=int))
        if came:
            adds.setdefault(at, []).extend(f"{a} . {a}" for a in sorted(came, key=int))
    out = [*declare, *fill]
    out += [
        f"delete element inet {t} {m} {{ {', '.join(sorted(k))} }}"
        for (t, m), k in sorted(deletes.items())
    ]
    out += [
        f"add element inet {t} {m} {{ {', '.join(sorted(e))} }}"
        for (t, m), e in sorted(adds.items())
    ]
    out += [f"flush chain {w} {c}" for w, c in gone]
    out += [f"delete chain {w} {c}" for w, c in gone]
    return out


def _changed(before: Mapping[str, ServiceRules], after: Mapping[str, ServiceRules]) -> list[str]:
    """Names of services whose objects differ, in name order. Identity
    first: with_service leaves every other service's value as it was."""
    found = [
        name
        for name, rules in after.items()
        if (old := before.get(name)) is not rules and old != rules
    ]
    found += [name for name in before if name not in after]
    return sorted(found)


def statement_count(statements: Iterable[str]) -> int:
    """How many statements a transaction has (one per line of its script):
    the figure the flat-update tests compare across ruleset sizes."""
    return sum(1 for s in statements if s.strip())
