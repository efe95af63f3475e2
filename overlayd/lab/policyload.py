"""Synthetic endpoints and policies for the policy benchmarks (`lab
policybench --cold`, `lab bench --policies`): a cluster's worth of
registrations and a realistic mix of policy documents, the same for the
same seed. Pure: values in, values out; the benchmarks write them to etcd.

Endpoints carry four labels drawn from a few hundred values (300 apps, 5
tiers, 3 environments, 40 teams), so that selectors select some endpoints
and not all. Policies cycle through the shapes people write (out of every
20):

    10  ingress from selectors (an app; a tier and environment), on a port
        and a port range
     3  ingress from ipBlocks (the cluster less one /24; an outside range)
     3  egress only: to an app's selector on a port, and to everything
        outside the cluster (0.0.0.0/0 except the cluster) on 443
     2  both directions
     1  deny all ingress (policyTypes Ingress, no rules)
     1  matchExpressions (In) on both the selected and the peers

Every document is in overlayd's own shape and must parse with the daemon's
parser (tests/unit/test_policy_load.py checks that, and that every
endpoint's value reads back as the endpoint).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Network
from typing import Any

from overlayd.model import IPAddress
from overlayd.plan.endpoints import endpoint_key, host_id
from overlayd.plan.policy_model import Endpoint, HostSubnets

APPS = 300
TIERS = ("web", "api", "worker", "db", "cache")
ENVS = ("prod", "staging", "dev")
TEAMS = 40
PORTS = (80, 443, 3306, 5432, 6379, 8080, 8443, 9090)
RANGES = ((8000, 8099), (9000, 9100), (30000, 32767))
# Outside ranges a policy may name: documentation addresses only.
OUTSIDE = ("198.51.100.0/24", "203.0.113.0/24")
REGISTERED = 1_800_000_000.0  # a fixed registration time: the same values every run

# The bench containers' labels (`lab bench --policies`): `bench` is theirs
# alone; the others are common ones, so that some synthetic policies select
# the bench containers too and their first packets walk those chains.
BENCH_LABELS: Mapping[str, str] = {"bench": "iperf", "app": "app-000", "tier": "web", "env": "prod"}
BENCH_POLICY_NAMES = ("zz-bench-egress", "zz-bench-ingress")


def app(index: int) -> str:
    return f"app-{index:03d}"


def team(index: int) -> str:
    return f"team-{index:02d}"


def hosts_for(endpoints: int, per_host: int) -> int:
    """How many hosts hold `endpoints` at `per_host` each (the last fewer)."""
    if endpoints < 0 or per_host < 1:
        raise ValueError("endpoints must be at least 0 and per_host at least 1")
    return max(1, math.ceil(endpoints / per_host))


def _labels(rng: random.Random) -> dict[str, str]:
    return {
        "app": app(rng.randrange(APPS)),
        "tier": rng.choice(TIERS),
        "env": rng.choice(ENVS),
        "team": team(rng.randrange(TEAMS)),
    }


def synthetic_endpoints(
    hosts: Sequence[HostSubnets],
    total: int,
    *,
    per_host: int,
    own_prefix: str,
    offset: int = 2,
    seed: int = 0,
) -> list[Endpoint]:
    """`total` endpoints, `per_host` on each host in turn (the last host
    may get fewer): host h's i-th has the address `offset + i` in each of
    its subnets, so that `offset` can keep clear of the addresses a real
    IPAM hands out (it starts at 2). ValueError when they do not fit: an
    address must never be a subnet's network, gateway or broadcast
    address (the rule parse_endpoint enforces)."""
    if total > len(hosts) * per_host:
        raise ValueError(f"{total} endpoints do not fit on {len(hosts)} hosts of {per_host}")
    rng = random.Random(seed)
    found: list[Endpoint] = []
    for number, subnets in enumerate(hosts):
        count = min(per_host, total - len(found))
        if count <= 0:
            break
        for network in (subnets.subnet, subnets.subnet6):
            # The last address used must stay below the broadcast address
            # (IPv4; IPv6 has none, but the same bound costs nothing).
            if network is not None and (offset < 2 or offset + count >= network.num_addresses):
                raise ValueError(f"{count} endpoints from offset {offset} do not fit in {network}")
        host = host_id(subnets.subnet)
        for i in range(count):
            ident = f"syn-{number}-{i}"
            addresses: list[IPAddress] = [subnets.subnet.network_address + offset + i]
            if subnets.subnet6 is not None:
                addresses.append(subnets.subnet6.network_address + offset + i)
            found.append(
                Endpoint(
                    key=endpoint_key(own_prefix, host, ident),
                    id=ident,
                    host=host,
                    name=ident,
                    addresses=tuple(addresses),
                    labels=_labels(rng),
                    registered=REGISTERED,
                    hostname=f"synthetic-{number}",
                )
            )
    return found


def _match(**labels: str) -> dict[str, Any]:
    return {"matchLabels": labels}


def _port(rng: random.Random) -> dict[str, Any]:
    return {"protocol": "TCP", "port": rng.choice(PORTS)}


def _range(rng: random.Random, protocol: str = "TCP") -> dict[str, Any]:
    first, last = rng.choice(RANGES)
    return {"protocol": protocol, "port": first, "endPort": last}


def _policy(index: int, name: str, rng: random.Random, cluster: IPv4Network) -> dict[str, Any]:
    """Policy number `index`: its shape is index's place in a cycle of 20."""
    kind = index % 20
    some_app = app(rng.randrange(APPS))
    if kind < 10:
        return {
            "name": name,
            "selector": _match(app=some_app),
            "ingress": [
                {
                    "from": [
                        {"selector": _match(app=app(rng.randrange(APPS)))},
                        {"selector": _match(tier=rng.choice(TIERS), env=rng.choice(ENVS))},
                    ],
                    "ports": [_port(rng), _range(rng)],
                }
            ],
        }
    if kind < 13:
        # An except inside the cluster: one host's /24 (any, taken or not).
        excluded = IPv4Network((int(cluster.network_address) + rng.randrange(256) * 256, 24))
        return {
            "name": name,
            "selector": _match(app=some_app, env=rng.choice(ENVS)),
            "ingress": [
                {
                    "from": [
                        {"ipBlock": {"cidr": str(cluster), "except": [str(excluded)]}},
                        {"ipBlock": {"cidr": rng.choice(OUTSIDE)}},
                    ],
                    "ports": [{"protocol": "UDP", "port": 53}, _port(rng)],
                }
            ],
        }
    if kind < 16:
        return {
            "name": name,
            "selector": _match(team=team(rng.randrange(TEAMS))),
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [{"selector": _match(app=some_app)}], "ports": [_port(rng)]},
                {
                    "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [str(cluster)]}}],
                    "ports": [{"protocol": "TCP", "port": 443}],
                },
            ],
        }
    if kind < 18:
        return {
            "name": name,
            "selector": _match(app=some_app, tier=rng.choice(TIERS)),
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [{"selector": _match(team=team(rng.randrange(TEAMS)))}],
                    "ports": [_range(rng)],
                }
            ],
            "egress": [
                {
                    "to": [{"selector": _match(tier="db")}],
                    "ports": [{"protocol": "TCP", "port": 5432}],
                }
            ],
        }
    if kind == 18:
        return {"name": name, "selector": _match(app=some_app), "policyTypes": ["Ingress"]}
    apps = sorted({app(rng.randrange(APPS)) for _ in range(3)})
    teams = sorted({team(rng.randrange(TEAMS)) for _ in range(2)})
    return {
        "name": name,
        "selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": apps}]},
        "ingress": [
            {
                "from": [
                    {
                        "selector": {
                            "matchExpressions": [
                                {"key": "team", "operator": "In", "values": teams},
                                {"key": "env", "operator": "Exists"},
                            ]
                        }
                    }
                ],
                "ports": [_range(rng, "UDP")],
            }
        ],
    }


