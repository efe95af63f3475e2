"""Service definitions in, validated `Service` values out (plan/service_model.py),
their canonical form and etcd keys, and which stored services every host
uses: the pure core that `overlayctl service` and the daemons share.

Definitions come in two shapes, as JSON or YAML (read as policies are read:
plan/policy.load_document, no aliases, no duplicate keys, at most 1 MiB):

  ours:
      name: web
      selector: {matchLabels: {app: web}}     # a label selector, as in policies
      ports:
      - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}
      sessionAffinity: ClientIP               # or None (the default)
      sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
      externalTrafficPolicy: Local            # or Cluster; only with node ports
      vip: 10.96.0.10                         # or vips: [10.96.0.10, fd00:96::10]

  Kubernetes (a v1 Service):
      apiVersion: v1
      kind: Service
      metadata: {name: web}
      spec:
        type: NodePort                        # ClusterIP (default) or NodePort
        selector: {app: web}                  # plain labels, ANDed
        ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
        clusterIP: 10.96.0.10                 # or clusterIPs; "" or absent: allocated
        sessionAffinity: ClientIP
        sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
        externalTrafficPolicy: Local

with Kubernetes' semantics and defaults: protocol TCP, targetPort the
port, sessionAffinity None, ClientIP's timeout 10800 s, externalTrafficPolicy
Cluster. `ipFamilies`, `ipFamilyPolicy` and `internalTrafficPolicy: Cluster`
(what `kubectl get -o yaml` prints) are accepted and have no effect: a
service gets one VIP per service network the cluster config has
(`ServiceNetwork`, `IPv6ServiceNetwork`). VIPs left out are allocated when
the service is created (store/services.py), never changed after.

Refused, each with the path of the field at fault leading the message:
- a name that is not a DNS-1035 label (it becomes a DNS name: lower-case
  alphanumerics and '-', starting with a letter, at most 63 characters);
- a missing or empty selector (overlayd has no hand-written Endpoints: a
  service without one could never have a backend), bad label keys/values;
- no ports, more than MAX_SERVICE_PORTS (creating the service is one etcd
  transaction, which holds 128 operations), a port or targetPort that is
  not 1-65535 (named target ports included: there are no pod specs to
  resolve them in), an unknown protocol, a nodePort outside 30000-32767;
- two ports with the same (protocol, port), or the same (protocol,
  nodePort); port names that are not DNS-1123 labels or repeat; an
  unnamed port beside another port (SRV records need names);
- sessionAffinity other than None or ClientIP; sessionAffinityConfig
  without ClientIP, or a timeoutSeconds outside 1-86400;
- externalTrafficPolicy other than Cluster or Local, or given without node
  ports; Kubernetes' type LoadBalancer and ExternalName, a headless service
  (clusterIP None), type NodePort with a port without nodePort (overlayd
  does not pick node ports), a nodePort without type NodePort;
- a VIP that is not an address, not inside the service network of its
  family (or the config has none for it), is that network's first or last
  address, or two VIPs of one family;
- unknown fields (metadata's informational ones, and a Kubernetes
  document's `status`, are ignored), namespaces.

The canonical form (`render_service`) is our shape as JSON with sorted keys
and the VIPs spelled out; etcd holds it under `<own>/services/<name>`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

from overlayd.errors import PolicyError, ServiceError
from overlayd.model import IPAddress, IPNetwork
from overlayd.plan.policy import (
    MAX_POLICY_BYTES,
    as_list,
    as_object,
    check_known,
    document_name,
    fail,
    join_path,
    kind_of,
    label_key_problem,
    label_value_problem,
    load_document,
    name_problem,
    parse_selector,
    port_number,
    render_selector,
    show,
)
from overlayd.plan.policy_model import LabelSelector, Protocol
from overlayd.plan.service_model import (
    AFFINITY_SECONDS_DEFAULT,
    NODE_PORT_FIRST,
    NODE_PORT_LAST,
    Affinity,
    Service,
    ServicePort,
    TrafficPolicy,
)

MAX_SERVICE_PORTS = 100
AFFINITY_SECONDS_MAX = 86400
KUBERNETES_API_VERSION = "v1"

_PROTOCOLS = {protocol.value: protocol for protocol in Protocol}
_AFFINITIES = {affinity.value: affinity for affinity in Affinity}
_TRAFFIC_POLICIES = {policy.value: policy for policy in TrafficPolicy}

NO_SERVICE_NETWORK = (
    'the network config has no ServiceNetwork: add one (e.g. "ServiceNetwork":'
    ' "10.96.0.0/16", apart from Network) with `overlayctl network set`'
)


# --- the parts both shapes share ------------------------------------------------


def service_name_problem(name: object) -> str | None:
    """None for a valid service name: a DNS-1035 label (a DNS-1123 label
    that starts with a letter, as Kubernetes requires of service names)."""
    problem = name_problem(name)
    if problem:
        return problem
    assert isinstance(name, str)
    if not name[0].isalpha():
        return f"{show(name)} must start with a letter (it becomes a DNS name)"
    return None


def _service_name(raw: object, path: str, given: str | None) -> str:
    return document_name(
        raw, path, given, kind="service", verb="stored", problem_of=service_name_problem
    )


def _nonempty_selector(selector: LabelSelector, path: str) -> LabelSelector:
    if not selector.match_labels and not selector.match_expressions:
        fail(
            path,
            "selects nothing: a service needs labels to select its endpoints (overlayd"
            " has no hand-written Endpoints)",
        )
    return selector


def _plain_labels(raw: object, path: str) -> LabelSelector:
    """Kubernetes' spec.selector: a map of labels, all of which must match."""
    labels = as_object(raw, path)
    if labels.keys() & {"matchLabels", "matchExpressions"}:
        fail(path, "a Kubernetes Service's selector is a plain map of labels ({app: web})")
    for key, value in labels.items():
        problem = label_key_problem(key) or label_value_problem(value)
        if problem:
            fail(path, problem)
    return _nonempty_selector(LabelSelector(tuple(sorted(labels.items()))), path)


