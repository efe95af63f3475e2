"""`overlayctl diagnose`, the pure part: from facts gathered on the host
(kernel entries, devices, sysctls, firewall, etcd's leases, policies and
services, the services table and DNS answers, the daemon's answer) to a
list of findings in plain words. Every check appears, passed or not, so
that an operator sees what was looked at."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from overlayd.model import (
    Change,
    DeviceFacts,
    DeviceSpec,
    Entry,
    EntrySet,
    IPAddress,
    IPNetwork,
    Op,
    kind_of,
)
from overlayd.plan.diff import diff
from overlayd.plan.egress import TABLE
from overlayd.plan.nftables import split_objects
from overlayd.plan.policy_rules import (
    WHERE,
    Chain,
    PolicyRuleset,
    comparable,
    listed_elements,
    listed_ports,
    render_ruleset,
    terse_listing,
)
from overlayd.plan.service_check import (
    DnsAnswer,
    DnsQuestion,
    ServicesInForce,
    dns_differences,
    table_differences,
)
from overlayd.plan.service_rules import TABLES as SERVICES_TABLES
from overlayd.plan.service_rules import WHERE as SERVICES_WHERE
from overlayd.plan.vxlan_filter import CHAIN, SET, FilterSpec, render_objects


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's verdict. `count`: how many differences it stands for
    (more than 1 only for the "and N more" line closing a long list)."""

    check: str
    ok: bool
    detail: str
    count: int = 1


# Differences listed one by one per check; the rest are counted in one line.
MAX_LISTED = 20


# A certificate that expires sooner than this fails diagnose: time to renew.
CERT_WARNING_DAYS = 7


@dataclass(frozen=True, slots=True)
class CertificateExpiry:
    """One etcd TLS file: which setting, its subject and expiry, or what is wrong."""

    setting: str
    path: str
    subject: str | None
    not_after: datetime.datetime | None
    problem: str | None = None


@dataclass
class FilterFacts:
    """One family's VXLAN allow-list as diagnose found it: what the filter
    must be, our objects as listed ("" when none), the set's elements
    (None: no set), the tunnelled peers of the family by public IP, and
    why nft could not be asked, if so."""

    spec: FilterSpec
    listing: str | None = None
    sources: frozenset[IPAddress] | None = None
    wanted: dict[str, str] = field(default_factory=dict)  # public IP -> subnet
    error: str | None = None


@dataclass
class PolicyFacts:
    """The network policy table as diagnose found it: what etcd's policies
    and endpoints make it (None: they could not be read), its listing as
    JSON and as `nft -t` prints it (None: no table), the inputs skipped
    and why, and a problem that stopped the look."""

    desired: PolicyRuleset | None = None
    listing: str | None = None
    terse: str | None = None
    skipped: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None


@dataclass
class ServiceFacts:
    """The services as diagnose found them: the network config's service
    networks (none: services are off), what etcd's services and endpoints
    make (None: it could not be computed, `error` says why), the services
    table's map and set elements and its chains (None: no table;
    `table_error`: nft could not be asked), and DNS: why it is not checked
    (`dns_off`, passes), what kept it from being asked (`dns_problem`, no
    address or a silent responder, fails), and the questions asked and
    each answering address's answers."""

    networks: tuple[IPNetwork, ...] = ()
    in_force: ServicesInForce | None = None
    error: str | None = None
    elements: Mapping[tuple[str, str], frozenset[str]] | None = None  # (table, name)
    chains: Mapping[str, Chain] | None = None
    table_error: str | None = None
    dns_off: str | None = None
    dns_problem: str | None = None
    questions: Sequence[DnsQuestion] = ()
    answers: Mapping[str, Mapping[DnsQuestion, DnsAnswer]] = field(default_factory=dict)


