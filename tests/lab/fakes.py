"""Room for hand-written peer leases in lab tests.

Lab hosts lease a random free /24 of 10.244.0.0/16. A test that writes the
lease of a host that does not exist must not pick a subnet a real lab host
holds: it would overwrite that host's lease, or be confused with its routes.
So the tests' lab networks stop real leases at 10.244.199.0 and keep
10.244.200.0/24 to 10.244.255.0/24 for fakes.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from overlayd.lab.lab import default_network_config
from overlayd.model import NetworkConfig

FIRST_FAKE_OCTET = 200


def lab_network(
    *, vni: int = 1, port: int = 8472, backend: str = "vxlan", direct_routing: bool = False
) -> NetworkConfig:
    """The lab's default network, with the fakes' subnets never leased."""
    return default_network_config(
        vni=vni,
        port=port,
        backend=backend,
        direct_routing=direct_routing,
        subnet_max=IPv4Address(f"10.244.{FIRST_FAKE_OCTET - 1}.0"),
    )
