"""Lease keys and values in flannel's format, and which peer leases are usable.

A lease value is untrusted input written by another host: `parse_lease`
validates every field and raises `LeaseError` with one line of reason, so a
peer's garbage is skipped with a warning instead of crashing the agent or
programming a bogus entry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address, IPv4Network, NetmaskValueError
from typing import Any

from overlayd.errors import LeaseError
from overlayd.model import Lease, NetworkConfig

_KEY_RE = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3})-(\d{1,2})$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")
# A lease value is a few hundred bytes; anything far larger is not a lease.
MAX_LEASE_BYTES = 4096


def subnets_prefix(etcd_prefix: str) -> str:
    return f"{etcd_prefix.rstrip('/')}/subnets/"


def config_key(etcd_prefix: str) -> str:
    return f"{etcd_prefix.rstrip('/')}/config"


def subnet_key(etcd_prefix: str, subnet: IPv4Network) -> str:
    """`<prefix>/subnets/10.244.1.0-24`, flannel's spelling."""
    return f"{subnets_prefix(etcd_prefix)}{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(key: str, etcd_prefix: str) -> IPv4Network:
    prefix = subnets_prefix(etcd_prefix)
    if not key.startswith(prefix):
        raise LeaseError(f"key {key!r} is not under {prefix}")
    match = _KEY_RE.match(key[len(prefix) :])
    if not match:
        raise LeaseError(f"key {key!r} is not of the form {prefix}A.B.C.D-LEN")
    try:
        return IPv4Network(f"{match.group(1)}/{match.group(2)}", strict=True)
    except (AddressValueError, NetmaskValueError, ValueError) as exc:
        raise LeaseError(f"key {key!r} does not name a subnet: {exc}") from exc


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


