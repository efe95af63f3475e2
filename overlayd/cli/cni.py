"""`overlay-cni`: a CNI plugin that attaches a container to overlayd's
network the way the host's egress mode needs.

It does what flannel's CNI plugin does: read the subnet file that overlayd
writes and delegate to the standard `bridge` plugin with `host-local` IPAM
(containernetworking-plugins), once per interface:

    eth0 on the overlay bridge (ovl0), an address from the leased subnet;
         the default route in masquerade/none mode, the cluster route in
         gwbridge mode
    eth1 on the gwbridge (gwbridge mode only), an address from the gwbridge
         subnet and the default route, as Docker attaches overlay containers

In a dual-stack network (the subnet file has FLANNEL_IPV6_SUBNET and
FLANNEL_IPV6_NETWORK) every interface gets an address of each family from
one host-local call (one range set per family), and a route of each
family: the default routes `0.0.0.0/0` and `::/0`, or in gwbridge mode
both cluster networks on eth0 and both default routes on eth1 (its IPv6
address from OVERLAYD_GWBRIDGE_SUBNET6; without that variable the
container has no IPv6 way out, only the cluster route). Without the IPv6
variables the delegates are exactly the IPv4-only ones.

Veths, addresses, routes and address bookkeeping are the standard plugins'
work; this program only decides what to ask them for, merges their results,
and remembers what it asked so that DEL and CHECK hit the same delegates
even if the subnet file changed since. The bridge plugin also keeps
duplicate address detection off in the container (`enabledad` false, see
`delegate_configs`), so an IPv6 address is usable the moment ADD returns,
and puts the container's port on the overlay bridge in hairpin mode
(`hairpinMode`), so that a container reaching its own service through a
VIP lands on itself (plan/service_rules.py).

Addresses on the overlay come from one half of the host's subnet, in each
family (plan/ipam.container_ranges: IPv4's lower half after the gateway,
IPv6's upper half); the other half is Docker's own IPAM's
(`overlayctl docker-opts`), so that Docker and host-local never hand out
the same address on one host. overlayd's Docker plugin allocates from this
plugin's host-local store, so it shares host-local's half safely.

Network config keys (besides cniVersion, name, type):
    subnetFile    default /run/flannel/subnet.env
    dataDir       default /var/lib/cni/overlay (delegate records, host-local state)
    egressIfName  default eth1 (the second interface in gwbridge mode)
    wholeSubnet   default false; true gives host-local the whole subnet, for
                  a host where Docker's own IPAM (docker-opts) never runs
    dns           passed into the result as it is (CNI's DNS type:
                  nameservers, domain, search, options); runtimes such as
                  Podman write the container's resolv.conf from it.
                  Without it, the result's dns names overlayd's own DNS
                  responder when the subnet file does (OVERLAYD_DNS and
                  OVERLAYD_DNS_DOMAIN: services configured), see
                  `subnet_file_dns`
    controlSocket default /run/overlayd/overlayd.sock: the daemon's control
                  socket, where containers are registered (below)
    registerEndpoint  default true; false attaches containers without
                  registering them: policies then cannot select them (no
                  policy applies to them in either direction, and a
                  `from`/`to` selector never matches them, only ipBlocks)

Endpoints (network policy). Once the delegates have attached the container,
ADD registers it with the daemon over the control socket (`endpoint_add`):
its id (CNI_CONTAINERID), its name (K8S_POD_NAME from CNI_ARGS, which
Podman and Kubernetes runtimes pass, else the id's first 12 characters),
every address of the overlay interface, and in gwbridge mode every
address of the gwbridge interface (egress policy judges the container's
traffic to the outside world by them, since it leaves from there), both
interfaces' MACs (which name the container in IPv6 link-local traffic on
either bridge), and its labels
(plan/endpoints.labels_from_cni: `args.labels`, `runtimeConfig.labels`,
K8S_POD_NAMESPACE and `OVERLAYD_LABEL_<key>=<value>` in CNI_ARGS). The
daemon answers once the endpoint is in force on this host. A container
never runs outside the policies that select it, so when the daemon cannot
be reached or refuses, ADD fails and the delegates' work is undone (DEL).
Bad labels are refused before anything is made. DEL unregisters the
container first, best effort: a daemon that is down never fails a DEL
(the registration goes with the host's etcd lease, or when the daemon
next sees the container deleted); it says so on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Interface, IPv6Network, ip_address, ip_interface
from pathlib import Path
from typing import Any

from overlayd.config import DEFAULT_CONTROL_SOCKET
from overlayd.errors import EndpointError
from overlayd.model import IPV4, IPV6, Family
from overlayd.nsexec import call_plugin
from overlayd.plan.endpoints import labels_from_cni, without_label_args
from overlayd.plan.ipam import HOST_LOCAL_STORE, container_ranges
from overlayd.surfaces.control import DaemonRefused, DaemonUnreachable, ask
from overlayd.surfaces.subnetfile import read_dns, read_service_networks, read_variables

SUPPORTED_VERSIONS = ["0.4.0", "1.0.0"]
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/overlay"
DEFAULT_PLUGIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni")

# CNI error codes (SPEC.md): 4 invalid network config, 7 invalid environment
# variables, 11 try again later, 999 plugin-specific.
ERR_CONFIG = 4
ERR_ENV = 7
ERR_TRY_LATER = 11
ERR_PLUGIN = 999


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


@dataclass(frozen=True)
class Invocation:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: str
    path: list[str]

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Invocation:
        command = env.get("CNI_COMMAND", "")
        needed = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")}.get(
            command, ("CNI_CONTAINERID", "CNI_IFNAME")
        )
        for name in needed:
            if not env.get(name):
                raise CniError(ERR_ENV, f"{name} is not set")
        return cls(
            command=command,
            container_id=env.get("CNI_CONTAINERID", ""),
            netns=env.get("CNI_NETNS", ""),
            ifname=env.get("CNI_IFNAME", ""),
            args=env.get("CNI_ARGS", ""),
            path=[p for p in env.get("CNI_PATH", "").split(":") if p],
        )


def find_plugin(name: str, path: list[str]) -> str:
    for directory in [*path, *DEFAULT_PLUGIN_DIRS]:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise CniError(
        ERR_PLUGIN,
        f"the {name!r} CNI plugin was not found in CNI_PATH or {', '.join(DEFAULT_PLUGIN_DIRS)}",
        "install containernetworking-plugins",
    )


@dataclass(frozen=True)
class Stack:
    """What the subnet file says about one address family: the bridge's
    gateway (address/prefix of the host's subnet) and the cluster network."""

    family: Family
    gateway: IPv4Interface | IPv6Interface
    cluster: str | None


def _ipv6_stack(found: dict[str, str], subnet_file: Path) -> Stack | None:
    """The IPv6 half of a dual-stack subnet file, None in an IPv4-only one.
    flannel writes FLANNEL_IPV6_SUBNET (gateway/len) and FLANNEL_IPV6_NETWORK
    together; one without the other is a damaged file, not IPv4-only."""
    present = [name for name in ("FLANNEL_IPV6_SUBNET", "FLANNEL_IPV6_NETWORK") if name in found]
    if not present:
        return None
    if len(present) == 1:
        raise CniError(
            ERR_CONFIG,
            f"{subnet_file} has {present[0]} but not the other of FLANNEL_IPV6_SUBNET"
            " and FLANNEL_IPV6_NETWORK",
        )
    try:
        gateway = IPv6Interface(found["FLANNEL_IPV6_SUBNET"])
        cluster = IPv6Network(found["FLANNEL_IPV6_NETWORK"])
    except ValueError as exc:
        raise CniError(ERR_CONFIG, f"{subnet_file}: bad FLANNEL_IPV6_*: {exc}") from exc
    return Stack(IPV6, gateway, str(cluster))


def _address_range(stack: Stack, whole_subnet: bool) -> dict[str, str]:
    """host-local's range for one family: its half of the subnet
    (plan/ipam.container_ranges), or all of it."""
    found = {"subnet": str(stack.gateway.network), "gateway": str(stack.gateway.ip)}
    if whole_subnet:
        return found
    try:
        shared = container_ranges(stack.gateway.network)
    except ValueError as exc:
        raise CniError(ERR_CONFIG, f"{exc}; set wholeSubnet to true") from exc
    return found | {
        "rangeStart": str(shared.host_local_start),
        "rangeEnd": str(shared.host_local_end),
    }


def _route(stack: Stack, dst: str) -> dict[str, str]:
    # The gateway spelled out: the bridge plugin's CHECK compares routes
    # with the result, and the kernel's route has one.
    return {"dst": dst, "gw": str(stack.gateway.ip)}


def delegate_configs(conf: dict[str, Any], ifname: str) -> list[tuple[str, dict[str, Any]]]:
    """(interface, bridge plugin config) for each interface the mode needs,
    each with one host-local range and route per address family: IPv4, and
    IPv6 as well when the subnet file is dual-stack."""
    subnet_file = Path(conf.get("subnetFile", DEFAULT_SUBNET_FILE))
    found = read_variables(subnet_file)
    if "FLANNEL_SUBNET" not in found or "FLANNEL_MTU" not in found:
        raise CniError(
            ERR_TRY_LATER,
            f"{subnet_file} has no FLANNEL_SUBNET/FLANNEL_MTU",
            "overlayd is not running or not ready on this host",
        )
    try:
        gateway = IPv4Interface(found["FLANNEL_SUBNET"])
        mtu = int(found["FLANNEL_MTU"])
    except ValueError as exc:
        raise CniError(ERR_CONFIG, f"{subnet_file} is malformed: {exc}") from exc
    stacks = [Stack(IPV4, gateway, found.get("FLANNEL_NETWORK"))]
    v6 = _ipv6_stack(found, subnet_file)
    if v6 is not None:
        stacks.append(v6)
    version = conf.get("cniVersion", "1.0.0")
    # host-local keeps its books per network name (dataDir/ipam/<name>).
    # The name is fixed, not the conflist's: every runtime's network on this
    # bridge, and overlayd's Docker plugin, must draw from one store, or two
    # of them would hand out the same address.
    name = HOST_LOCAL_STORE
    data_dir = Path(conf.get("dataDir", DEFAULT_DATA_DIR))
    egress = found.get("OVERLAYD_EGRESS", "masquerade")
    two_interfaces = egress == "gwbridge" and "OVERLAYD_GWBRIDGE" in found

    whole_subnet = conf.get("wholeSubnet", False)
    if not isinstance(whole_subnet, bool):
        raise CniError(ERR_CONFIG, f"wholeSubnet must be true or false, not {whole_subnet!r}")

    def bridge_conf(
        net_name: str,
        bridge: str,
        ranges: list[dict[str, str]],
        routes: list[dict[str, str]],
        mtu: int | None,
        hairpin: bool,
    ) -> dict[str, Any]:
        delegate: dict[str, Any] = {
            "cniVersion": version,
            "name": net_name,
            "type": "bridge",
            "bridge": bridge,
            # overlayd owns the bridges' addresses and all NAT.
            "isGateway": False,
            "isDefaultGateway": False,
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "dataDir": str(data_dir / "ipam"),
                # One range set per family: host-local gives one address from each.
                "ranges": [[address_range] for address_range in ranges],
                "routes": routes,
            },
        }
        if mtu is not None:
            delegate["mtu"] = mtu
        if hairpin:
            delegate["hairpinMode"] = True
        if len(ranges) > 1:
            # No duplicate address detection in the container (the bridge
            # plugin's default, spelled out where IPv6 is): host-local's
            # store is the one authority for its half of the subnet, and
            # with DAD an IPv6 address stays tentative, unusable as a
            # source, for a second or two, which the bridge plugin waits
            # out (ADD took 2.1 s instead of 0.07 s here).
            delegate["enabledad"] = False
        return delegate

    # eth0: the cluster routes in gwbridge mode (the default routes go by
    # eth1), else the default routes, for every family the host has.
    if two_interfaces and any(s.cluster is None for s in stacks):
        raise CniError(ERR_CONFIG, f"{subnet_file} has no FLANNEL_NETWORK for the cluster route")
    overlay_routes = [
        _route(s, str(s.cluster) if two_interfaces else s.family.any_network) for s in stacks
    ]
    if two_interfaces:
        # Service VIPs by eth0 too: by eth1 a connection would leave from
        # the gwbridge address and reach its backend masqueraded, so that
        # the backend's policy and the service's client affinity would see
        # this host instead of the container.
        overlay_routes += [
            _route(s, str(network))
            for s in stacks
            for network in read_service_networks(subnet_file)
            if network.version == s.family.version
        ]
    bridge = found.get("OVERLAYD_BRIDGE", "ovl0")
    delegates = [
        (
            ifname,
            bridge_conf(
                name,
                bridge,
                [_address_range(s, whole_subnet) for s in stacks],
                overlay_routes,
                mtu,
                # Always on the overlay bridge: a container reaching a
                # service VIP may be DNATed to itself, and with bridge
                # netfilter on (policies, gwbridge isolation) that DNAT
                # happens inside the bridge, which sends the frame back
                # out the port it came in by only in hairpin mode
                # (plan/service_rules.py, "hairpin"). Not on the gwbridge:
                # nothing is bridged between its ports (its isolation drops
                # it), so no frame ever needs to go back out its own port.
                hairpin=True,
            ),
        )
    ]
    if two_interfaces:
        egress_if = str(conf.get("egressIfName", "eth1"))
        if egress_if == ifname:
            raise CniError(ERR_CONFIG, f"egressIfName {egress_if!r} is CNI_IFNAME itself")
        egress_stacks = _gwbridge_stacks(found, subnet_file, ipv6=v6 is not None)
        delegates.append(
            (
                egress_if,
                bridge_conf(
                    f"{name}-egress",
                    found["OVERLAYD_GWBRIDGE"],
                    # The gwbridge is this host's alone: its whole subnets.
                    [_address_range(s, whole_subnet=True) for s in egress_stacks],
                    [_route(s, s.family.any_network) for s in egress_stacks],
                    None,
                    hairpin=False,
                ),
            )
        )
    return delegates


