"""Docker's network plugin protocol (libnetwork's remote driver and remote
IPAM, as Docker 20.10 speaks them): validating parsers for every request and
the decisions the server acts on. Pure: no I/O, no asyncio.

Docker posts JSON to `/<Interface>.<Method>` on the plugin's unix socket. A
request that is not what Docker sends (not JSON, a field missing or of the
wrong type, an ID we never saw, an address outside this host's subnet or
outside host-local's half of it) raises PluginError, which the server turns
into a 4xx/5xx answer with a body of `{"Err": "..."}`: Docker's plugin client
reads `Err` from any non-200 answer, for the network driver and the IPAM
driver alike (a 200 answer of the IPAM driver would carry its error in
`Error` instead, so errors are never sent with 200).

The decisions that depend on overlayd's egress mode are in `join_response`:
- masquerade and none: the endpoint's Gateway is the overlay bridge's
  address, so the container's default route goes over the overlay, as
  overlay-cni does it; Docker then sends this driver
  ProgramExternalConnectivity with the published ports (`-p`).
- gwbridge: no Gateway, and a static route for the cluster network via the
  bridge's address. libnetwork (sandbox.needDefaultGW) then attaches the
  container to its own `docker_gwbridge` network as well, with the default
  route there and the published ports handled by Docker's bridge driver,
  exactly as for Docker's own overlay driver.
A change of egress mode (overlayd restarted with another egress setting)
applies to containers that join afterwards. A running container keeps what
its Join got: its default route, and its docker_gwbridge endpoint or none.
Nothing re-joins it, so it goes out the old way until it is restarted:
- started in gwbridge mode: its default route stays on docker_gwbridge,
  Docker's own bridge network, which Docker masquerades itself, so egress
  goes on working in masquerade or none mode;
- started in masquerade or none mode: its default route stays via the
  overlay bridge; in gwbridge mode overlayd no longer masquerades the
  cluster network's traffic, so it loses egress (in none mode, unless the
  host NATs it some other way).
Restart (or disconnect and connect again) the plugin's containers after
changing the mode.

Dual-stack (HostView.subnet6 set, and the network created with `--ipv6`):
Docker asks for a second pool with V6 true and an IPv6 address per
endpoint from it, and passes it in CreateEndpoint's Interface.AddressIPv6;
host-local hands it out from its half of the IPv6 subnet (the upper one,
plan/ipam.py), in the same store as the IPv4 ones (and overlay-cni's). Join then answers for both
families: GatewayIPv6 beside Gateway, or in gwbridge mode a second static
route, the cluster's IPv6 network via the bridge's IPv6 address. Docker's
docker_gwbridge is IPv4 only (libnetwork makes it with IPv6 off), so in
gwbridge mode the plugin's containers reach the IPv6 cluster but have no
IPv6 way out. Published ports without a host address (Docker's 0.0.0.0
binding) reach the container on both families: portmap maps every address
of the endpoint; a binding to a specific IPv6 host address is skipped.
A network created without `--ipv6` on a dual-stack host is IPv4 only.

Addresses are handed out only from the subnet the data plane is programmed
for (HostView.subnet). While a new lease waits for its first pass
(HostView.settled false), requests for addresses and pools are refused
with 503, which Docker reports and its user retries.

Endpoints (network policy). Join registers the endpoint with the daemon's
endpoint registry (in-process: the plugin runs inside the daemon), once
it has its addresses (CreateEndpoint) and its sandbox (Join), and a
refusal fails the Join: a container never runs outside the policies that
select it. Leave and DeleteEndpoint unregister it. Docker 20.10 passes no
container name and no container labels to a network driver; CreateEndpoint
carries the endpoint's driver options, which `docker network connect
--driver-opt K=V` and the API's EndpointsConfig.DriverOpts set (`docker
run` has no flag for them before Docker 25). From those options
(`endpoint_identity`): `overlayd.name` names the endpoint (default: the
endpoint ID's first 12 digits), and each `overlayd.label.<key>` is the
label <key> (checked by Kubernetes' rules at CreateEndpoint).

At start the server repairs what it can from its records
(`orphan_reservations`, `veth_repairs`): host-local reservations of this
plugin that no record holds are released, and ovd* ports of the bridge
that belong to no recorded endpoint are deleted.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_interface,
    ip_network,
)
from typing import Any, TypeVar

from overlayd.model import IPAddress, IPNetwork
from overlayd.plan.ipam import container_ranges, gateway_address
from overlayd.plan.policy import label_key_problem, label_value_problem

CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
IMPLEMENTS = ("NetworkDriver", "IpamDriver")
ADDRESS_SPACE = "overlayd"
ANY_POOL = "0.0.0.0/0"  # the pool shown to Docker when none is asked for (see request_pool)
GATEWAY_REQUEST = "com.docker.network.gateway"  # RequestAddress Options[RequestAddressType]
PORTMAP_OPTION = "com.docker.network.portmap"
MAC_OPTION = "com.docker.network.endpoint.macaddress"
# Driver options (`docker network connect --driver-opt`) that name and
# label an endpoint for network policy.
NAME_OPTION = "overlayd.name"
LABEL_OPTION_PREFIX = "overlayd.label."
MAX_NAME = 253
# libnetwork's types.NEXTHOP: a StaticRoute through NextHop.
ROUTE_NEXTHOP = 0
# Docker's types.Protocol numbers in a PortBinding.
PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}
# libnetwork's IDs are 64 hex digits; anything else never came from Docker.
_ID = re.compile(r"^[0-9a-f]{64}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
HOST_VETH_PREFIX = "ovd"  # host end, a port of the overlay bridge
PEER_VETH_PREFIX = "ovt"  # the end Docker moves into the container as eth*


class PluginError(Exception):
    """A request refused: `status` is the HTTP status, the message goes to Docker as Err."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict[str, str]:
        return {"Err": self.message}