def synthetic_policies(
    count: int, *, cluster: IPv4Network, seed: int = 0, prefix: str = "syn"
) -> list[dict[str, Any]]:
    """`count` policy documents named `<prefix>-0000` upwards (names sort
    before the bench's own, zz-bench-*). `cluster`: the network ipBlocks
    name (and except parts of)."""
    rng = random.Random(seed)
    return [_policy(i, f"{prefix}-{i:04d}", rng, cluster) for i in range(count)]


def bench_policies(cluster: IPv4Network) -> list[dict[str, Any]]:
    """The two policies that select the bench containers (label
    bench=iperf) and allow the bench's traffic between them: every
    protocol (iperf3, sockperf, ping) from and to each other, in both
    directions, so that both directions judge both hosts' bench packets.
    Each has a second rule the bench does not use, as real policies do.
    Named to sort last: a new connection's first packet tries every other
    policy's dispatch rule before reaching them."""
    bench = {"selector": _match(bench=BENCH_LABELS["bench"])}
    egress, ingress = BENCH_POLICY_NAMES
    return [
        {
            "name": egress,
            "selector": _match(bench=BENCH_LABELS["bench"]),
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [bench]},
                {
                    "to": [{"ipBlock": {"cidr": OUTSIDE[1]}}],
                    "ports": [{"protocol": "TCP", "port": 443}],
                },
            ],
        },
        {
            "name": ingress,
            "selector": _match(bench=BENCH_LABELS["bench"]),
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [bench]},
                {
                    "from": [{"ipBlock": {"cidr": str(cluster)}}],
                    "ports": [{"protocol": "TCP", "port": 9100}],
                },
            ],
        },
    ]


def bench_policy_mix(count: int, *, cluster: IPv4Network, seed: int = 0) -> list[dict[str, Any]]:
    """`count` policies in all: the bench's two and synthetic ones."""
    if count < len(BENCH_POLICY_NAMES):
        raise ValueError(f"--policies must be at least {len(BENCH_POLICY_NAMES)}")
    others = synthetic_policies(count - len(BENCH_POLICY_NAMES), cluster=cluster, seed=seed)
    return [*others, *bench_policies(cluster)]
