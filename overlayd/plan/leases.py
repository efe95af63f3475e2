"""Lease keys and values in flannel's format (which leases are usable is
plan/selection.py).

A lease value is untrusted input written by another host: `parse_lease`
validates every field and raises `LeaseError` with one line of reason, so a
peer's garbage is skipped with a warning instead of crashing the agent or
programming a bogus entry.

Dual-stack leases are flannel's: the key names both subnets
(`10.244.1.0-24&fd00:10:244:1::-64`) and the value adds `PublicIPv6` and
`BackendV6Data {VNI, VtepMAC}`. Both subnets live in one key, so one etcd
transaction allocates both. A bad IPv6 half (a malformed PublicIPv6, a
multicast or link-local address, a v6 subnet outside IPv6Network or
overlapping another) costs the peer its IPv6 entries only, with one
warning: it stays reachable over IPv4, like a peer that has no IPv6 at all.
"""

from __future__ import annotations

import json
import re
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    NetmaskValueError,
)
from typing import Any

from overlayd.errors import LeaseError
from overlayd.model import Lease

# flannel's own pattern (pkg/subnet: `(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?`),
# anchored and with bounded digit counts.
_KEY_RE = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3})-(\d{1,2})(?:&([a-f\d:]{2,39})-(\d{1,3}))?$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")
# A lease value is a few hundred bytes; anything far larger is not a lease.
MAX_LEASE_BYTES = 4096


def subnets_prefix(etcd_prefix: str) -> str:
    return f"{etcd_prefix.rstrip('/')}/subnets/"


def config_key(etcd_prefix: str) -> str:
    return f"{etcd_prefix.rstrip('/')}/config"


def subnet_key(etcd_prefix: str, subnet: IPv4Network, subnet6: IPv6Network | None = None) -> str:
    """`<prefix>/subnets/10.244.1.0-24`, or with IPv6
    `<prefix>/subnets/10.244.1.0-24&fd00:10:244:1::-64`: flannel's spelling
    (Python and Go both print IPv6 addresses in RFC 5952's form)."""
    key = f"{subnets_prefix(etcd_prefix)}{subnet.network_address}-{subnet.prefixlen}"
    if subnet6 is not None:
        key += f"&{subnet6.network_address}-{subnet6.prefixlen}"
    return key


def subnet_key_range(etcd_prefix: str, subnet: IPv4Network) -> tuple[str, str]:
    """The etcd key range [start, end) that holds every spelling of a lease
    key for `subnet`: `.../10.244.1.0-24` itself and each
    `.../10.244.1.0-24&<v6>-<len>`. "'" is the byte after "&", and a digit,
    which would make another prefix length, sorts after both."""
    start = subnet_key(etcd_prefix, subnet)
    return start, start + "'"


def lease_key(etcd_prefix: str, lease: Lease) -> str:
    return subnet_key(etcd_prefix, lease.subnet, lease.ipv6_subnet)


def parse_lease_key(key: str, etcd_prefix: str) -> tuple[IPv4Network, IPv6Network | None]:
    """Both subnets a lease key names (the IPv6 one None for a v4-only key)."""
    prefix = subnets_prefix(etcd_prefix)
    if not key.startswith(prefix):
        raise LeaseError(f"key {key!r} is not under {prefix}")
    match = _KEY_RE.match(key[len(prefix) :])
    if not match:
        raise LeaseError(
            f"key {key!r} is not of the form {prefix}A.B.C.D-LEN or {prefix}A.B.C.D-LEN&V6-LEN"
        )
    try:
        subnet = IPv4Network(f"{match.group(1)}/{match.group(2)}", strict=True)
    except (AddressValueError, NetmaskValueError, ValueError) as exc:
        raise LeaseError(f"key {key!r} does not name a subnet: {exc}") from exc
    if match.group(3) is None:
        return subnet, None
    try:
        subnet6 = IPv6Network(f"{match.group(3)}/{match.group(4)}", strict=True)
    except (AddressValueError, NetmaskValueError, ValueError) as exc:
        raise LeaseError(f"key {key!r} does not name an IPv6 subnet: {exc}") from exc
    return subnet, subnet6


