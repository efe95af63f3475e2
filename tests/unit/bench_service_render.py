"""How long the services render takes in-process (no nft): a cold start of
10,000 services with 2 backends each, and one service changed at 10,000.
Run under the lab lock: `flock /tmp/overlayd-lab.lock .venv/bin/python -m
tests.unit.bench_service_render`. Prints figures; asserts nothing."""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from overlayd.plan.policy_model import Endpoint
from overlayd.plan.policy_rules import LocalSubnets
from overlayd.plan.service_rules import (
    service_ruleset,
    service_transaction,
    statement_count,
    with_service,
)
from tests.unit.test_service_rules import background

LOCAL = LocalSubnets(IPv4Network("10.244.1.0/24"))
CLUSTER = (IPv4Network("10.244.0.0/16"), IPv6Network("fd00:10:244::/56"))


def main() -> None:
    services, backends = background(10_000)
    started = time.perf_counter()
    ruleset = service_ruleset(services, backends, LOCAL, CLUSTER)
    statements = service_transaction(None, ruleset)
    text = "".join(f"{s}\n" for s in statements)
    cold = time.perf_counter() - started
    print(
        f"cold start, 10,000 services x 2 backends: {cold * 1000:.0f} ms render,"
        f" {statement_count(statements)} statements, {len(text) / 1e6:.1f} MB of nft input"
    )
    extra = Endpoint("/e/x", "x", "h", "", (IPv4Address("10.244.1.99"),))
    times = []
    for i in range(200):
        name = f"bg{i:05d}"
        started = time.perf_counter()
        after = with_service(ruleset, name, services[name], (*backends[name], extra))
        statements = service_transaction(ruleset, after)
        times.append(time.perf_counter() - started)
    times.sort()
    print(
        f"one backend added at 10,000 services: median {times[100] * 1000:.2f} ms,"
        f" p99 {times[197] * 1000:.2f} ms, {statement_count(statements)} statements"
    )


if __name__ == "__main__":
    main()
