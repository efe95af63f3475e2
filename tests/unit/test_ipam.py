"""Subnet picking: only candidates, never a taken or overlapping one."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

import pytest

from overlayd.config import parse_network_config
from overlayd.errors import SubnetsExhaustedError
from overlayd.plan.ipam import candidate_subnets, container_ranges, gateway_address, pick_subnet

CONFIG = parse_network_config('{"Network": "10.244.0.0/16"}')
SMALL = parse_network_config('{"Network": "10.0.0.0/26"}')  # /28s: three usable


def test_candidates_skip_the_first_subnet_and_end_at_the_last() -> None:
    subnets = list(candidate_subnets(CONFIG))
    assert subnets[0] == IPv4Network("10.244.1.0/24")
    assert subnets[-1] == IPv4Network("10.244.255.0/24")
    assert len(subnets) == 255


def test_a_free_preferred_subnet_wins() -> None:
    wanted = IPv4Network("10.244.77.0/24")
    assert pick_subnet(CONFIG, [], preferred=[wanted]) == wanted


def test_a_taken_or_foreign_preferred_subnet_is_passed_over() -> None:
    taken = IPv4Network("10.244.77.0/24")
    picked = pick_subnet(
        CONFIG, [taken], preferred=[taken, IPv4Network("10.99.0.0/24")], rng=random.Random(1)
    )
    assert picked != taken and picked.subnet_of(CONFIG.network)


def test_picks_never_overlap_leases_of_another_length() -> None:
    taken = [IPv4Network("10.0.0.0/27")]  # covers 10.0.0.16/28
    for seed in range(20):
        picked = pick_subnet(SMALL, taken, rng=random.Random(seed))
        assert not picked.overlaps(taken[0])


def test_exhaustion_names_the_network_and_the_size() -> None:
    taken = list(candidate_subnets(SMALL))
    with pytest.raises(SubnetsExhaustedError, match=r"/28 subnet left in 10.0.0.0/26.*all 3"):
        pick_subnet(SMALL, taken)


def test_every_pick_from_a_partly_full_network_is_free() -> None:
    rng = random.Random(7)
    taken: list[IPv4Network] = []
    for _ in range(255):
        picked = pick_subnet(CONFIG, taken, rng=rng)
        assert picked not in taken
        taken.append(picked)
    with pytest.raises(SubnetsExhaustedError):
        pick_subnet(CONFIG, taken, rng=rng)


def test_container_ranges_give_each_allocator_one_half() -> None:
    """IPv4: host-local the lower half after the gateway, Docker the upper
    half. IPv6 the other way round (Docker 20.10 takes its IPv6 addresses
    at the bottom of the subnet), and dockerd's --fixed-cidr-v6 the whole
    subnet, whose lowest /80 (Docker's MAC-made addresses) is in Docker's half."""
    v4 = container_ranges(IPv4Network("10.244.7.0/24"))
    assert (str(v4.host_local_start), str(v4.host_local_end)) == ("10.244.7.2", "10.244.7.127")
    assert v4.docker_ip_range == v4.docker_fixed_cidr == IPv4Network("10.244.7.128/25")
    v6 = container_ranges(IPv6Network("fd00:10:244:7::/64"))
    assert (str(v6.host_local_start), str(v6.host_local_end)) == (
        "fd00:10:244:7:8000::",
        "fd00:10:244:7:ffff:ffff:ffff:ffff",
    )
    assert v6.docker_ip_range == IPv6Network("fd00:10:244:7::/65")
    assert v6.docker_fixed_cidr == IPv6Network("fd00:10:244:7::/64")
    docker_macs = IPv6Network("fd00:10:244:7::/80")  # e.g. fd00:10:244:7:0:242:af4:780
    assert docker_macs.subnet_of(v6.docker_ip_range)
    assert (
        not int(v6.host_local_start) <= int(docker_macs.broadcast_address) <= int(v6.host_local_end)
    )
    assert gateway_address(IPv6Network("fd00:10:244:7::/64")) == IPv6Address("fd00:10:244:7::1")
    # The halves meet and never overlap, in both families.
    assert v4.host_local_end + 1 == v4.docker_ip_range.network_address
    assert v6.docker_ip_range.broadcast_address + 1 == v6.host_local_start
    # An IPv6 subnet too long for Docker's MAC-made addresses to stay in its half.
    assert container_ranges(IPv6Network("fd00::/79")).docker_fixed_cidr is not None
    assert container_ranges(IPv6Network("fd00::/80")).docker_fixed_cidr is None
    assert container_ranges(IPv6Network("fd00::/80")).docker_ip_range == IPv6Network("fd00::/81")


def test_a_subnet_too_small_to_share_is_refused_in_either_family() -> None:
    for small, smallest in (("10.0.0.0/29", "/28"), ("fd00::/125", "/124")):
        with pytest.raises(ValueError, match=f"at most {smallest}"):
            container_ranges(ip_network(small))
    assert container_ranges(IPv4Network("10.0.0.0/28")).host_local_end == IPv4Address("10.0.0.7")
    smallest6 = container_ranges(IPv6Network("fd00::/124"))
    assert (smallest6.host_local_start, smallest6.host_local_end) == (
        IPv6Address("fd00::8"),
        IPv6Address("fd00::f"),
    )