def _gwbridge_stacks(found: dict[str, str], subnet_file: Path, *, ipv6: bool) -> list[Stack]:
    """The gwbridge's gateways: IPv4, and IPv6 in a dual-stack file that
    gives the gwbridge an IPv6 subnet (without one, containers have no IPv6
    way out in gwbridge mode, only the cluster route)."""
    names = [("OVERLAYD_GWBRIDGE_SUBNET", IPV4)]
    if ipv6 and "OVERLAYD_GWBRIDGE_SUBNET6" in found:
        names.append(("OVERLAYD_GWBRIDGE_SUBNET6", IPV6))
    stacks = []
    for name, family in names:
        try:
            gateway = ip_interface(found[name])
        except (KeyError, ValueError) as exc:
            raise CniError(ERR_CONFIG, f"{subnet_file}: bad {name}") from exc
        if gateway.version != family.version:
            raise CniError(ERR_CONFIG, f"{subnet_file}: {name} is not an IPv{family.version} one")
        stacks.append(Stack(family, gateway, None))
    return stacks


def run_delegate(
    inv: Invocation, command: str, ifname: str, conf: dict[str, Any]
) -> dict[str, Any] | None:
    env = dict(os.environ)
    env.update(
        CNI_COMMAND=command,
        CNI_IFNAME=ifname,
        CNI_PATH=":".join(inv.path or DEFAULT_PLUGIN_DIRS),
        CNI_ARGS=without_label_args(inv.args),
    )
    ok, parsed, raw = call_plugin([find_plugin(str(conf["type"]), inv.path)], conf, env)
    if not ok:
        if parsed is None:
            raise CniError(ERR_PLUGIN, f"bridge plugin {command} for {ifname} failed", raw)
        raise CniError(
            int(parsed.get("code", ERR_PLUGIN)),
            f"bridge plugin {command} for {ifname}: {parsed.get('msg')}",
            str(parsed.get("details", "")),
        )
    return parsed