@dataclass
class HostFacts:
    """What `overlayctl diagnose` gathered; None where it could not look."""

    daemon_status: dict[str, Any] | None = None
    daemon_peers: list[dict[str, Any]] | None = None
    daemon_error: str | None = None
    config_error: str | None = None
    lease_problem: str | None = None
    own_subnet: str | None = None
    spec: DeviceSpec | None = None
    desired: EntrySet | None = None
    actual: EntrySet | None = None
    cluster_peers: dict[str, str] = field(default_factory=dict)  # subnet -> public IP
    cluster_peers6: dict[str, str] = field(default_factory=dict)  # the IPv6 halves, likewise
    rejected: Mapping[str, str] = field(default_factory=dict)
    devices: dict[str, DeviceFacts | None] = field(default_factory=dict)
    vtep_tx_checksumming: bool | None = None
    sysctls: dict[str, str | None] = field(default_factory=dict)
    ruleset: list[dict[str, Any]] = field(default_factory=list)
    subnet_file_mtu: int | None = None
    etcd_certificates: list[CertificateExpiry] = field(default_factory=list)
    now: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))
    # The VXLAN allow-list: the setting (None: unknown), and one look per
    # family with a VTEP (none in host-gw mode).
    vxlan_filter: bool | None = None
    filters: list[FilterFacts] = field(default_factory=list)
    policy: PolicyFacts | None = None
    services: ServiceFacts | None = None


# How an operator would name each kind of entry, with the device it sits on.
_WORDS: dict[str, Callable[[Any, DeviceSpec], str]] = {
    "route": lambda e, spec: (
        f"route to {e.dst} via {e.gateway} dev {spec.underlay if e.direct else spec.bridge}"
    ),
    "neigh": lambda e, spec: f"ARP entry {e.ip} -> {e.mac} on {spec.bridge}",
    "fdb_tunnel": lambda e, spec: f"FDB entry {e.mac} -> {e.remote} on {spec.vtep}",
    "fdb_bridge": lambda e, spec: f"bridge FDB entry {e.mac} on {spec.vtep} (master {spec.bridge})",
}


def _entry_words(entry: Entry, spec: DeviceSpec) -> str:
    return _WORDS[kind_of(entry).name](entry, spec)


def describe_change(change: Change, actual: EntrySet, spec: DeviceSpec) -> str:
    if change.op is Op.DELETE:
        return f"stale {_entry_words(change.entry, spec)}: no lease asks for it"
    current = actual.get(change.entry)
    if current is None:
        return f"missing {_entry_words(change.entry, spec)}"
    return f"wrong {_entry_words(current, spec)}: should be {_entry_words(change.entry, spec)}"


def _chains_with_input_hook(
    ruleset: Sequence[dict[str, Any]], families: Sequence[str]
) -> dict[tuple[str, str, str], str]:
    """(family, table, chain) -> policy, for base chains on the input hook."""
    found = {}
    for item in ruleset:
        chain = item.get("chain")
        if chain and chain.get("hook") == "input" and chain.get("family") in families:
            found[(chain["family"], chain["table"], chain["name"])] = chain.get("policy", "accept")
    return found


def _matches_port(value: Any, port: int) -> bool:
    if isinstance(value, int):
        return value == port
    if isinstance(value, dict) and "set" in value:
        return any(_matches_port(v, port) for v in value["set"])
    if isinstance(value, dict) and "range" in value:
        low, high = value["range"]
        return isinstance(low, int) and isinstance(high, int) and low <= port <= high
    if isinstance(value, list):
        return any(_matches_port(v, port) for v in value)
    return False


def _rule_port_match(expr: Sequence[dict[str, Any]], port: int) -> bool | None:
    """True: the rule matches UDP to `port`; False: it matches some other
    port; None: it does not look at destination ports at all."""
    verdict: bool | None = None
    for e in expr:
        match = e.get("match")
        if not match:
            continue
        left = match.get("left", {})
        payload = left.get("payload", {}) if isinstance(left, dict) else {}
        if payload.get("field") == "dport" and payload.get("protocol") in ("udp", "th"):
            if match.get("op", "==") in ("==", "in") and _matches_port(match.get("right"), port):
                verdict = True if verdict is None else verdict
            else:
                return False
        if payload.get("field") == "dport" and payload.get("protocol") == "tcp":
            return False
    return verdict


