"""Services cold start (`overlayctl lab svcbench --cold`): one real overlayd
started in a lab host while etcd already holds S services with two
endpoints each. Prints figures; asserts nothing, but refuses a run whose
kernel does not hold every service with exactly its backends.

Before the daemon starts, etcd holds:

    2 S endpoints  `per_host` on each host, on the daemon's own subnet and on
                   synthetic peers (cpbench's leases, never sent to), the
                   2k-th and (2k+1)-th labelled svc=s<k>
    S services     s<k>: TCP 80 -> 8080, selector svc=s<k>, VIP the k-th
                   address of the ServiceNetwork, written with its claim
                   (vips/<ip>) as `overlayctl service create` writes them

Timed from the daemon's start, as policycold times it: `ready` (first full
pass done, the services table included) and `enforced` (its status key
names the benchmark's last revision). Then the kernel's services tables
are read back: every VIP in a dispatch map, and each service's chain
translating to exactly its two backends, or the run is refused.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Network
from typing import Any

from overlayd.config import parse_network_config
from overlayd.lab import cpbench, netns
from overlayd.lab.lab import PREFIX, Lab, LabSettings
from overlayd.lab.policycheck import OWN_PREFIX, endpoint_items, put_in_batches
from overlayd.lab.policycold import OWN_SUBNET, WAIT_SECONDS, start_and_time
from overlayd.lab.policyload import hosts_for, synthetic_endpoints
from overlayd.plan.leases import lease_key, render_lease
from overlayd.plan.policy_model import Endpoint, HostSubnets, LabelSelector, Protocol
from overlayd.plan.service import claim_keys, render_service, service_key
from overlayd.plan.service_model import Service, ServicePort
from overlayd.plan.service_rules import TABLES

SERVICE_NETWORK = IPv4Network("10.96.0.0/16")  # outside cpbench's 10.128.0.0/9
GOAL_SECONDS = 5.0  # issue 15: 10,000 services with 2 endpoints each
TARGET_PORT = 8080

__all__ = ["GOAL_SECONDS", "HEADER", "WAIT_SECONDS", "run_one", "summary"]


@dataclass(frozen=True, slots=True)
class ColdResult:
    services: int
    endpoints: int
    ready: float
    enforced: float
    chains: int  # in the kernel's services table
    peak_rss_mb: float

    def row(self) -> str:
        return (
            f"| {self.services:>8} | {self.endpoints:>9} | {self.ready:6.2f} s"
            f" | {self.enforced:6.2f} s | {self.chains:>6} | {self.peak_rss_mb:5.0f} MB |"
        )


HEADER = (
    "| services | endpoints |  ready   | enforced | chains | peak RSS |\n|---|---|---|---|---|---|"
)


def summary(results: Sequence[ColdResult]) -> Iterator[str]:
    times = [r.enforced for r in results]
    ready = [r.ready for r in results]
    yield (
        f"{results[0].services} services, {results[0].endpoints} endpoints, {len(results)}"
        f" run(s): enforced after {statistics.median(times):.2f} s median ({min(times):.2f} to"
        f" {max(times):.2f}), ready after {statistics.median(ready):.2f} s; goal under"
        f" {GOAL_SECONDS:g} s: {'met' if max(times) < GOAL_SECONDS else 'NOT met'} in"
        f" {sum(t < GOAL_SECONDS for t in times)} of {len(times)}"
    )


def synthetic_services(
    count: int, endpoints: Sequence[Endpoint]
) -> tuple[list[Service], list[Endpoint]]:
    """`count` services and the endpoints relabelled to back them, two each."""
    services = [
        Service(
            name=f"s{k:05d}",
            selector=LabelSelector((("svc", f"s{k:05d}"),)),
            ports=(ServicePort("", Protocol.TCP, 80, TARGET_PORT),),
            vips=(SERVICE_NETWORK.network_address + 1 + k,),
        )
        for k in range(count)
    ]
    backing = [
        dataclasses.replace(e, labels={"svc": f"s{i // 2:05d}"})
        for i, e in enumerate(endpoints[: 2 * count])
    ]
    return services, backing


def service_items(services: Sequence[Service]) -> list[tuple[str, str]]:
    items = []
    for service in services:
        items.append((service_key(OWN_PREFIX, service.name), render_service(service)))
        items += [(key, service.name) for key in claim_keys(OWN_PREFIX, service)]
    return items


def _dnat_targets(rules: Sequence[Mapping[str, Any]]) -> dict[str, set[str]]:
    """chain -> the `address:port` its dnat statements translate to."""
    found: dict[str, set[str]] = {}
    for rule in rules:
        for expr in rule["expr"]:
            if "dnat" in expr:
                d = expr["dnat"]
                found.setdefault(rule["chain"], set()).add(f"{d['addr']}:{d['port']}")
    return found


def kernel_problem(
    ns: str, services: Sequence[Service], backing: Sequence[Endpoint]
) -> tuple[str | None, int]:
    """What the kernel's services tables lack or have wrong (None: nothing),
    and how many chains they have."""
    items = [
        item
        for table in TABLES
        for item in json.loads(netns.in_ns(ns, "nft", "-j", "list", "table", "inet", table))[
            "nftables"
        ]
    ]
    chains = sum(1 for i in items if "chain" in i)
    rules = [i["rule"] for i in items if "rule" in i]
    targets = _dnat_targets(rules)
    keys: dict[str, str] = {}  # VIP -> service chain, from the v4 dispatch map
    for item in items:
        m = item.get("map")
        if m is None or m.get("type") != ["ipv4_addr", "inet_proto", "inet_service"]:
            continue
        for key, verdict in m.get("elem", []):
            vip, proto, port = key["concat"]
            if proto == "tcp" and port == 80 and "goto" in verdict:
                keys[vip] = verdict["goto"]["target"]
    by_service: dict[str, set[str]] = {}
    for e in backing:
        by_service.setdefault(e.labels["svc"], set()).add(f"{e.addresses[0]}:{TARGET_PORT}")
    for service in services:
        vip = str(service.vips[0])
        if vip not in keys:
            return f"{service.name}: VIP {vip} is not in the dispatch map", chains
        got = targets.get(keys[vip], set())
        if got != by_service[service.name]:
            wrong = f"{service.name}: chain {keys[vip]} goes to {sorted(got)}, not its backends"
            return wrong, chains
    return None, chains


def run_one(name: str, count: int, per_host: int) -> ColdResult:
    endpoints_total = 2 * count
    hosts = hosts_for(endpoints_total, per_host)
    lab = Lab(name)
    lab.down()
    raw = cpbench.network_config(False) | {"ServiceNetwork": str(SERVICE_NETWORK)}
    config = parse_network_config(json.dumps(raw))
    try:
        lab.up(0, config=config, settings=LabSettings(egress="none", lease_ttl=300))
        leases = [cpbench.synthetic_lease(i) for i in range(hosts - 1)]
        subnets = [HostSubnets(OWN_SUBNET)] + [HostSubnets(lease.subnet) for lease in leases]
        made = synthetic_endpoints(
            subnets, endpoints_total, per_host=per_host, own_prefix=OWN_PREFIX
        )
        services, backing = synthetic_services(count, made)
        lease_values = [(lease_key(PREFIX, lease), render_lease(lease)) for lease in leases]
        revision = lab.etcd(
            partial(
                put_in_batches,
                items=lease_values + endpoint_items(backing) + service_items(services),
            )
        )
        lab.attach_host_namespace(1)
        ns = lab.host_ns(1)
        subnet_file = lab.subnet_file(1)
        subnet_file.parent.mkdir(parents=True, exist_ok=True)
        subnet_file.write_text(f"FLANNEL_SUBNET={OWN_SUBNET.network_address + 1}/24\n")
        try:
            ready, enforced, pid = lab.etcd(partial(start_and_time, lab, revision))
        except (RuntimeError, TimeoutError) as e:
            tail = lab.daemon_log(1).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{e}; the daemon's log ends:\n{tail}") from e
        if lab.subnet(1) != OWN_SUBNET:
            raise RuntimeError(f"the daemon leased {lab.subnet(1)}, not {OWN_SUBNET}")
        problem, chains = kernel_problem(ns, services, backing)
        if problem is not None:
            raise RuntimeError(f"the kernel's services table is not what etcd makes: {problem}")
        return ColdResult(
            services=count,
            endpoints=endpoints_total,
            ready=ready,
            enforced=enforced,
            chains=chains,
            peak_rss_mb=cpbench._peak_rss_mb(pid),
        )
    finally:
        lab.down()