DNS_LIST_KEYS = ("nameservers", "search", "options")


def dns_settings(conf: dict[str, Any]) -> dict[str, Any]:
    """The network config's `dns`, checked: it goes into the result as it is,
    and a runtime writes it into the container's resolv.conf."""
    dns = conf.get("dns", {})
    if not isinstance(dns, dict):
        raise CniError(ERR_CONFIG, "dns must be an object (nameservers, domain, search, options)")
    for key, value in dns.items():
        if key in DNS_LIST_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise CniError(ERR_CONFIG, f"dns.{key} must be a list of strings")
        elif key == "domain":
            if not isinstance(value, str):
                raise CniError(ERR_CONFIG, "dns.domain must be a string")
        else:
            raise CniError(ERR_CONFIG, f"dns.{key} is not a CNI DNS setting")
    for server in dns.get("nameservers", []):
        try:
            ip_address(server)
        except ValueError as exc:
            raise CniError(ERR_CONFIG, f"dns.nameservers: {server!r} is not an address") from exc
    return dict(dns)


# resolv.conf's ndots for overlayd's responder: see subnet_file_dns.
NDOTS = 2


def subnet_file_dns(conf: dict[str, Any]) -> dict[str, Any]:
    """The result's dns for overlayd's DNS responder, from the subnet file's
    OVERLAYD_DNS (the overlay bridge's gateway addresses) and
    OVERLAYD_DNS_DOMAIN; {} when it names no server (no services on this
    host). The domain is the search domain, so a container asks for `web`
    or `tasks.web`.

    `ndots:2` rather than resolv.conf's default of 1: `tasks.web` has one
    dot, and with ndots:1 the resolver asks for it as an absolute name
    first, which the responder does not own and forwards upstream (a round
    trip out of the host, and an internal name leaked to the outside
    resolvers) before the search domain is tried. With ndots:2 it is
    `tasks.web.overlay.internal` first, answered locally. The price: a
    one-dot outside name (`example.com`) is first tried as
    `example.com.overlay.internal`, which the responder answers NXDOMAIN
    itself, from its own records, without forwarding. Not Kubernetes'
    ndots:5, whose search list makes every outside name cost several
    queries; SRV names (`_http._tcp.web`, two dots) are asked absolute
    first, then with the domain."""
    servers, domain = read_dns(Path(conf.get("subnetFile", DEFAULT_SUBNET_FILE)))
    if not servers:
        return {}
    found: dict[str, Any] = {"nameservers": [str(server) for server in servers]}
    if domain is not None:
        found |= {"search": [domain], "options": [f"ndots:{NDOTS}"]}
    return found