def firewall_blocks(
    ruleset: Sequence[dict[str, Any]], port: int, families: Sequence[str] = ("ip", "inet")
) -> list[str]:
    """Rules (or a drop policy) on the input hook of tables of `families`
    (nft's: "ip", "ip6", "inet") that would drop VXLAN."""
    chains = _chains_with_input_hook(ruleset, families)
    problems = []
    accepted: set[tuple[str, str, str]] = set()
    for item in ruleset:
        rule = item.get("rule")
        if not rule:
            continue
        where = (rule.get("family"), rule.get("table"), rule.get("chain"))
        if where not in chains:
            continue
        expr = rule.get("expr", [])
        verdicts = {k for e in expr for k in e if k in ("drop", "reject", "accept")}
        hit = _rule_port_match(expr, port)
        if hit and verdicts & {"drop", "reject"}:
            problems.append(
                f"{where[0]} {where[1]} chain {where[2]}: a rule drops UDP port {port}"
                f" (handle {rule.get('handle')})"
            )
        if "accept" in verdicts and hit is not False:
            accepted.add(where)
    for where, policy in chains.items():
        if policy == "drop" and where not in accepted:
            problems.append(
                f"{where[0]} {where[1]} chain {where[2]}: policy drop and no rule accepts"
                f" UDP port {port}"
            )
    return problems


def certificate_verdict(cert: CertificateExpiry, now: datetime.datetime) -> tuple[bool, str]:
    if cert.problem is not None or cert.not_after is None:
        return False, f"{cert.path}: {cert.problem}"
    left = cert.not_after - now
    when = f"{cert.path} ({cert.subject}) expires {cert.not_after:%Y-%m-%d %H:%M} UTC"
    if left <= datetime.timedelta(0):
        return False, f"{when}: expired; renew it"
    days = left.total_seconds() / 86400
    if left < datetime.timedelta(days=CERT_WARNING_DAYS):
        return False, f"{when}, in {days:.1f} days: renew it (under {CERT_WARNING_DAYS} days)"
    return True, f"{when}, in {days:.0f} days"


