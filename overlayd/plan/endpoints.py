"""Endpoint registrations: keys, values, labels, and which registrations
are usable.

An endpoint is a container the cluster knows, registered by the host that
runs it under `<own>/endpoints/<host>/<id>` (plan/policy_model.py has the
layout). Values are written by other hosts and are untrusted:
`parse_endpoint` validates every field and raises EndpointError with one
line of reason, and `select_endpoints` keeps the usable ones and says why
each other one is not used, so that a bad registration costs its own
endpoint and nothing else.

A value is JSON: {"name", "host", "hostname", "addresses", "labels",
"registered"}, and optionally "gwbridge_addresses" (the addresses of the
container's gwbridge interface, in gwbridge egress mode) and "macs" (the
link-layer addresses of its interfaces). Those two are used by the
endpoint's own host alone (HostSubnets.own): they are checked for form on
every host, so that a registration reads the same everywhere, and dropped
on the others. Fields this version does not know are ignored (values are
written by programs, possibly a newer overlayd, not typed by people);
policies, which people type, refuse them instead (plan/policy.py).

Labels follow Kubernetes' syntax (the rules live in plan/policy.py and are
shared). They come from the engine at registration (`labels_from_cni`) and
from `overlayctl endpoint label` afterwards (`parse_label_changes`).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address
from typing import Any

from overlayd.errors import EndpointError
from overlayd.model import IPAddress
from overlayd.plan.ipam import gateway_address
from overlayd.plan.policy import label_key_problem, label_value_problem, show
from overlayd.plan.policy_model import Endpoint, HostSubnets, MacAddress

# A registration is a few hundred bytes; anything far larger is not one.
MAX_ENDPOINT_BYTES = 8192
MAX_ID = 128
MAX_NAME = 253
# CNI's container id alphabet (SPEC.md), which Docker's hex ids fit too.
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_HOST_RE = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3})-(\d{1,2})")

# CNI_ARGS keys kept as labels (Kubernetes runtimes pass them); every other
# key is an argument for some plugin (IP=, MAC=, IgnoreUnknown=), not a label.
CNI_ARGS_LABELS = {"K8S_POD_NAMESPACE": "k8s.pod.namespace", "K8S_POD_NAME": "k8s.pod.name"}
# CNI_ARGS `OVERLAYD_LABEL_<key>=<value>`: one label each, overlay-cni's own
# (Podman passes its own CNI_ARGS variable on, so `CNI_ARGS=... podman run`
# labels one container); overlay-cni keeps them from its delegates.
CNI_ARGS_LABEL_PREFIX = "OVERLAYD_LABEL_"


# --- keys -------------------------------------------------------------------------


def endpoints_prefix(own_prefix: str) -> str:
    return f"{own_prefix.rstrip('/')}/endpoints/"


def host_endpoints_prefix(own_prefix: str, host: str) -> str:
    """The prefix of one host's endpoints (`<own>/endpoints/<host>/`)."""
    return f"{endpoints_prefix(own_prefix)}{host}/"