def result_dns(conf: dict[str, Any]) -> dict[str, Any]:
    """The result's dns: the network config's own, when it has one (the
    operator's choice wins), else overlayd's responder's (subnet_file_dns)."""
    return dns_settings(conf) or subnet_file_dns(conf)


def merge_results(
    version: str, results: list[dict[str, Any]], dns: dict[str, Any] | None = None
) -> dict[str, Any]:
    merged: dict[str, Any] = {"cniVersion": version, "interfaces": [], "ips": [], "routes": []}
    for result in results:
        offset = len(merged["interfaces"])
        merged["interfaces"].extend(result.get("interfaces", []))
        for ip in result.get("ips", []):
            ip = dict(ip)
            if "interface" in ip:
                ip["interface"] += offset
            merged["ips"].append(ip)
        merged["routes"].extend(result.get("routes", []))
    merged["dns"] = dns or {}
    return merged


def _record_path(conf: dict[str, Any], inv: Invocation) -> Path:
    data_dir = Path(conf.get("dataDir", DEFAULT_DATA_DIR))
    return data_dir / "delegates" / f"{inv.container_id}-{inv.ifname}.json"


@dataclass(frozen=True)
class Registration:
    """What ADD registers with the daemon, decided before anything is made
    (None from `registration` when the config turns registering off)."""

    socket: Path
    name: str
    labels: dict[str, str]

    def request(
        self,
        inv: Invocation,
        addresses: list[str],
        gwbridge_addresses: list[str] | None = None,
        macs: list[str] | None = None,
    ) -> dict[str, Any]:
        found: dict[str, Any] = {
            "id": inv.container_id,
            "name": self.name,
            "addresses": addresses,
            "labels": self.labels,
        }
        if gwbridge_addresses:
            found["gwbridge_addresses"] = gwbridge_addresses
        if macs:
            found["macs"] = macs
        return found