def _port(raw: object, path: str, node_ports_allowed: bool | None) -> ServicePort:
    """One ports entry; node_ports_allowed None: our shape (a nodePort is
    fine anywhere), False: type ClusterIP, True: type NodePort."""
    obj = as_object(raw, path)
    check_known(obj, path, ("name", "nodePort", "port", "protocol", "targetPort"))
    name_raw = obj.get("name")
    name = ""
    if name_raw is not None and name_raw != "":
        problem = name_problem(name_raw)
        if problem:
            fail(join_path(path, "name"), problem)
        name = str(name_raw)
    protocol_raw = obj.get("protocol")
    protocol = Protocol.TCP
    if protocol_raw is not None:
        found = _PROTOCOLS.get(protocol_raw) if isinstance(protocol_raw, str) else None
        if found is None:
            fail(join_path(path, "protocol"), f"{show(protocol_raw)} is not TCP, UDP or SCTP")
        protocol = found
    if obj.get("port") is None:
        fail(join_path(path, "port"), "required")
    port = port_number(obj["port"], join_path(path, "port"))
    target_raw = obj.get("targetPort")
    target = port if target_raw is None else port_number(target_raw, join_path(path, "targetPort"))
    node_raw = obj.get("nodePort")
    node_port: int | None = None
    node_path = join_path(path, "nodePort")
    if node_raw is not None and node_raw != 0:  # kubectl prints no 0, but 0 means "none"
        if node_ports_allowed is False:
            fail(node_path, "a nodePort needs spec.type NodePort")
        if isinstance(node_raw, bool) or not isinstance(node_raw, int):
            fail(node_path, f"{show(node_raw)} is {kind_of(node_raw)}, not a port number")
        if not NODE_PORT_FIRST <= node_raw <= NODE_PORT_LAST:
            fail(
                node_path,
                f"{node_raw} is outside the node port range {NODE_PORT_FIRST}-{NODE_PORT_LAST}",
            )
        node_port = node_raw
    elif node_ports_allowed is True:
        fail(node_path, "required with type NodePort (overlayd does not pick node ports)")
    return ServicePort(name, protocol, port, target, node_port)