def host_id(subnet: IPv4Network) -> str:
    """A host's id in endpoint keys: its IPv4 lease's subnet as flannel
    spells it in lease keys ("10.244.1.0-24")."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


# Cached: a cold start reads thousands of registrations of a few hundred
# hosts and label values, and these checks were a fifth of reading them.
@functools.lru_cache(maxsize=8192)
def _check_host(host: str) -> None:
    match = _HOST_RE.fullmatch(host)
    if match is None:
        raise EndpointError(f"host {show(host)} is not a subnet id like 10.244.1.0-24")
    try:
        IPv4Network(f"{match.group(1)}/{match.group(2)}", strict=True)
    except ValueError as exc:
        raise EndpointError(f"host {show(host)} does not name a subnet: {exc}") from exc


def _check_id(ident: str) -> None:
    if not _ID_RE.fullmatch(ident):
        raise EndpointError(
            f"id {show(ident)} is not 1 to {MAX_ID} characters of letters, digits, '_', '.', '-'"
        )


def endpoint_key(own_prefix: str, host: str, id: str) -> str:
    """`<own>/endpoints/<host>/<id>`; EndpointError for a bad host or id,
    so that nothing unreadable is ever written."""
    _check_host(host)
    _check_id(id)
    return host_endpoints_prefix(own_prefix, host) + id


def parse_endpoint_key(key: str, own_prefix: str) -> tuple[str, str]:
    """(host, id) of an endpoint key; EndpointError for anything else."""
    prefix = endpoints_prefix(own_prefix)
    if not key.startswith(prefix):
        raise EndpointError(f"key {show(key)} is not under {prefix}")
    host, slash, ident = key[len(prefix) :].partition("/")
    if not slash:
        raise EndpointError(f"key {show(key)} is not of the form {prefix}HOST/ID")
    _check_host(host)
    _check_id(ident)
    return host, ident


# --- values -----------------------------------------------------------------------


def render_endpoint(endpoint: Endpoint) -> bytes:
    """The registration's value (JSON, sorted keys); EndpointError when it
    would exceed MAX_ENDPOINT_BYTES (too many or too long labels), so the
    registration is refused instead of written and then skipped by every
    reader."""
    value = json.dumps(
        {
            "name": endpoint.name,
            "host": endpoint.host,
            "hostname": endpoint.hostname,
            "addresses": [str(address) for address in endpoint.addresses],
            "labels": dict(endpoint.labels),
            "registered": endpoint.registered,
            # Only when known: a registration without them reads as before.
            **(
                {"gwbridge_addresses": [str(a) for a in endpoint.gwbridge_addresses]}
                if endpoint.gwbridge_addresses
                else {}
            ),
            **({"macs": [str(m) for m in endpoint.macs]} if endpoint.macs else {}),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    if len(value) > MAX_ENDPOINT_BYTES:
        raise EndpointError(
            f"endpoint {show(endpoint.name)}: its value is {len(value)} bytes,"
            f" more than {MAX_ENDPOINT_BYTES} (fewer or shorter labels)"
        )
    return value


def check_labels(raw: object, where: str) -> dict[str, str]:
    """Labels as a dict of str to str by Kubernetes' rules; EndpointError
    naming `where` and the label otherwise."""
    if not isinstance(raw, Mapping):
        raise EndpointError(f"{where}: not an object")
    for key, value in raw.items():
        if isinstance(key, str) and isinstance(value, str):
            problem = _label_problem(key, value)
        else:
            problem = label_key_problem(key) or label_value_problem(value)
        if problem:
            raise EndpointError(f"{where}: {problem}")
    return dict(raw)


@functools.lru_cache(maxsize=8192)
def _label_problem(key: str, value: str) -> str | None:
    return label_key_problem(key) or label_value_problem(value)


def _text(raw: dict[str, Any], name: str, required: bool) -> str:
    value = raw.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise EndpointError(f"{name}: {show(value)} is not a string")
    if len(value) > MAX_NAME:
        raise EndpointError(f"{name}: longer than {MAX_NAME} characters")
    if not value.isprintable():
        raise EndpointError(f"{name}: {show(value)} has unprintable characters")
    return value


def _utf8(value: bytes) -> str | bytes:
    """A registration's bytes as json.loads would decode them, decoded
    here when that is UTF-8 (every value overlayd writes): json.loads's own
    detection of the encoding costs as much again as decoding."""
    # json.detect_encoding: no BOM (none starts with "{") and no NUL among
    # the first bytes (UTF-16 and UTF-32) means UTF-8.
    if len(value) >= 4 and value[0] == 0x7B and value[1] and value[2]:
        return value.decode("utf-8", "surrogatepass")
    return value


# A dotted quad as ipaddress accepts it (no leading zeros), read without
# ipaddress's octet-by-octet Python: a cold start reads 10,000 of them.
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")


def _ip(text: str) -> IPAddress:
    """ip_address(text), faster for IPv4; ValueError for anything else."""
    quad = _DOTTED_QUAD.fullmatch(text)
    if quad is None:
        return ip_address(text)
    a, b, c, d = quad.groups()
    return IPv4Address((int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d))


def _addresses(raw: object, host: str, subnets: HostSubnets) -> tuple[IPAddress, ...]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= 2:
        raise EndpointError(f"addresses: {show(raw)} is not a list of one or two addresses")
    found: list[IPAddress] = []
    for index, item in enumerate(raw):
        if not isinstance(item, str):
            raise EndpointError(f"addresses[{index}]: {show(item)} is not a string")
        try:
            address = _ip(item)
        except ValueError as exc:
            raise EndpointError(f"addresses[{index}]: {show(item)} is not an IP address") from exc
        bounds = _bounds(subnets, address.version)
        value = int(address)
        if bounds is None or not bounds[0] <= value <= bounds[1]:
            held = ", ".join(str(n) for n in (subnets.subnet, subnets.subnet6) if n is not None)
            raise EndpointError(
                f"addresses[{index}]: {address} is outside host {host}'s subnets ({held})"
            )
        # The bridge's own address and the ones no container has: an
        # endpoint claiming one would have policy judge the host's traffic
        # as the endpoint's.
        if value in bounds[2]:
            network = subnets.subnet if address.version == 4 else subnets.subnet6
            raise EndpointError(
                f"addresses[{index}]: {address} is the network, gateway or broadcast address"
                f" of {network}"
            )
        found.append(address)
    if len(found) == 1:
        return (found[0],)
    if found[0].version == found[1].version:
        raise EndpointError(f"addresses: two IPv{found[0].version} addresses")
    return tuple(sorted(found, key=lambda a: a.version))


# Per host's subnets (by identity: the selection keeps one HostSubnets per
# host, and hashing one costs more than the lookup saves) and family.
_BOUNDS: dict[tuple[int, int], tuple[HostSubnets, tuple[int, int, frozenset[int]] | None]] = {}


def _bounds(subnets: HostSubnets, version: int) -> tuple[int, int, frozenset[int]] | None:
    """The host subnet's first and last address of a family, and the ones
    no container may claim (network, gateway, and in IPv4 broadcast), as
    ints; None for a family the host has no subnet of. Kept per host and
    family, not made per registration (a cold start reads thousands)."""
    key = (id(subnets), version)
    kept = _BOUNDS.get(key)
    if kept is not None and kept[0] is subnets:
        return kept[1]
    network = subnets.subnet if version == 4 else subnets.subnet6
    bounds = None
    if network is not None:
        first, last = int(network.network_address), int(network.broadcast_address)
        reserved = {first, int(gateway_address(network))}
        if network.version == 4:
            reserved.add(last)
        bounds = first, last, frozenset(reserved)
    if len(_BOUNDS) >= 4096:
        _BOUNDS.clear()
    _BOUNDS[key] = (subnets, bounds)
    return bounds


def _gwbridge_addresses(raw: object, subnets: HostSubnets) -> tuple[IPAddress, ...]:
    """The gwbridge addresses this host uses: on the endpoint's own host,
    those inside its gwbridge's subnets; elsewhere none. An address outside
    them is left out, not refused: it is what a container kept after the
    gwbridge's subnet or the egress mode changed, which it can send nothing
    from (there is no route back to it), while refusing the registration
    would take the endpoint out of every policy."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > 2:
        raise EndpointError(f"gwbridge_addresses: {show(raw)} is not a list of up to two addresses")
    found: list[IPAddress] = []
    for index, item in enumerate(raw):
        where = f"gwbridge_addresses[{index}]"
        try:
            address = ip_address(item) if isinstance(item, str) else None
        except ValueError:
            address = None
        if address is None:
            raise EndpointError(f"{where}: {show(item)} is not an IP address")
        if any(a.version == address.version for a in found):
            raise EndpointError(f"gwbridge_addresses: two IPv{address.version} addresses")
        found.append(address)
        network = subnets.gwbridge_network(address) if subnets.own else None
        if network is not None and address in (
            network.network_address,
            gateway_address(network),
            network.broadcast_address if address.version == 4 else None,
        ):
            # The gwbridge's own address: the host's traffic is never an endpoint's.
            raise EndpointError(
                f"{where}: {address} is the network, gateway or broadcast address of {network}"
            )
    return tuple(
        sorted(
            (a for a in found if subnets.own and subnets.gwbridge_network(a) is not None),
            key=lambda a: a.version,
        )
    )