def parse_lease(subnet: IPv4Network, value: bytes | str) -> Lease:
    """Validate a lease value read from etcd for the given subnet."""
    if len(value) > MAX_LEASE_BYTES:
        raise LeaseError(f"value is {len(value)} bytes, more than {MAX_LEASE_BYTES}")
    try:
        raw = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LeaseError(f"value is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise LeaseError("value is not a JSON object")
    backend_type = raw.get("BackendType", "vxlan")
    if backend_type == "host-gw":
        # flannel's host-gw leases carry no backend data: the public IP is all.
        return Lease(subnet, check_public_ip(raw.get("PublicIP")), 0, "", "host-gw")
    if backend_type != "vxlan":
        raise LeaseError(f"BackendType {json.dumps(backend_type)[:40]} is not vxlan or host-gw")
    data = raw.get("BackendData")
    if not isinstance(data, dict):
        raise LeaseError("BackendData is missing or not an object")
    vni = data.get("VNI")
    if isinstance(vni, bool) or not isinstance(vni, int) or not 0 <= vni < 1 << 24:
        raise LeaseError(f"BackendData.VNI {json.dumps(vni)[:40]} is not a VNI")
    return Lease(
        subnet=subnet,
        public_ip=check_public_ip(raw.get("PublicIP")),
        vni=vni,
        vtep_mac=normalise_mac(data.get("VtepMAC")),
        backend_type=backend_type,
    )


def render_lease(lease: Lease) -> str:
    """flannel's lease value; key order as flannel writes it."""
    return json.dumps(
        {
            "PublicIP": str(lease.public_ip),
            "PublicIPv6": None,
            "BackendType": lease.backend_type,
            "BackendData": (
                {"VNI": lease.vni, "VtepMAC": lease.vtep_mac}
                if lease.backend_type == "vxlan"
                else None
            ),
        }
    )


@dataclass(frozen=True, slots=True)
class Rejected:
    """A lease that is not used, and why (for one warning, not one per pass)."""

    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class PeerSelection:
    peers: tuple[Lease, ...]
    rejected: tuple[Rejected, ...]


# key -> (value, lease or the reason it is unusable, first and last address)
ParseCache = dict[str, tuple[bytes, "Lease | str", int, int]]


def _parse_cached(
    key: str, value: bytes, etcd_prefix: str, cache: ParseCache | None
) -> tuple[Lease, int, int]:
    """Parse a lease, reusing the result for an unchanged value: with
    thousands of peers, a pass must not parse every JSON value again."""
    if cache is not None:
        hit = cache.get(key)
        if hit is not None and hit[0] == value:
            if isinstance(hit[1], str):
                raise LeaseError(hit[1])
            return hit[1], hit[2], hit[3]
    try:
        lease = parse_lease(parse_subnet_key(key, etcd_prefix), value)
    except LeaseError as exc:
        if cache is not None:
            cache[key] = (value, str(exc), 0, 0)
        raise
    first, last = int(lease.subnet.network_address), int(lease.subnet.broadcast_address)
    if cache is not None:
        cache[key] = (value, lease, first, last)
    return lease, first, last


def select_peers(
    config: NetworkConfig,
    own: Lease | None,
    raw_leases: Mapping[str, bytes],
    etcd_prefix: str,
    *,
    cache: ParseCache | None = None,
) -> PeerSelection:
    """Turn every raw `<prefix>/subnets/*` key and value into usable peers.

    A lease is rejected when its key or value is malformed, its subnet lies
    outside the network or overlaps this host's own, its VNI differs from
    ours, or its public IP is ours (a stale lease of this very host under
    another subnet must not become a route to itself). Of two peer leases
    that overlap, the one with the lower address (then the shorter prefix)
    wins; the other is rejected. O(n log n), so that thousands of peers stay
    cheap.
    """
    candidates: list[tuple[int, int, str, Lease]] = []
    rejected: list[Rejected] = []
    # Plain integers: ipaddress's own overlap tests cost microseconds each.
    net_first, net_last = int(config.network.network_address), int(config.network.broadcast_address)
    own_first = int(own.subnet.network_address) if own is not None else -1
    own_last = int(own.subnet.broadcast_address) if own is not None else -1
    vni, backend = config.backend.vni, config.backend.type
    for key, value in raw_leases.items():
        try:
            lease, first, last = _parse_cached(key, value, etcd_prefix, cache)
            subnet = lease.subnet
            if first < net_first or last > net_last:
                raise LeaseError(f"subnet {subnet} is outside Network {config.network}")
            if own is not None:
                if first == own_first and last == own_last:
                    continue
                if first <= own_last and own_first <= last:
                    raise LeaseError(f"subnet {subnet} overlaps this host's {own.subnet}")
                if lease.public_ip == own.public_ip:
                    raise LeaseError(f"PublicIP {lease.public_ip} is this host's own address")
            if lease.backend_type != backend:
                raise LeaseError(
                    f"BackendType {lease.backend_type} differs from the network's {backend}"
                )
            if backend == "vxlan" and lease.vni != vni:
                raise LeaseError(f"VNI {lease.vni} differs from the network's {vni}")
        except LeaseError as exc:
            rejected.append(Rejected(key=key, reason=str(exc)))
            continue
        candidates.append((first, last, key, lease))
    # By start, then the larger (shorter prefix) first.
    candidates.sort(key=lambda c: (c[0], -c[1]))
    peers: list[Lease] = []
    kept_last = -1
    for first, last, key, lease in candidates:
        # Sorted by start: a lease overlaps a kept one only if it starts
        # before the end of the last kept one (kept leases never overlap).
        if first <= kept_last:
            rejected.append(
                Rejected(
                    key=key,
                    reason=f"subnet {lease.subnet} overlaps the lease for {peers[-1].subnet}",
                )
            )
            continue
        peers.append(lease)
        kept_last = last
    if cache is not None and len(cache) > len(raw_leases):
        for gone in set(cache) - set(raw_leases):
            del cache[gone]
    return PeerSelection(peers=tuple(peers), rejected=tuple(sorted(rejected, key=lambda r: r.key)))
