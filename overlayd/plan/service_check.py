"""Do etcd, a host's services table and its DNS responder agree? The pure
part of `overlayctl diagnose`'s services check (plan/diagnose.py turns its
differences into findings, cli/diagnose_services.py gathers the facts).

What etcd says is computed by the daemon's own pure code, from scratch:
the usable services (plan/service.stored_services), the usable endpoints
of the hosts holding leases (plan/endpoints.select_endpoints), each
service's backends (service_model.backends), the table
(service_rules.service_ruleset) and the DNS records
(dns_records.build_records). The daemon moves its table by one service at
a time; its tests prove that this lands where a render from scratch does,
so any difference found here is drift or a change still in flight.

Compared, each difference in one sentence that names the map and key,
set element, chain or DNS record, and the service it belongs to:
- every element of every map and hairpin set, missing, extra, or with
  another verdict (from `nft -j list maps|sets`);
- every chain with its hook, comment and rules in order (from `nft -t
  list table`; anonymous sets' elements and priority names normalized);
- DNS: for every service, `<name>` and `tasks.<name>` (A, and AAAA in a
  dual-stack cluster) and the PTR of each VIP, asked of the live
  responder; also the PTR of any VIP the table holds that etcd does not
  (a stale service), which must be NXDOMAIN. A name only the responder
  knows, and in no table, cannot be found by asking: DNS has no listing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address

from overlayd.model import IPAddress, IPNetwork, Lease
from overlayd.plan.dns_records import TASKS_LABEL, DnsRecords, build_records, reverse_name
from overlayd.plan.endpoints import select_endpoints
from overlayd.plan.policy_inputs import endpoint_hosts, local_subnets
from overlayd.plan.policy_model import Endpoint, EndpointIndex
from overlayd.plan.policy_rules import Chain
from overlayd.plan.service import stored_services
from overlayd.plan.service_listing import believed_elements, comparable_chain
from overlayd.plan.service_model import Service, backends
from overlayd.plan.service_rules import (
    SHARD_TABLES,
    TABLE,
    WHERE,
    MapId,
    ServiceRuleset,
    chain_label,
    map_table,
    service_ruleset,
    table_chains,
)

RECORD_TYPES = {4: "A", 6: "AAAA"}


@dataclass(frozen=True, slots=True)
class ServicesInForce:
    """What etcd makes a host hold: the usable services and why the others
    are skipped, each one's backends, every usable endpoint, the table, and
    the DNS records (None: this host answers no DNS)."""

    services: Mapping[str, Service]
    skipped: Mapping[str, str]
    backends: Mapping[str, tuple[Endpoint, ...]]
    endpoints: tuple[Endpoint, ...]
    ruleset: ServiceRuleset
    records: DnsRecords | None


def services_in_force(
    raw_services: Mapping[str, bytes],
    raw_endpoints: Mapping[str, bytes],
    own_prefix: str,
    *,
    service_networks: Sequence[IPNetwork],
    cluster: Sequence[IPNetwork],
    own: Lease,
    peers: Iterable[Lease],
    gwbridge: tuple[IPNetwork, ...] = (),
    domain: str | None = None,
) -> ServicesInForce:
    """From the raw values under overlayd's prefix (services and endpoints;
    other keys are ignored) to what a host holding `own` must have, as the
    daemon's services manager makes it. `domain` None: no DNS records.
    ValueError when two services would share a VIP and port (the render
    refuses; stored_services keeps that from happening)."""
    stored = stored_services(raw_services, own_prefix, service_networks)
    selection = select_endpoints(raw_endpoints, own_prefix, endpoint_hosts(own, peers, gwbridge))
    endpoints = selection.endpoints
    index = EndpointIndex(endpoints)
    found = {name: backends(s, endpoints, index) for name, s in stored.services.items()}
    ruleset = service_ruleset(stored.services, found, local_subnets(own, gwbridge), tuple(cluster))
    records = None
    if domain is not None:
        records = build_records(
            stored.services.values(),
            found,
            endpoints,
            domain=domain,
            reverse_zones=[*cluster, *service_networks],
        )
    return ServicesInForce(stored.services, stored.rejected, found, endpoints, ruleset, records)


# --- the table ---------------------------------------------------------------------


def _split(element: str) -> tuple[str, str]:
    """A map element's text, "key : verdict", as (key, verdict)."""
    key, _, verdict = element.partition(" : ")
    return key, verdict


def _owners(ruleset: ServiceRuleset) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """(map label, key) -> the service whose element it is; chain label ->
    its service."""
    elements: dict[tuple[str, str], str] = {}
    chains: dict[str, str] = {}
    for name, rules in ruleset.services.items():
        for map_, keys in rules.elements.items():
            label = _map_label((map_table(map_, rules.shard), map_))
            for key in keys:
                elements[(label, key)] = name
        for chain in rules.chains:
            chains[chain_label(SHARD_TABLES[rules.shard], chain)] = name
    return elements, chains