def _macs(raw: object, subnets: HostSubnets) -> tuple[MacAddress, ...]:
    """The interfaces' MACs (overlay and gwbridge), on the endpoint's own host."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > 2:
        raise EndpointError(f"macs: {show(raw)} is not a list of up to two MAC addresses")
    found: list[MacAddress] = []
    for index, item in enumerate(raw):
        where = f"macs[{index}]"
        if not isinstance(item, str):
            raise EndpointError(f"{where}: {show(item)} is not a string")
        try:
            mac = MacAddress.parse(item)
        except ValueError as exc:
            raise EndpointError(f"{where}: {exc}") from None
        if not mac.unicast:
            raise EndpointError(f"{where}: {mac} is not a unicast address")
        if mac in found:
            raise EndpointError(f"{where}: {mac} is given twice")
        found.append(mac)
    return tuple(found) if subnets.own else ()


def parse_endpoint(
    key: str, value: bytes, own_prefix: str, hosts: Mapping[str, HostSubnets]
) -> Endpoint:
    """Validate a registration read from etcd (or about to be written).
    `hosts`: host id -> that host's leased subnets; a host without a lease
    has no endpoints. EndpointError names the field at fault."""
    host, ident = parse_endpoint_key(key, own_prefix)
    return _parse_value(key, host, ident, value, hosts)


def _parse_value(
    key: str, host: str, ident: str, value: bytes, hosts: Mapping[str, HostSubnets]
) -> Endpoint:
    """parse_endpoint for a key already parsed into (host, ident)."""
    subnets = hosts.get(host)
    if subnets is None:
        raise EndpointError(f"host {host} has no lease")
    if len(value) > MAX_ENDPOINT_BYTES:
        raise EndpointError(f"value is {len(value)} bytes, more than {MAX_ENDPOINT_BYTES}")
    try:
        raw = json.loads(_utf8(value))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise EndpointError(f"value is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise EndpointError("value is not a JSON object")
    if raw.get("host") != host:
        raise EndpointError(f"host: {show(raw.get('host'))} differs from the key's {host}")
    registered = raw.get("registered", 0)
    if (
        isinstance(registered, bool)
        or not isinstance(registered, int | float)
        or not math.isfinite(registered)
        or registered < 0
    ):
        raise EndpointError(f"registered: {show(registered)} is not a time (seconds since 1970)")
    return Endpoint(
        key=key,
        id=ident,
        host=host,
        name=_text(raw, "name", required=True),
        addresses=_addresses(raw.get("addresses"), host, subnets),
        labels=check_labels(raw.get("labels", {}), "labels"),
        registered=float(registered),
        hostname=_text(raw, "hostname", required=False),
        gwbridge_addresses=_gwbridge_addresses(raw.get("gwbridge_addresses"), subnets),
        macs=_macs(raw.get("macs"), subnets),
    )


# --- which registrations are used ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointSelection:
    """The usable endpoints (in the order of the keys given) and, for every
    other key under the endpoints prefix, why it is not used."""

    endpoints: tuple[Endpoint, ...]
    rejected: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Parsed:
    """One registration parsed once, with what it was checked against (its
    host's subnets then) so a changed lease makes it parse again."""

    value: bytes
    host: str | None
    subnets: HostSubnets | None
    endpoint: Endpoint | None
    reason: str = ""


EndpointCache = dict[str, _Parsed]


def _parse(key: str, value: bytes, own_prefix: str, hosts: Mapping[str, HostSubnets]) -> _Parsed:
    try:
        host, ident = parse_endpoint_key(key, own_prefix)
    except EndpointError as exc:
        return _Parsed(value, None, None, None, str(exc))
    subnets = hosts.get(host)
    try:
        return _Parsed(value, host, subnets, _parse_value(key, host, ident, value, hosts))
    except EndpointError as exc:
        return _Parsed(value, host, subnets, None, str(exc))


def select_endpoints(
    raw: Mapping[str, bytes],
    own_prefix: str,
    hosts: Mapping[str, HostSubnets],
    cache: EndpointCache | None = None,
) -> EndpointSelection:
    """Every key under endpoints_prefix in `raw` (others are ignored):
    usable ones as Endpoints, bad ones rejected with their reason. Two or
    more endpoints claiming one address are all rejected (which one is
    right cannot be told, and an address in two endpoints' sets would take
    both endpoints' policies). O(len(raw)); with a `cache` kept across
    calls (a dict, owned by the caller), an unchanged value on an unchanged
    host is not parsed again."""
    prefix = endpoints_prefix(own_prefix)
    parsed: list[_Parsed] = []
    rejected: dict[str, str] = {}
    # Whether a cached entry's subnets still stand, per (host, the cached
    # object): one comparison per host per call, not one per endpoint.
    unchanged: dict[tuple[str, int], bool] = {}
    for key, value in raw.items():
        if not key.startswith(prefix):
            continue
        hit = cache.get(key) if cache is not None else None
        if hit is not None and hit.value != value:
            hit = None
        elif hit is not None and hit.host is not None:
            # (A key that names no host reads the same whatever the hosts.)
            memo = (hit.host, id(hit.subnets))
            same = unchanged.get(memo)
            if same is None:
                same = unchanged[memo] = hit.subnets == hosts.get(hit.host)
            if not same:
                hit = None
        if hit is None:
            hit = _parse(key, value, own_prefix, hosts)
            if cache is not None:
                cache[key] = hit
        if hit.endpoint is None:
            rejected[key] = hit.reason
        else:
            parsed.append(hit)
    if cache is not None and len(cache) > len(raw):
        for gone in set(cache) - set(raw):
            del cache[gone]
    # Gwbridge and link-layer addresses too: only this host's endpoints
    # have them (every host's gwbridge has the same subnet).
    claims: dict[IPAddress | MacAddress, list[str]] = {}
    for item in parsed:
        assert item.endpoint is not None
        for address in _claimed(item.endpoint):
            claims.setdefault(address, []).append(item.endpoint.key)
    endpoints: list[Endpoint] = []
    for item in parsed:
        endpoint = item.endpoint
        assert endpoint is not None
        conflicts = [
            f"address {address} is also claimed by "
            + ", ".join(other for other in claims[address] if other != endpoint.key)
            for address in _claimed(endpoint)
            if len(claims[address]) > 1
        ]
        if conflicts:
            rejected[endpoint.key] = "; ".join(conflicts) + " (neither is used)"
        else:
            endpoints.append(endpoint)
    return EndpointSelection(tuple(endpoints), rejected)


def _claimed(endpoint: Endpoint) -> tuple[IPAddress | MacAddress, ...]:
    return (*endpoint.addresses, *endpoint.gwbridge_addresses, *endpoint.macs)


# --- labels from people and engines ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelChanges:
    """`overlayctl endpoint label` arguments: labels to set and to remove."""

    set: Mapping[str, str] = field(default_factory=dict)
    remove: frozenset[str] = frozenset()

    def apply(self, labels: Mapping[str, str]) -> dict[str, str]:
        """The labels after the change (removing an absent key is no error)."""
        found = {key: value for key, value in labels.items() if key not in self.remove}
        found.update(self.set)
        return found


def parse_label_changes(items: Sequence[str]) -> LabelChanges:
    """kubectl's spelling: `key=value` sets (an empty value is a value),
    `key-` removes (no valid key ends in '-', so this is unambiguous). A
    key given twice is refused. EndpointError names the argument."""
    to_set: dict[str, str] = {}
    remove: set[str] = set()
    for item in items:
        key, equals, value = item.partition("=")
        if not equals:
            if not item.endswith("-"):
                raise EndpointError(
                    f"label {show(item)}: write key=value to set a label or key- to remove one"
                )
            key = item[:-1]
        problem = label_key_problem(key) or (label_value_problem(value) if equals else None)
        if problem:
            raise EndpointError(f"label {show(item)}: {problem}")
        if key in to_set or key in remove:
            raise EndpointError(f"label {show(item)}: {key} is given twice")
        if equals:
            to_set[key] = value
        else:
            remove.add(key)
    return LabelChanges(to_set, frozenset(remove))


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    """`key=value` arguments as labels (removals, `key-`, are refused here:
    see parse_label_changes)."""
    changes = parse_label_changes(items)
    if changes.remove:
        raise EndpointError(
            f"label {show(min(changes.remove) + '-')}: removing a label makes no sense here"
        )
    return dict(changes.set)


def _labels_from(raw: object, where: str) -> dict[str, str]:
    """Labels given as an object or as a list of {"key", "value"} (the CNI
    conventions' `args.cni.labels` spelling)."""
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return check_labels(raw, where)
    if not isinstance(raw, list):
        raise EndpointError(f"{where}: not an object or a list of {{key, value}}")
    found: dict[str, str] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping) or set(item) != {"key", "value"}:
            raise EndpointError(f"{where}[{index}]: {show(item)} is not {{key, value}}")
        key, value = item["key"], item["value"]
        problem = label_key_problem(key) or label_value_problem(value)
        if problem:
            raise EndpointError(f"{where}[{index}]: {problem}")
        if found.get(key, value) != value:
            raise EndpointError(f"{where}[{index}]: {key} is given twice, with different values")
        found[key] = value
    return found