def _register_setting(conf: dict[str, Any]) -> bool:
    value = conf.get("registerEndpoint", True)
    if not isinstance(value, bool):
        raise CniError(ERR_CONFIG, f"registerEndpoint must be true or false, not {value!r}")
    return value


def control_socket(conf: dict[str, Any]) -> Path:
    value = conf.get("controlSocket", str(DEFAULT_CONTROL_SOCKET))
    if not isinstance(value, str) or not value.startswith("/"):
        raise CniError(ERR_CONFIG, f"controlSocket must be an absolute path, not {value!r}")
    return Path(value)


def container_name(inv: Invocation) -> str:
    """K8S_POD_NAME from CNI_ARGS (Podman passes the container's name
    there, Kubernetes runtimes the pod's), else the id's first 12 characters."""
    for part in inv.args.split(";"):
        key, equals, value = part.partition("=")
        if key.strip() == "K8S_POD_NAME" and equals and value:
            return value
    return inv.container_id[:12]


def registration(conf: dict[str, Any], inv: Invocation) -> Registration | None:
    if not _register_setting(conf):
        return None
    socket = control_socket(conf)
    try:
        labels = labels_from_cni(conf, inv.args)
    except EndpointError as exc:
        raise CniError(ERR_CONFIG, f"labels: {exc}") from exc
    return Registration(socket, container_name(inv), labels)