def diagnose(f: HostFacts) -> list[Finding]:
    out: list[Finding] = []

    def add(check: str, ok: bool, detail: str) -> None:
        out.append(Finding(check, ok, detail))

    if f.daemon_error is not None:
        add("daemon", False, f.daemon_error)
    elif f.daemon_status is not None:
        s = f.daemon_status
        last = s.get("last_reconcile") or {}
        if not s.get("ready"):
            add("daemon", False, f"not ready: {s.get('ready_reason')}")
        elif not last.get("ok", False):
            add("daemon", False, f"last reconcile failed: {last.get('error')}")
        else:
            add("daemon", True, f"running, ready, last reconcile {last.get('ago_seconds')} s ago")
    for cert in f.etcd_certificates:
        add(f"etcd {cert.setting}", *certificate_verdict(cert, f.now))
    if f.config_error is not None:
        add("network config", False, f.config_error)
    if f.lease_problem is not None:
        add("lease", False, f.lease_problem)
    elif f.own_subnet is not None:
        add("lease", True, f"{f.own_subnet} is held in etcd by this host")
    spec = f.spec
    if spec is None:
        return out

    # Devices and MTU.
    names = [spec.bridge] + ([spec.vtep] if spec.vtep else [])
    for name in names:
        dev = f.devices.get(name)
        if dev is None:
            add(f"device {name}", False, f"{name} does not exist")
            continue
        problems = []
        if not dev.up:
            problems.append("is down")
        if dev.mtu != spec.mtu:
            problems.append(f"MTU {dev.mtu}, expected {spec.mtu}")
        if name == spec.vtep and dev.master != spec.bridge:
            problems.append(f"is not a port of {spec.bridge}")
        add(f"device {name}", not problems, "; ".join(problems) or f"up, MTU {dev.mtu}")
    if f.subnet_file_mtu is not None and f.subnet_file_mtu != spec.mtu:
        add(
            "subnet file",
            False,
            f"FLANNEL_MTU={f.subnet_file_mtu} but the overlay MTU is {spec.mtu}:"
            " containers made from it will fragment or drop large packets",
        )
    if spec.vtep:
        if f.vtep_tx_checksumming is False:
            add(
                "offload",
                False,
                f"tx checksum offload is off on {spec.vtep} (TSO goes with it; throughput"
                f" drops about 5x): ethtool -K {spec.vtep} tx on",
            )
        elif f.vtep_tx_checksumming is True:
            add("offload", True, f"tx checksum offload on {spec.vtep}")

    # Forwarding.
    forwarding = f.sysctls.get("net.ipv4.ip_forward")
    bridge_fwd = f.sysctls.get(f"net.ipv4.conf.{spec.bridge}.forwarding")
    if forwarding != "1" or bridge_fwd == "0":
        add(
            "forwarding",
            False,
            f"IPv4 forwarding is off (net.ipv4.ip_forward={forwarding},"
            f" {spec.bridge}.forwarding={bridge_fwd}): this host routes no container traffic",
        )
    else:
        add("forwarding", True, "IPv4 forwarding on")

    # Firewall: the input hook of each family a VTEP sends VXLAN over.
    if spec.vtep:
        tables = ("ip", "inet", *(("ip6",) if spec.vtep6 else ()))
        blocks = firewall_blocks(f.ruleset, spec.port, tables)
        for block in blocks:
            add("firewall", False, f"VXLAN port may be blocked: {block}")
        if not blocks:
            add("firewall", True, f"no input rule drops UDP port {spec.port}")

    if spec.vtep and f.vxlan_filter is not None:
        out += _filter_findings(f)
    if f.policy is not None:
        out += _policy_findings(f.policy)
    if f.services is not None:
        out += service_findings(f.services)

    # Kernel entries against the desired state.
    if f.desired is not None and f.actual is not None:
        changes = diff(f.desired, f.actual)
        for change in changes:
            add("kernel entries", False, describe_change(change, f.actual, spec))
        if not changes:
            add(
                "kernel entries",
                True,
                f"{len(f.desired)} entries for {len(f.cluster_peers)} peer(s), as desired",
            )

    # The daemon's view against etcd's.
    for key, reason in sorted(f.rejected.items()):
        add("leases", False, f"skipped {key}: {reason}")
    if f.daemon_peers is not None:
        programmed = {p["subnet"]: p["public_ip"] for p in f.daemon_peers}
        missing = sorted(set(f.cluster_peers) - set(programmed))
        gone = sorted(set(programmed) - set(f.cluster_peers))
        for subnet in missing:
            add(
                "peers",
                False,
                f"{subnet} ({f.cluster_peers[subnet]}) is leased in etcd but the daemon has"
                " not programmed it",
            )
        for subnet in gone:
            add("peers", False, f"the daemon programs {subnet}, whose lease etcd no longer has")
        for subnet in sorted(set(programmed) & set(f.cluster_peers)):
            if programmed[subnet] != f.cluster_peers[subnet]:
                add(
                    "peers",
                    False,
                    f"{subnet}: the daemon uses {programmed[subnet]}, etcd says"
                    f" {f.cluster_peers[subnet]}",
                )
        if not missing and not gone:
            add("peers", True, f"the daemon programs all {len(programmed)} peer(s) etcd has")
    # The daemon counts its IPv6 peers (the status' ipv6_peers) rather than
    # listing them; their entries are checked one by one above.
    programmed6 = (f.daemon_status or {}).get("ipv6_peers")
    if isinstance(programmed6, int) and programmed6 != len(f.cluster_peers6):
        add(
            "peers",
            False,
            f"etcd has {len(f.cluster_peers6)} peer(s) with an IPv6 half to program, the"
            f" daemon programs {programmed6}",
        )
    return out


