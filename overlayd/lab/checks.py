"""What `lab check` measures: ping between containers (all cross-host
pairs, retried until they answer), and egress, the source address a server
on the outside sees for a connection from a container.

Both take the address family as a parameter: in a dual-stack cluster the
same checks run once per family, between the containers' addresses of that
family, against the outside server's address of that family.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import TypeVar

from overlayd.lab import netns
from overlayd.lab.containers import Container
from overlayd.lab.topology import (
    OUTSIDE_SERVER,
    OUTSIDE_SERVER6,
    WHOAMI_PORT,
    host_address,
    host_address6,
)
from overlayd.model import IPV4, Family
from overlayd.nsexec import ping_rtt_ms

T = TypeVar("T")
A = TypeVar("A")


@dataclass(frozen=True, slots=True)
class PingResult:
    src: Container
    dst: Container
    ok: bool
    rtt_ms: float | None
    family: Family = IPV4

    @property
    def src_address(self) -> IPv4Address | IPv6Address | None:
        return self.src.address_of(self.family)

    @property
    def dst_address(self) -> IPv4Address | IPv6Address | None:
        return self.dst.address_of(self.family)


@dataclass(frozen=True, slots=True)
class EgressResult:
    container: Container
    seen_as: str | None  # the source address the outside server saw, None if unreachable
    expected: IPv4Address | IPv6Address  # the host's public address of the family
    family: Family = IPV4

    @property
    def ok(self) -> bool:
        return self.seen_as == str(self.expected)


def parallel(fn: Callable[[A], T], items: Iterable[A]) -> list[T]:
    """`fn` over `items` in threads: each item mostly waits for a child process."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(fn, items))


def ping(
    src: Container,
    dst: Container,
    *,
    count: int = 1,
    wait: float = 1.0,
    family: Family = IPV4,
) -> PingResult:
    """Ping `dst`'s address of `family` from `src`; a container without an
    address of the family on either end fails without a ping."""
    target = dst.address_of(family)
    if target is None or src.address_of(family) is None:
        return PingResult(src, dst, False, None, family)
    out = netns.in_ns(
        src.ns,
        "ping",
        *(["-6"] if family.version == 6 else []),
        "-n",
        "-q",
        "-c",
        str(count),
        "-W",
        f"{wait:g}",
        str(target),
        check=False,
        timeout=count * wait + 5,
    )
    ok = f" {count} received" in out or (
        count > 1 and " 0 received" not in out and "received" in out
    )
    rtt = ping_rtt_ms(out)
    return PingResult(src, dst, ok and rtt is not None, rtt, family)


def cross_host_pairs(containers: Sequence[Container]) -> list[tuple[Container, Container]]:
    return [(a, b) for a in containers for b in containers if a.host != b.host]


def check(
    containers: Sequence[Container], *, timeout: float = 20.0, family: Family = IPV4
) -> list[PingResult]:
    """Ping every container from every container on another host, over
    `family`; pairs that fail are retried until all answer or the timeout
    passes. Every cross-host pair is tried: one without an address of the
    family on either end is a failed pair, not a pair left out."""
    pending = cross_host_pairs(containers)
    results: dict[tuple[str, str], PingResult] = {}
    deadline = time.monotonic() + timeout
    while pending:
        outcome = parallel(lambda pair: ping(*pair, family=family), pending)
        for r in outcome:
            results[(r.src.ns, r.dst.ns)] = r
        # A pair without addresses of the family will not get them by waiting.
        pending = [
            (r.src, r.dst)
            for r in outcome
            if not r.ok and r.src_address is not None and r.dst_address is not None
        ]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    return sorted(results.values(), key=lambda r: (r.src.ns, r.dst.ns))


def whoami(ns: str, address: IPv4Address | IPv6Address, *, timeout: float = 2.0) -> str | None:
    """The source address `address`'s whoami service sees for a connection
    from `ns`; None if the connection fails."""
    argv = netns.module_argv(
        ns, "overlayd.lab.whoami", "ask", str(address), str(WHOAMI_PORT), f"{timeout:g}"
    )
    out = netns.sh(argv, check=False, timeout=timeout + 10).strip()
    return out or None


def outside_server(family: Family) -> IPv4Address | IPv6Address:
    return OUTSIDE_SERVER6 if family.version == 6 else OUTSIDE_SERVER


def public_address(host: int, family: Family) -> IPv4Address | IPv6Address:
    """The host's underlay address of `family`: what the outside must see."""
    return host_address6(host) if family.version == 6 else host_address(host)


def check_egress(containers: Sequence[Container], *, family: Family = IPV4) -> list[EgressResult]:
    """Every container connects to the outside server's address of
    `family`, which must see the container's host's public address of the
    same family (source NAT)."""
    server = outside_server(family)
    return parallel(
        lambda c: EgressResult(c, whoami(c.ns, server), public_address(c.host, family), family),
        containers,
    )
