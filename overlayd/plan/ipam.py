"""Choosing this host's subnet: which subnets exist, which are free, which one to try.

The etcd transaction (create only if absent) is what guarantees that no two
hosts hold the same subnet; this module only makes a good first guess, so
that many hosts starting at once rarely collide.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Generic, TypeVar, overload

from overlayd.errors import SubnetsExhaustedError
from overlayd.model import NetworkConfig

# Pick at random among the first this-many free subnets: low numbers stay
# dense (as flannel does), and simultaneous starters spread out.
PICK_WINDOW = 256


def candidate_subnets(config: NetworkConfig) -> Iterator[IPv4Network]:
    size = 1 << (32 - config.subnet_len)
    for start in range(int(config.subnet_min), int(config.subnet_max) + 1, size):
        yield IPv4Network((start, config.subnet_len))


def is_candidate(config: NetworkConfig, subnet: IPv4Network) -> bool:
    return (
        subnet.prefixlen == config.subnet_len
        and config.subnet_min <= subnet.network_address <= config.subnet_max
        and subnet.subnet_of(config.network)
    )


def free_subnets(config: NetworkConfig, taken: Iterable[IPv4Network]) -> Iterator[IPv4Network]:
    same_len = {t.network_address for t in taken if t.prefixlen == config.subnet_len}
    other_len = [t for t in taken if t.prefixlen != config.subnet_len]
    for subnet in candidate_subnets(config):
        if subnet.network_address in same_len:
            continue
        if any(subnet.overlaps(t) for t in other_len):
            continue
        yield subnet


def pick_subnet(
    config: NetworkConfig,
    taken: Iterable[IPv4Network],
    *,
    preferred: Sequence[IPv4Network] = (),
    rng: random.Random | None = None,
) -> IPv4Network:
    """The first free preferred subnet, else a random one of the first free ones."""
    taken = list(taken)
    for subnet in preferred:
        if is_candidate(config, subnet) and not any(subnet.overlaps(t) for t in taken):
            return subnet
    window: list[IPv4Network] = []
    for subnet in free_subnets(config, taken):
        window.append(subnet)
        if len(window) >= PICK_WINDOW:
            break
    if not window:
        total = sum(1 for _ in candidate_subnets(config))
        raise SubnetsExhaustedError(
            f"no free /{config.subnet_len} subnet left in {config.network}"
            f" between {config.subnet_min} and {config.subnet_max}: all {total} are leased"
        )
    return (rng or random.Random()).choice(window)


@overload
def gateway_address(subnet: IPv4Network) -> IPv4Address: ...
@overload
def gateway_address(subnet: IPv6Network) -> IPv6Address: ...
def gateway_address(subnet: IPv4Network | IPv6Network) -> IPv4Address | IPv6Address:
    """The bridge's address: the first host address of the subnet (either family)."""
    return subnet.network_address + 1


_Net = TypeVar("_Net", IPv4Network, IPv6Network)
_Addr = TypeVar("_Addr", IPv4Address, IPv6Address)


@dataclass(frozen=True, slots=True)
class ContainerRanges(Generic[_Net, _Addr]):
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

    subnet: _Net
    host_local_start: _Addr
    host_local_end: _Addr
    # `docker network create --ip-range`: Docker's half. (An IPv6 range
    # reaching the last address of a /64 is refused by Docker 20.10 when a
    # container starts: its /64 bitmap holds 2**64 - 1 addresses.)
    docker_ip_range: _Net
    # dockerd's `--fixed-cidr` / `--fixed-cidr-v6` for its default bridge.
    # IPv4: Docker's half, carved from the bridge's subnet. IPv6: the whole
    # subnet, since Docker 20.10 gives containers the prefix of
    # --fixed-cidr-v6 and deletes every other global IPv6 address from the
    # bridge (overlayd's gateway included) unless it lies inside; its
    # addresses come from the containers' MACs, in the subnet's lowest /80,
    # which is inside Docker's half for a /79 or shorter prefix. None for a
    # longer IPv6 prefix: no safe value exists.
    docker_fixed_cidr: _Net | None


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
