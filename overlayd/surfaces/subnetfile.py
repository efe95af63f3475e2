"""flannel's subnet file (`/run/flannel/subnet.env`), which CNI plugins and
Docker helper scripts read to learn this host's subnet and MTU.

With services configured, the file also tells attaching containers where
overlayd's DNS responder listens (the overlay bridge's gateway addresses,
port 53) and under which domain: `OVERLAYD_DNS=<ip>[,<ip6>]` and
`OVERLAYD_DNS_DOMAIN=<domain>`, written only when given. overlay-cni puts
them in its CNI result's `dns`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from ipaddress import (
    IPv4Interface,
    IPv4Network,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_network,
)
from pathlib import Path

from overlayd.model import IPAddress
from overlayd.plan.dns_records import validate_domain
from overlayd.plan.host import HostFacts
from overlayd.plan.ipam import gateway_address


@dataclass(frozen=True, slots=True)
class SubnetFile:
    network: IPv4Network
    subnet: IPv4Network
    mtu: int
    ipmasq: bool = False
    egress: str = "none"
    gwbridge: str | None = None
    gwbridge_gateway: IPv4Interface | None = None
    bridge: str | None = None
    # Dual-stack (flannel's FLANNEL_IPV6_*), None without IPv6.
    network6: IPv6Network | None = None
    subnet6: IPv6Network | None = None
    gwbridge_gateway6: IPv6Interface | None = None
    # The network config's ServiceNetwork(s): in gwbridge mode a container
    # reaches service VIPs by its overlay interface, like the cluster.
    service_networks: tuple[IPv4Network | IPv6Network, ...] = ()
    # overlayd's DNS responder for containers (services), none without.
    dns_servers: tuple[IPAddress, ...] = ()
    dns_domain: str | None = None

    def render(self) -> str:
        """flannel's variables (the IPv6 ones in a dual-stack network), then
        overlayd's own (which flannel's readers ignore): the egress mode and,
        in gwbridge mode, the egress bridge and its gateways for the
        container's second interface."""
        gateway = IPv4Interface((gateway_address(self.subnet), self.subnet.prefixlen))
        masq = "true" if self.ipmasq else "false"
        text = f"FLANNEL_NETWORK={self.network}\nFLANNEL_SUBNET={gateway}\n"
        if self.network6 is not None and self.subnet6 is not None:
            gateway6 = IPv6Interface((self.subnet6.network_address + 1, self.subnet6.prefixlen))
            text += f"FLANNEL_IPV6_NETWORK={self.network6}\nFLANNEL_IPV6_SUBNET={gateway6}\n"
        text += f"FLANNEL_MTU={self.mtu}\nFLANNEL_IPMASQ={masq}\n"
        if self.subnet6 is not None:
            text += f"FLANNEL_IPV6_MASQ={masq}\n"
        text += f"OVERLAYD_EGRESS={self.egress}\n"
        if self.bridge:
            text += f"OVERLAYD_BRIDGE={self.bridge}\n"
        if self.gwbridge and self.gwbridge_gateway:
            text += (
                f"OVERLAYD_GWBRIDGE={self.gwbridge}\n"
                f"OVERLAYD_GWBRIDGE_SUBNET={self.gwbridge_gateway}\n"
            )
            if self.gwbridge_gateway6 is not None:
                text += f"OVERLAYD_GWBRIDGE_SUBNET6={self.gwbridge_gateway6}\n"
        if self.service_networks:
            text += f"OVERLAYD_SERVICE_NETWORK={','.join(map(str, self.service_networks))}\n"
        if self.dns_servers:
            text += f"OVERLAYD_DNS={','.join(map(str, self.dns_servers))}\n"
        if self.dns_domain:
            text += f"OVERLAYD_DNS_DOMAIN={self.dns_domain}\n"
        return text


