"""Choosing this host's subnet: which subnets exist, which are free, which one to try.

The etcd transaction (create only if absent) is what guarantees that no two
hosts hold the same subnet; this module only makes a good first guess, so
that many hosts starting at once rarely collide.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Protocol, TypeVar, cast

from overlayd.errors import SubnetsExhaustedError

N = TypeVar("N", IPv4Network, IPv6Network)
A = TypeVar("A", IPv4Address, IPv6Address)
N_co = TypeVar("N_co", IPv4Network, IPv6Network, covariant=True)
A_co = TypeVar("A_co", IPv4Address, IPv6Address, covariant=True)

# Pick at random among the first this-many free subnets: low numbers stay
# dense (as flannel does), and simultaneous starters spread out.
PICK_WINDOW = 256


class Pool(Protocol[N_co, A_co]):
    """Where subnets are leased from: the IPv4 network config, or its IPv6
    half (`Ipv6Config`); both have these four fields."""

    @property
    def network(self) -> N_co: ...

    @property
    def subnet_len(self) -> int: ...

    @property
    def subnet_min(self) -> A_co: ...

    @property
    def subnet_max(self) -> A_co: ...


def _subnet(pool: Pool[N, A], start: int) -> N:
    return cast(N, ip_network((start, pool.subnet_len)))


def candidate_subnets(pool: Pool[N, A]) -> Iterator[N]:
    size = 1 << (pool.network.max_prefixlen - pool.subnet_len)
    for start in range(int(pool.subnet_min), int(pool.subnet_max) + 1, size):
        yield _subnet(pool, start)


def candidate_count(pool: Pool[N, A]) -> int:
    size = 1 << (pool.network.max_prefixlen - pool.subnet_len)
    return (int(pool.subnet_max) - int(pool.subnet_min)) // size + 1


def is_candidate(pool: Pool[N, A], subnet: N) -> bool:
    return (
        subnet.prefixlen == pool.subnet_len
        and int(pool.subnet_min) <= int(subnet.network_address) <= int(pool.subnet_max)
        and subnet.subnet_of(pool.network)
    )


def free_subnets(pool: Pool[N, A], taken: Iterable[N]) -> Iterator[N]:
    same_len = {int(t.network_address) for t in taken if t.prefixlen == pool.subnet_len}
    other_len = [t for t in taken if t.prefixlen != pool.subnet_len]
    for subnet in candidate_subnets(pool):
        if int(subnet.network_address) in same_len:
            continue
        if any(subnet.overlaps(t) for t in other_len):
            continue
        yield subnet


def pick_subnet(
    pool: Pool[N, A],
    taken: Iterable[N],
    *,
    preferred: Sequence[N] = (),
    rng: random.Random | None = None,
) -> N:
    """The first free preferred subnet, else a random one of the first free ones.

    The same for both families: an IPv6 network may hold millions of
    subnets, so nothing here walks more of them than the window needs."""
    taken = list(taken)
    for subnet in preferred:
        if is_candidate(pool, subnet) and not any(subnet.overlaps(t) for t in taken):
            return subnet
    window: list[N] = []
    for subnet in free_subnets(pool, taken):
        window.append(subnet)
        if len(window) >= PICK_WINDOW:
            break
    if not window:
        raise SubnetsExhaustedError(
            f"no free /{pool.subnet_len} subnet left in {pool.network}"
            f" between {pool.subnet_min} and {pool.subnet_max}:"
            f" all {candidate_count(pool)} are leased"
        )
    return (rng or random.Random()).choice(window)


def gateway_address(subnet: IPv4Network) -> IPv4Address:
    """The bridge's address: the first host address of the subnet."""
    return subnet.network_address + 1


@dataclass(frozen=True, slots=True)
class ContainerRanges:
    """Who hands out which of a host's container addresses.

    Docker's built-in IPAM (docker-opts: `--fixed-cidr`) and CNI's host-local
    (overlay-cni, and overlayd's Docker plugin, which shares host-local's
    store) each keep their own books, so they must never draw from the same
    addresses: host-local takes the lower half of the subnet (after the
    gateway), Docker's `--fixed-cidr` the upper half. Every container still
    gets the whole subnet as its prefix, so containers of both engines on one
    host are on one link."""

    subnet: IPv4Network
    host_local_start: IPv4Address
    host_local_end: IPv4Address
    docker_fixed_cidr: IPv4Network


# The network name under which host-local keeps the overlay's reservations
# (dataDir/ipam/<name>), whatever a runtime's conflist calls the network:
# overlay-cni and the Docker plugin both allocate there.
HOST_LOCAL_STORE = "overlay"
SMALLEST_SHARED_SUBNET = 28  # 16 addresses: two halves of 8, the lower one keeps 5


def container_ranges(subnet: IPv4Network) -> ContainerRanges:
    if subnet.prefixlen > SMALLEST_SHARED_SUBNET:
        raise ValueError(
            f"subnet {subnet} is too small to share between host-local and Docker"
            f" (at most /{SMALLEST_SHARED_SUBNET})"
        )
    lower, upper = subnet.subnets(prefixlen_diff=1)
    return ContainerRanges(
        subnet=subnet,
        # .0 is the network, .1 the bridge's gateway; the lower half's
        # broadcast address is an ordinary host address of the subnet.
        host_local_start=gateway_address(subnet) + 1,
        host_local_end=lower.broadcast_address,
        docker_fixed_cidr=upper,
    )
