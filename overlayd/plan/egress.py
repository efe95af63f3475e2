"""Egress for containers, rendered as data: the nftables tables overlayd owns,
the iptables FORWARD exceptions it needs, and the choice of gwbridge subnet.

Modes (the `egress` setting):

- gwbridge (default), like Docker's docker_gwbridge: a second, host-local
  bridge; containers get a second interface on it and their default route
  through it, while their overlay interface carries only the cluster route.
  Traffic from the gwbridge subnet leaving by any other interface is
  masqueraded to the host's address; containers on the gwbridge cannot talk
  to each other through it (Docker's icc=false).
- masquerade, like flannel's ip-masq: one interface on the overlay bridge;
  traffic from the cluster network to anything outside it, except
  multicast (and IPv6 link-local), is masqueraded.
- none: no rules at all (our egress chains are removed if they exist).

In every mode the overlay is never NATed: the masquerade rules only match
traffic whose destination lies outside the cluster network, and nobody
outside the cluster network may open connections to containers, except
through a port the host publishes (a DNAT by portmap or Docker's -p, or
a service's node port).

Dual-stack: the same rules, rendered by the same functions for each address
family (`Family`) that the cluster has, into one table per family: `ip
overlayd` and `ip6 overlayd`. Two tables rather than one `inet` table: the
IPv4 table keeps its name and content exactly, so an upgraded host needs no
migration, and every rule names its family's addresses anyway (an `inet`
table would save no rule). When both tables change, both are written in
one `nft -f` transaction (see dataplane/nft.py), so there is never a moment
with half a ruleset. In gwbridge mode the gwbridge gets an IPv6 subnet too,
a ULA /64 by default (GWBRIDGE_CANDIDATES6).

Packet paths (gwbridge mode, host A at 192.0.2.11):

    container ── eth0 (10.244.1.2) ── ovl0 ── VXLAN ──> containers on B   no NAT
        │        route 10.244.0.0/16 only
        └─────── eth1 (172.18.0.2) ── ovl_gwbridge ── A routes ── eth0 ──> outside
                 default route                    masquerade to 192.0.2.11

    masquerade mode: container ── eth0 ── ovl0 ─┬─ VXLAN ──> cluster       no NAT
                                                └─ eth0 ──> outside      masquerade
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from itertools import islice
from typing import TypeVar, cast

from overlayd.errors import ConfigError
from overlayd.model import IPV4, IPV6, Family, IPNetwork
from overlayd.plan.desired import stable_mac
from overlayd.plan.nftables import nft_family

TABLE = "overlayd"
FAMILY = "ip"  # the IPv4 table's family (nft_family(IPV4))
FAMILIES = (IPV4, IPV6)  # every family that may have a table of ours
FORWARD_CHAIN = "OVERLAYD-FORWARD"
# The chains of our table that the egress rules own.
EGRESS_CHAINS = ("forward", "postrouting")
MULTICAST = IPv4Network("224.0.0.0/4")
# Destinations outside the cluster network that traffic from it still goes
# to unmasqueraded: multicast, and for IPv6 link-local addresses, which are
# never routed (a masqueraded fe80:: packet could not even leave its link).
NEVER_NAT: Mapping[int, tuple[IPNetwork, ...]] = {
    4: (MULTICAST,),
    6: (IPv6Network("ff00::/8"), IPv6Network("fe80::/10")),
}
# Docker's default pool for its own bridges starts at 172.17; take the next
# /16s, as docker_gwbridge does.
GWBRIDGE_CANDIDATES = tuple(IPv4Network(f"172.{n}.0.0/16") for n in range(18, 32))
# The gwbridge's IPv6 subnet, by default the first free /64 of one unique
# local /48 (RFC 4193). RFC 4193 wants a ULA's global ID picked at random so
# that two sites' prefixes are unlikely to meet; ours was picked once, as
# the first 40 bits of sha256("overlayd gwbridge") (4a4eae8d08, so anyone
# can check it is not hand-made), and is the same on every host, as
# 172.18.0.0/16 is. That is harmless: the subnet never leaves its host
# (it is masqueraded, never routed between hosts, never in a lease), so
# hosts need not differ; a constant needs no state to be the same after a
# restart; and it is checked against the cluster's IPv6 network and the
# host's routes like the IPv4 candidates, falling to the next /64.
GWBRIDGE_ULA = IPv6Network("fd4a:4eae:8d08::/48")
# The first 16 of its /64s, made one by one: listing all 65,536 of them to
# keep 16 took a fifth of a second of every start.
GWBRIDGE_CANDIDATES6 = tuple(islice(GWBRIDGE_ULA.subnets(new_prefix=64), 16))
_CANDIDATES: Mapping[int, tuple[IPNetwork, ...]] = {
    4: GWBRIDGE_CANDIDATES,
    6: GWBRIDGE_CANDIDATES6,
}
# The setting that configures each family's gwbridge subnet.
GWBRIDGE_SETTING = {4: "gwbridge-subnet", 6: "gwbridge-subnet6"}


@dataclass(frozen=True, slots=True)
class EgressSpec:
    mode: str
    cluster: IPv4Network
    overlay_bridge: str
    gwbridge: str
    gwbridge_subnet: IPv4Network | None = None
    # Dual-stack: the cluster's IPv6 network, and the gwbridge's IPv6 subnet
    # (gwbridge mode). None without IPv6.
    cluster6: IPv6Network | None = None
    gwbridge_subnet6: IPv6Network | None = None

    @property
    def gwbridge_mac(self) -> str:
        assert self.gwbridge_subnet is not None
        return stable_mac("gwbridge", self.gwbridge_subnet, 0)

    @property
    def gwbridge_gateway(self) -> IPv4Interface | None:
        if self.mode != "gwbridge" or self.gwbridge_subnet is None:
            return None
        return IPv4Interface(
            (self.gwbridge_subnet.network_address + 1, self.gwbridge_subnet.prefixlen)
        )

    @property
    def gwbridge_gateway6(self) -> IPv6Interface | None:
        # Without IPv6 in the cluster (or in our lease) the gwbridge has none either.
        if self.mode != "gwbridge" or self.gwbridge_subnet6 is None or self.cluster6 is None:
            return None
        return IPv6Interface(
            (self.gwbridge_subnet6.network_address + 1, self.gwbridge_subnet6.prefixlen)
        )

    @property
    def families(self) -> tuple[Family, ...]:
        """The address families the cluster has a network of."""
        return tuple(f for f in FAMILIES if self.cluster_for(f) is not None)

    def cluster_for(self, family: Family) -> IPNetwork | None:
        """The cluster's network of `family`; None: the cluster has none."""
        return self.cluster6 if family.version == 6 else self.cluster

    def gwbridge_subnet_for(self, family: Family) -> IPNetwork | None:
        return self.gwbridge_subnet6 if family.version == 6 else self.gwbridge_subnet