def subnet_file_for(
    host: HostFacts,
    *,
    dns_servers: tuple[IPAddress, ...] = (),
    dns_domain: str | None = None,
) -> SubnetFile:
    """What this host's subnet file says; `dns_servers` and `dns_domain`
    name overlayd's DNS responder for containers, when it serves one."""
    egress = host.egress
    return SubnetFile(
        network=host.config.network,
        subnet=host.own.subnet,
        mtu=host.spec.mtu,
        ipmasq=egress.mode == "masquerade",
        egress=egress.mode,
        gwbridge=egress.gwbridge if egress.mode == "gwbridge" else None,
        gwbridge_gateway=egress.gwbridge_gateway,
        bridge=host.spec.bridge,
        network6=host.config.ipv6.network if host.config.ipv6 is not None else None,
        subnet6=host.own.ipv6_subnet,
        gwbridge_gateway6=egress.gwbridge_gateway6,
        service_networks=host.config.service_networks,
        dns_servers=dns_servers,
        dns_domain=dns_domain,
    )


def read_variables(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return {}
    found = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key.strip()] = value.strip()
    return found


def read_subnet(path: Path) -> IPv4Network | None:
    """The subnet recorded by a previous run, or None if there is none usable."""
    value = read_variables(path).get("FLANNEL_SUBNET")
    try:
        return IPv4Interface(value).network if value else None
    except ValueError:
        return None


def read_subnet6(path: Path) -> IPv6Network | None:
    """The IPv6 subnet recorded by a previous run, or None."""
    value = read_variables(path).get("FLANNEL_IPV6_SUBNET")
    try:
        return IPv6Interface(value).network if value else None
    except ValueError:
        return None


def read_gwbridge_subnets(path: Path) -> tuple[IPv4Network | IPv6Network, ...]:
    """The gwbridge's subnets in gwbridge egress mode, as a previous run
    wrote them (for tools that judge as the daemon does); () otherwise."""
    found = read_variables(path)
    if found.get("OVERLAYD_EGRESS") != "gwbridge":
        return ()
    subnets: list[IPv4Network | IPv6Network] = []
    for name, kind in (
        ("OVERLAYD_GWBRIDGE_SUBNET", IPv4Interface),
        ("OVERLAYD_GWBRIDGE_SUBNET6", IPv6Interface),
    ):
        value = found.get(name)
        try:
            if value:
                subnets.append(kind(value).network)
        except ValueError:
            continue
    return tuple(subnets)


def read_service_networks(path: Path) -> tuple[IPv4Network | IPv6Network, ...]:
    """The ServiceNetwork(s) the file names; a bad value is left out."""
    found: list[IPv4Network | IPv6Network] = []
    for text in read_variables(path).get("OVERLAYD_SERVICE_NETWORK", "").split(","):
        try:
            network = ip_network(text.strip(), strict=True)
        except ValueError:
            continue
        if network not in found:
            found.append(network)
    return tuple(found)


def read_dns(path: Path) -> tuple[tuple[IPAddress, ...], str | None]:
    """overlayd's DNS servers and domain for containers, as the file says;
    ((), None) without them. A bad address is left out and a bad domain
    read as none: the container then goes without, never an attach that
    fails on a damaged line."""
    found = read_variables(path)
    servers: list[IPAddress] = []
    for text in found.get("OVERLAYD_DNS", "").split(","):
        try:
            address = ip_address(text.strip())
        except ValueError:
            continue
        if address not in servers:
            servers.append(address)
    domain: str | None
    try:
        domain = validate_domain(found["OVERLAYD_DNS_DOMAIN"])
    except (KeyError, ValueError):
        domain = None
    return tuple(servers), domain


def write_atomically(path: Path, content: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SubnetFileWriter:
    """Keeps the subnet file in step with what the kernel is programmed for.

    Fed the inputs of each pass that programmed the kernel (never the plan:
    a new lease reaches the file only once the bridge holds it, so no CNI
    ADD or Docker request gets an address the bridge does not route yet).
    Writes only when the text changes; a failed write is tried again with
    the next pass."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written: str | None = None  # the file's text as we last wrote it

    def programmed(
        self,
        facts: HostFacts,
        *,
        dns_servers: tuple[IPAddress, ...] = (),
        dns_domain: str | None = None,
    ) -> bool:
        """Write the file for `facts` (and the DNS responder, when given) if
        it says something else; True when written."""
        text = subnet_file_for(facts, dns_servers=dns_servers, dns_domain=dns_domain).render()
        if text == self.written:
            return False
        try:
            write_atomically(self.path, text)
        except BaseException:
            self.written = None  # unknown now: the next pass writes it whole
            raise
        self.written = text
        return True