def parse_subnet_key(key: str, etcd_prefix: str) -> IPv4Network:
    """The IPv4 subnet a lease key names."""
    return parse_lease_key(key, etcd_prefix)[0]


def normalise_mac(value: Any) -> str:
    """Return a lower-case unicast MAC, or raise LeaseError."""
    if not isinstance(value, str):
        raise LeaseError(f"VtepMAC {json.dumps(value)[:40]} is not a string")
    mac = value.strip().lower()
    if not _MAC_RE.match(mac):
        raise LeaseError(f"VtepMAC {value[:40]!r} is not a MAC address")
    first_octet = int(mac[:2], 16)
    if first_octet & 0x01:
        raise LeaseError(f"VtepMAC {mac} is a multicast or broadcast address")
    if mac == "00:00:00:00:00:00":
        raise LeaseError("VtepMAC is all zeros")
    return mac


def check_public_ip(value: Any) -> IPv4Address:
    if not isinstance(value, str):
        raise LeaseError(f"PublicIP {json.dumps(value)[:40]} is not a string")
    try:
        address = IPv4Address(value)
    except AddressValueError as exc:
        raise LeaseError(f"PublicIP {value[:40]!r} is not an IPv4 address") from exc
    if (
        address.is_loopback
        or address.is_multicast
        or address.is_unspecified
        or address.is_link_local
        or address == IPv4Address("255.255.255.255")
    ):
        raise LeaseError(f"PublicIP {address} cannot be a tunnel endpoint")
    return address


def check_public_ipv6(value: Any) -> IPv6Address:
    if not isinstance(value, str):
        raise LeaseError(f"PublicIPv6 {json.dumps(value)[:40]} is not a string")
    try:
        address = IPv6Address(value)
    except AddressValueError as exc:
        raise LeaseError(f"PublicIPv6 {value[:46]!r} is not an IPv6 address") from exc
    if address.scope_id is not None:
        # "2001:db8::1%eth0": iproute2 refuses it, pyroute2 raises OSError.
        raise LeaseError(f"PublicIPv6 {value[:46]!r} carries a scope")
    if not is_unicast_ipv6(address):
        raise LeaseError(f"PublicIPv6 {address} cannot be a tunnel endpoint")
    return address


# Ranges no IPv6 tunnel endpoint or container network may touch: the
# unspecified and IPv4-compatible (::/96) and IPv4-mapped addresses,
# link-local, and multicast.
NOT_UNICAST_V6 = tuple(
    IPv6Network(n) for n in ("::/96", "::ffff:0:0/96", "fe80::/10", "ff00::/8", "::1/128")
)


def is_unicast_ipv6(address: IPv6Address) -> bool:
    return not any(address in net for net in NOT_UNICAST_V6)


def is_unicast_ipv6_network(network: IPv6Network) -> bool:
    """No address of `network` in a non-unicast range (`is_link_local` and
    friends look at the first and last address only: fe00::/7 holds fe80::/10)."""
    return not any(network.overlaps(net) for net in NOT_UNICAST_V6)


def _backend_data(data: Any, name: str) -> tuple[int, str]:
    if not isinstance(data, dict):
        raise LeaseError(f"{name} is missing or not an object")
    vni = data.get("VNI")
    if isinstance(vni, bool) or not isinstance(vni, int) or not 0 <= vni < 1 << 24:
        raise LeaseError(f"{name}.VNI {json.dumps(vni)[:40]} is not a VNI")
    try:
        mac = normalise_mac(data.get("VtepMAC"))
    except LeaseError as exc:
        raise LeaseError(f"{name}.{exc}") from exc
    return vni, mac


