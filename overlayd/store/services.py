"""Creating and deleting services in etcd, with their VIPs and node ports
claimed atomically: what `overlayctl service create|delete` do, over the
`Store` protocol (so unit tests run it on a dictionary).

A service is written as one etcd transaction that puts

    <own>/services/<name>              the canonical definition, VIPs included
    <own>/vips/<ip>                    the service's name, one per VIP
    <own>/nodeports/<proto>/<port>     the service's name, one per node port

and succeeds only if none of those keys exists. Two creators can never
share a VIP or a node port, nor write the same name twice: one of them
finds a key present and writes nothing. (plan/service.stored_services
still skips a second claimant, by name order, for values written around
this code.)

A VIP left out of the definition is allocated from the service network of
its family: the probe starts at an address picked by a hash of the name
(so concurrent creators of different services rarely try the same one) and
goes up, wrapping, skipping the network's first and last addresses and
every address already under vips/. A creator that loses a race reads the
claims again and tries the next free address, at most MAX_ATTEMPTS times.

Deleting removes the service key and every vips/ and nodeports/ key that
names it, in one transaction that succeeds only if none of them changed
since they were read.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_address

from overlayd.errors import OverlaydError
from overlayd.model import IPAddress, IPNetwork
from overlayd.plan.service import (
    claim_keys,
    node_port_key,
    node_ports_prefix,
    render_service,
    service_key,
    services_prefix,
    vip_key,
    vips_prefix,
)
from overlayd.plan.service_model import Service
from overlayd.store.base import Store

# A creator loses a round only to another creator that won one (a key it
# wanted appeared), and each wins once: up to this many concurrent creators
# all get through.
MAX_ATTEMPTS = 32


class ServiceConflict(OverlaydError):
    """A service cannot be created as defined: its name, a VIP or a node port
    is taken (the message names by which service). Nothing was written."""


class ServiceNetworkFull(OverlaydError):
    """No free address is left in a service network."""


def _offset(name: str, size: int) -> int:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") % size


def allocate(network: IPNetwork, taken: set[IPAddress], name: str) -> IPAddress:
    """A free VIP in `network` for the service `name`: the first address,
    from a start the name's hash picks, that is not taken, neither the
    network's first nor its last. ServiceNetworkFull when none is left.
    Costs O(taken addresses) at most, whatever the network's size."""
    size = network.num_addresses - 2  # the usable addresses, first + 1 .. last - 1
    first = int(network.network_address) + 1
    inside = {int(a) for a in taken if a.version == network.version and a in network}
    inside.discard(first - 1)
    inside.discard(int(network.broadcast_address))
    if len(inside) >= size:
        raise ServiceNetworkFull(
            f"the service network {network} is full: all {size} VIPs are taken"
        )
    start = _offset(name, size)
    for step in range(size):
        candidate = first + (start + step) % size
        if candidate not in inside:
            return ip_address(candidate)
    raise AssertionError("unreachable: a free address was counted")


async def _holders(store: Store, prefix: str) -> dict[str, str]:
    raw, _ = await store.get_prefix(prefix)
    return {key: value.decode(errors="replace") for key, value in raw.items()}


async def _named_by(store: Store, own_prefix: str, holder: str, key: str) -> str:
    """`service "x"`, or, when no such service exists, a leftover to clean."""
    found, _ = await store.get(service_key(own_prefix, holder))
    if found is None:
        return f"a leftover claim of a service {holder!r} that no longer exists (delete {key})"
    return f"service {holder!r}"


@dataclass(frozen=True, slots=True)
class Created:
    service: Service  # with every VIP
    revision: int


async def create_service(
    store: Store, own_prefix: str, service: Service, networks: Sequence[IPNetwork]
) -> Created:
    """Write a validated service (plan/service.parse_service against these
    networks), allocating a VIP in each network whose family the service
    has none of. ServiceConflict when its name, a VIP it gives or a node
    port is taken; ServiceNetworkFull when a network has no VIP left."""
    key = service_key(own_prefix, service.name)
    for _ in range(MAX_ATTEMPTS):
        existing, _ = await store.get(key)
        if existing is not None:
            raise ServiceConflict(f"service {service.name!r} already exists ({key})")
        vips_held = await _holders(store, vips_prefix(own_prefix))
        for vip in service.vips:
            holder = vips_held.get(vip_key(own_prefix, vip))
            if holder is not None:
                by = await _named_by(store, own_prefix, holder, vip_key(own_prefix, vip))
                raise ServiceConflict(f"VIP {vip} is taken by {by}")
        ports_held = await _holders(store, node_ports_prefix(own_prefix))
        for port in service.ports:
            if port.node_port is None:
                continue
            port_key = node_port_key(own_prefix, port.protocol, port.node_port)
            holder = ports_held.get(port_key)
            if holder is not None:
                by = await _named_by(store, own_prefix, holder, port_key)
                raise ServiceConflict(
                    f"nodePort {port.node_port}/{port.protocol.value} is taken by {by}"
                )
        taken = {ip_address(k.rsplit("/", 1)[-1]) for k in vips_held if _is_address(k)}
        vips = list(service.vips)
        for network in networks:
            if not any(v.version == network.version for v in vips):
                vips.append(allocate(network, taken, service.name))
        full = dataclasses.replace(service, vips=tuple(sorted(vips, key=lambda a: a.version)))
        claims = [(k, service.name) for k in claim_keys(own_prefix, full)]
        revision = await store.create_all([(key, render_service(full)), *claims])
        if revision is not None:
            return Created(full, revision)
        # Some key appeared since it was read: another creator won a race.
        # The next round reads again and says who, or picks another VIP.
    raise ServiceConflict(
        f"service {service.name!r}: another creator took the chosen VIP {MAX_ATTEMPTS} times"
        " in a row; try again"
    )


def _is_address(key: str) -> bool:
    try:
        ip_address(key.rsplit("/", 1)[-1])
    except ValueError:
        return False
    return True


async def delete_service(store: Store, own_prefix: str, name: str) -> int:
    """Delete a service and the VIPs and node ports it holds, in one
    transaction; its revision. OverlaydError when there is no such service."""
    key = service_key(own_prefix, name)
    for _ in range(MAX_ATTEMPTS):
        found = await store.get_with_revision(key)
        if found is None:
            raise OverlaydError(f"no service {name!r} under {services_prefix(own_prefix)}")
        revisions: dict[str, int] = {key: found[1]}
        for prefix in (vips_prefix(own_prefix), node_ports_prefix(own_prefix)):
            held, _ = await store.get_prefix_revisions(prefix)
            revisions |= {k: rev for k, (value, rev) in held.items() if value == name.encode()}
        revision = await store.delete_if_unchanged(revisions)
        if revision is not None:
            return revision
    raise OverlaydError(f"service {name!r} changed {MAX_ATTEMPTS} times while being deleted")