N = TypeVar("N", IPv4Network, IPv6Network)


def choose_gwbridge_subnet(
    configured: N | None,
    cluster: N,
    host_routes: Iterable[IPNetwork],
    family: Family = IPV4,
    *,
    service_networks: Iterable[IPNetwork] = (),
) -> N:
    """The configured subnet if it overlaps nothing, else the first free
    candidate of `family`. `host_routes` must leave out the gwbridge's own
    route, so that a restart chooses the same subnet again; routes and
    service networks of the other family are ignored. A gwbridge subnet
    inside the service network would make VIPs of container addresses."""
    setting = GWBRIDGE_SETTING[family.version]
    routes: list[IPNetwork] = [
        r
        for r in host_routes
        if r.version == family.version and r.prefixlen > 0  # a default route overlaps all
    ]
    services: list[IPNetwork] = [n for n in service_networks if n.version == family.version]
    if configured is not None:
        if configured.overlaps(cluster):
            raise ConfigError(setting, f"{configured} overlaps the cluster network {cluster}")
        service = next((n for n in services if n.overlaps(configured)), None)
        if service is not None:
            raise ConfigError(setting, f"{configured} overlaps the service network {service}")
        clash = next((r for r in routes if r.overlaps(configured)), None)
        if clash is not None:
            raise ConfigError(setting, f"{configured} overlaps the host's route to {clash}")
        return configured
    candidates = cast(tuple[N, ...], _CANDIDATES[family.version])
    taken: list[IPNetwork] = [cluster, *services, *routes]
    for candidate in candidates:
        if not any(t.overlaps(candidate) for t in taken):
            return candidate
    raise ConfigError(
        setting,
        f"every default candidate ({candidates[0]} to {candidates[-1]}) overlaps the cluster"
        " network, the service network or a host route: set one explicitly",
    )


@dataclass(frozen=True, slots=True)
class _Rules:
    """What one family's rules need: nft's word for its header fields, the
    cluster's network, the gwbridge's subnet (gwbridge mode) and what is
    never masqueraded."""

    ip: str
    net: IPNetwork
    gwbridge_subnet: IPNetwork | None
    never_nat: tuple[IPNetwork, ...]


def _rules_for(spec: EgressSpec, family: Family) -> _Rules | None:
    """None: no rules of this family (mode none, or the cluster has no
    network of this family)."""
    net = spec.cluster_for(family)
    if spec.mode == "none" or net is None:
        return None
    return _Rules(
        nft_family(family), net, spec.gwbridge_subnet_for(family), NEVER_NAT[family.version]
    )


