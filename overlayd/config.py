"""Config at the boundary: the cluster's network config (flannel JSON in etcd)
and the agent's own settings (TOML file, environment, flags).

Both are parsed and validated here, once; every error names the field the
user wrote and says what is wrong with it. The rest of the code only sees
the frozen dataclasses this module returns.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    NetmaskValueError,
    ip_address,
)
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from overlayd.errors import ConfigError
from overlayd.model import (
    DEFAULT_VNI,
    DEFAULT_VXLAN_PORT,
    BackendConfig,
    Ipv6Config,
    NetworkConfig,
)
from overlayd.plan.leases import is_unicast_ipv6, is_unicast_ipv6_network
from overlayd.store.access import EtcdAccess

SUPPORTED_BACKENDS = ("vxlan", "host-gw")
MAX_VNI = (1 << 24) - 1


def _int_field(raw: Mapping[str, Any], name: str, field: str, default: int | None) -> int | None:
    value = raw.get(name, default)
    if value is None:
        return None
    # bool is an int in Python, and `true` is never a sensible port or length.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"must be an integer, got {json.dumps(value)}")
    return value


def _address_field(raw: Mapping[str, Any], name: str) -> IPv4Address | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(name, f"must be an IPv4 address string, got {json.dumps(value)}")
    try:
        return IPv4Address(value)
    except AddressValueError as exc:
        raise ConfigError(name, f"{value!r} is not an IPv4 address") from exc


def parse_backend(raw: Any) -> BackendConfig:
    """Parse the `Backend` object. overlayd implements vxlan and host-gw; a
    missing Backend means vxlan (flannel's own default, udp, is not implemented)."""
    if raw is None:
        return BackendConfig()
    if not isinstance(raw, dict):
        raise ConfigError("Backend", "must be a JSON object")
    backend_type = raw.get("Type", "vxlan")
    if backend_type not in SUPPORTED_BACKENDS:
        raise ConfigError(
            "Backend.Type",
            f"{json.dumps(backend_type)} is not supported"
            f" (supported: {', '.join(SUPPORTED_BACKENDS)})",
        )
    vni = _int_field(raw, "VNI", "Backend.VNI", DEFAULT_VNI)
    assert vni is not None
    if not 1 <= vni <= MAX_VNI:
        raise ConfigError("Backend.VNI", f"must be between 1 and {MAX_VNI}, got {vni}")
    # flannel treats Port 0 as "the kernel's default", which is 8472 on Linux.
    port = _int_field(raw, "Port", "Backend.Port", 0) or DEFAULT_VXLAN_PORT
    if not 1 <= port <= 65535:
        raise ConfigError("Backend.Port", f"must be between 1 and 65535, got {port}")
    mtu = _int_field(raw, "MTU", "Backend.MTU", None)
    if mtu is not None and not 576 <= mtu <= 65535:
        raise ConfigError("Backend.MTU", f"must be between 576 and 65535, got {mtu}")
    direct = raw.get("DirectRouting", False)
    if not isinstance(direct, bool):
        raise ConfigError(
            "Backend.DirectRouting", f"must be true or false, got {json.dumps(direct)}"
        )
    if direct and backend_type != "vxlan":
        raise ConfigError("Backend.DirectRouting", "only applies to the vxlan backend")
    return BackendConfig(type=backend_type, vni=vni, port=port, mtu=mtu, direct_routing=direct)


def _bool_field(raw: Mapping[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be true or false, got {json.dumps(value)}")
    return value


# flannel's rule: a host needs room for a bridge and a tunnel address.
MAX_IPV6_SUBNET_LEN = 126
DEFAULT_IPV6_SUBNET_LEN = 64


def parse_ipv6(raw: Mapping[str, Any]) -> Ipv6Config | None:
    """The IPv6 half of a dual-stack config (flannel's field names and
    defaults), or None when `EnableIPv6` is not true."""
    if not _bool_field(raw, "EnableIPv4", True):
        # flannel's etcd mode cannot run IPv6-only either; every host still
        # needs an IPv4 lease key to hang the IPv6 subnet on.
        raise ConfigError("EnableIPv4", "false (IPv6-only) is not supported: keep IPv4 enabled")
    if not _bool_field(raw, "EnableIPv6", False):
        return None
    text = raw.get("IPv6Network")
    if not isinstance(text, str) or not text:
        raise ConfigError(
            "IPv6Network",
            "is required with EnableIPv6 and must be an IPv6 CIDR such as fd00:10:244::/56",
        )
    try:
        network = IPv6Network(text, strict=True)
    except (AddressValueError, NetmaskValueError, ValueError) as exc:
        raise ConfigError("IPv6Network", f"{text!r} is not an IPv6 network: {exc}") from exc
    if not is_unicast_ipv6_network(network):
        raise ConfigError("IPv6Network", f"{network} is not a unicast range containers can use")
    subnet_len = _int_field(raw, "IPv6SubnetLen", "IPv6SubnetLen", 0) or 0
    if subnet_len:
        if subnet_len > MAX_IPV6_SUBNET_LEN:
            raise ConfigError(
                "IPv6SubnetLen", f"must be at most {MAX_IPV6_SUBNET_LEN}, got {subnet_len}"
            )
        if subnet_len < network.prefixlen + 2:
            raise ConfigError(
                "IPv6SubnetLen",
                f"/{subnet_len} leaves fewer than four subnets in {network}"
                f" (use /{network.prefixlen + 2} or longer)",
            )
    elif network.prefixlen > DEFAULT_IPV6_SUBNET_LEN - 2:
        raise ConfigError(
            "IPv6Network",
            f"{network} is too small for the default IPv6SubnetLen /{DEFAULT_IPV6_SUBNET_LEN}"
            f" (use a /{DEFAULT_IPV6_SUBNET_LEN - 2} or larger, or set IPv6SubnetLen)",
        )
    else:
        subnet_len = DEFAULT_IPV6_SUBNET_LEN
    size = 1 << (128 - subnet_len)
    first = int(network.network_address)
    last_subnet = first + network.num_addresses - size
    bounds: dict[str, IPv6Address] = {}
    for name, default in (("IPv6SubnetMin", first + size), ("IPv6SubnetMax", last_subnet)):
        value = raw.get(name)
        if value is None:
            bounds[name] = IPv6Address(default)
            continue
        if not isinstance(value, str):
            raise ConfigError(name, f"must be an IPv6 address string, got {json.dumps(value)}")
        try:
            address = IPv6Address(value)
        except AddressValueError as exc:
            raise ConfigError(name, f"{value!r} is not an IPv6 address") from exc
        if address not in network:
            raise ConfigError(name, f"{address} is not in IPv6Network {network}")
        if int(address) % size:
            raise ConfigError(name, f"{address} is not on a /{subnet_len} boundary")
        bounds[name] = address
    if bounds["IPv6SubnetMin"] > bounds["IPv6SubnetMax"]:
        raise ConfigError(
            "IPv6SubnetMin",
            f"{bounds['IPv6SubnetMin']} is above IPv6SubnetMax {bounds['IPv6SubnetMax']}",
        )
    return Ipv6Config(network, subnet_len, bounds["IPv6SubnetMin"], bounds["IPv6SubnetMax"])


def parse_network_config(text: str | bytes) -> NetworkConfig:
    """Parse and validate `<prefix>/config` with flannel's rules and defaults."""
    try:
        raw = json.loads(text)
    except RecursionError as exc:
        raise ConfigError("config", "is not valid JSON: nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError("config", f"is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("config", "must be a JSON object")

    network_text = raw.get("Network")
    if not isinstance(network_text, str) or not network_text:
        raise ConfigError("Network", "is required and must be an IPv4 CIDR such as 10.244.0.0/16")
    try:
        network = IPv4Network(network_text, strict=True)
    except (AddressValueError, NetmaskValueError, ValueError) as exc:
        raise ConfigError("Network", f"{network_text!r} is not an IPv4 network: {exc}") from exc

    subnet_len = _int_field(raw, "SubnetLen", "SubnetLen", 0) or 0
    if subnet_len:
        # A host needs at least a bridge address and one container address.
        if subnet_len > 30:
            raise ConfigError("SubnetLen", f"must be at most 30, got {subnet_len}")
        # The first subnet is skipped, so the network must hold at least four.
        if subnet_len < network.prefixlen + 2:
            raise ConfigError(
                "SubnetLen",
                f"/{subnet_len} leaves fewer than four subnets in {network}"
                f" (use /{network.prefixlen + 2} or longer)",
            )
    elif network.prefixlen > 28:
        raise ConfigError("Network", f"{network} is too small: the smallest useful network is /28")
    elif network.prefixlen <= 22:
        subnet_len = 24
    else:
        subnet_len = network.prefixlen + 2

    size = 1 << (32 - subnet_len)
    first = int(network.network_address)
    last_subnet = first + network.num_addresses - size

    subnet_min = _address_field(raw, "SubnetMin") or IPv4Address(first + size)
    subnet_max = _address_field(raw, "SubnetMax") or IPv4Address(last_subnet)
    for name, value in (("SubnetMin", subnet_min), ("SubnetMax", subnet_max)):
        if value not in network:
            raise ConfigError(name, f"{value} is not in Network {network}")
        if int(value) % size:
            raise ConfigError(name, f"{value} is not on a /{subnet_len} boundary")
    if subnet_min > subnet_max:
        raise ConfigError("SubnetMin", f"{subnet_min} is above SubnetMax {subnet_max}")

    ipv6 = parse_ipv6(raw)
    service_network, service_network6 = parse_service_networks(raw, network, ipv6)
    return NetworkConfig(
        network=network,
        subnet_len=subnet_len,
        subnet_min=subnet_min,
        subnet_max=subnet_max,
        backend=parse_backend(raw.get("Backend")),
        ipv6=ipv6,
        service_network=service_network,
        service_network6=service_network6,
    )


# A service network holds at least this many addresses (a /28 or a /124):
# the network and last addresses are never VIPs.
MIN_SERVICE_ADDRESSES = 16


def _service_network(
    raw: Mapping[str, Any], name: str, version: int, example: str
) -> IPv4Network | IPv6Network | None:
    text = raw.get(name)
    if text is None:
        return None
    if not isinstance(text, str) or not text:
        raise ConfigError(
            name, f"must be an IPv{version} CIDR such as {example}, got {json.dumps(text)}"
        )
    network_type = IPv4Network if version == 4 else IPv6Network
    try:
        network: IPv4Network | IPv6Network = network_type(text, strict=True)
    except (AddressValueError, NetmaskValueError, ValueError) as exc:
        raise ConfigError(name, f"{text!r} is not an IPv{version} network: {exc}") from exc
    if network.num_addresses < MIN_SERVICE_ADDRESSES:
        smallest = network.max_prefixlen - 4
        raise ConfigError(
            name, f"{network} is too small: a service network is a /{smallest} or larger"
        )
    unicast = (
        is_unicast_ipv6_network(network)
        if isinstance(network, IPv6Network)
        else not (network.is_loopback or network.is_multicast or network.is_unspecified)
    )
    if not unicast:
        raise ConfigError(name, f"{network} is not a unicast range")
    return network


def parse_service_networks(
    raw: Mapping[str, Any], network: IPv4Network, ipv6: Ipv6Config | None
) -> tuple[IPv4Network | None, IPv6Network | None]:
    """`ServiceNetwork` and `IPv6ServiceNetwork` (overlayd's own fields):
    where service VIPs are allocated. Each must be a network of its family
    with room for VIPs, apart from the containers' network (a VIP that is
    also some host's container address would be DNATed away from it)."""
    found4 = _service_network(raw, "ServiceNetwork", 4, "10.96.0.0/16")
    found6 = _service_network(raw, "IPv6ServiceNetwork", 6, "fd00:10:96::/112")
    if found4 is not None and found4.overlaps(network):
        raise ConfigError("ServiceNetwork", f"{found4} overlaps Network {network}")
    if found6 is not None:
        if ipv6 is None:
            raise ConfigError(
                "IPv6ServiceNetwork",
                "needs EnableIPv6 (containers without IPv6 addresses cannot be IPv6 backends)",
            )
        if found6.overlaps(ipv6.network):
            raise ConfigError("IPv6ServiceNetwork", f"{found6} overlaps IPv6Network {ipv6.network}")
    return (
        found4 if isinstance(found4, IPv4Network) else None,
        found6 if isinstance(found6, IPv6Network) else None,
    )


def render_network_config(config: NetworkConfig) -> str:
    """The JSON that `parse_network_config` reads back to an equal value."""
    backend: dict[str, Any] = {
        "Type": config.backend.type,
        "VNI": config.backend.vni,
        "Port": config.backend.port,
    }
    if config.backend.mtu is not None:
        backend["MTU"] = config.backend.mtu
    if config.backend.direct_routing:
        backend["DirectRouting"] = True
    rendered: dict[str, Any] = {
        "Network": str(config.network),
        "SubnetLen": config.subnet_len,
        "SubnetMin": str(config.subnet_min),
        "SubnetMax": str(config.subnet_max),
    }
    if config.ipv6 is not None:
        rendered |= {
            "EnableIPv6": True,
            "IPv6Network": str(config.ipv6.network),
            "IPv6SubnetLen": config.ipv6.subnet_len,
            "IPv6SubnetMin": str(config.ipv6.subnet_min),
            "IPv6SubnetMax": str(config.ipv6.subnet_max),
        }
    if config.service_network is not None:
        rendered["ServiceNetwork"] = str(config.service_network)
    if config.service_network6 is not None:
        rendered["IPv6ServiceNetwork"] = str(config.service_network6)
    return json.dumps(rendered | {"Backend": backend})


# --- the agent's own settings -------------------------------------------------

DEFAULT_PREFIX = "/coreos.com/network"
DEFAULT_SUBNET_FILE = Path("/run/flannel/subnet.env")
DEFAULT_BRIDGE = "ovl0"
DEFAULT_LEASE_TTL = 300
MIN_LEASE_TTL = 5
DEFAULT_OVERLAYD_PREFIX = "/overlayd"
DEFAULT_RESYNC_SECONDS = 60.0
# Re-reading every entry costs time in proportion to the peers (about half
# a second of CPU at 5,000), and netlink events already tell us of every
# change, so a re-read with no reason to doubt happens only this often.
DEFAULT_FULL_RESYNC_SECONDS = 900.0
ENV_PREFIX = "OVERLAYD_"
IFNAMSIZ = 15
EGRESS_MODES = ("gwbridge", "masquerade", "none")
ON_OFF = ("on", "off")  # the values of every on/off setting
VXLAN_FILTER_VALUES = ON_OFF
DEFAULT_EGRESS = "gwbridge"
DEFAULT_GWBRIDGE = "ovl_gwbridge"
DEFAULT_CONTROL_SOCKET = Path("/run/overlayd/overlayd.sock")
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9469"
LOG_FORMATS = ("kv", "json")
DEFAULT_MQTT_TOPIC = "overlayd"
DEFAULT_DOCKER_PLUGIN_SOCKET = Path("/run/docker/plugins/overlayd.sock")
DEFAULT_DNS_DOMAIN = "overlay.internal"
# overlay-cni's default dataDir: the Docker plugin shares its host-local store.
DEFAULT_CNI_DATA_DIR = Path("/var/lib/cni/overlay")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Per-host settings of the daemon, after flags > environment > file."""

    etcd_endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    etcd_cafile: Path | None = None
    etcd_certfile: Path | None = None
    etcd_keyfile: Path | None = None
    etcd_username: str | None = None
    etcd_password: str | None = field(default=None, repr=False)
    etcd_password_setting: str = "etcd-password"
    etcd_prefix: str = DEFAULT_PREFIX
    overlayd_prefix: str = DEFAULT_OVERLAYD_PREFIX
    iface: str | None = None
    public_ip: IPv4Address | None = None
    # None: the underlay interface's first global IPv6 address, if any.
    public_ipv6: IPv6Address | None = None
    subnet_file: Path = DEFAULT_SUBNET_FILE
    bridge: str = DEFAULT_BRIDGE
    lease_ttl: int = DEFAULT_LEASE_TTL
    resync_seconds: float = DEFAULT_RESYNC_SECONDS
    full_resync_seconds: float = DEFAULT_FULL_RESYNC_SECONDS
    log_level: str = "info"
    egress: str = DEFAULT_EGRESS
    gwbridge: str = DEFAULT_GWBRIDGE
    gwbridge_subnet: IPv4Network | None = None  # None: the first free of GWBRIDGE_CANDIDATES
    # The gwbridge's IPv6 subnet when the cluster has IPv6; None: the first
    # free of GWBRIDGE_CANDIDATES6 (a ULA /64).
    gwbridge_subnet6: IPv6Network | None = None
    vxlan_filter: bool = True  # accept VXLAN only from current peers
    control_socket: Path = DEFAULT_CONTROL_SOCKET
    metrics_address: tuple[str, int] | None = ("127.0.0.1", 9469)  # None: off
    log_format: str = "kv"
    mqtt_url: str | None = None  # None: no MQTT
    mqtt_topic: str = DEFAULT_MQTT_TOPIC
    docker_plugin: bool = False  # serve Docker's network and IPAM plugin API
    docker_plugin_socket: Path = DEFAULT_DOCKER_PLUGIN_SOCKET
    cni_data_dir: Path = DEFAULT_CNI_DATA_DIR  # overlay-cni's dataDir (host-local's store)
    # The DNS responder for service and container names, on the bridge's
    # gateway addresses, port 53, while the network has a ServiceNetwork.
    dns: bool = True
    dns_domain: str = DEFAULT_DNS_DOMAIN
    # Where other names go; None: the nameservers of /etc/resolv.conf.
    dns_upstreams: tuple[IPv4Address | IPv6Address, ...] | None = None

    @property
    def etcd(self) -> EtcdAccess:
        """How to reach etcd: endpoints and credentials, as the store takes them."""
        return EtcdAccess(
            endpoints=self.etcd_endpoints,
            cafile=self.etcd_cafile,
            certfile=self.etcd_certfile,
            keyfile=self.etcd_keyfile,
            username=self.etcd_username,
            password=self.etcd_password,
            password_setting=self.etcd_password_setting,
        )


# The settings that say how to reach etcd; overlayctl and overlay-cni take them too.
ETCD_ACCESS_SETTINGS = (
    "etcd-endpoints",
    "etcd-cafile",
    "etcd-certfile",
    "etcd-keyfile",
    "etcd-username",
    "etcd-password",
    "etcd-password-file",
)

# Setting name (as spelled in flags, TOML and, upper-cased, the environment).
AGENT_SETTINGS = (
    *ETCD_ACCESS_SETTINGS,
    "etcd-prefix",
    "overlayd-prefix",
    "iface",
    "public-ip",
    "public-ipv6",
    "subnet-file",
    "bridge",
    "lease-ttl",
    "resync-seconds",
    "full-resync-seconds",
    "log-level",
    "egress",
    "gwbridge",
    "gwbridge-subnet",
    "gwbridge-subnet6",
    "vxlan-filter",
    "control-socket",
    "metrics-address",
    "log-format",
    "mqtt-url",
    "mqtt-topic",
    "docker-plugin",
    "docker-plugin-socket",
    "cni-data-dir",
    "dns",
    "dns-domain",
    "dns-upstreams",
)


def _env_settings(env: Mapping[str, str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in AGENT_SETTINGS:
        key = ENV_PREFIX + name.upper().replace("-", "_")
        if key in env:
            found[name] = env[key]
    return found


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError("--config", f"{path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(AGENT_SETTINGS))
    if unknown:
        raise ConfigError(
            unknown[0], f"unknown setting in {path} (known: {', '.join(AGENT_SETTINGS)})"
        )
    return data


def _endpoints(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError("etcd-endpoints", "must be a comma-separated list of URLs")
    endpoints = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError("etcd-endpoints", f"{item!r} is not a URL")
        item = item.strip()
        parts = urlsplit(item)
        if parts.scheme == "unix" and (parts.netloc or parts.path):
            endpoints.append(item)
            continue
        if parts.scheme not in ("http", "https"):
            raise ConfigError(
                "etcd-endpoints",
                f"{item!r}: only http://, https:// and unix:// endpoints are supported",
            )
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError("etcd-endpoints", f"{item!r}: bad port") from exc
        if not parts.hostname or port is None:
            raise ConfigError("etcd-endpoints", f"{item!r} must look like http://HOST:PORT")
        endpoints.append(item)
    if len({urlsplit(e).scheme for e in endpoints}) > 1:
        raise ConfigError("etcd-endpoints", "mixes schemes: use https:// (or http://) for all")
    return tuple(endpoints)


def _optional_path(value: Any) -> Path | None:
    if value is None or str(value).strip() == "":
        return None
    return Path(str(value))


def _etcd_credentials(merged: Mapping[str, Any], endpoints: tuple[str, ...]) -> dict[str, Any]:
    """The TLS files and the user and password, checked for consistency.
    (The files' contents are checked when the store opens them, see
    store/access.py, so that a rotation on disk is checked the same way.)"""
    tls = any(urlsplit(e).scheme == "https" for e in endpoints)
    cafile = _optional_path(merged.get("etcd-cafile"))
    certfile = _optional_path(merged.get("etcd-certfile"))
    keyfile = _optional_path(merged.get("etcd-keyfile"))
    for name, path in (("etcd-cafile", cafile), ("etcd-certfile", certfile)):
        if path is not None and not tls:
            raise ConfigError(
                name, "is set, but etcd-endpoints are not https://: TLS would not be used"
            )
    if certfile is not None and keyfile is None:
        raise ConfigError("etcd-keyfile", "is required with etcd-certfile")
    if keyfile is not None and certfile is None:
        raise ConfigError("etcd-certfile", "is required with etcd-keyfile")
    username = merged.get("etcd-username")
    password = merged.get("etcd-password")
    password_file = _optional_path(merged.get("etcd-password-file"))
    setting = "etcd-password"
    if password is not None and password_file is not None:
        raise ConfigError("etcd-password-file", "give either etcd-password or etcd-password-file")
    if password_file is not None:
        setting = "etcd-password-file"
        try:
            password = password_file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(
                "etcd-password-file", f"{password_file} cannot be read: {exc.strerror}"
            ) from exc
        if not password:
            raise ConfigError("etcd-password-file", f"{password_file} is empty")
    if password is not None and not username:
        raise ConfigError("etcd-username", f"is required with {setting}")
    if username and password is None:
        raise ConfigError(
            "etcd-password", "is required with etcd-username (or use etcd-password-file)"
        )
    return {
        "etcd_cafile": cafile,
        "etcd_certfile": certfile,
        "etcd_keyfile": keyfile,
        "etcd_username": str(username) if username else None,
        "etcd_password": None if password is None else str(password),
        "etcd_password_setting": setting,
    }


def _metrics_address(value: Any) -> tuple[str, int] | None:
    text = str(value).strip()
    if text in ("", "off", "none"):
        return None
    host, _, port = text.rpartition(":")
    try:
        IPv4Address(host)
        number = int(port)
    except ValueError as exc:
        raise ConfigError(
            "metrics-address", f"{text!r} must look like 127.0.0.1:9469 (or off)"
        ) from exc
    if not 1 <= number <= 65535:
        raise ConfigError("metrics-address", f"port {number} is not between 1 and 65535")
    return host, number


def _mqtt_url(value: Any) -> str | None:
    if value is None or str(value).strip() in ("", "off", "none"):
        return None
    text = str(value).strip()
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError("mqtt-url", f"{text!r}: bad port") from exc
    if parts.scheme != "mqtt" or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError("mqtt-url", f"{text!r} must look like mqtt://HOST[:PORT]")
    del port
    return text


def _mqtt_topic(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in "+#\0") or text.startswith("/") or text.endswith("/"):
        raise ConfigError(
            "mqtt-topic", f"{text!r} must be a plain topic prefix (no wildcards, no outer /)"
        )
    return text


def _ifname(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > IFNAMSIZ or "/" in value:
        raise ConfigError(field, f"{value!r} is not a valid interface name (1 to 15 characters)")
    return value


def _positive_number(value: Any, field: str, kind: type[int] | type[float]) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(field, f"must be a positive number, got {value!r}") from exc
    if isinstance(value, bool) or number <= 0:
        raise ConfigError(field, f"must be a positive number, got {value!r}")
    return number


def _prefix(value: Any, field: str) -> str:
    text = str(value)
    if not text.startswith("/") or (text.endswith("/") and text != "/"):
        raise ConfigError(field, f"{text!r} must start with / and not end with /")
    return text


def _nested(a: str, b: str) -> bool:
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"  # "/" holds every prefix
    return a.startswith(b) or b.startswith(a)


def _on_off(value: Any, field: str) -> bool:
    # TOML users may write a boolean; flags and the environment give text.
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ON_OFF:
        raise ConfigError(field, f"{value!r} is not one of {', '.join(ON_OFF)}")
    return text == "on"


def _absolute_path(value: Any, field: str) -> Path:
    path = Path(str(value))
    if not path.is_absolute():
        raise ConfigError(field, f"{value!r} must be an absolute path")
    return path


# The longest prefix of a gwbridge subnet, by IP version: room for the
# gateway and at least one container.
GWBRIDGE_LONGEST_PREFIX = {4: 30, 6: 126}


_Subnet = TypeVar("_Subnet", IPv4Network, IPv6Network)


def _gwbridge_subnet(value: Any, setting: str, kind: type[_Subnet]) -> _Subnet | None:
    """A gwbridge subnet of one IP version (`kind`), as a network address
    with its prefix; None when not set."""
    if value is None:
        return None
    try:
        subnet = kind(str(value).strip(), strict=True)
    except ValueError as exc:
        version = 4 if kind is IPv4Network else 6
        raise ConfigError(setting, f"{value!r} is not an IPv{version} network: {exc}") from exc
    longest = GWBRIDGE_LONGEST_PREFIX[subnet.version]
    if subnet.prefixlen > longest:
        raise ConfigError(setting, f"{subnet} is too small (at most /{longest})")
    if subnet.is_multicast or subnet.is_link_local or subnet.is_loopback:
        raise ConfigError(setting, f"{subnet} is not a unicast network a bridge can route for")
    return subnet


def _lease_ttl(value: Any) -> int:
    ttl: int = _positive_number(value, "lease-ttl", int)
    # Renewal runs every third of the TTL; below a few seconds one slow etcd
    # answer would cost the lease.
    if ttl < MIN_LEASE_TTL:
        raise ConfigError("lease-ttl", f"must be at least {MIN_LEASE_TTL} seconds, got {ttl}")
    return ttl


def build_agent_config(
    *,
    flags: Mapping[str, Any],
    file: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Merge the three sources (flags win) and validate every value."""
    merged: dict[str, Any] = {}
    merged.update(file or {})
    merged.update(_env_settings(env if env is not None else os.environ))
    merged.update({k: v for k, v in flags.items() if v is not None})
    defaults = AgentConfig()

    public_ip = merged.get("public-ip")
    parsed_ip: IPv4Address | None = None
    if public_ip is not None:
        try:
            parsed_ip = IPv4Address(str(public_ip))
        except AddressValueError as exc:
            raise ConfigError("public-ip", f"{public_ip!r} is not an IPv4 address") from exc
        if parsed_ip.is_loopback or parsed_ip.is_multicast or parsed_ip.is_unspecified:
            raise ConfigError("public-ip", f"{parsed_ip} cannot carry tunnel traffic")

    public_ipv6 = merged.get("public-ipv6")
    parsed_ipv6: IPv6Address | None = None
    if public_ipv6 is not None:
        try:
            parsed_ipv6 = IPv6Address(str(public_ipv6))
        except AddressValueError as exc:
            raise ConfigError("public-ipv6", f"{public_ipv6!r} is not an IPv6 address") from exc
        if parsed_ipv6.scope_id is not None or not is_unicast_ipv6(parsed_ipv6):
            raise ConfigError("public-ipv6", f"{public_ipv6} cannot carry tunnel traffic")

    prefix = _prefix(merged.get("etcd-prefix", defaults.etcd_prefix), "etcd-prefix")
    own_prefix = _prefix(merged.get("overlayd-prefix", defaults.overlayd_prefix), "overlayd-prefix")
    # flannel hosts must never see overlayd's keys, and overlayd must never
    # read its own keys as flannel's (a key under both would be both).
    if _nested(prefix, own_prefix):
        raise ConfigError(
            "overlayd-prefix", f"{own_prefix!r} and etcd-prefix {prefix!r} must not nest"
        )

    log_level = str(merged.get("log-level", defaults.log_level)).lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log-level", f"{log_level!r} is not one of debug, info, warning, error")

    egress = str(merged.get("egress", defaults.egress))
    if egress not in EGRESS_MODES:
        raise ConfigError("egress", f"{egress!r} is not one of {', '.join(EGRESS_MODES)}")
    gw_subnet = _gwbridge_subnet(merged.get("gwbridge-subnet"), "gwbridge-subnet", IPv4Network)
    gw_subnet6 = _gwbridge_subnet(merged.get("gwbridge-subnet6"), "gwbridge-subnet6", IPv6Network)

    log_format = str(merged.get("log-format", defaults.log_format)).lower()
    if log_format not in LOG_FORMATS:
        raise ConfigError("log-format", f"{log_format!r} is not one of {', '.join(LOG_FORMATS)}")

    iface = merged.get("iface")
    endpoints = _endpoints(merged.get("etcd-endpoints", list(defaults.etcd_endpoints)))
    return AgentConfig(
        etcd_endpoints=endpoints,
        **_etcd_credentials(merged, endpoints),
        etcd_prefix=prefix,
        overlayd_prefix=own_prefix,
        iface=None if iface is None else str(iface),
        public_ip=parsed_ip,
        public_ipv6=parsed_ipv6,
        subnet_file=Path(str(merged.get("subnet-file", defaults.subnet_file))),
        bridge=_ifname(merged.get("bridge", defaults.bridge), "bridge"),
        lease_ttl=_lease_ttl(merged.get("lease-ttl", defaults.lease_ttl)),
        resync_seconds=_positive_number(
            merged.get("resync-seconds", defaults.resync_seconds), "resync-seconds", float
        ),
        full_resync_seconds=_positive_number(
            merged.get("full-resync-seconds", defaults.full_resync_seconds),
            "full-resync-seconds",
            float,
        ),
        log_level=log_level,
        egress=egress,
        gwbridge=_ifname(merged.get("gwbridge", defaults.gwbridge), "gwbridge"),
        gwbridge_subnet=gw_subnet,
        gwbridge_subnet6=gw_subnet6,
        vxlan_filter=_on_off(merged.get("vxlan-filter", "on"), "vxlan-filter"),
        control_socket=Path(str(merged.get("control-socket", defaults.control_socket))),
        metrics_address=_metrics_address(merged.get("metrics-address", DEFAULT_METRICS_ADDRESS)),
        log_format=log_format,
        mqtt_url=_mqtt_url(merged.get("mqtt-url")),
        mqtt_topic=_mqtt_topic(merged.get("mqtt-topic", defaults.mqtt_topic)),
        docker_plugin=_on_off(merged.get("docker-plugin", "off"), "docker-plugin"),
        docker_plugin_socket=_absolute_path(
            merged.get("docker-plugin-socket", defaults.docker_plugin_socket),
            "docker-plugin-socket",
        ),
        cni_data_dir=_absolute_path(
            merged.get("cni-data-dir", defaults.cni_data_dir), "cni-data-dir"
        ),
        dns=_on_off(merged.get("dns", "on"), "dns"),
        dns_domain=_dns_domain(merged.get("dns-domain", defaults.dns_domain)),
        dns_upstreams=_dns_upstreams(merged.get("dns-upstreams")),
    )


def _dns_domain(value: Any) -> str:
    """A domain of DNS labels (letters, digits, hyphens; 63 each), lower-cased,
    without the final dot: what the responder's records take
    (plan/dns_records.validate_domain, which also leaves room under it for
    `tasks.<service>` and refuses the reverse-mapping tree), so that a
    domain the responder would refuse is refused here, naming the setting."""
    # Imported here: most commands that read settings never need the records.
    from overlayd.plan.dns_records import validate_domain

    try:
        return validate_domain(str(value).strip())
    except ValueError as exc:
        raise ConfigError(
            "dns-domain", f"{value!r} is not a DNS domain like overlay.internal: {exc}"
        ) from None


def _dns_upstreams(value: Any) -> tuple[IPv4Address | IPv6Address, ...] | None:
    """Nameserver addresses, as a list or comma-separated text; "" or an
    empty list: forward nothing (other names are answered SERVFAIL)."""
    if value is None:
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    found: list[IPv4Address | IPv6Address] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            address = ip_address(text)
        except ValueError as exc:
            raise ConfigError("dns-upstreams", f"{text!r} is not an IP address") from exc
        if address.is_unspecified or address.is_multicast:
            raise ConfigError("dns-upstreams", f"{text} cannot be a nameserver")
        found.append(address)
    return tuple(found)