def bad(message: str) -> PluginError:
    return PluginError(400, message)


def unknown(message: str) -> PluginError:
    return PluginError(404, message)


# --- what the server knows about this host -----------------------------------


@dataclass(frozen=True, slots=True)
class HostView:
    """This host as the plugin needs it: the leased subnet, the bridge, the
    containers' MTU, the cluster network and the egress mode."""

    subnet: IPv4Network
    cluster: IPv4Network
    bridge: str
    mtu: int
    egress: str
    # False while the planned subnet (a new lease) differs from the
    # programmed one: no new addresses until the bridge has the new subnet.
    settled: bool = True
    # Dual-stack: this host's IPv6 subnet and the cluster's IPv6 network.
    subnet6: IPv6Network | None = None
    cluster6: IPv6Network | None = None
    # The network config's ServiceNetwork(s): in gwbridge mode a VIP must be
    # reached by eth0 like the cluster, or the service's backend would see
    # the connection come masqueraded from the gwbridge.
    service_networks: tuple[IPNetwork, ...] = ()

    @property
    def gateway(self) -> IPv4Address:
        return gateway_address(self.subnet)

    @property
    def gateway6(self) -> IPv6Address | None:
        return gateway_address(self.subnet6) if self.subnet6 is not None else None

    @property
    def pool_id(self) -> str:
        return pool_id_of(self.subnet)

    @property
    def pool_id6(self) -> str | None:
        return pool_id_of(self.subnet6) if self.subnet6 is not None else None

    def subnets(self) -> list[IPNetwork]:
        """This host's subnets: the IPv4 one, then the IPv6 one if any."""
        return [self.subnet] if self.subnet6 is None else [self.subnet, self.subnet6]

    def pool(self, pool_id: str) -> IPNetwork | None:
        """The subnet of this host's pool `pool_id`, of either family; None
        for any other ID."""
        return next((s for s in self.subnets() if pool_id_of(s) == pool_id), None)

    def host_local_ipam(
        self, data_dir: str, subnets: list[IPNetwork] | None = None
    ) -> dict[str, Any]:
        """host-local's config: the same store and ranges overlay-cni uses, so
        that podman (CNI) and Docker containers never get one address twice.
        One range set per subnet (by default the IPv4 one only): host-local
        gives one address from each."""
        ranges = []
        for subnet in subnets or [self.subnet]:
            shared = container_ranges(subnet)
            ranges.append(
                [
                    {
                        "subnet": str(subnet),
                        "rangeStart": str(shared.host_local_start),
                        "rangeEnd": str(shared.host_local_end),
                        "gateway": str(gateway_address(subnet)),
                    }
                ]
            )
        return {"type": "host-local", "dataDir": data_dir, "ranges": ranges}


def pool_id_of(subnet: IPNetwork) -> str:
    return f"{ADDRESS_SPACE}-{subnet}"