def _ports(raw: object, path: str, node_ports_allowed: bool | None) -> tuple[ServicePort, ...]:
    if raw is None:
        fail(path, "required: at least one port")
    items = as_list(raw, path, MAX_SERVICE_PORTS)
    if not items:
        fail(path, "required: at least one port")
    ports = [_port(item, f"{path}[{i}]", node_ports_allowed) for i, item in enumerate(items)]
    seen_ports: dict[tuple[Protocol, int], int] = {}
    seen_nodes: dict[tuple[Protocol, int], int] = {}
    seen_names: dict[str, int] = {}
    for index, port in enumerate(ports):
        here = f"{path}[{index}]"
        if len(ports) > 1 and not port.name:
            fail(join_path(here, "name"), "required when a service has more than one port")
        if port.name in seen_names:
            fail(
                join_path(here, "name"),
                f"{show(port.name)} is also {path}[{seen_names[port.name]}]'s name",
            )
        seen_names[port.name] = index
        key = (port.protocol, port.port)
        if key in seen_ports:
            fail(
                join_path(here, "port"),
                f"{port.port}/{port.protocol.value} is also {path}[{seen_ports[key]}]",
            )
        seen_ports[key] = index
        if port.node_port is not None:
            node_key = (port.protocol, port.node_port)
            if node_key in seen_nodes:
                fail(
                    join_path(here, "nodePort"),
                    f"{port.node_port}/{port.protocol.value} is also"
                    f" {path}[{seen_nodes[node_key]}]'s nodePort",
                )
            seen_nodes[node_key] = index
    return tuple(ports)


def _affinity(obj: Mapping[str, Any], path: str) -> tuple[Affinity, int]:
    affinity_path = join_path(path, "sessionAffinity")
    raw = obj.get("sessionAffinity")
    affinity = Affinity.NONE
    if raw is not None:
        found = _AFFINITIES.get(raw) if isinstance(raw, str) else None
        if found is None:
            fail(affinity_path, f"{show(raw)} is not None or ClientIP")
        affinity = found
    config_path = join_path(path, "sessionAffinityConfig")
    config_raw = obj.get("sessionAffinityConfig")
    if config_raw is None:
        return affinity, AFFINITY_SECONDS_DEFAULT
    if affinity is not Affinity.CLIENT_IP:
        fail(config_path, "only with sessionAffinity ClientIP")
    config = as_object(config_raw, config_path)
    check_known(config, config_path, ("clientIP",))
    client_path = join_path(config_path, "clientIP")
    client = as_object(config.get("clientIP") or {}, client_path)
    check_known(client, client_path, ("timeoutSeconds",))
    seconds_path = join_path(client_path, "timeoutSeconds")
    seconds = client.get("timeoutSeconds")
    if seconds is None:
        return affinity, AFFINITY_SECONDS_DEFAULT
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        fail(seconds_path, f"{show(seconds)} is {kind_of(seconds)}, not a number of seconds")
    if not 1 <= seconds <= AFFINITY_SECONDS_MAX:
        fail(seconds_path, f"{seconds} is not between 1 and {AFFINITY_SECONDS_MAX}")
    return affinity, seconds


def _traffic_policy(
    obj: Mapping[str, Any], path: str, ports: Sequence[ServicePort]
) -> TrafficPolicy:
    field_path = join_path(path, "externalTrafficPolicy")
    raw = obj.get("externalTrafficPolicy")
    if raw is None:
        return TrafficPolicy.CLUSTER
    found = _TRAFFIC_POLICIES.get(raw) if isinstance(raw, str) else None
    if found is None:
        fail(field_path, f"{show(raw)} is not Cluster or Local")
    if not any(port.node_port is not None for port in ports):
        fail(field_path, "applies to node ports only, and no port has a nodePort")
    return found


def _vip(raw: object, path: str, networks: Sequence[IPNetwork]) -> IPAddress:
    if not isinstance(raw, str):
        fail(path, f"{show(raw)} is {kind_of(raw)}, not an address string")
    try:
        address = ip_address(raw)
    except ValueError:
        fail(path, f"{show(raw)} is not an IP address")
    problem = vip_problem(address, networks)
    if problem:
        fail(path, problem)
    return address


