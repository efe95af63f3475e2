"""The data-plane cost of network policy (`overlayctl lab bench --policies
N`): the overlay path between two containers on two hosts, with N policies
in force and with none, interleaved within each round (the order swapped
every round), ratios paired within rounds, as `lab bench --vxlan-filter`
measures the allow-list.

One lab of two hosts (egress gwbridge by default, overlayd's own, so that
connection tracking is on in both modes, as on a real host; `--policy-egress
none` leaves no stateful rule in the mode without policies, so that its
ratio also prices turning connection tracking on), one container per host
registered by overlay-cni. Set up once:

- both bench containers' registrations get the labels bench=iperf and
  common app, tier and env labels (policyload.BENCH_LABELS), so that some
  synthetic policies select them too;
- `--policy-endpoints` synthetic endpoints (labels from a few hundred
  values) on the two hosts' subnets, away from the addresses IPAM hands
  out, so that the sets hold other endpoints' addresses as in a cluster.

A mode switch writes the N policies (the two that select the bench
containers and allow their traffic both ways, zz-bench-egress and
zz-bench-ingress, named to sort last, and N - 2 synthetic ones) or deletes
them all, waits until both hosts' status keys report the change enforced
(`overlayctl policy wait`'s wait), and checks that each host's kernel holds
exactly the table the policies make, or none (`diagnose`'s comparison).

Both daemons run with the production resync period (DEFAULT_RESYNC_SECONDS,
60 s), not the lab's 10 s: a resync's check pass lists the policy table's
sets and counters (some 0.2 s of nft and daemon CPU at 500 policies), and
at the lab's period that work, which belongs to the control plane, would
land inside a good part of the measurements with policies and none of
those without. The daemons' CPU during each measurement, their children
(nft) included, is reported per mode, so that what remains of it is seen
rather than guessed.

So with policies, every packet of the bench crosses the policy table's
base chain on both hosts (egress judged on the sender's host, ingress on
the receiver's),
and the first packet of each connection walks the dispatch chain past every
other policy before the bench's allow it. After every measurement with
policies the policy counters are read: the bench policies' allow counters
must have risen on both hosts (those are first packets of connections;
later packets pass as established, by the base chain's first rule) and no
deny counter may have: otherwise the run is refused.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Network
from pathlib import Path

from overlayd.cli.policy import wait_enforced
from overlayd.config import DEFAULT_RESYNC_SECONDS
from overlayd.lab import bench, hosts
from overlayd.lab.containers import Container
from overlayd.lab.lab import PREFIX, Lab, LabSettings
from overlayd.lab.policycheck import (
    OWN_PREFIX,
    Expected,
    counters,
    endpoint_items,
    expected,
    kernel_finding,
    label_endpoint,
    policy_items,
    put_in_batches,
    ruleset_size,
)
from overlayd.lab.policyload import (
    BENCH_LABELS,
    BENCH_POLICY_NAMES,
    bench_policy_mix,
    synthetic_endpoints,
)
from overlayd.plan.policy import PolicyChecker, policies_prefix
from overlayd.plan.policy_model import Direction, HostSubnets, Protocol
from overlayd.plan.policy_rules import counter_name
from overlayd.store.etcd import EtcdStore
from overlayd.surfaces.subnetfile import read_gwbridge_subnets

MODES = ("policies", "none")
METRICS = (
    ("tcp1_fwd", "TCP 1 stream, A to B", "Gbit/s"),
    ("tcp2_fwd", "TCP 2 streams, A to B", "Gbit/s"),
    ("ping_us", "ping RTT (avg)", "us"),
)
ENDPOINT_OFFSET = 16  # synthetic endpoints from .16 up: clear of host-local's first addresses
MAX_ENDPOINTS = 2 * (254 - ENDPOINT_OFFSET)  # two /24s
ENFORCE_SECONDS = 60.0
SETTLE_SECONDS = 1.0  # after a switch, before measuring: the daemons' passes are over


@dataclass(frozen=True, slots=True)
class Judged:
    """What one measurement with policies did to the policy counters:
    packets the bench's allow rules counted on the sender's host (egress)
    and the receiver's (ingress), and packets any policy dropped on either."""

    egress_allowed: int
    ingress_allowed: int
    dropped: int

    @property
    def ok(self) -> bool:
        return self.egress_allowed > 0 and self.ingress_allowed > 0 and self.dropped == 0