def _policy_findings(facts: PolicyFacts) -> list[Finding]:
    """The policy table: exactly the sets, elements and chains that etcd's
    policies and endpoints make (the same pure code as the daemon's)."""
    check = "network policy"
    out: list[Finding] = []
    if facts.skipped:
        first = sorted(facts.skipped.items())[0]
        out.append(
            Finding(
                check,
                False,
                f"{len(facts.skipped)} policy document(s) or endpoint(s) skipped as invalid,"
                f" e.g. {first[0]}: {first[1]}",
            )
        )
    desired = facts.desired
    if facts.error is not None or desired is None:
        return [*out, Finding(check, False, facts.error or "could not compute the policies")]
    if desired.empty:
        if facts.listing is None:
            return [*out, Finding(check, True, "no policies; no policy table (nothing judged)")]
        return [*out, Finding(check, False, f"no policies in etcd, but table {WHERE} exists")]
    if facts.listing is None:
        return [
            *out,
            Finding(check, False, f"{len(desired.chains)} chains due, table {WHERE} missing"),
        ]
    problems = []
    listed = listed_elements(facts.listing)
    ports = listed_ports(facts.listing)
    for name, wanted_ports in desired.port_sets.items():
        if ports.get(name) != frozenset(wanted_ports.elements):
            problems.append(
                f"port set {name} missing" if name not in ports else f"port set {name} differs"
            )
    for name, wanted in desired.sets.items():
        have = listed.get(name)
        if have is None:
            problems.append(f"set {name} missing")
        elif have != wanted.elements:
            problems.append(
                f"set {name}: {len(wanted.elements - have)} element(s) missing,"
                f" {len(have - wanted.elements)} extra"
            )
    if facts.terse is not None and comparable(terse_listing(facts.terse)) != comparable(
        render_ruleset(desired, elements=False)
    ):
        problems.append("its chains or rules differ from what the policies make")
    if problems:
        return [*out, Finding(check, False, "; ".join(problems[:5]))]
    counters = len(desired.counters)
    return [
        *out,
        Finding(
            check,
            True,
            f"{len(desired.sets) + len(desired.port_sets)} sets, {len(desired.chains)} chains"
            f" and {counters} counters"
            " as the policies and endpoints make them",
        ),
    ]


def _listed(check: str, differences: Sequence[str]) -> list[Finding]:
    """One failed finding per difference, the first MAX_LISTED of them, and
    one line counting the rest."""
    out = [Finding(check, False, d) for d in differences[:MAX_LISTED]]
    rest = len(differences) - MAX_LISTED
    if rest > 0:
        out.append(Finding(check, False, f"and {rest} more difference(s) like these", rest))
    return out


def service_findings(facts: ServiceFacts) -> list[Finding]:
    """etcd's services and endpoints, the services table and the DNS
    responder must agree (plan/service_check.py compares them); with no
    ServiceNetwork there are no services, and the table must not exist."""
    if not facts.networks:
        if facts.elements is None and facts.chains is None:
            return [
                Finding(
                    "services",
                    True,
                    "off: the network config has no ServiceNetwork (nothing judged)",
                )
            ]
        return [
            Finding(
                "services table",
                False,
                f"table {SERVICES_WHERE} exists, but the network config has no ServiceNetwork",
            )
        ]
    in_force = facts.in_force
    if facts.error is not None or in_force is None:
        return [Finding("services", False, facts.error or "could not compute the services")]
    out = _listed(
        "services",
        [f"skipped {key}: {why}" for key, why in sorted(in_force.skipped.items())],
    )
    with_backends = sum(bool(b) for b in in_force.backends.values())
    out.append(
        Finding(
            "services",
            True,
            f"{len(in_force.services)} service(s) in etcd, {with_backends} with backends,"
            f" {len(in_force.endpoints)} usable endpoint(s)",
        )
    )
    if facts.table_error is not None:
        out.append(Finding("services table", False, f"could not look: {facts.table_error}"))
    else:
        table = table_differences(in_force.ruleset, facts.elements, facts.chains)
        out += _listed("services table", table)
        if not table:
            out.append(Finding("services table", True, _table_summary(in_force)))
    if facts.dns_off is not None:
        out.append(Finding("services dns", True, facts.dns_off))
        return out
    if facts.dns_problem is not None:
        out.append(Finding("services dns", False, facts.dns_problem))
    for server, answers in sorted(facts.answers.items()):
        dns = dns_differences(server, facts.questions, answers)
        out += _listed("services dns", dns)
        if not dns:
            out.append(
                Finding(
                    "services dns",
                    True,
                    f"the responder at {server} answers all {len(facts.questions)} questions"
                    f" (each service's name, tasks name and VIP PTRs) as etcd says",
                )
            )
    return out


