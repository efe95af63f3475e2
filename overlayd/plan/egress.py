"""Egress for containers, rendered as data: the nftables table overlayd owns,
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
  multicast, is masqueraded.
- none: no rules at all (our egress chains are removed if they exist).

In every mode the overlay is never NATed: the masquerade rules only match
traffic whose destination lies outside the cluster network, and nobody
outside the cluster network may open connections to containers, except
through a port the host publishes (a DNAT by portmap or Docker's -p).

Packet paths (gwbridge mode, host A at 192.0.2.11):

    container ── eth0 (10.244.1.2) ── ovl0 ── VXLAN ──> containers on B   no NAT
        │        route 10.244.0.0/16 only
        └─────── eth1 (172.18.0.2) ── ovl_gwbridge ── A routes ── eth0 ──> outside
                 default route                    masquerade to 192.0.2.11

    masquerade mode: container ── eth0 ── ovl0 ─┬─ VXLAN ──> cluster       no NAT
                                                └─ eth0 ──> outside      masquerade
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network

from overlayd.errors import ConfigError
from overlayd.plan.desired import stable_mac

TABLE = "overlayd"
FAMILY = "ip"
FORWARD_CHAIN = "OVERLAYD-FORWARD"
# The chains of our table that the egress rules own.
EGRESS_CHAINS = ("forward", "postrouting")
MULTICAST = IPv4Network("224.0.0.0/4")
# Docker's default pool for its own bridges starts at 172.17; take the next
# /16s, as docker_gwbridge does.
GWBRIDGE_CANDIDATES = tuple(IPv4Network(f"172.{n}.0.0/16") for n in range(18, 32))


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
        if self.mode != "gwbridge" or self.gwbridge_subnet6 is None:
            return None
        return IPv6Interface(
            (self.gwbridge_subnet6.network_address + 1, self.gwbridge_subnet6.prefixlen)
        )


def choose_gwbridge_subnet(
    configured: IPv4Network | None,
    cluster: IPv4Network,
    host_routes: Iterable[IPv4Network],
) -> IPv4Network:
    """The configured subnet if it overlaps nothing, else the first free
    candidate. `host_routes` must leave out the gwbridge's own route, so that a
    restart chooses the same subnet again."""
    routes = [r for r in host_routes if r.prefixlen > 0]  # a default route overlaps all
    if configured is not None:
        if configured.overlaps(cluster):
            raise ConfigError(
                "gwbridge-subnet", f"{configured} overlaps the cluster network {cluster}"
            )
        clash = next((r for r in routes if r.overlaps(configured)), None)
        if clash is not None:
            raise ConfigError(
                "gwbridge-subnet", f"{configured} overlaps the host's route to {clash}"
            )
        return configured
    for candidate in GWBRIDGE_CANDIDATES:
        if not candidate.overlaps(cluster) and not any(r.overlaps(candidate) for r in routes):
            return candidate
    raise ConfigError(
        "gwbridge-subnet",
        "every default candidate (172.18.0.0/16 to 172.31.0.0/16) overlaps the cluster"
        " network or a host route: set one explicitly",
    )


def _forward_chain(spec: EgressSpec) -> list[str]:
    net = spec.cluster
    rules = [
        "type filter hook forward priority filter; policy accept;",
        # A port published on purpose (portmap for CNI runtimes, Docker's -p)
        # is a DNAT the host's own rules made; its connections are the only
        # ones from outside that reach a container, so they pass before the
        # isolation rules below, which would otherwise drop them.
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
        f"ct state new ip daddr {net} ip saddr != {net} drop"
        ' comment "only the cluster opens connections to cluster addresses"'
    )
    return rules


def _postrouting_chain(spec: EgressSpec) -> list[str]:
    rules = ["type nat hook postrouting priority srcnat; policy accept;"]
    if spec.mode == "gwbridge":
        assert spec.gwbridge_subnet is not None
        rules.append(
            f'ip saddr {spec.gwbridge_subnet} oifname != "{spec.gwbridge}" masquerade fully-random'
        )
    else:
        net = spec.cluster
        rules += [
            f'ip saddr {net} ip daddr {net} return comment "the overlay is never NATed"',
            f"ip saddr {net} ip daddr {MULTICAST} return",
            f"ip saddr {net} masquerade fully-random",
        ]
    return rules


def render_table(spec: EgressSpec) -> str | None:
    """The egress chains as `nft list table` prints them (when they are all
    the table holds); None when the mode wants no rules."""
    if spec.mode == "none":
        return None
    lines = [f"table {FAMILY} {TABLE} {{"]
    for name, body in (
        ("forward", _forward_chain(spec)),
        ("postrouting", _postrouting_chain(spec)),
    ):
        lines.append(f"\tchain {name} {{")
        lines += [f"\t\t{rule}" for rule in body]
        lines.append("\t}")
        lines.append("")
    lines[-1] = "}"
    return "\n".join(lines) + "\n"


def render_transaction(spec: EgressSpec) -> str:
    """An `nft -f` script that replaces our egress chains, and nothing else
    in the table, in one atomic transaction. The table also holds the VXLAN
    allow-list (plan/vxlan_filter.py), whose set elements and drop counter
    must survive a change of egress rules, so the table itself is never
    deleted here. Each chain is added first, which makes its delete safe
    when it is absent; the kernel applies the whole script or none of it,
    so there is no moment without rules."""
    script = f"table {FAMILY} {TABLE}\n"
    for chain in EGRESS_CHAINS:
        script += f"add chain {FAMILY} {TABLE} {chain}\ndelete chain {FAMILY} {TABLE} {chain}\n"
    table = render_table(spec)
    return script + (table or "")


def forward_accept_rules(spec: EgressSpec) -> list[str]:
    """iptables rules (for our own chain in the filter table) that let cluster
    and gwbridge traffic through a FORWARD chain whose policy is drop."""
    if spec.mode == "none":
        return []
    net = spec.cluster
    rules = [f"-s {net} -j ACCEPT", f"-d {net} -j ACCEPT"]
    if spec.mode == "gwbridge":
        rules += [f"-i {spec.gwbridge} -j ACCEPT", f"-o {spec.gwbridge} -j ACCEPT"]
    return [f"-A {FORWARD_CHAIN} {rule}" for rule in rules]