def labels_from_cni(config: Mapping[str, Any] | None, cni_args: str | None) -> dict[str, str]:
    """An endpoint's labels from a CNI ADD: `config` is the network config
    the runtime passed on stdin, `cni_args` the CNI_ARGS variable.

    Sources, later ones winning for the same key:
      1. config `args.labels` and `args.cni.labels` (the CNI conventions'
         spelling): an object or a list of {"key", "value"};
      2. config `runtimeConfig.labels` (a runtime fills it in when the
         plugin's conflist declares the capability "labels": true);
      3. CNI_ARGS (`K=V;K=V`): K8S_POD_NAMESPACE as the label
         k8s.pod.namespace, and K8S_POD_NAME as k8s.pod.name when it is a
         valid label value (pod names may be up to 253 characters, label
         values 63: a longer name is left out rather than failing the
         pod);
      4. CNI_ARGS `OVERLAYD_LABEL_<key>=<value>`, the label <key>=<value>.
    Every other CNI_ARGS key (IgnoreUnknown, K8S_POD_INFRA_CONTAINER_ID, IP,
    ...) is an argument, not a label, and is ignored.
    A bad label raises EndpointError naming it and where it came from."""
    found: dict[str, str] = {}
    if config is not None:
        args = config.get("args")
        if isinstance(args, Mapping):
            found.update(_labels_from(args.get("labels"), "args.labels"))
            cni = args.get("cni")
            if isinstance(cni, Mapping):
                found.update(_labels_from(cni.get("labels"), "args.cni.labels"))
        runtime = config.get("runtimeConfig")
        if isinstance(runtime, Mapping):
            found.update(_labels_from(runtime.get("labels"), "runtimeConfig.labels"))
    chosen: dict[str, str] = {}
    for part in (cni_args or "").split(";"):
        name, equals, value = part.partition("=")
        name = name.strip()
        label = CNI_ARGS_LABELS.get(name)
        if label is not None and equals:
            problem = label_value_problem(value)
            if problem is None:
                found[label] = value
            elif label != "k8s.pod.name":
                raise EndpointError(f"CNI_ARGS {name}: {problem}")
        elif name.startswith(CNI_ARGS_LABEL_PREFIX):
            key = name[len(CNI_ARGS_LABEL_PREFIX) :]
            problem = (
                "no value (write OVERLAYD_LABEL_<key>=<value>)"
                if not equals
                else label_key_problem(key) or label_value_problem(value)
            )
            if problem:
                raise EndpointError(f"CNI_ARGS {show(name)}: {problem}")
            chosen[key] = value
    found.update(chosen)
    return found


def without_label_args(cni_args: str) -> str:
    """CNI_ARGS without the OVERLAYD_LABEL_ keys, for the plugins overlay-cni
    delegates to: the standard plugins refuse keys they do not know unless
    the runtime also passed IgnoreUnknown=1."""
    return ";".join(
        part for part in cni_args.split(";") if not part.strip().startswith(CNI_ARGS_LABEL_PREFIX)
    )