def vip_problem(address: IPAddress, networks: Sequence[IPNetwork]) -> str | None:
    """None when `address` may be a VIP: inside the service network of its
    family, and neither that network's first nor its last address."""
    network = next((n for n in networks if n.version == address.version), None)
    if network is None:
        field = "ServiceNetwork" if address.version == 4 else "IPv6ServiceNetwork"
        return f"{address} is IPv{address.version}, and the network config has no {field}"
    if address not in network:
        return f"{address} is outside the service network {network}"
    if address in (network.network_address, network.broadcast_address):
        which = "first" if address == network.network_address else "last"
        return f"{address} is the {which} address of the service network {network}"
    return None


def route_clashes(
    service_networks: Sequence[IPNetwork], routes: Sequence[IPNetwork]
) -> list[tuple[IPNetwork, IPNetwork]]:
    """(service network, host route) pairs that overlap; a default route
    overlaps everything and is left out. A VIP's service ports are
    translated before routing, so a clash breaks no service: it hides,
    at those ports, the hosts down that route whose addresses are VIPs."""
    return [
        (network, route)
        for network in service_networks
        for route in routes
        if route.version == network.version and route.prefixlen > 0 and route.overlaps(network)
    ]


def _vips(
    single: object,
    many: object,
    paths: tuple[str, str],
    networks: Sequence[IPNetwork],
    *,
    repeated: bool,
) -> tuple[IPAddress, ...]:
    """The VIPs a document gives: `single` (vip, clusterIP) and `many`
    (vips, clusterIPs). With `repeated` (Kubernetes), many[0] repeats
    single when both are given; otherwise they exclude each other."""
    single_path, many_path = paths
    items = list(as_list(many, many_path, 2))
    found: list[tuple[IPAddress, str]] = []
    if single is not None and single != "":
        address = _vip(single, single_path, networks)
        if items and not repeated:
            fail(many_path, f"{single_path.rsplit('.', 1)[-1]} and vips exclude each other")
        if items:
            if _vip(items[0], f"{many_path}[0]", networks) != address:
                fail(f"{many_path}[0]", f"must be {single_path}, {address}")
            items = items[1:]
            found.append((address, f"{many_path}[0]"))
        else:
            found.append((address, single_path))
    start = len(found)
    for index, item in enumerate(items, start=start):
        item_path = f"{many_path}[{index}]"
        found.append((_vip(item, item_path, networks), item_path))
    for index, (address, path) in enumerate(found):
        for other, _ in found[:index]:
            if other.version == address.version:
                fail(path, f"a second IPv{address.version} VIP ({other} is one)")
    return tuple(sorted((a for a, _ in found), key=lambda a: a.version))


# --- the two shapes ------------------------------------------------------------------

_OUR_FIELDS = (
    "externalTrafficPolicy",
    "name",
    "ports",
    "selector",
    "sessionAffinity",
    "sessionAffinityConfig",
    "vip",
    "vips",
)
_KUBERNETES_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
_SPEC_FIELDS = (
    "clusterIP",
    "clusterIPs",
    "externalTrafficPolicy",
    "internalTrafficPolicy",
    "ipFamilies",
    "ipFamilyPolicy",
    "ports",
    "selector",
    "sessionAffinity",
    "sessionAffinityConfig",
    "type",
)
# metadata that says nothing about what the service does (what `kubectl get
# -o yaml` prints); a namespace would, and is refused.
_METADATA_FIELDS = (
    "annotations",
    "creationTimestamp",
    "generation",
    "labels",
    "managedFields",
    "name",
    "namespace",
    "resourceVersion",
    "selfLink",
    "uid",
)


def _ours(root: Mapping[str, Any], name: str | None, networks: Sequence[IPNetwork]) -> Service:
    hint = " (or write a Kubernetes Service)" if "spec" in root else ""
    check_known(root, "", _OUR_FIELDS, hint)
    service_name = _service_name(root.get("name"), "name", name)
    if root.get("selector") is None:
        fail("selector", "required: the labels of the endpoints behind the service")
    selector = _nonempty_selector(parse_selector(root["selector"], "selector"), "selector")
    ports = _ports(root.get("ports"), "ports", None)
    affinity, seconds = _affinity(root, "")
    traffic = _traffic_policy(root, "", ports)
    vips = _vips(root.get("vip"), root.get("vips"), ("vip", "vips"), networks, repeated=False)
    return Service(service_name, selector, ports, vips, affinity, seconds, traffic)