def _ipv6_half(raw: dict[str, Any], lease: Lease, subnet6: IPv6Network) -> Lease:
    """The lease with its IPv6 half; LeaseError says why that half is unusable."""
    public_ipv6 = check_public_ipv6(raw.get("PublicIPv6"))
    if not is_unicast_ipv6_network(subnet6):
        raise LeaseError(f"IPv6 subnet {subnet6} is not a unicast range")
    mac6 = ""
    if lease.backend_type == "vxlan":
        vni6, mac6 = _backend_data(raw.get("BackendV6Data"), "BackendV6Data")
        if vni6 != lease.vni:
            raise LeaseError(f"BackendV6Data.VNI {vni6} differs from BackendData.VNI {lease.vni}")
        if mac6 == lease.vtep_mac:
            # Both VTEPs are ports of one bridge here: one MAC cannot be
            # forwarded out of two ports.
            raise LeaseError(f"BackendV6Data.VtepMAC {mac6} is the same as the IPv4 VtepMAC")
    return Lease(
        lease.subnet,
        lease.public_ip,
        lease.vni,
        lease.vtep_mac,
        lease.backend_type,
        ipv6_subnet=subnet6,
        public_ipv6=public_ipv6,
        vtep_mac_v6=mac6,
    )


def read_lease(
    subnet: IPv4Network, subnet6: IPv6Network | None, value: bytes | str
) -> tuple[Lease, str | None]:
    """A lease value for a key's subnets: the lease, with its IPv6 half when
    the key names one and the value's IPv6 fields are valid, and why that
    half was left out when they are not. LeaseError when even the IPv4 half
    is unusable."""
    raw = _json_object(value)
    lease = _ipv4_half(raw, subnet)
    if subnet6 is None:
        return lease, None
    if raw.get("PublicIPv6") is None:
        return lease, "the key names an IPv6 subnet but the value has no PublicIPv6"
    try:
        return _ipv6_half(raw, lease, subnet6), None
    except LeaseError as exc:
        return lease, str(exc)


def parse_lease(subnet: IPv4Network, value: bytes | str) -> Lease:
    """Validate a lease value read from etcd for the given subnet (its
    IPv4 half; `read_lease` adds the IPv6 one)."""
    return _ipv4_half(_json_object(value), subnet)


def _json_object(value: bytes | str) -> dict[str, Any]:
    if len(value) > MAX_LEASE_BYTES:
        raise LeaseError(f"value is {len(value)} bytes, more than {MAX_LEASE_BYTES}")
    try:
        raw = json.loads(value)
    except RecursionError as exc:
        # A few KB of brackets: not a lease, and never the end of a pass.
        raise LeaseError("value is not valid JSON: nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise LeaseError(f"value is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise LeaseError("value is not a JSON object")
    return raw


def _ipv4_half(raw: dict[str, Any], subnet: IPv4Network) -> Lease:
    backend_type = raw.get("BackendType", "vxlan")
    if backend_type == "host-gw":
        # flannel's host-gw leases carry no backend data: the public IP is all.
        return Lease(subnet, check_public_ip(raw.get("PublicIP")), 0, "", "host-gw")
    if backend_type != "vxlan":
        raise LeaseError(f"BackendType {json.dumps(backend_type)[:40]} is not vxlan or host-gw")
    public_ip = check_public_ip(raw.get("PublicIP"))
    vni, mac = _backend_data(raw.get("BackendData"), "BackendData")
    return Lease(
        subnet=subnet, public_ip=public_ip, vni=vni, vtep_mac=mac, backend_type=backend_type
    )


def render_lease(lease: Lease) -> str:
    """flannel's lease value (its LeaseAttrs); key order as flannel writes it."""
    vxlan = lease.backend_type == "vxlan"
    value: dict[str, Any] = {
        "PublicIP": str(lease.public_ip),
        "PublicIPv6": str(lease.public_ipv6) if lease.public_ipv6 is not None else None,
        "BackendType": lease.backend_type,
        "BackendData": {"VNI": lease.vni, "VtepMAC": lease.vtep_mac} if vxlan else None,
    }
    if lease.has_ipv6:
        value["BackendV6Data"] = {"VNI": lease.vni, "VtepMAC": lease.vtep_mac_v6} if vxlan else None
    return json.dumps(value)