# --- the plugin's records (kept on disk by the server) ------------------------


@dataclass(slots=True)
class Endpoint:
    network_id: str
    address: IPv4Interface
    mac: str | None = None
    sandbox: str | None = None  # the sandbox key given at Join
    ports: list[dict[str, Any]] = field(default_factory=list)  # CNI portMappings programmed
    address6: IPv6Interface | None = None  # in a dual-stack network
    # From the driver options (endpoint_identity): what the registration says.
    name: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "network_id": self.network_id,
            "address": str(self.address),
            "address6": str(self.address6) if self.address6 is not None else None,
            "mac": self.mac,
            "sandbox": self.sandbox,
            "ports": self.ports,
            "name": self.name,
            "labels": self.labels,
        }

    def addresses(self) -> list[IPv4Interface | IPv6Interface]:
        return [self.address] if self.address6 is None else [self.address, self.address6]

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Endpoint:
        return cls(
            network_id=str(raw["network_id"]),
            address=IPv4Interface(raw["address"]),
            mac=raw.get("mac"),
            sandbox=raw.get("sandbox"),
            ports=list(raw.get("ports", [])),
            address6=IPv6Interface(raw["address6"]) if raw.get("address6") else None,
            name=str(raw["name"]) if raw.get("name") else None,
            labels={str(k): str(v) for k, v in (raw.get("labels") or {}).items()},
        )

    def link_mac(self, endpoint_id: str) -> str:
        """The container interface's MAC: Docker's, or when Docker gave none
        one of our own, so that the registration can name it (policy
        judges IPv6 link-local traffic on the bridge by it) instead of the
        kernel picking one at random."""
        return self.mac or endpoint_mac(endpoint_id)

    def registration(self, endpoint_id: str) -> dict[str, Any]:
        """What the endpoint registry is asked to register at Join."""
        return {
            "id": endpoint_id,
            "name": self.name or endpoint_id[:12],
            "addresses": [str(address.ip) for address in self.addresses()],
            "labels": dict(self.labels),
            "macs": [self.link_mac(endpoint_id)],
        }