def _inside(result: dict[str, Any], ifname: str) -> dict[int, dict[str, Any]]:
    """The merged result's interfaces named `ifname` inside the container, by index."""
    return {
        index: iface
        for index, iface in enumerate(result.get("interfaces", []))
        if isinstance(iface, dict) and iface.get("name") == ifname and iface.get("sandbox")
    }


def container_addresses(result: dict[str, Any], ifname: str) -> list[str]:
    """Every address (no prefix length) of interface `ifname` inside the
    container, in a merged result: the overlay interface's, of both
    families; eth1's in gwbridge mode are the gwbridge's, not the overlay's."""
    inside = _inside(result, ifname)
    return [
        str(ip_interface(ip["address"]).ip)
        for ip in result.get("ips", [])
        if ip.get("interface") in inside
    ]


def container_mac(result: dict[str, Any], ifname: str) -> str | None:
    """The MAC of interface `ifname` inside the container, if the result says."""
    for iface in _inside(result, ifname).values():
        mac = iface.get("mac")
        if isinstance(mac, str) and mac:
            return mac
    return None


def _ask(socket: Path, command: str, args: dict[str, Any]) -> Any:
    return asyncio.run(ask(socket, command, args))


def register(
    registered: Registration,
    inv: Invocation,
    result: dict[str, Any],
    egress_if: str | None = None,
) -> None:
    """Register the attached container (with the addresses of `egress_if`,
    its gwbridge interface, if it has one); CniError when the daemon cannot
    be reached or refuses."""
    addresses = container_addresses(result, inv.ifname)
    gwbridge = container_addresses(result, egress_if) if egress_if is not None else []
    macs = [container_mac(result, name) for name in (inv.ifname, egress_if) if name is not None]
    request = registered.request(inv, addresses, gwbridge, [m for m in macs if m is not None])
    try:
        _ask(registered.socket, "endpoint_add", request)
    except DaemonRefused as exc:
        raise CniError(
            ERR_PLUGIN,
            f"overlayd refused to register container {registered.name}: the container is"
            " not attached, since no policy could apply to it",
            str(exc),
        ) from exc
    except DaemonUnreachable as exc:
        raise CniError(
            ERR_TRY_LATER,
            f"overlayd could not register container {registered.name}: the container is"
            " not attached, since no policy could apply to it (set registerEndpoint to"
            " false to attach containers that policies cannot select)",
            str(exc),
        ) from exc


def unregister(conf: dict[str, Any], inv: Invocation) -> None:
    """Best effort: a daemon that is down or refuses is reported on stderr,
    never a failed DEL."""
    try:
        if not _register_setting(conf):
            return
        _ask(control_socket(conf), "endpoint_del", {"id": inv.container_id})
    except (CniError, DaemonUnreachable) as exc:
        text = exc.msg if isinstance(exc, CniError) else str(exc)
        print(
            f"overlay-cni: DEL {inv.container_id}: not unregistered from overlayd: {text}",
            file=sys.stderr,
        )