def _table_summary(in_force: ServicesInForce) -> str:
    ruleset = in_force.ruleset
    tables = f"inet {SERVICES_TABLES[0]} and its {len(SERVICES_TABLES) - 1} shard tables"
    if ruleset.empty:
        return f"no service to serve, and no {tables}"
    elements = sum(len(m) for m in ruleset.maps().values())
    chains = sum(len(r.chains) for r in ruleset.services.values())
    return (
        f"{tables} hold exactly what etcd makes: {elements} map element(s),"
        f" {len(ruleset.hairpin)} hairpin element(s), {chains} service chain(s)"
    )


def _filter_findings(f: HostFacts) -> list[Finding]:
    """The VXLAN allow-list of each family: the rules as overlayd writes
    them, and a set that holds exactly the tunnelled peers' public IPs."""
    check = "vxlan filter"
    port = f.spec.port if f.spec is not None else 0
    if not f.vxlan_filter:
        return [
            Finding(
                check,
                True,
                f"off (vxlan-filter=off): VXLAN to port {port} is accepted from any source;"
                " it must be filtered elsewhere",
            )
        ]
    out: list[Finding] = []
    for facts in f.filters:
        out += _family_filter_findings(check, facts)
    return out


def _family_filter_findings(check: str, facts: FilterFacts) -> list[Finding]:
    fs = facts.spec
    where = f"table {fs.table_family} {TABLE}"
    if facts.error is not None:
        return [Finding(check, False, f"could not look at {where}: {facts.error}")]
    if facts.listing is None:
        return []
    out: list[Finding] = []
    expected = render_objects(fs)
    if facts.listing != expected:
        found = split_objects(facts.listing)
        wanted = split_objects(expected)
        for key, block in wanted.items():
            if key not in found:
                out.append(
                    Finding(check, False, f"{key} is missing from {where}: VXLAN is not filtered")
                )
            elif found[key] != block:
                out.append(
                    Finding(
                        check,
                        False,
                        f"{key} in {where} is not what overlayd writes for {fs.local_ip},"
                        f" port {fs.port}, VNI {fs.vni}: {' | '.join(_lines(found[key]))}",
                    )
                )
    if facts.sources is not None:
        wanted_ips = {str(ip): subnet for ip, subnet in facts.wanted.items()}
        held = {str(ip) for ip in facts.sources}
        for ip in sorted(set(wanted_ips) - held):
            out.append(
                Finding(
                    check,
                    False,
                    f"{ip} (peer {wanted_ips[ip]}) is not in set {SET} of {where}:"
                    " its VXLAN is dropped",
                )
            )
        for ip in sorted(held - set(wanted_ips)):
            out.append(
                Finding(
                    check,
                    False,
                    f"{ip} is in set {SET} of {where} but is no tunnelled peer: it may send VXLAN",
                )
            )
    if not out:
        out.append(
            Finding(
                check,
                True,
                f"chain {CHAIN} of {where} accepts VXLAN (port {fs.port}, VNI {fs.vni}) only"
                f" from set {SET}, which holds the {len(facts.wanted)} tunnelled peer(s)",
            )
        )
    return out


def _lines(block: str) -> list[str]:
    return [line.strip() for line in block.splitlines()[1:-1]]
