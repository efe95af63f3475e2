"""Policy cold start (`overlayctl lab policybench --cold`): one real
overlayd started in a lab host while etcd already holds a cluster's worth
of endpoints and policies. Prints figures; asserts nothing, but refuses a
run whose kernel does not hold what the policies make.

Before the daemon starts, etcd holds (lab/policyload.py makes them):

    E endpoints   `per_host` on each host: on the daemon's own subnet
                  (10.128.1.0/24: its subnet file, as a previous run would
                  have left it, names that one, so it leases it again) and
                  on ceil(E / per_host) - 1 synthetic peers (cpbench's
                  leases, whose public addresses are never sent to)
    P policies    the synthetic mix, each written in its canonical form as
                  `overlayctl policy apply` writes it

Timed from the daemon's start:

    ready      its log says event=ready: the first (full) pass is done,
               peer entries and the whole policy table in one nft
               transaction included
    enforced   its status key (<own>/status/<host>) names a revision at
               least that of the benchmark's last write, seen by an etcd
               watch (no polling interval in the figure): what `overlayctl
               policy wait` would wait for

Before the clock starts, overlayd's modules are byte-compiled (as
`pip install` and distribution packages do at install time): the lab runs
overlayd from its source tree, where Python writes no bytecode when
PYTHONDONTWRITEBYTECODE is set, and compiling 130 modules at every start
added 0.15 to 0.2 s that no installed daemon pays.

Then checked, or the run is refused: every endpoint and policy was usable,
the daemon has a route per peer, and its policy table is exactly what the
daemon's pure code makes of etcd (`overlayctl diagnose`'s comparison: each
set with its elements, every chain and rule). Reported with it: the size
of that first transaction (nft statements, and the sets, elements, chains
and rules they make) and the daemon's peak RSS (VmHWM) at the end.
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import json
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Network
from pathlib import Path

import overlayd
from overlayd.config import parse_network_config
from overlayd.daemon.status import status_key
from overlayd.lab import cpbench, netns
from overlayd.lab.lab import PREFIX, Lab, LabSettings
from overlayd.lab.policycheck import (
    OWN_PREFIX,
    RulesetSize,
    endpoint_items,
    expected,
    kernel_finding,
    policy_items,
    put_in_batches,
    ruleset_size,
)
from overlayd.lab.policyload import hosts_for, synthetic_endpoints, synthetic_policies
from overlayd.plan.endpoints import host_id
from overlayd.plan.leases import lease_key, render_lease
from overlayd.plan.policy_model import HostSubnets
from overlayd.store.etcd import EtcdStore

OWN_SUBNET = IPv4Network("10.128.1.0/24")  # below every synthetic lease (cpbench's start at 1000)
GOAL_SECONDS = 2.0  # issue 14: 10,000 endpoints and 500 policies
WAIT_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
class ColdResult:
    endpoints: int
    policies: int
    hosts: int  # the daemon's and its peers
    ready: float  # seconds from start
    enforced: float  # seconds from start
    size: RulesetSize
    peak_rss_mb: float
    check: str  # what the kernel comparison found

    def row(self) -> str:
        s = self.size
        return (
            f"| {self.endpoints:>9} | {self.policies:>8} | {self.hosts:>5} | {self.ready:6.2f} s"
            f" | {self.enforced:6.2f} s | {s.statements:>10} | {s.sets:>5} | {s.elements:>8}"
            f" | {s.chains:>6} | {s.rules:>5} | {self.peak_rss_mb:5.0f} MB |"
        )


HEADER = (
    "| endpoints | policies | hosts |  ready   | enforced | nft statements | sets | elements"
    " | chains | rules | peak RSS |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def summary(results: Sequence[ColdResult]) -> Iterator[str]:
    """Per policy count: the median (min to max) of `enforced` over runs,
    against the goal."""
    counts = sorted({r.policies for r in results})
    for count in counts:
        runs = [r for r in results if r.policies == count]
        times = [r.enforced for r in runs]
        ready = [r.ready for r in runs]
        yield (
            f"{runs[0].endpoints} endpoints, {count} policies, {len(runs)} run(s): enforced after"
            f" {statistics.median(times):.2f} s median ({min(times):.2f} to {max(times):.2f}),"
            f" ready after {statistics.median(ready):.2f} s; goal under {GOAL_SECONDS:g} s:"
            f" {'met' if max(times) < GOAL_SECONDS else 'NOT met'} in"
            f" {sum(t < GOAL_SECONDS for t in times)} of {len(times)}"
        )


async def _write(
    store: EtcdStore, leases: list[tuple[str, str]], others: list[tuple[str, str]]
) -> int:
    return await put_in_batches(store, leases + others)


async def start_and_time(lab: Lab, revision: int, store: EtcdStore) -> tuple[float, float, int]:
    """Start host 1's daemon; seconds until it is ready and until its
    status key names `revision` or later; its pid."""
    key = status_key(OWN_PREFIX, host_id(OWN_SUBNET))

    async def enforced_at() -> float:
        async for event in store.watch_prefix(key, revision + 1):
            if event.value is not None and json.loads(event.value).get("revision", 0) >= revision:
                return time.monotonic()
        raise RuntimeError("the status watch ended")

    watcher = asyncio.create_task(enforced_at())
    await asyncio.sleep(0.2)  # the watch set up before the clock starts
    log = lab.daemon_log(1)
    started = time.monotonic()
    proc: subprocess.Popen[bytes] = lab.start_daemon(1)
    try:
        while "event=ready" not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited: {log.read_text()[-2000:]}")
            if time.monotonic() - started > WAIT_SECONDS:
                raise TimeoutError(f"not ready after {WAIT_SECONDS:g} s")
            await asyncio.sleep(0.005)
        ready = time.monotonic() - started
        done = await asyncio.wait_for(asyncio.shield(watcher), WAIT_SECONDS)
        return ready, done - started, proc.pid
    finally:
        # Cancelled until done (see cli/policy.wait_enforced: a cancellation
        # can be swallowed while aetcd sets a watch up).
        while not watcher.done():
            watcher.cancel()
            await asyncio.wait({watcher}, timeout=0.1)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher


def byte_compile() -> None:
    """overlayd's modules compiled to bytecode, where they are not already
    (see the module's docstring); quietly does nothing where it cannot
    write (the start then compiles them, as before)."""
    compileall.compile_dir(Path(overlayd.__file__).parent, quiet=2)


def run_one(name: str, endpoints: int, policies: int, per_host: int, seed: int = 0) -> ColdResult:
    hosts = hosts_for(endpoints, per_host)
    lab = Lab(name)
    lab.down()
    config = parse_network_config(json.dumps(cpbench.network_config(False)))
    try:
        lab.up(0, config=config, settings=LabSettings(egress="none", lease_ttl=300))
        leases = [cpbench.synthetic_lease(i) for i in range(hosts - 1)]
        subnets = [HostSubnets(OWN_SUBNET)] + [HostSubnets(lease.subnet) for lease in leases]
        made = synthetic_endpoints(
            subnets, endpoints, per_host=per_host, own_prefix=OWN_PREFIX, seed=seed
        )
        documents = synthetic_policies(policies, cluster=cpbench.NETWORK, seed=seed)
        lease_values = [(lease_key(PREFIX, lease), render_lease(lease)) for lease in leases]
        revision = lab.etcd(
            partial(
                _write, leases=lease_values, others=endpoint_items(made) + policy_items(documents)
            )
        )
        lab.attach_host_namespace(1)
        byte_compile()
        ns = lab.host_ns(1)
        # A previous run's subnet file: the daemon asks for this subnet first.
        subnet_file = lab.subnet_file(1)
        subnet_file.parent.mkdir(parents=True, exist_ok=True)
        subnet_file.write_text(f"FLANNEL_SUBNET={OWN_SUBNET.network_address + 1}/24\n")
        ready, enforced, pid = lab.etcd(partial(start_and_time, lab, revision))
        if lab.subnet(1) != OWN_SUBNET:
            raise RuntimeError(f"the daemon leased {lab.subnet(1)}, not {OWN_SUBNET}")
        wanted = lab.etcd(partial(expected, own_subnet=OWN_SUBNET))
        if wanted.skipped or len(wanted.endpoints) != endpoints or len(wanted.policies) != policies:
            raise RuntimeError(
                f"{len(wanted.endpoints)} endpoints and {len(wanted.policies)} policies usable"
                f" of {endpoints} and {policies}; skipped: {list(wanted.skipped.items())[:3]}"
            )
        routes = len(netns.ip(ns, "route", "show", "proto", "77").splitlines())
        if routes != hosts - 1:
            raise RuntimeError(f"{routes} peer routes after ready, expected {hosts - 1}")
        finding = kernel_finding(ns, wanted)
        if not finding.ok:
            raise RuntimeError(
                f"the kernel's policy table is not what etcd makes: {finding.detail}"
            )
        return ColdResult(
            endpoints=endpoints,
            policies=policies,
            hosts=hosts,
            ready=ready,
            enforced=enforced,
            size=ruleset_size(wanted.ruleset),
            peak_rss_mb=cpbench._peak_rss_mb(pid),
            check=finding.detail,
        )
    finally:
        lab.down()