def endpoint_mac(endpoint_id: str) -> str:
    """A locally administered unicast MAC that depends only on the ID."""
    digest = bytearray(hashlib.sha256(f"docker-endpoint|{endpoint_id}".encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return ":".join(f"{octet:02x}" for octet in digest)


@dataclass(slots=True)
class Records:
    """Networks (ID -> subnet, and ID -> IPv6 subnet for those created with
    --ipv6), endpoints, and which host-local container ID holds each address
    (of either family) this plugin allocated, so that a release frees
    exactly what was taken."""

    networks: dict[str, IPv4Network] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    addresses: dict[IPAddress, str] = field(default_factory=dict)
    networks6: dict[str, IPv6Network] = field(default_factory=dict)
    # Host ends of veths found on the bridge when the records were lost
    # (see `adopt`): live containers' interfaces, kept until Docker deletes
    # their endpoints, never taken for stale.
    adopted_veths: set[str] = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        return {
            "networks": {k: str(v) for k, v in self.networks.items()},
            "networks6": {k: str(v) for k, v in self.networks6.items()},
            "endpoints": {k: v.to_json() for k, v in self.endpoints.items()},
            "addresses": {str(k): v for k, v in self.addresses.items()},
            "adopted_veths": sorted(self.adopted_veths),
        }

    @classmethod
    def from_json(cls, raw: Any) -> Records:
        """Our own file; a damaged one raises ValueError (or KeyError/TypeError)."""
        if not isinstance(raw, dict):
            raise ValueError("records must be a JSON object")
        parts = {
            name: raw.get(name, {}) for name in ("networks", "networks6", "endpoints", "addresses")
        }
        for name, part in parts.items():
            if not isinstance(part, dict):
                raise ValueError(f"records' {name} must be a JSON object")
        for value in parts["endpoints"].values():
            if not isinstance(value, dict) or not isinstance(value.get("ports", []), list):
                raise ValueError("records' endpoints must be JSON objects")
        adopted = raw.get("adopted_veths", [])
        if not isinstance(adopted, list) or not all(isinstance(v, str) for v in adopted):
            raise ValueError("records' adopted_veths must be a list of names")
        return cls(
            networks={str(k): IPv4Network(v) for k, v in parts["networks"].items()},
            endpoints={str(k): Endpoint.from_json(v) for k, v in parts["endpoints"].items()},
            addresses={ip_address(k): str(v) for k, v in parts["addresses"].items()},
            adopted_veths=set(adopted),
            networks6={str(k): IPv6Network(v) for k, v in parts["networks6"].items()},
        )

    def network(self, network_id: str) -> IPv4Network:
        try:
            return self.networks[network_id]
        except KeyError:
            raise unknown(f"network {network_id} is not an overlayd network") from None

    def network6(self, network_id: str) -> IPv6Network | None:
        """The network's IPv6 subnet; None for one without IPv6 (or unknown)."""
        return self.networks6.get(network_id)

    def endpoint(self, network_id: str, endpoint_id: str) -> Endpoint:
        self.network(network_id)
        found = self.endpoints.get(endpoint_id)
        if found is None or found.network_id != network_id:
            raise unknown(f"endpoint {endpoint_id} is not in network {network_id}")
        return found


# --- parsing --------------------------------------------------------------------


def parse_body(body: bytes, *, empty_ok: bool = False) -> dict[str, Any]:
    """A request body as a JSON object. Docker sends `null` (or nothing) to
    the methods without arguments."""
    if not body.strip():
        if empty_ok:
            return {}
        raise bad("the request has no body")
    try:
        raw = json.loads(body)
    except RecursionError:
        raise bad("the request is not JSON this plugin reads: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise bad(f"the request is not JSON: {exc}") from None
    if raw is None and empty_ok:
        return {}
    if not isinstance(raw, dict):
        raise bad("the request must be a JSON object")
    return raw


def _str(raw: dict[str, Any], name: str, *, required: bool = True) -> str:
    value = raw.get(name)
    if value is None or value == "":
        if required:
            raise bad(f"{name} is missing")
        return ""
    if not isinstance(value, str):
        raise bad(f"{name} must be a string, got {json.dumps(value)}")
    return value


def _id(raw: dict[str, Any], name: str) -> str:
    value = _str(raw, name)
    if not _ID.match(value):
        raise bad(f"{name} {value[:80]!r} is not a Docker ID (64 hex digits)")
    return value


def _options(raw: dict[str, Any], name: str = "Options") -> dict[str, Any]:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{name} must be a JSON object")
    return value


Interface = TypeVar("Interface", IPv4Interface, IPv6Interface)


def _address(text: str, what: str, kind: type[Interface]) -> Interface:
    """An address/len (or a bare address) of the family `kind` is."""
    try:
        return kind(text)
    except ValueError:
        version = 4 if kind is IPv4Interface else 6
        raise bad(f"{what} {text[:80]!r} is not an IPv{version} address") from None


def _address_in(text: str, what: str, subnet: IPNetwork) -> IPAddress:
    """An address of `subnet`'s family (inside it or not: the caller says)."""
    try:
        found = ip_interface(text).ip
    except ValueError:
        found = None
    if found is None or found.version != subnet.version:
        raise bad(f"{what} {text[:80]!r} is not an IPv{subnet.version} address")
    return found


@dataclass(frozen=True, slots=True)
class NetworkIds:
    network_id: str
    endpoint_id: str


def parse_network_id(raw: dict[str, Any]) -> str:
    return _id(raw, "NetworkID")


def parse_endpoint_ids(raw: dict[str, Any]) -> NetworkIds:
    return NetworkIds(_id(raw, "NetworkID"), _id(raw, "EndpointID"))


NO_IPV6 = "this host has no IPv6 subnet (the overlay network is IPv4 only): leave --ipv6 out"


def _network_pool(
    data: Any, key: str, subnet: IPNetwork, kind: type[Interface], placeholder: str | None = None
) -> None:
    """One family's pool in CreateNetwork: exactly one, this host's subnet
    (or the placeholder request_pool shows for it), with the bridge's
    address as its gateway."""
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], dict):
        raise bad(f"{key} must hold exactly one pool: use --ipam-driver overlayd")
    pool = _str(data[0], "Pool")
    try:
        found = ip_network(pool, strict=True)
    except ValueError:
        found = None
    if found is None or found.version != subnet.version:
        raise bad(f"pool {pool[:80]!r} is not an IPv{subnet.version} network")
    if found != subnet and str(found) != placeholder:
        raise bad(f"pool {found} is not this host's subnet {subnet}: use --ipam-driver overlayd")
    gateway = _str(data[0], "Gateway", required=False)
    if gateway and _address(gateway, "Gateway", kind).ip != gateway_address(subnet):
        raise bad(
            f"gateway {gateway} is not the overlay bridge's address {gateway_address(subnet)}"
        )


def create_network(
    raw: dict[str, Any], view: HostView
) -> tuple[str, IPv4Network, IPv6Network | None]:
    """CreateNetwork: the network's one IPv4 pool must be this host's subnet
    (which it is when the network uses the overlayd IPAM driver), and its
    IPv6 pool, if it has one (--ipv6), this host's IPv6 subnet. Answers the
    network's ID and subnets."""
    network_id = parse_network_id(raw)
    _options(raw)
    _network_pool(raw.get("IPv4Data"), "IPv4Data", view.subnet, IPv4Interface, ANY_POOL)
    if not raw.get("IPv6Data"):
        return network_id, view.subnet, None
    if view.subnet6 is None:
        raise bad(NO_IPV6)
    _network_pool(raw["IPv6Data"], "IPv6Data", view.subnet6, IPv6Interface)
    return network_id, view.subnet, view.subnet6


@dataclass(frozen=True, slots=True)
class EndpointRequest:
    network_id: str
    endpoint_id: str
    address: IPv4Interface
    mac: str | None
    options: dict[str, Any]
    address6: IPv6Interface | None = None
    name: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


def endpoint_identity(options: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
    """The name (`overlayd.name`) and labels (`overlayd.label.<key>`) in an
    endpoint's driver options; a bad one is refused (400) naming the option,
    before the container starts rather than registered unselectable."""
    name = options.get(NAME_OPTION)
    if name is not None and (
        not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable()
    ):
        raise bad(f"driver option {NAME_OPTION}: 1 to {MAX_NAME} printable characters")
    labels: dict[str, str] = {}
    for key, value in sorted(options.items()):
        if not key.startswith(LABEL_OPTION_PREFIX):
            continue
        label = key[len(LABEL_OPTION_PREFIX) :]
        problem = label_key_problem(label) or label_value_problem(value)
        if problem:
            raise bad(f"driver option {key[:120]}: {problem}")
        labels[label] = value
    return name, labels


def _endpoint_address(
    iface: dict[str, Any],
    key: str,
    kind: type[Interface],
    subnet: IPNetwork,
    current: IPNetwork | None,
) -> Interface:
    """Interface.<key>: in the network's `subnet`, which must still be this
    host's (`current`: a lease change leaves the network stale)."""
    address = _address(_str(iface, key), f"Interface.{key}", kind)
    if address.network != subnet:
        raise bad(f"address {address} is not in the network's subnet {subnet}")
    if subnet != current:
        raise PluginError(
            409,
            f"this host's subnet is now {current or 'none of this family'},"
            f" the network's is {subnet}: recreate it",
        )
    return address


def create_endpoint(raw: dict[str, Any], records: Records, view: HostView) -> EndpointRequest:
    ids = parse_endpoint_ids(raw)
    subnet = records.network(ids.network_id)
    subnet6 = records.network6(ids.network_id)
    if ids.endpoint_id in records.endpoints:
        raise bad(f"endpoint {ids.endpoint_id} exists already")
    iface = raw.get("Interface")
    if not isinstance(iface, dict):
        raise bad("Interface is missing: the network needs --ipam-driver overlayd")
    if subnet6 is None and _str(iface, "AddressIPv6", required=False):
        raise bad("the network is IPv4 only (created without --ipv6): no AddressIPv6")
    address = _endpoint_address(iface, "Address", IPv4Interface, subnet, view.subnet)
    address6 = None
    if subnet6 is not None:
        address6 = _endpoint_address(iface, "AddressIPv6", IPv6Interface, subnet6, view.subnet6)
    mac = _str(iface, "MacAddress", required=False).lower() or None
    if mac is not None and not _MAC.match(mac):
        raise bad(f"MacAddress {mac[:40]!r} is not a MAC address")
    options = _options(raw)
    name, labels = endpoint_identity(options)
    return EndpointRequest(
        ids.network_id, ids.endpoint_id, address, mac, options, address6, name, labels
    )


@dataclass(frozen=True, slots=True)
class JoinRequest:
    network_id: str
    endpoint_id: str
    sandbox: str


def join(raw: dict[str, Any], records: Records) -> JoinRequest:
    """Join: refused (409) for an endpoint joined to another sandbox, and for
    one whose veth names a joined endpoint's veth has (the names keep only 12
    hex digits of the ID), since making its pair would take the other's."""
    ids = parse_endpoint_ids(raw)
    endpoint = records.endpoint(ids.network_id, ids.endpoint_id)
    sandbox = _str(raw, "SandboxKey")
    if not sandbox.startswith("/"):
        raise bad(f"SandboxKey {sandbox[:80]!r} is not a path")
    _options(raw)
    if endpoint.sandbox is not None and endpoint.sandbox != sandbox:
        raise PluginError(
            409, f"endpoint {ids.endpoint_id} is joined to {endpoint.sandbox} already: Leave first"
        )
    host, _ = veth_names(ids.endpoint_id)
    for other_id, other in records.endpoints.items():
        if other_id != ids.endpoint_id and other.sandbox and veth_names(other_id)[0] == host:
            raise PluginError(
                409, f"joined endpoint {other_id} has the same veth name {host}: recreate one"
            )
    return JoinRequest(ids.network_id, ids.endpoint_id, sandbox)


def veth_names(endpoint_id: str) -> tuple[str, str]:
    """(host end, container end): 15 characters at most, from the endpoint ID."""
    return HOST_VETH_PREFIX + endpoint_id[:12], PEER_VETH_PREFIX + endpoint_id[:12]


def join_response(view: HostView, endpoint_id: str, *, ipv6: bool = False) -> dict[str, Any]:
    """What Join answers in this host's egress mode (see the module's
    docstring), for IPv4 and, for an endpoint with an IPv6 address, IPv6."""
    _, peer = veth_names(endpoint_id)
    answer: dict[str, Any] = {"InterfaceName": {"SrcName": peer, "DstPrefix": "eth"}}
    # (Join's gateway key, the bridge's address, the cluster network) per family.
    families: list[tuple[str, IPAddress, IPNetwork | None]] = [
        ("Gateway", view.gateway, view.cluster)
    ]
    if ipv6 and view.gateway6 is not None:
        families.append(("GatewayIPv6", view.gateway6, view.cluster6))
    if view.egress == "gwbridge":
        # No Gateway: libnetwork adds docker_gwbridge for the default route
        # (IPv4 only: Docker makes it without IPv6).
        answer["StaticRoutes"] = [
            {"Destination": str(network), "RouteType": ROUTE_NEXTHOP, "NextHop": str(gateway)}
            for _, gateway, cluster in families
            for network in (cluster, *view.service_networks)
            if network is not None and network.version == gateway.version
        ]
    else:
        answer |= {key: str(gateway) for key, gateway, _ in families}
    return answer


def program_ports(raw: dict[str, Any]) -> tuple[NetworkIds, list[dict[str, Any]]]:
    """ProgramExternalConnectivity: the endpoint and its published ports."""
    return parse_endpoint_ids(raw), port_mappings(_options(raw))


def port_mappings(options: dict[str, Any]) -> list[dict[str, Any]]:
    """Docker's published ports (ProgramExternalConnectivity's
    com.docker.network.portmap) as CNI portmap's portMappings. Bindings to
    IPv6 host addresses are skipped: Docker pairs `::` with `0.0.0.0`, whose
    mapping (no hostIP) portmap applies to every address of the endpoint,
    an IPv6 one too; a specific IPv6 host address is not supported. A port Docker would have to
    choose (HostPort 0) is refused, since a remote driver cannot tell Docker
    which one it took."""
    bindings = options.get(PORTMAP_OPTION)
    if bindings is None:
        return []
    if not isinstance(bindings, list):
        raise bad(f"{PORTMAP_OPTION} must be a list")
    found: list[dict[str, Any]] = []
    for binding in bindings:
        if not isinstance(binding, dict):
            raise bad(f"{PORTMAP_OPTION} entries must be objects")
        number = binding.get("Proto")
        proto = PROTOCOLS.get(number) if type(number) is int else None
        if proto is None:
            raise bad(f"protocol {binding.get('Proto')!r} is not tcp, udp or sctp")
        host_ip = binding.get("HostIP") or ""
        if not isinstance(host_ip, str):
            raise bad("HostIP must be a string")
        if ":" in host_ip:
            continue
        numbers = []
        for name in ("Port", "HostPort", "HostPortEnd"):
            value = binding.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
                raise bad(f"{name} {value!r} is not a port number")
            numbers.append(value)
        port, host_port, host_port_end = numbers
        if port == 0 or host_port == 0:
            raise bad("publish ports with an explicit host port (-p HOSTPORT:PORT)")
        if host_port_end not in (0, host_port):
            raise bad("host port ranges are not supported: publish one port per -p")
        mapping: dict[str, Any] = {
            "hostPort": host_port,
            "containerPort": port,
            "protocol": proto,
        }
        if host_ip and host_ip != "0.0.0.0":
            try:
                mapping["hostIP"] = str(IPv4Address(host_ip))
            except ValueError:
                raise bad(f"HostIP {host_ip[:40]!r} is not an address") from None
        if mapping not in found:
            found.append(mapping)
    return found


# --- IPAM -----------------------------------------------------------------------


def request_pool(raw: dict[str, Any], view: HostView) -> dict[str, Any]:
    """RequestPool: the pool is always this host's leased subnet, the IPv6
    one when Docker asks with V6 (a network created with --ipv6)."""
    unsettled(view)
    v6 = raw.get("V6") is True
    subnet: IPNetwork | None = view.subnet6 if v6 else view.subnet
    if subnet is None:
        raise bad(NO_IPV6)
    space = _str(raw, "AddressSpace", required=False)
    if space and space != ADDRESS_SPACE:
        raise bad(f"address space {space!r} is not {ADDRESS_SPACE!r}")
    pool = _str(raw, "Pool", required=False)
    if pool:
        try:
            wanted = ip_network(pool, strict=True)
        except ValueError:
            raise bad(f"pool {pool[:80]!r} is not an IPv{subnet.version} network") from None
        if wanted != subnet:
            raise bad(f"pool {wanted} is not this host's subnet {subnet}: leave --subnet out")
    if _str(raw, "SubPool", required=False):
        raise bad("--ip-range is not supported: containers take host-local's range")
    _options(raw)
    # Without --subnet, libnetwork checks an IPv4 pool against the host's
    # routes and asks again, holding the first, until one does not overlap
    # (network.go, requestPoolHelper): the leased subnet is routed on the
    # overlay bridge, so it would ask forever. The placeholder 0.0.0.0/0 is
    # exempt from that check (types.IsIPNetValid), as in Calico's IPAM;
    # addresses still carry the subnet's prefix. With --subnet equal to the
    # host's subnet, Docker skips the check and shows the real subnet. An
    # IPv6 pool is shown as it is: libnetwork 20.10 compares pools with the
    # IPv4 routes only (netutils.CheckRouteOverlaps).
    shown = str(subnet) if pool or v6 else ANY_POOL
    return {"PoolID": pool_id_of(subnet), "Pool": shown, "Data": {}}


def unsettled(view: HostView) -> None:
    """Refuse while a new subnet is planned but not yet programmed."""
    if not view.settled:
        raise PluginError(
            503, "this host's subnet is changing (a new lease is being programmed): try again"
        )


def pool_subnet(pool_id: str, view: HostView) -> IPNetwork:
    subnet = view.pool(pool_id)
    if subnet is None:
        pools = " or ".join(pool_id_of(s) for s in view.subnets())
        raise unknown(f"pool {pool_id[:80]!r} is not this host's pool {pools}")
    return subnet


@dataclass(frozen=True, slots=True)
class AddressRequest:
    subnet: IPNetwork  # the pool's: this host's subnet of the family asked for
    gateway: bool  # the network's gateway: the bridge's address, never allocated
    address: IPAddress | None  # a specific address asked for, else host-local picks


def request_address(raw: dict[str, Any], view: HostView) -> AddressRequest:
    subnet = pool_subnet(_str(raw, "PoolID"), view)
    options = _options(raw)
    wanted_text = _str(raw, "Address", required=False)
    wanted = _address_in(wanted_text, "Address", subnet) if wanted_text else None
    gateway = gateway_address(subnet)
    if options.get("RequestAddressType") == GATEWAY_REQUEST:
        if wanted is not None and wanted != gateway:
            raise bad(f"the gateway must be the overlay bridge's address {gateway}")
        return AddressRequest(subnet, True, gateway)
    unsettled(view)
    if wanted is not None:
        shared = container_ranges(subnet)
        start, end = shared.host_local_start, shared.host_local_end
        if wanted not in subnet:
            raise bad(f"address {wanted} is outside this host's subnet {subnet}")
        if not int(start) <= int(wanted) <= int(end):
            raise bad(f"address {wanted} is outside host-local's range {start}-{end} of {subnet}")
    return AddressRequest(subnet, False, wanted)


def release_address(raw: dict[str, Any], view: HostView, records: Records) -> IPAddress:
    """ReleaseAddress: an address this plugin took is released whatever the
    pool is now (after a lease change Docker releases the old subnet's
    addresses under the old pool); anything else must be in this host's
    pool, where releasing it has nothing to do (the gateway, a repeat)."""
    pool_id = _str(raw, "PoolID")
    text = _str(raw, "Address")
    try:
        address = ip_interface(text).ip
    except ValueError:
        raise bad(f"Address {text[:80]!r} is not an IP address") from None
    if address in records.addresses:
        if not pool_id.startswith(ADDRESS_SPACE + "-"):
            raise unknown(f"pool {pool_id[:80]!r} is not an overlayd pool")
        return address
    subnet = pool_subnet(pool_id, view)
    if address not in subnet:
        raise bad(f"address {address} is outside this host's subnet {subnet}")
    return address


CONTAINER_ID_PREFIX = "docker-"  # host-local's container ID for this plugin's addresses


def orphan_reservations(
    reservations: dict[IPAddress, str], records: Records
) -> dict[IPAddress, str]:
    """Of host-local's reservations (address -> container ID), those this
    plugin took (`docker-` IDs) that no record holds: lost with a damaged
    records file, or taken by a request that died half-way. Nothing else
    can release them."""
    held = set(records.addresses.values())
    return {
        address: owner
        for address, owner in reservations.items()
        if owner.startswith(CONTAINER_ID_PREFIX) and owner not in held
    }


def adopt(
    records: Records, reservations: dict[IPAddress, str], ports: list[str]
) -> tuple[int, int]:
    """Records lost (missing or damaged file): what this plugin made may
    still serve running containers, so it is adopted rather than repaired
    away. Every reservation of ours becomes a record (Docker releases it by
    address when its container goes), every ovd* port of the bridge that no
    endpoint explains is kept (deleted when Docker deletes its endpoint).
    Returns (addresses, veths) adopted."""
    orphans = orphan_reservations(reservations, records)
    records.addresses.update({address: owner for address, owner in orphans.items()})
    known = {veth_names(endpoint_id)[0] for endpoint_id in records.endpoints}
    found = {port for port in ports if port not in known} - records.adopted_veths
    records.adopted_veths |= found
    return len(orphans), len(found)


def veth_repairs(records: Records, ports: list[str]) -> tuple[list[str], list[str]]:
    """(the bridge's ovd* ports that belong to no recorded endpoint and were
    not adopted, to be deleted; the joined endpoints whose veth is gone, to
    be reported). A record is never dropped here: Docker deletes its
    endpoints itself."""
    ours = {veth_names(endpoint_id)[0]: endpoint_id for endpoint_id in records.endpoints}
    stale = sorted(port for port in ports if port not in ours and port not in records.adopted_veths)
    present = set(ports)
    missing = sorted(
        endpoint_id
        for host, endpoint_id in ours.items()
        if records.endpoints[endpoint_id].sandbox is not None and host not in present
    )
    return stale, missing


def release_pool(raw: dict[str, Any]) -> str:
    """ReleasePool: a pool is the host's subnet, so nothing is given back;
    only a pool ID that never came from overlayd is refused."""
    pool_id = _str(raw, "PoolID")
    if not pool_id.startswith(ADDRESS_SPACE + "-"):
        raise unknown(f"pool {pool_id[:80]!r} is not an overlayd pool")
    return pool_id


def address_answer(address: IPAddress, subnet: IPNetwork) -> dict[str, Any]:
    return {"Address": f"{address}/{subnet.prefixlen}", "Data": {}}


def host_local_address(result: Any, subnet: IPNetwork) -> IPAddress | None:
    """The address in host-local's ADD result, if it holds one of `subnet`."""
    if not isinstance(result, dict):
        return None
    ips = result.get("ips")
    if not isinstance(ips, list) or not ips or not isinstance(ips[0], dict):
        return None
    text = ips[0].get("address")
    if not isinstance(text, str):
        return None
    try:
        address = ip_interface(text).ip
    except ValueError:
        return None
    return address if address in subnet else None