def _kubernetes(
    root: Mapping[str, Any], name: str | None, networks: Sequence[IPNetwork]
) -> Service:
    check_known(root, "", _KUBERNETES_FIELDS)
    kind = root.get("kind")
    if kind != "Service":
        fail("kind", "required: Service" if kind is None else f"{show(kind)} is not Service")
    api = root.get("apiVersion")
    if api != KUBERNETES_API_VERSION:
        given = "required" if api is None else f"{show(api)} is not supported"
        fail("apiVersion", f"{given}: {KUBERNETES_API_VERSION}")
    metadata = as_object(root.get("metadata") or {}, "metadata")
    check_known(metadata, "metadata", _METADATA_FIELDS)
    if metadata.get("namespace") is not None:
        fail(
            "metadata.namespace",
            "overlayd has no namespaces: a service's name is unique in the cluster",
        )
    service_name = _service_name(metadata.get("name"), "metadata.name", name)
    if root.get("spec") is None:
        fail("spec", "required")
    spec = as_object(root["spec"], "spec")
    check_known(spec, "spec", _SPEC_FIELDS)
    kind_raw = spec.get("type", "ClusterIP")
    if kind_raw not in ("ClusterIP", "NodePort"):
        fail("spec.type", f"{show(kind_raw)} is not supported (ClusterIP or NodePort)")
    internal = spec.get("internalTrafficPolicy")
    if internal is not None and internal != "Cluster":
        fail("spec.internalTrafficPolicy", f"{show(internal)} is not supported (Cluster)")
    families_path = "spec.ipFamilies"
    for index, family in enumerate(as_list(spec.get("ipFamilies"), families_path, 2)):
        if family not in ("IPv4", "IPv6"):
            fail(f"{families_path}[{index}]", f"{show(family)} is not IPv4 or IPv6")
    policy = spec.get("ipFamilyPolicy")
    if policy is not None and policy not in ("SingleStack", "PreferDualStack", "RequireDualStack"):
        fail("spec.ipFamilyPolicy", f"{show(policy)} is not a family policy")
    if spec.get("selector") is None:
        fail("spec.selector", "required: the labels of the endpoints behind the service")
    selector = _plain_labels(spec["selector"], "spec.selector")
    ports = _ports(spec.get("ports"), "spec.ports", kind_raw == "NodePort")
    affinity, seconds = _affinity(spec, "spec")
    traffic = _traffic_policy(spec, "spec", ports)
    if spec.get("clusterIP") == "None":
        fail("spec.clusterIP", "headless services (None) are not supported")
    vips = _vips(
        spec.get("clusterIP"),
        spec.get("clusterIPs"),
        ("spec.clusterIP", "spec.clusterIPs"),
        networks,
        repeated=True,
    )
    return Service(service_name, selector, ports, vips, affinity, seconds, traffic)


def parse_service(
    document: str | bytes | bytearray | Mapping[str, Any],
    *,
    service_networks: Sequence[IPNetwork],
    name: str | None = None,
) -> Service:
    """Validate a service definition (JSON or YAML text, or its data) of
    either shape against the cluster's service networks; `name` fills in
    or must equal the document's name. The VIPs are the ones the document
    gives (none when they are to be allocated). Raises ServiceError naming
    the field at fault (ServiceNetwork when the config has none)."""
    if not service_networks:
        raise ServiceError("ServiceNetwork", NO_SERVICE_NETWORK)
    try:
        raw = load_document(document) if isinstance(document, str | bytes | bytearray) else document
        root = as_object(raw, "document")
        if root.keys() & {"apiVersion", "kind", "metadata", "spec"}:
            return _kubernetes(root, name, service_networks)
        return _ours(root, name, service_networks)
    except PolicyError as exc:  # the shared helpers' refusals, as a service's
        raise ServiceError(exc.field, exc.reason) from None