def _map_label(at: MapId) -> str:
    """A map or set as findings name it: the front table's by name, a
    shard's with its table (every shard has a vips_v4)."""
    table, name = at
    return name if table == TABLE else f"{name} of table {table}"


def _hairpin_owners(ruleset: ServiceRuleset) -> dict[str, list[str]]:
    """A hairpin element's text -> the services with that local backend."""
    found: dict[str, list[str]] = {}
    for name in sorted(ruleset.services):
        for address in ruleset.services[name].hairpin:
            found.setdefault(f"{address} . {address}", []).append(name)
    return found


def _whose(service: str | None) -> str:
    return f" (service {service})" if service else ""


def table_differences(
    ruleset: ServiceRuleset,
    listed: Mapping[MapId, frozenset[str]] | None,
    chains: Mapping[str, Chain] | None,
) -> list[str]:
    """How the listed table differs from `ruleset`: `elements` are its
    maps' and sets' (service_listing.listed_elements), `chains` its chains
    (service_listing.listed_chains); either None when there is no table.
    Empty when they agree."""
    elements = None if listed is None else {_map_label(at): e for at, e in listed.items()}
    if elements is None or chains is None:
        if ruleset.empty:
            return []
        return [
            f"table {WHERE} is missing: the VIPs and node ports of {len(ruleset.services)}"
            " service(s) are not served here"
        ]
    if ruleset.empty:
        return [f"table {WHERE} exists, but etcd has no service this host must serve"]
    out: list[str] = []
    owners, chain_owners = _owners(ruleset)
    hairpins = _hairpin_owners(ruleset)
    wanted = {_map_label(at): e for at, e in believed_elements(ruleset).items()}
    for name in sorted(wanted):
        have = elements.get(name)
        kind = "set" if name.startswith("hairpin_") else "map"
        if have is None:
            out.append(f"{kind} {name} is missing from table {WHERE}")
            continue
        if kind == "set":
            for element in sorted(wanted[name] - have):
                services = ", ".join(hairpins.get(element, ()))
                out.append(f"set {name}: no element {element} (a local backend of {services})")
            for element in sorted(have - wanted[name]):
                out.append(f"set {name}: element {element} is no service's local backend in etcd")
            continue
        want = dict(map(_split, wanted[name]))
        held = dict(map(_split, have))
        for key in sorted(want.keys() - held.keys()):
            out.append(
                f"map {name}: no element for {key}{_whose(owners.get((name, key)))},"
                f" which must {want[key]}"
            )
        for key in sorted(held.keys() - want.keys()):
            out.append(
                f"map {name}: element {key} : {held[key]} is no service's in etcd"
                f"{_stale_owner(held[key], chains)}"
            )
        for key in sorted(held.keys() & want.keys()):
            if held[key] != want[key]:
                out.append(
                    f"map {name}: element {key}{_whose(owners.get((name, key)))}"
                    f" does {held[key]}, must {want[key]}"
                )
    for name in sorted(elements.keys() - wanted.keys()):
        out.append(f"{name} in table {WHERE} is not one overlayd makes")
    out += _chain_differences(table_chains(ruleset), chains, chain_owners)
    return out


def _stale_owner(verdict: str, chains: Mapping[str, Chain]) -> str:
    """Whose the chain a stale element goes to says it was (its comment)."""
    target = verdict.partition(" ")[2]
    chain = next((c for label, c in chains.items() if label.split()[-1] == target), None)
    return f" (its chain says: {chain.comment})" if chain is not None and chain.comment else ""


def _chain_differences(
    wanted: Mapping[str, Chain], listed: Mapping[str, Chain], owners: Mapping[str, str]
) -> list[str]:
    out: list[str] = []
    for name in sorted(wanted.keys() - listed.keys()):
        out.append(f"chain {name}{_whose(owners.get(name))} is missing")
    for name in sorted(listed.keys() - wanted.keys()):
        said = f" (its comment: {listed[name].comment})" if listed[name].comment else ""
        out.append(f"chain {name}{said} is no service's in etcd")
    for name in sorted(wanted.keys() & listed.keys()):
        want, have = comparable_chain(wanted[name]), comparable_chain(listed[name])
        if want == have:
            continue
        where = f"chain {name}{_whose(owners.get(name))}"
        if want.hook != have.hook:
            out.append(f"{where}: hook `{have.hook}`, must be `{want.hook}`")
        if want.comment != have.comment:
            out.append(f'{where}: comment "{have.comment}", must be "{want.comment}"')
        if want.rules != have.rules:
            out.append(f"{where}: {_first_rule_difference(want.rules, have.rules)}")
    return out