def judged(
    before: tuple[dict[str, int], dict[str, int]], after: tuple[dict[str, int], dict[str, int]]
) -> Judged:
    """The counters' rise between two readings of (sender's host,
    receiver's host)."""
    egress, ingress = BENCH_POLICY_NAMES
    allow_out = counter_name(egress, Direction.EGRESS, "allow")
    allow_in = counter_name(ingress, Direction.INGRESS, "allow")

    def rise(side: int, name: str) -> int:
        return after[side].get(name, 0) - before[side].get(name, 0)

    dropped = sum(
        rise(side, name) for side in (0, 1) for name in after[side] if name.endswith("_deny")
    )
    return Judged(rise(0, allow_out), rise(1, allow_in), dropped)


@dataclass
class Run:
    samples: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {mode: {m: [] for m, _, _ in METRICS} for mode in MODES}
    )
    steal: list[float] = field(default_factory=list)
    judged: list[Judged] = field(default_factory=list)
    switches: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    expected: Expected | None = None  # the sender's host's, with policies
    # Both hosts' daemons' CPU seconds (their nft children included) during
    # each measurement, per mode.
    daemon_cpu: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})


def daemon_cpu_seconds(lab: Lab) -> float:
    """CPU seconds used so far by the lab's daemons and their waited-for
    children (nft, ip): utime, stime, cutime and cstime of /proc/PID/stat."""
    total = 0
    for host in lab.hosts():
        for pid in hosts.daemon_pids(lab.host_ns(host)):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue  # gone since it was listed
            total += sum(int(x) for x in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


async def _setup(store: EtcdStore, a: Container, b: Container, made: list[tuple[str, str]]) -> None:
    for container in (a, b):
        await label_endpoint(store, container.address, BENCH_LABELS)
    await put_in_batches(store, made)


async def _revision(store: EtcdStore) -> int:
    _, revision = await store.get(policies_prefix(OWN_PREFIX))
    return revision


async def _enforced(revision: int, store: EtcdStore) -> None:
    found, _ = await wait_enforced(store, PREFIX, OWN_PREFIX, revision, ENFORCE_SECONDS)
    if not found.done or len(found.live) != 2:
        behind = ", ".join(f"{h.host} at {h.revision}" for h in found.behind)
        raise RuntimeError(f"revision {revision} not enforced by both hosts: {behind}")


def _switch(lab: Lab, mode: str, items: list[tuple[str, str]]) -> tuple[float, Expected]:
    """Into `mode`: seconds until both hosts enforce it, and the sender's
    host's expected state. Each host's kernel is checked against etcd."""
    started = time.monotonic()
    if mode == "policies":
        revision = lab.etcd(lambda store: put_in_batches(store, items))
    else:
        # One deletion of them all, as one etcd revision.
        lab.etcdctl("del", "--prefix", policies_prefix(OWN_PREFIX))
        revision = lab.etcd(_revision)
    lab.etcd(partial(_enforced, revision))
    took = time.monotonic() - started
    found: list[Expected] = []
    for host in (1, 2):
        # In gwbridge mode the daemon judges its gwbridge subnets as local,
        # as diagnose reads them: from the host's subnet file.
        gwbridge = read_gwbridge_subnets(lab.subnet_file(host))
        wanted = lab.etcd(partial(expected, own_subnet=lab.subnet(host), gwbridge=gwbridge))
        finding = kernel_finding(lab.host_ns(host), wanted)
        if not finding.ok or wanted.ruleset.empty != (mode == "none"):
            raise RuntimeError(f"h{host} with {mode}: {finding.detail}")
        found.append(wanted)
    time.sleep(SETTLE_SECONDS)
    return took, found[0]


def _measure(
    a: bench.Endpoint, b: bench.Endpoint, seconds: float, congestion: str
) -> dict[str, float]:
    return {
        "tcp1_fwd": bench._iperf(
            a, b, streams=1, reverse=False, seconds=seconds, congestion=congestion
        ),
        "tcp2_fwd": bench._iperf(
            a, b, streams=2, reverse=False, seconds=seconds, congestion=congestion
        ),
        "ping_us": bench._ping_us(a, b),
    }


def policy_bench(
    name: str,
    rounds: int,
    seconds: float,
    congestion: str,
    policies: int,
    endpoints: int,
    out_dir: Path,
    progress: Callable[[str], None],
    *,
    egress: str = "gwbridge",
) -> Iterator[str]:
    if not 0 <= endpoints <= MAX_ENDPOINTS:
        raise ValueError(f"--policy-endpoints must be between 0 and {MAX_ENDPOINTS}")
    bench.check_congestion(congestion)
    lab = Lab(f"{name}p")
    lab.down()
    run = Run()
    try:
        lab.up(2, settings=LabSettings(egress=egress, resync_seconds=DEFAULT_RESYNC_SECONDS))
        config = lab.network_config()
        assert config is not None
        cluster: IPv4Network = config.network
        ca, cb = lab.container(1, 1), lab.container(2, 1)
        a, b = bench._endpoint(ca), bench._endpoint(cb)
        bench._servers(a, b)
        hosts = [HostSubnets(lab.subnet(h), lab.subnet6(h)) for h in (1, 2)]
        made = synthetic_endpoints(
            hosts,
            endpoints,
            per_host=max(1, -(-endpoints // 2)),
            own_prefix=OWN_PREFIX,
            offset=ENDPOINT_OFFSET,
        )
        lab.etcd(partial(_setup, a=ca, b=cb, made=endpoint_items(made)))
        items = policy_items(bench_policy_mix(policies, cluster=cluster))
        current = "none"
        for round_no in range(rounds):
            order = MODES if round_no % 2 == 0 else MODES[::-1]
            total0, steal0 = bench._cpu_times()
            for mode in order:
                if mode != current:
                    took, wanted = _switch(lab, mode, items)
                    run.switches[mode].append(took)
                    if mode == "policies":
                        run.expected = wanted
                    current = mode
                before = (counters(lab.host_ns(1)), counters(lab.host_ns(2)))
                cpu_before = daemon_cpu_seconds(lab)
                for metric, value in _measure(a, b, seconds, congestion).items():
                    run.samples[mode][metric].append(value)
                run.daemon_cpu[mode].append(daemon_cpu_seconds(lab) - cpu_before)
                if mode == "policies":  # (without, `before` is two empty readings)
                    seen = judged(before, (counters(lab.host_ns(1)), counters(lab.host_ns(2))))
                    run.judged.append(seen)
                    if not seen.ok:
                        went_back = min(seen.egress_allowed, seen.ingress_allowed) < 0
                        raise RuntimeError(
                            f"round {round_no + 1}: the bench's packets were not judged by the"
                            f" policies as they must be: {seen}"
                            + (
                                " (a counter went back: a table was made afresh without"
                                " the old one's counts; see the daemons' logs)"
                                if went_back
                                else ""
                            )
                        )
            total1, steal1 = bench._cpu_times()
            run.steal.append(100.0 * (steal1 - steal0) / max(1, total1 - total0))
            with_, without = run.samples["policies"], run.samples["none"]
            progress(
                f"round {round_no + 1}/{rounds} ({', '.join(order)}): TCP 1 stream"
                f" {with_['tcp1_fwd'][-1]:.2f} / {without['tcp1_fwd'][-1]:.2f} Gbit/s, ping"
                f" {with_['ping_us'][-1]:.0f} / {without['ping_us'][-1]:.0f} us (policies /"
                f" none); policy counters: {run.judged[-1].egress_allowed} packets allowed"
                f" by {BENCH_POLICY_NAMES[0]} on h1, {run.judged[-1].ingress_allowed} by"
                f" {BENCH_POLICY_NAMES[1]} on h2, {run.judged[-1].dropped} dropped;"
                f" steal {run.steal[-1]:.1f} %"
            )
    finally:
        lab.down()
    yield from report(
        run, policies, endpoints, rounds, seconds, congestion, out_dir, a, b, egress=egress
    )


def verdict_line(wanted: Expected, a: bench.Endpoint, b: bench.Endpoint) -> str:
    """How the daemon's own verdict function judges the bench's connection:
    which policies isolate each end and which allow it."""
    found = PolicyChecker(wanted.policies, wanted.endpoints).verdict(
        a.address, b.address, Protocol.TCP, bench.IPERF_PORT
    )
    return (
        f"The bench's connection {a.address} -> {b.address} TCP {bench.IPERF_PORT}, by the"
        f" daemon's verdict function: {'allowed' if found.allowed else 'DENIED'}; policies"
        f" selecting the sender for egress: {len(found.egress.selected_by)} (allowed by"
        f" {', '.join(found.egress.allowed_by) or 'none'}), the receiver for ingress:"
        f" {len(found.ingress.selected_by)} (allowed by"
        f" {', '.join(found.ingress.allowed_by) or 'none'})."
    )


def report(
    run: Run,
    policies: int,
    endpoints: int,
    rounds: int,
    seconds: float,
    congestion: str,
    out_dir: Path,
    a: bench.Endpoint,
    b: bench.Endpoint,
    *,
    egress: str = "gwbridge",
) -> Iterator[str]:
    rows, summary = bench.mode_rows(run.samples, MODES, METRICS)
    steal = run.steal
    lines = [
        f"Network policy: {policies} policies in force vs none, {time.strftime('%Y-%m-%d')},"
        f" {platform.machine()}, {bench._nproc()} vCPUs, kernel {platform.release()},"
        f" congestion control {congestion}, {rounds} rounds of {seconds:g} s iperf3 (modes"
        f" interleaved, order swapped every round), hypervisor steal {min(steal):.1f} to"
        f" {max(steal):.1f} % per round. The IPv4 overlay path between containers on two"
        f" hosts, egress {egress}; {endpoints} synthetic endpoints besides the two bench"
        " containers.",
        "",
        *rows,
        "",
    ]
    if run.expected is not None:
        size = ruleset_size(run.expected.ruleset)
        lines.append(f"With policies, each host's table: {size.text()}.")
        lines.append(verdict_line(run.expected, a, b))
    allowed_out = [j.egress_allowed for j in run.judged]
    allowed_in = [j.ingress_allowed for j in run.judged]
    lines.append(
        f"Policy counters, checked after each of the {len(run.judged)} measurements with"
        f" policies: the bench's allow rules counted {statistics.median(allowed_out):.0f}"
        f" packets on h1 (egress) and {statistics.median(allowed_in):.0f} on h2 (ingress) per"
        f" measurement (median), the first packets of its connections (later ones pass as"
        f" established, by the base chain's first rule); dropped: "
        f"{sum(j.dropped for j in run.judged)}."
    )
    cpu = ", ".join(
        f"{mode} {statistics.median(used):.2f} s (max {max(used):.2f})"
        for mode, used in run.daemon_cpu.items()
        if used
    )
    lines.append(
        f"Both daemons' CPU (with their nft and ip children) during one measurement, median: {cpu}."
    )
    switch = ", ".join(
        f"{mode} {statistics.median(times):.2f} s" for mode, times in run.switches.items() if times
    )
    lines.append(f"Mode switches, write to enforced on both hosts (median): {switch}.")
    table = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-policies.md").write_text(table)
    (out_dir / "bench-policies.json").write_text(
        json.dumps(
            {
                "congestion": congestion,
                "rounds": rounds,
                "policies": policies,
                "endpoints": endpoints,
                "steal_pct": steal,
                "judged": [
                    {
                        "egress_allowed": j.egress_allowed,
                        "ingress_allowed": j.ingress_allowed,
                        "dropped": j.dropped,
                    }
                    for j in run.judged
                ],
                "switch_seconds": run.switches,
                "daemon_cpu_seconds": run.daemon_cpu,
                **summary,
            }
        )
    )
    yield table
    yield f"written: {out_dir / 'bench-policies.md'}, {out_dir / 'bench-policies.json'}"