# --- rendering -----------------------------------------------------------------------


def render_service(service: Service) -> str:
    """The canonical document (our shape, JSON with sorted keys, defaults
    spelled out, the VIPs listed) that etcd holds: `parse_service` gives
    the same Service back. ServiceError when it would be larger than the
    documents read (1 MiB), so that it is refused before anything is
    written."""
    ports: list[dict[str, Any]] = []
    for port in service.ports:
        item: dict[str, Any] = {
            "protocol": port.protocol.value,
            "port": port.port,
            "targetPort": port.target_port,
        }
        if port.name:
            item["name"] = port.name
        if port.node_port is not None:
            item["nodePort"] = port.node_port
        ports.append(item)
    document: dict[str, Any] = {
        "name": service.name,
        "selector": render_selector(service.selector),
        "ports": ports,
        "vips": [str(vip) for vip in service.vips],
        "sessionAffinity": service.affinity.value,
    }
    if service.affinity is Affinity.CLIENT_IP:
        document["sessionAffinityConfig"] = {
            "clientIP": {"timeoutSeconds": service.affinity_seconds}
        }
    if any(port.node_port is not None for port in service.ports):
        document["externalTrafficPolicy"] = service.traffic_policy.value
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    if len(text) > MAX_POLICY_BYTES:
        raise ServiceError(
            "document", f"its canonical form is {len(text)} bytes, more than {MAX_POLICY_BYTES}"
        )
    return text


# --- keys ------------------------------------------------------------------------------


def services_prefix(own_prefix: str) -> str:
    return f"{own_prefix.rstrip('/')}/services/"


def service_key(own_prefix: str, name: str) -> str:
    return services_prefix(own_prefix) + name


def vips_prefix(own_prefix: str) -> str:
    return f"{own_prefix.rstrip('/')}/vips/"


def vip_key(own_prefix: str, address: IPAddress) -> str:
    """`<own>/vips/<ip>`: its value is the name of the service holding it."""
    return vips_prefix(own_prefix) + str(address)


def node_ports_prefix(own_prefix: str) -> str:
    return f"{own_prefix.rstrip('/')}/nodeports/"


def node_port_key(own_prefix: str, protocol: Protocol, port: int) -> str:
    """`<own>/nodeports/<tcp|udp|sctp>/<port>`: its value is the name of the
    service holding it."""
    return f"{node_ports_prefix(own_prefix)}{protocol.value.lower()}/{port}"


def claim_keys(own_prefix: str, service: Service) -> list[str]:
    """The keys a service claims besides its own: one per VIP and node port."""
    keys = [vip_key(own_prefix, vip) for vip in service.vips]
    keys += [
        node_port_key(own_prefix, p.protocol, p.node_port)
        for p in service.ports
        if p.node_port is not None
    ]
    return keys


def parse_service_key(key: str, own_prefix: str) -> str:
    """The service name a key under services_prefix names; ServiceError
    for anything else."""
    prefix = services_prefix(own_prefix)
    if not key.startswith(prefix):
        raise ServiceError("key", f"{show(key)} is not under {prefix}")
    name = key[len(prefix) :]
    problem = service_name_problem(name)
    if problem:
        raise ServiceError("key", f"{show(key)}: the name {problem}")
    return name


# --- what the hosts use ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Stored:
    """One stored value parsed: the service as served (or why it is not
    used), and what of it is not served (VIPs of a family the network
    config has no service network for), None when all of it is."""

    service: Service | str
    unserved: str | None = None


# key -> (value, what it parsed to): each value parsed once.
ServiceCache = dict[str, tuple[bytes, _Stored]]

# Stand-ins for a family the config has no service network for, so that a
# stored VIP of it parses (and is then left out, not refused).
_ANY_NETWORK: Mapping[int, IPNetwork] = {4: IPv4Network("0.0.0.0/0"), 6: IPv6Network("::/0")}


