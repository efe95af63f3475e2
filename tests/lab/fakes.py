"""Room for hand-written peer leases in lab tests.

Lab hosts lease a random free /24 of 10.244.0.0/16 (and in a dual-stack
lab a /64 of fd00:10:244::/56). A test that writes the lease of a host that
does not exist must not pick a subnet a real lab host holds: it would
overwrite that host's lease, or be confused with its routes. So the tests'
lab networks stop real leases at 10.244.199.0 and fd00:10:244:c7:: and keep
10.244.200.0/24 to 10.244.255.0/24 and fd00:10:244:c8::/64 to
fd00:10:244:ff::/64 for fakes (the same numbers, 200 = 0xc8).

The tests' labs are dual-stack unless a test says otherwise, as `lab up`'s
are: every IPv4 test then runs beside IPv6, and the IPv6 tests share the
labs of the IPv4 ones.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from overlayd.lab.lab import default_network_config
from overlayd.model import NetworkConfig

FIRST_FAKE_OCTET = 200


def fake_subnet6(octet: int) -> str:
    """The IPv6 fake subnet numbered like the IPv4 one, 10.244.<octet>.0/24."""
    assert octet >= FIRST_FAKE_OCTET, "lab hosts may hold this subnet"
    return f"fd00:10:244:{octet:x}::/64"


def lab_network(
    *,
    vni: int = 1,
    port: int = 8472,
    backend: str = "vxlan",
    direct_routing: bool = False,
    ipv6: bool = True,
    service_network: IPv4Network | None = None,
    service_network6: IPv6Network | None = None,
) -> NetworkConfig:
    """The lab's default network, with the fakes' subnets never leased
    (and service networks when given)."""
    return default_network_config(
        vni=vni,
        port=port,
        backend=backend,
        direct_routing=direct_routing,
        subnet_max=IPv4Address(f"10.244.{FIRST_FAKE_OCTET - 1}.0"),
        ipv6=ipv6,
        subnet_max6=IPv6Address(f"fd00:10:244:{FIRST_FAKE_OCTET - 1:x}::"),
        service_network=service_network,
        service_network6=service_network6,
    )
