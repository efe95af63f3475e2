"""What `lab check` measures: ping between containers (all cross-host
pairs, retried until they answer), and egress, the source address a server
on the outside sees for a connection from a container.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import TypeVar

from overlayd.lab import netns
from overlayd.lab.containers import Container
from overlayd.lab.topology import OUTSIDE_SERVER, WHOAMI_PORT, host_address
from overlayd.nsexec import ping_rtt_ms

T = TypeVar("T")
A = TypeVar("A")


@dataclass(frozen=True, slots=True)
class PingResult:
    src: Container
    dst: Container
    ok: bool
    rtt_ms: float | None


@dataclass(frozen=True, slots=True)
class EgressResult:
    container: Container
    seen_as: str | None  # the source address the outside server saw, None if unreachable
    expected: IPv4Address  # the host's public address


def parallel(fn: Callable[[A], T], items: Iterable[A]) -> list[T]:
    """`fn` over `items` in threads: each item mostly waits for a child process."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(fn, items))


def ping(src: Container, dst: Container, *, count: int = 1, wait: float = 1.0) -> PingResult:
    out = netns.in_ns(
        src.ns,
        "ping",
        "-n",
        "-q",
        "-c",
        str(count),
        "-W",
        f"{wait:g}",
        str(dst.address),
        check=False,
        timeout=count * wait + 5,
    )
    ok = f" {count} received" in out or (
        count > 1 and " 0 received" not in out and "received" in out
    )
    rtt = ping_rtt_ms(out)
    return PingResult(src, dst, ok and rtt is not None, rtt)


def cross_host_pairs(containers: Sequence[Container]) -> list[tuple[Container, Container]]:
    return [(a, b) for a in containers for b in containers if a.host != b.host]


def check(containers: Sequence[Container], *, timeout: float = 20.0) -> list[PingResult]:
    """Ping every container from every container on another host; pairs
    that fail are retried until all answer or the timeout passes."""
    pending = cross_host_pairs(containers)
    results: dict[tuple[str, str], PingResult] = {}
    deadline = time.monotonic() + timeout
    while pending:
        outcome = parallel(lambda pair: ping(*pair), pending)
        for r in outcome:
            results[(r.src.ns, r.dst.ns)] = r
        pending = [(r.src, r.dst) for r in outcome if not r.ok]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    return sorted(results.values(), key=lambda r: (r.src.ns, r.dst.ns))


def whoami(ns: str, address: IPv4Address, *, timeout: float = 2.0) -> str | None:
    """The source address `address`'s whoami service sees for a connection
    from `ns`; None if the connection fails."""
    argv = netns.module_argv(
        ns, "overlayd.lab.whoami", "ask", str(address), str(WHOAMI_PORT), f"{timeout:g}"
    )
    out = netns.sh(argv, check=False, timeout=timeout + 10).strip()
    return out or None


def check_egress(containers: Sequence[Container]) -> list[EgressResult]:
    """Every container connects to the outside server, which must see the
    container's host's public address (source NAT)."""
    return parallel(
        lambda c: EgressResult(c, whoami(c.ns, OUTSIDE_SERVER), host_address(c.host)),
        containers,
    )