@dataclass(frozen=True, slots=True)
class StoredServices:
    """The services every host uses, by name (sorted), and for every other
    key under services_prefix why not (one warning each); `unserved`: the
    services used without some of their VIPs, and which (a warning each)."""

    services: dict[str, Service]
    rejected: dict[str, str]
    unserved: dict[str, str]


def _parse_stored(
    value: bytes, key: str, own_prefix: str, networks: Sequence[IPNetwork]
) -> _Stored:
    """A stored service, served with the VIPs of the families the network
    config has a service network for. A VIP of another family (the config
    lost its IPv6ServiceNetwork, or EnableIPv6, after the service was made)
    is left out, with a note, rather than refusing the service: its other
    VIPs serve on, and the left-out one serves again once the family is
    back (its vips/ claim stays). A service left with no VIP is refused,
    as a VIP outside its family's service network still is."""
    try:
        name = parse_service_key(key, own_prefix)
        served = {n.version for n in networks}
        # The networks of the config come first: a VIP of a served family is
        # checked against its real network (vip_problem takes the first).
        lenient = [*networks, *(_ANY_NETWORK[v] for v in (4, 6) if networks and v not in served)]
        service = parse_service(value, service_networks=lenient, name=name)
        left_out = [v for v in service.vips if v.version not in served]
        if left_out and len(left_out) == len(service.vips):
            # Nothing left to serve: refused, as parse_service refuses it.
            service = parse_service(value, service_networks=networks, name=name)
        elif left_out:
            kept = tuple(v for v in service.vips if v.version in served)
            note = "; ".join(vip_problem(v, networks) or str(v) for v in left_out)
            return _Stored(replace(service, vips=kept), note)
    except ServiceError as exc:
        return _Stored(str(exc))
    if not service.vips:
        return _Stored("vips: none (a stored service has the VIPs it was given at creation)")
    return _Stored(service)


def stored_services(
    items: Mapping[str, bytes],
    own_prefix: str,
    service_networks: Sequence[IPNetwork],
    cache: ServiceCache | None = None,
) -> StoredServices:
    """The usable services among the keys under services_prefix (others are
    ignored). Skipped, each with its reason, never raising: a value that
    does not parse (a VIP outside the service networks among them; a VIP
    of a family the config has no service network for is only left out,
    in `unserved`, while another VIP is left: see _parse_stored), and a
    service that claims a VIP or a (protocol, node port) an earlier one
    claims, in name order, so every host makes the same choice whatever
    order it learnt the keys in. With a `cache` kept across calls (the
    daemon's), an unchanged value is not parsed again; the claims are
    settled on every call, in O(services)."""
    prefix = services_prefix(own_prefix)
    usable: dict[str, Service] = {}
    rejected: dict[str, str] = {}
    unserved: dict[str, str] = {}
    vips: dict[IPAddress, str] = {}
    node_ports: dict[tuple[Protocol, int], str] = {}
    for key in sorted(items):
        if not key.startswith(prefix):
            continue
        value = items[key]
        hit = cache.get(key) if cache is not None else None
        if hit is None or hit[0] != value:
            hit = (value, _parse_stored(value, key, own_prefix, service_networks))
            if cache is not None:
                cache[key] = hit
        found = hit[1].service
        if isinstance(found, str):
            rejected[key] = found
            continue
        clash = next(
            (f"VIP {vip} is {vips[vip]}'s" for vip in found.vips if vip in vips), None
        ) or next(
            (
                f"nodePort {p.node_port}/{p.protocol.value} is"
                f" {node_ports[(p.protocol, p.node_port)]}'s"
                for p in found.ports
                if p.node_port is not None and (p.protocol, p.node_port) in node_ports
            ),
            None,
        )
        if clash is not None:
            rejected[key] = f"{clash} (the first service by name keeps it)"
            continue
        usable[found.name] = found
        if hit[1].unserved is not None:
            unserved[key] = hit[1].unserved
        for vip in found.vips:
            vips[vip] = found.name
        for p in found.ports:
            if p.node_port is not None:
                node_ports[(p.protocol, p.node_port)] = found.name
    if cache is not None and len(cache) > len(items):
        for gone in [k for k in cache if k not in items]:
            del cache[gone]
    return StoredServices(usable, rejected, unserved)
