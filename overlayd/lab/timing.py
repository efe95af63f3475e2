"""Lab timings, printed as figures (not asserted): how long a lab takes from
nothing to all-pairs reachable, and how long a joining host takes to become
reachable from every other host.

Reachability is probed with one-packet pings every 50 ms (each waiting at
most 200 ms), so the figures resolve to roughly a tenth of a second.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from overlayd.lab.checks import parallel, ping
from overlayd.lab.lab import Container, Lab

PROBE_WAIT = 0.2
PROBE_STEP = 0.05


def _all_reachable(pairs: Sequence[tuple[Container, Container]], timeout: float) -> bool:
    pending = list(pairs)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        results = parallel(lambda p: ping(*p, wait=PROBE_WAIT), pending)
        pending = [(r.src, r.dst) for r in results if not r.ok]
        if pending:
            time.sleep(PROBE_STEP)
    return not pending


@dataclass(frozen=True, slots=True)
class Summary:
    what: str
    samples: tuple[float, ...]

    def line(self) -> str:
        s = sorted(self.samples)
        return (
            f"{self.what}: median {statistics.median(s):.2f} s"
            f"  min {s[0]:.2f}  max {s[-1]:.2f}  (n={len(s)})"
        )


def time_lab_up(hosts: int, runs: int, name: str = "timing") -> Summary:
    """Seconds from an empty machine to every cross-host pair answering."""
    samples = []
    for run in range(runs):
        lab = Lab(f"{name}{run}")
        lab.down()
        started = time.monotonic()
        try:
            lab.up(hosts)
            if not _all_reachable(lab.cross_host_pairs(), timeout=60):
                raise RuntimeError(f"lab with {hosts} hosts not fully reachable after 60 s")
            samples.append(time.monotonic() - started)
        finally:
            lab.down()
    return Summary(f"lab up + all-pairs reachable, {hosts} hosts", tuple(samples))


def time_joins(base_hosts: int, joins: int, name: str = "timingj") -> tuple[Summary, Summary]:
    """For each joining host: seconds from starting its daemon to its first
    lease-backed readiness, and from readiness to reachable from all others."""
    ready_samples, reach_samples = [], []
    lab = Lab(name)
    lab.down()
    try:
        lab.up(base_hosts)
        for host in range(base_hosts + 1, base_hosts + joins + 1):
            started = time.monotonic()
            lab.add_host(host)  # namespace, daemon, lease, first reconcile, container
            ready = time.monotonic()
            new = [c for c in lab.containers() if c.host == host]
            old = [c for c in lab.containers() if c.host != host]
            pairs = [(o, n) for o in old for n in new] + [(n, o) for n in new for o in old]
            if not _all_reachable(pairs, timeout=30):
                raise RuntimeError(f"h{host} not reachable from all others after 30 s")
            ready_samples.append(ready - started)
            reach_samples.append(time.monotonic() - ready)
    finally:
        lab.down()
    return (
        Summary(
            "new host: start to ready (lease held, own kernel programmed)", tuple(ready_samples)
        ),
        Summary("new host: ready to reachable from every other host", tuple(reach_samples)),
    )