def add(conf: dict[str, Any], inv: Invocation) -> dict[str, Any]:
    # Checked before anything is made: nothing to undo when they are bad.
    dns = result_dns(conf)
    registered = registration(conf, inv)
    done: list[tuple[str, dict[str, Any]]] = []
    results = []
    try:
        for ifname, delegate in delegate_configs(conf, inv.ifname):
            result = run_delegate(inv, "ADD", ifname, delegate)
            done.append((ifname, delegate))
            results.append(result or {})
        merged = merge_results(conf.get("cniVersion", "1.0.0"), results, dns)
        if registered is not None:
            # The second delegate, if any, is the gwbridge interface's.
            egress_if = done[1][0] if len(done) > 1 else None
            try:
                register(registered, inv, merged, egress_if)
            except CniError:
                # A registration that timed out waiting for its pass may be
                # in etcd already: it goes too.
                unregister(conf, inv)
                raise
    except CniError:
        for ifname, delegate in reversed(done):  # leave nothing half made
            with contextlib.suppress(CniError):
                run_delegate(inv, "DEL", ifname, delegate)
        raise
    record = _record_path(conf, inv)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(
        json.dumps(
            [{"ifname": i, "conf": d, "result": r} for (i, d), r in zip(done, results, strict=True)]
        )
    )
    return merged


def delete(conf: dict[str, Any], inv: Invocation) -> None:
    # The registration first: the address must not be handed to another
    # container while this one's labels still claim it.
    unregister(conf, inv)
    record = _record_path(conf, inv)
    try:
        delegates = json.loads(record.read_text())
    except FileNotFoundError:
        return  # DEL is idempotent: nothing was added, or it is gone already
    errors = []
    for item in reversed(delegates):
        try:
            run_delegate(inv, "DEL", item["ifname"], item["conf"])
        except CniError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    record.unlink(missing_ok=True)


def check(conf: dict[str, Any], inv: Invocation) -> None:
    if "prevResult" not in conf:
        raise CniError(ERR_CONFIG, "CHECK needs prevResult in the network config")
    try:
        delegates = json.loads(_record_path(conf, inv).read_text())
    except FileNotFoundError as exc:
        raise CniError(ERR_PLUGIN, f"no record of ADD for {inv.container_id}/{inv.ifname}") from exc
    wanted = {ip["address"] for item in delegates for ip in item["result"].get("ips", [])}
    have = {ip["address"] for ip in conf["prevResult"].get("ips", [])}
    if wanted - have:
        raise CniError(ERR_PLUGIN, f"prevResult lacks {sorted(wanted - have)}")
    for item in delegates:
        run_delegate(inv, "CHECK", item["ifname"], {**item["conf"], "prevResult": item["result"]})


def main() -> int:
    env = dict(os.environ)
    try:
        if env.get("CNI_COMMAND") == "VERSION":
            print(json.dumps({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}))
            return 0
        try:
            conf = json.loads(sys.stdin.read())
        except ValueError as exc:
            raise CniError(ERR_CONFIG, f"network config is not JSON: {exc}") from exc
        if not isinstance(conf, dict):
            raise CniError(ERR_CONFIG, "network config must be a JSON object")
        if conf.get("cniVersion", "1.0.0") not in SUPPORTED_VERSIONS:
            raise CniError(1, f"cniVersion {conf.get('cniVersion')} is not supported")
        inv = Invocation.from_env(env)
        if inv.command == "ADD":
            print(json.dumps(add(conf, inv)))
        elif inv.command == "DEL":
            delete(conf, inv)
        elif inv.command == "CHECK":
            check(conf, inv)
        else:
            raise CniError(
                ERR_ENV, f"CNI_COMMAND {inv.command!r} is not ADD, DEL, CHECK or VERSION"
            )
        return 0
    except CniError as exc:
        print(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "code": exc.code,
                    "msg": exc.msg,
                    "details": exc.details,
                }
            )
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
