"""`overlayctl lab svcbench`: what the services table costs the kernel and
nft at scale, without a daemon around it: for each size, a cold load of N
synthetic services (two remote backends each) into a throwaway network
namespace, then CHANGES changes, each one backend added to one service:
the render (`with_service`, `service_transaction`) plus its write, timed
together, and the statements each wrote.

Writes go as the daemon makes them, through one kept libnftables context
(dataplane/libnft.py). Every other change goes through the `nft -f`
command instead, as the baseline measured in the same run.

It isolates the data plane's part of the issue's figures (cold start,
flat update cost) from etcd and the daemon's pass; the lab tests measure
those end to end. The namespace holds only the table, so nothing is sent
anywhere."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_address

from overlayd.dataplane.libnft import NftSession
from overlayd.lab import netns
from overlayd.plan.policy_model import Endpoint, LabelSelector, Protocol
from overlayd.plan.policy_rules import LocalSubnets
from overlayd.plan.service_model import Service, ServicePort
from overlayd.plan.service_rules import (
    ServiceRuleset,
    script,
    service_ruleset,
    service_transaction,
    statement_count,
    with_service,
)

LOCAL = LocalSubnets(IPv4Network("10.244.1.0/24"))
CLUSTER = (IPv4Network("10.244.0.0/16"), IPv6Network("fd00:10:244::/56"))
VIPS = IPv4Address("10.97.0.0")  # up to 65,536 services
BACKENDS = IPv4Address("10.200.0.0")  # remote: outside LOCAL


def synthetic_services(count: int) -> tuple[dict[str, Service], dict[str, tuple[Endpoint, ...]]]:
    """`count` services, TCP 80 -> 8080, two remote backends each."""
    services: dict[str, Service] = {}
    backends: dict[str, tuple[Endpoint, ...]] = {}
    for i in range(count):
        name = f"s{i:05d}"
        services[name] = Service(
            name=name,
            selector=LabelSelector((("svc", name),)),
            ports=(ServicePort("", Protocol.TCP, 80, 8080),),
            vips=(VIPS + i,),
        )
        backends[name] = tuple(
            Endpoint(f"/e/{name}/{k}", f"{name}-{k}", "h", "", (BACKENDS + 2 * i + k,))
            for k in (0, 1)
        )
    return services, backends


def _nft(ns: str, text: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        netns.enter_argv(ns, "nft", "-f", "-"), input=text, text=True, capture_output=True
    )
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"nft -f refused the services table: {done.stderr.strip()[:300]}")
    return took


def _percentile(times: Sequence[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_size(ns: str, count: int, changes: int) -> str:
    services, backends = synthetic_services(count)
    started = time.perf_counter()
    ruleset: ServiceRuleset = service_ruleset(services, backends, LOCAL, CLUSTER)
    statements = service_transaction(None, ruleset)
    text = script(statements)
    render = time.perf_counter() - started
    session = NftSession(ns)
    try:
        started = time.perf_counter()
        await session.apply(text)
        load = time.perf_counter() - started
        kept: list[float] = []  # through the kept context, as the daemon writes
        command: list[float] = []  # through `nft -f`, the baseline
        written: set[int] = set()
        for i in range(min(2 * changes, count)):
            name = f"s{i:05d}"
            extra = Endpoint(f"/e/{name}/x", f"{name}-x", "h", "", (ip_address("10.244.1.99"),))
            started = time.perf_counter()
            after = with_service(ruleset, name, services[name], (*backends[name], extra))
            change = service_transaction(ruleset, after)
            if i % 2 == 0:
                await session.apply(script(change))
                kept.append(time.perf_counter() - started)
            else:
                rendered = time.perf_counter() - started
                command.append(rendered + _nft(ns, script(change)))
            written.add(statement_count(change))
            ruleset = after
    finally:
        await session.close()
    return (
        f"| {count} | {render * 1000:.0f} ms | {load * 1000:.0f} ms |"
        f" {statement_count(statements)} | {statistics.median(kept) * 1000:.1f} ms |"
        f" {_percentile(kept, 0.99) * 1000:.1f} ms | {max(kept) * 1000:.1f} ms |"
        f" {statistics.median(command) * 1000:.1f} ms |"
        f" {_percentile(command, 0.99) * 1000:.1f} ms |"
        f" {', '.join(map(str, sorted(written)))} |"
    )


def svcbench(sizes: Sequence[int], changes: int) -> Iterator[str]:
    yield (
        f"services table: cold load and one backend added per change ({changes} changes per"
        " size and way), render plus write, nftables in a throwaway namespace; written"
        " through the daemon's kept libnftables context, and, every other change, through"
        " `nft -f` (baseline)"
    )
    yield (
        "| services | cold render | cold load | cold statements | change median |"
        " change p99 | change max | nft -f median | nft -f p99 | statements per change |"
    )
    yield "|---|---|---|---|---|---|---|---|---|---|"
    for count in sizes:
        ns = f"ovl-svcbench-{uuid.uuid4().hex[:6]}"
        netns.add_namespace(ns)
        try:
            yield asyncio.run(one_size(ns, count, changes))
        finally:
            netns.delete_namespace(ns)
