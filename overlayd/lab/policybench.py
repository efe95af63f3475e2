"""Policy propagation: how long a policy change takes to be in force on
every host of a lab, measured by the revisions the hosts publish
(`<own>/status/<host>`), and checked with real connections. Prints figures;
asserts nothing (but counts every connection that disagreed).

Each round writes, or deletes, a policy that denies all ingress to one
container (labelled role=target) and times, from the write's return, each
host's status key reaching the write's revision (an etcd watch, so no
polling interval is in the figure). Then a container on another host
connects to the target: refused while the policy stands, answered once it
is gone. The rounds alternate, so half measure a deny and half an allow.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

from overlayd.lab import checks
from overlayd.lab.lab import Lab
from overlayd.lab.policycheck import OWN_PREFIX, label_endpoint
from overlayd.plan.policy import parse_policy, policy_key, render_policy
from overlayd.store.etcd import EtcdStore

STATUS_PREFIX = f"{OWN_PREFIX}/status/"
POLICY = parse_policy(
    {
        "name": "bench-deny-target",
        "selector": {"matchLabels": {"role": "target"}},
        "policyTypes": ["Ingress"],
    }
)
WAIT_SECONDS = 10.0


@dataclass
class Round:
    deny: bool
    per_host: dict[str, float] = field(default_factory=dict)  # host -> seconds to enforce
    all_hosts: float | None = None  # seconds until the last host (None: timed out)
    packets_agree: bool = True


async def _change_and_time(store: EtcdStore, deny: bool, hosts: int) -> Round:
    """Write (or delete) the policy; time each host's status to its revision."""
    started = time.monotonic()
    key = policy_key(OWN_PREFIX, POLICY.name)
    if deny:
        revision = await store.put_bound(key, render_policy(POLICY).encode(), 0)
    else:
        deleted = await store.delete_revision(key)
        if deleted is None:
            raise RuntimeError(f"{key} was not there to delete")
        revision = deleted
    result = Round(deny)
    # From the revision before ours, so that no host's answer can be missed.
    async for event in store.watch_prefix(STATUS_PREFIX, max(1, revision - 1)):
        if event.value is None:
            continue
        seen = json.loads(event.value).get("revision", 0)
        host = event.key.removeprefix(STATUS_PREFIX)
        if seen >= revision and host not in result.per_host:
            result.per_host[host] = time.monotonic() - started
        if len(result.per_host) >= hosts or time.monotonic() - started > WAIT_SECONDS:
            break
    if len(result.per_host) >= hosts:
        result.all_hosts = max(result.per_host.values())
    return result


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def policybench(
    name: str, hosts: int, rounds: int, progress: Callable[[str], None]
) -> Iterator[str]:
    lab = Lab(name)
    lab.down()
    try:
        lab.up(hosts)
        # `up` attached one container to each host (through overlay-cni,
        # which registered it).
        containers = [lab.container(host, 1) for host in range(1, hosts + 1)]
        target, client = containers[0], containers[1]
        lab.serve_whoami(target.ns)
        lab.etcd(lambda store: label_endpoint(store, target.address, {"role": "target"}))
        results: list[Round] = []
        for number in range(rounds):
            deny = number % 2 == 0
            found = lab.etcd(partial(_change_and_time, deny=deny, hosts=hosts))
            answered = checks.whoami(client.ns, target.address, timeout=1.0) is not None
            found.packets_agree = answered != deny
            results.append(found)
            took = f"{found.all_hosts * 1000:.1f} ms" if found.all_hosts is not None else "TIMEOUT"
            progress(
                f"round {number + 1}: {'deny' if deny else 'allow'} in force on all"
                f" {hosts} hosts after {took}; connection {'answered' if answered else 'refused'}"
            )
        yield from report(results, hosts)
    finally:
        lab.down()


def report(results: list[Round], hosts: int) -> Iterator[str]:
    done = [r.all_hosts for r in results if r.all_hosts is not None]
    per_host = [t for r in results for t in r.per_host.values()]
    yield f"policy propagation: {len(results)} changes, {hosts} hosts"
    if done:
        yield (
            f"  all hosts enforcing: p50 {statistics.median(done) * 1000:.1f} ms,"
            f" p99 {_percentile(done, 99) * 1000:.1f} ms, max {max(done) * 1000:.1f} ms"
            f" (n = {len(done)})"
        )
    if per_host:
        yield (
            f"  one host enforcing: p50 {statistics.median(per_host) * 1000:.1f} ms,"
            f" p99 {_percentile(per_host, 99) * 1000:.1f} ms (n = {len(per_host)})"
        )
    timeouts = sum(r.all_hosts is None for r in results)
    wrong = sum(not r.packets_agree for r in results)
    yield f"  timed out: {timeouts}; connections that disagreed with the policy: {wrong}"
