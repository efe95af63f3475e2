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
from typing import Any, Generic, Protocol, TypeVar, cast, overload

from overlayd.errors import SubnetsExhaustedError
from overlayd.model import IPAddress, Lease, NetworkConfig

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


def paired_subnet6(config: NetworkConfig, subnet: IPv4Network) -> IPv6Network | None:
    """The IPv6 subnet with the same index among IPv6 candidates as `subnet`
    among IPv4 ones, if the IPv6 pool is that large."""
    pool = config.ipv6
    if pool is None or not is_candidate(config, subnet):
        return None
    index = (int(subnet.network_address) - int(config.subnet_min)) >> (32 - config.subnet_len)
    start = int(pool.subnet_min) + (index << (128 - pool.subnet_len))
    if start > int(pool.subnet_max):
        return None
    return IPv6Network((start, pool.subnet_len))


@overload
def gateway_address(subnet: IPv4Network) -> IPv4Address: ...
@overload
def gateway_address(subnet: IPv6Network) -> IPv6Address: ...
def gateway_address(subnet: IPv4Network | IPv6Network) -> IPv4Address | IPv6Address:
    """The bridge's address: the first host address of the subnet (either family)."""
    return subnet.network_address + 1


def gateways(own: Lease) -> tuple[IPAddress, ...]:
    """The bridge's gateway addresses for a lease, one per family (where the
    DNS responder listens)."""
    found: list[IPAddress] = [gateway_address(own.subnet)]
    if own.ipv6_subnet is not None:
        found.append(gateway_address(own.ipv6_subnet))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class ContainerRanges(Generic[N, A]):
    """Who hands out which of a host's container addresses, in one family.

    Docker's built-in IPAM (docker-opts, or `docker network create` on the
    bridge) and CNI's host-local (overlay-cni, and overlayd's Docker plugin,
    which shares host-local's store) each keep their own books, so they must
    never draw from the same addresses: each takes one half of the subnet.
    Every container still gets the whole subnet as its prefix, so containers
    of both engines on one host are on one link.

    IPv4: host-local the lower half (after the gateway), Docker the upper
    half (`--fixed-cidr`, `--ip-range`). IPv6 the other way round, because
    of how Docker 20.10 takes IPv6 addresses (measured, see docker_fixed_cidr):
    host-local the upper half, Docker the lower one (`--ip-range`)."""

    subnet: N
    host_local_start: A
    host_local_end: A
    # `docker network create --ip-range`: Docker's half. (An IPv6 range
    # reaching the last address of a /64 is refused by Docker 20.10 when a
    # container starts: its /64 bitmap holds 2**64 - 1 addresses.)
    docker_ip_range: N
    # dockerd's `--fixed-cidr` / `--fixed-cidr-v6` for its default bridge.
    # IPv4: Docker's half, carved from the bridge's subnet. IPv6: the whole
    # subnet, since Docker 20.10 gives containers the prefix of
    # --fixed-cidr-v6 and deletes every other global IPv6 address from the
    # bridge (overlayd's gateway included) unless it lies inside; its
    # addresses come from the containers' MACs, in the subnet's lowest /80,
    # which is inside Docker's half for a /79 or shorter prefix. None for a
    # longer IPv6 prefix: no safe value exists.
    docker_fixed_cidr: N | None


# The network name under which host-local keeps the overlay's reservations
# (dataDir/ipam/<name>), whatever a runtime's conflist calls the network:
# overlay-cni and the Docker plugin both allocate there, in both families.
HOST_LOCAL_STORE = "overlay"
# A subnet must have at least this many host bits to be shared: 16
# addresses, two halves of 8, the lower one keeps 5 (an IPv4 /28, an IPv6 /124).
SHARED_HOST_BITS = 4
# Docker 20.10 puts the container's MAC into an IPv6 address's last 48 bits.
DOCKER_MAC_BITS = 48


@overload
def container_ranges(subnet: IPv4Network) -> ContainerRanges[IPv4Network, IPv4Address]: ...
@overload
def container_ranges(subnet: IPv6Network) -> ContainerRanges[IPv6Network, IPv6Address]: ...
def container_ranges(subnet: IPv4Network | IPv6Network) -> ContainerRanges[Any, Any]:
    smallest = subnet.max_prefixlen - SHARED_HOST_BITS
    if subnet.prefixlen > smallest:
        raise ValueError(
            f"subnet {subnet} is too small to share between host-local and Docker"
            f" (at most /{smallest})"
        )
    lower, upper = subnet.subnets(prefixlen_diff=1)
    # The one difference between the families (see ContainerRanges).
    docker, host_local = (upper, lower) if subnet.version == 4 else (lower, upper)
    fixed_cidr: IPv4Network | IPv6Network | None = docker
    if subnet.version == 6:
        mac_space_fits = subnet.prefixlen < subnet.max_prefixlen - DOCKER_MAC_BITS
        fixed_cidr = subnet if mac_space_fits else None
    return ContainerRanges(
        subnet=subnet,
        # Never the network address or the bridge's gateway; the last
        # address of a half (IPv4's broadcast address of that half) is an
        # ordinary host address of the subnet.
        host_local_start=max(host_local.network_address, gateway_address(subnet) + 1),
        host_local_end=host_local.broadcast_address,
        docker_ip_range=docker,
        docker_fixed_cidr=fixed_cidr,
    )