def _forward_chain(spec: EgressSpec, r: _Rules) -> list[str]:
    rules = [
        "type filter hook forward priority filter; policy accept;",
        # A port published on purpose (portmap for CNI runtimes, Docker's -p,
        # a service's node port in the services table) is a DNAT the host's
        # own rules made; its connections are the only ones from outside
        # that reach a container, so they pass before the isolation rules
        # below, which would otherwise drop them. A node port forwarded to
        # another host's container passes here too (and there: it arrives
        # masqueraded to this host's bridge address, a cluster address);
        # tests/netns/test_nodeport_egress_kernel.py, in every mode.
        'ct status dnat accept comment "published ports"',
    ]
    if spec.mode == "gwbridge":
        gw = spec.gwbridge
        rules += [
            f'iifname "{gw}" oifname "{gw}" drop'
            ' comment "no container-to-container traffic through the gwbridge"',
            f'ct state new oifname "{gw}" drop'
            ' comment "nothing outside may open connections to containers"',
        ]
    rules.append(
        f"ct state new {r.ip} daddr {r.net} {r.ip} saddr != {r.net} drop"
        ' comment "only the cluster opens connections to cluster addresses"'
    )
    return rules


def _postrouting_chain(spec: EgressSpec, r: _Rules) -> list[str]:
    rules = ["type nat hook postrouting priority srcnat; policy accept;"]
    if spec.mode == "gwbridge":
        # The agent picks a gwbridge subnet for each family the cluster has
        # at start; one the cluster gained later has none until the next
        # start, and so no way out yet (but the same isolation).
        if r.gwbridge_subnet is not None:
            rules.append(
                f"{r.ip} saddr {r.gwbridge_subnet}"
                f' oifname != "{spec.gwbridge}" masquerade fully-random'
            )
    else:
        net = r.net
        rules += [
            f'{r.ip} saddr {net} {r.ip} daddr {net} return comment "the overlay is never NATed"',
            *(f"{r.ip} saddr {net} {r.ip} daddr {dst} return" for dst in r.never_nat),
            f"{r.ip} saddr {net} masquerade fully-random",
        ]
    return rules


def render_table(spec: EgressSpec, family: Family = IPV4) -> str | None:
    """`family`'s egress chains as `nft list table` prints them (when they
    are all the table holds); None when the mode wants no rules, or the
    cluster has no network of this family."""
    r = _rules_for(spec, family)
    if r is None:
        return None
    lines = [f"table {nft_family(family)} {TABLE} {{"]
    for name, body in (
        ("forward", _forward_chain(spec, r)),
        ("postrouting", _postrouting_chain(spec, r)),
    ):
        lines.append(f"\tchain {name} {{")
        lines += [f"\t\t{rule}" for rule in body]
        lines.append("\t}")
        lines.append("")
    lines[-1] = "}"
    return "\n".join(lines) + "\n"


def render_transaction(spec: EgressSpec, families: Iterable[Family] = (IPV4,)) -> str:
    """An `nft -f` script that replaces our egress chains, and nothing else
    in the tables, of each of `families`, in one atomic transaction. A
    table also holds the VXLAN allow-list (plan/vxlan_filter.py), whose set
    elements and drop counter must survive a change of egress rules, so the
    table itself is never deleted here. Each chain is added first, which
    makes its delete safe when it is absent; the kernel applies the whole
    script or none of it, both tables included, so there is no moment
    without rules or with one family's new rules and the other's old."""
    script = ""
    for family in families:
        where = f"{nft_family(family)} {TABLE}"
        script += f"table {where}\n"
        for chain in EGRESS_CHAINS:
            script += f"add chain {where} {chain}\ndelete chain {where} {chain}\n"
        script += render_table(spec, family) or ""
    return script


def forward_accept_rules(spec: EgressSpec, family: Family = IPV4) -> list[str]:
    """iptables (or, for IPv6, ip6tables) rules for our own chain in the
    filter table, that let cluster and gwbridge traffic through a FORWARD
    chain whose policy is drop."""
    net = spec.cluster_for(family)
    if spec.mode == "none" or net is None:
        return []
    rules = [f"-s {net} -j ACCEPT", f"-d {net} -j ACCEPT"]
    if spec.mode == "gwbridge":
        rules += [f"-i {spec.gwbridge} -j ACCEPT", f"-o {spec.gwbridge} -j ACCEPT"]
    return [f"-A {FORWARD_CHAIN} {rule}" for rule in rules]