def _first_rule_difference(want: Sequence[str], have: Sequence[str]) -> str:
    for number, (w, h) in enumerate(zip(want, have, strict=False), start=1):
        if w != h:
            return f"rule {number} is `{_short(h)}`, must be `{_short(w)}`"
    if len(have) < len(want):
        return (
            f"rule {len(have) + 1} `{_short(want[len(have)])}` is missing"
            f" ({len(have)} of {len(want)} rules)"
        )
    return (
        f"extra rule {len(want) + 1} `{_short(have[len(want)])}`"
        f" ({len(have)} rules, must be {len(want)})"
    )


def _short(rule: str, limit: int = 160) -> str:
    return rule if len(rule) <= limit else rule[: limit - 3] + "..."


# --- DNS ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DnsQuestion:
    """One question for the responder, and the answer etcd makes: the
    record values (addresses, or PTR targets with the final dot), or None
    for NXDOMAIN. `about` says whose the name is."""

    name: str  # absolute, with the final dot
    rdtype: str  # "A", "AAAA" or "PTR"
    expected: frozenset[str] | None
    about: str


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """What the responder said: its rcode ("NOERROR", "NXDOMAIN", ...) and
    the values of the answer's records of the type asked (lowercased), or
    `error` when it did not answer."""

    rcode: str = ""
    values: frozenset[str] = frozenset()
    error: str | None = None


def _expected(records: DnsRecords, name: str, rdtype: str) -> frozenset[str] | None:
    found = records.lookup(name)
    if found is None:
        return None
    if rdtype == "PTR":
        return frozenset(f"{target}." for target in found.ptr)
    version = 6 if rdtype == "AAAA" else 4
    return frozenset(str(a) for a in found.addresses if a.version == version)


def dns_questions(
    in_force: ServicesInForce, extra_vips: Iterable[IPAddress] = ()
) -> list[DnsQuestion]:
    """Every service's name and tasks name, in each family the cluster
    has, and the PTR of each of its VIPs, in name order; then the PTR of
    each of `extra_vips` (VIPs the table holds and etcd does not). None
    without DNS records."""
    records = in_force.records
    if records is None:
        return []
    versions = in_force.ruleset.versions
    out: list[DnsQuestion] = []
    for name in sorted(in_force.services):
        service = in_force.services[name]
        owner = f"{name.lower()}.{records.domain}"
        for text in (owner, f"{TASKS_LABEL}.{owner}"):
            for version in versions:
                rdtype = RECORD_TYPES[version]
                expected = _expected(records, text, rdtype)
                out.append(DnsQuestion(f"{text}.", rdtype, expected, f"service {name}"))
        for vip in service.vips:
            reverse = reverse_name(vip)
            expected = _expected(records, reverse, "PTR")
            out.append(DnsQuestion(f"{reverse}.", "PTR", expected, f"service {name}"))
    known = {vip for service in in_force.services.values() for vip in service.vips}
    for vip in sorted(set(extra_vips) - known, key=lambda a: (a.version, int(a))):
        reverse = reverse_name(vip)
        if records.authoritative(reverse):
            about = f"VIP {vip}, in the table but no service's in etcd"
            out.append(DnsQuestion(f"{reverse}.", "PTR", _expected(records, reverse, "PTR"), about))
    return out


def _values(values: Iterable[str]) -> str:
    return ", ".join(sorted(values)) or "nothing"


def dns_differences(
    server: str, questions: Sequence[DnsQuestion], answers: Mapping[DnsQuestion, DnsAnswer]
) -> list[str]:
    """How the responder at `server` answered `questions` otherwise than
    etcd says (a question without an answer counts as not answered)."""
    out: list[str] = []
    for q in questions:
        got = answers.get(q, DnsAnswer(error="not asked"))
        head = f"{q.name} {q.rdtype} at {server} ({q.about})"
        if got.error is not None:
            out.append(f"{head}: no answer: {got.error}")
        elif q.expected is None:
            if got.rcode != "NXDOMAIN":
                out.append(f"{head}: {got.rcode} {_values(got.values)}, must be NXDOMAIN")
        elif got.rcode != "NOERROR":
            out.append(f"{head}: {got.rcode}, must be NOERROR with {_values(q.expected)}")
        elif got.values != q.expected:
            missing, extra = q.expected - got.values, got.values - q.expected
            parts = [f"{_values(missing)} missing"] if missing else []
            parts += [f"{_values(extra)} extra"] if extra else []
            out.append(f"{head}: {'; '.join(parts)}")
    return out


def vips_in_table(elements: Mapping[MapId, frozenset[str]] | None) -> set[IPAddress]:
    """The VIPs the listed tables' VIP maps hold (with or without backends)."""
    found: set[IPAddress] = set()
    for (_, name), held in (elements or {}).items():
        if not name.startswith(("vips_", "noep_vips_")):
            continue
        for element in held:
            try:
                found.add(ip_address(element.split(" . ", 1)[0]))
            except ValueError:
                continue
    return found
