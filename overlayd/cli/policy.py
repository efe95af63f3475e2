"""`overlayctl policy ...`, `overlayctl endpoints` and `overlayctl endpoint
label`: network policy as etcd holds it, read and written with the
daemon's settings, and judged by the same pure code the daemons run.

    policy apply FILE|-      validate (parse_policy, render_policy), then
                             write <own>/policies/<name>; `--wait` waits
                             until every live host enforces it
    policy list | show NAME | delete NAME
    policy check SRC DST PORT/PROTO
                             the verdict, from etcd: the usable policies,
                             the usable endpoints of the hosts that hold
                             leases (select_endpoints), PolicyChecker
    policy wait              until every live host's status key reports a
                             revision at least R
    endpoints                the registrations, usable and rejected
    endpoint label NAME|ID|KEY key=value... key-

A *live host* holds a lease under the flannel prefix and publishes a status
key (`<own>/status/<host>`); a host with a lease and no status key (flannel,
or an overlayd from before network policy) does not enforce policies, and
is named in a warning rather than waited for.

A revision R is in force on a host once its status says R or later: its
mirror had seen every change up to R and a pass succeeded after that. By
default `policy wait` waits for the newest change under the policies and
endpoints prefixes; a deletion leaves no key behind, so `policy delete`
prints its revision and `--wait` waits for that.

Exit status: 0 done (check: allowed); 1 a failure, a timeout, or (check)
denied; 2 a document or argument refused before anything was written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import yaml

from overlayd.cli.common import add_settings_flags, print_json, settings_from, table
from overlayd.config import AgentConfig, parse_network_config
from overlayd.errors import ConfigError, EndpointError, LeaseError, OverlaydError, PolicyError
from overlayd.model import IPAddress
from overlayd.plan.endpoints import (
    MAX_ENDPOINT_BYTES,
    EndpointSelection,
    LabelChanges,
    check_labels,
    endpoints_prefix,
    host_id,
    parse_endpoint_key,
    parse_label_changes,
    select_endpoints,
)
from overlayd.plan.ipam import gateway_address
from overlayd.plan.leases import config_key, parse_lease_key, subnets_prefix
from overlayd.plan.policy import (
    PolicyChecker,
    Verdict,
    parse_policy,
    policies_prefix,
    policy_key,
    render_policy,
    show,
    stored_policies,
)
from overlayd.plan.policy_model import Direction, Endpoint, HostSubnets, Policy, Protocol
from overlayd.plan.selection import select_peers
from overlayd.store.base import Store, StoreUnavailable, WatchCompacted
from overlayd.store.etcd import EtcdStore

DEFAULT_WAIT_SECONDS = 30.0
# How often a wait reads the leases again (hosts come and go) when no
# status changes; status changes themselves wake it through a watch.
REREAD_SECONDS = 1.0
LABEL_ATTEMPTS = 10
EXIT_REFUSED = 2


class Refused(OverlaydError):
    """A document or an argument refused before anything was written (exit 2)."""


# --- etcd --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def connect(s: AgentConfig) -> AsyncIterator[Store]:
    """The store the commands use (tests put a FakeStore here)."""
    async with EtcdStore(s.etcd) as store:
        yield store


def status_prefix(own_prefix: str) -> str:
    # The daemon's layout (daemon/status.py), spelled here so that the CLI
    # does not import the daemon.
    return f"{own_prefix.rstrip('/')}/status/"


async def lease_hosts(store: Store, etcd_prefix: str) -> dict[str, str]:
    """host id -> lease key, for every key under the subnets prefix that
    names a subnet (whether its value is usable or not)."""
    raw, _ = await store.get_prefix(subnets_prefix(etcd_prefix))
    found: dict[str, str] = {}
    for key in sorted(raw):
        try:
            subnet, _ = parse_lease_key(key, etcd_prefix)
        except LeaseError:
            continue
        found[host_id(subnet)] = key
    return found


def cluster_hosts(
    config_value: bytes | None, leases: Mapping[str, bytes], etcd_prefix: str
) -> dict[str, HostSubnets]:
    """The hosts whose endpoints count, as every daemon counts them: the
    leases select_peers keeps (a lease outside the network, of another
    backend or overlapping another is not used, and neither are its
    host's endpoints)."""
    if config_value is None:
        raise ConfigError("Network", f"no network config at {config_key(etcd_prefix)}")
    config = parse_network_config(config_value)
    peers = select_peers(config, None, leases, etcd_prefix).peers
    return {host_id(lease.subnet): HostSubnets(lease.subnet, lease.ipv6_subnet) for lease in peers}


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What etcd holds, as the daemons read it."""

    policies: list[Policy]
    rejected_policies: dict[str, str]
    policy_revisions: dict[str, int]  # key -> mod revision
    selection: EndpointSelection
    hosts: dict[str, HostSubnets]
    newest: int  # the newest mod revision under policies/ and endpoints/
    raw_endpoints: dict[str, bytes] = field(default_factory=dict)


async def read_state(store: Store, etcd_prefix: str, own_prefix: str) -> PolicyState:
    config_value, _ = await store.get(config_key(etcd_prefix))
    leases, _ = await store.get_prefix(subnets_prefix(etcd_prefix))
    policies_raw, _ = await store.get_prefix_revisions(policies_prefix(own_prefix))
    endpoints_raw, _ = await store.get_prefix_revisions(endpoints_prefix(own_prefix))
    hosts = cluster_hosts(config_value, leases, etcd_prefix)
    policies, rejected = stored_policies({k: v for k, (v, _) in policies_raw.items()}, own_prefix)
    raw_endpoints = {k: v for k, (v, _) in endpoints_raw.items()}
    return PolicyState(
        policies=policies,
        rejected_policies=rejected,
        policy_revisions={k: rev for k, (_, rev) in policies_raw.items()},
        selection=select_endpoints(raw_endpoints, own_prefix, hosts),
        hosts=hosts,
        newest=max(
            (rev for _, rev in [*policies_raw.values(), *endpoints_raw.values()]), default=0
        ),
        raw_endpoints=raw_endpoints,
    )


# --- policy apply / delete / list / show ----------------------------------------------------


def read_document(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def validate(document: bytes) -> tuple[Policy, str]:
    """The policy and its canonical text; Refused naming the field."""
    try:
        policy = parse_policy(document)
        return policy, render_policy(policy)
    except PolicyError as exc:
        raise Refused(f"policy refused, nothing written: {exc}") from exc


async def apply_policy(store: Store, own_prefix: str, document: bytes) -> tuple[str, int]:
    """Validate, then write; (name, revision of the write)."""
    policy, text = validate(document)
    revision = await store.put_revision(policy_key(own_prefix, policy.name), text)
    return policy.name, revision


async def delete_policy(store: Store, own_prefix: str, name: str) -> int:
    """The revision of the deletion; OverlaydError when there is no such policy."""
    revision = await store.delete_revision(policy_key(own_prefix, name))
    if revision is None:
        raise OverlaydError(f"no policy {name!r} under {policies_prefix(own_prefix)}")
    return revision


def selector_text(policy: Policy) -> str:
    selector = policy.selector
    parts = [f"{k}={v}" for k, v in selector.match_labels]
    parts += [
        f"{r.key} {r.operator.value}" + (f" ({','.join(sorted(r.values))})" if r.values else "")
        for r in selector.match_expressions
    ]
    return ",".join(parts) or "{} (every endpoint)"


def policy_rows(state: PolicyState, own_prefix: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    endpoints = state.selection.endpoints
    for policy in state.policies:
        key = policy_key(own_prefix, policy.name)
        rows.append(
            {
                "name": policy.name,
                "key": key,
                "revision": state.policy_revisions.get(key, 0),
                "selector": selector_text(policy),
                "types": [
                    d.value for d in (Direction.INGRESS, Direction.EGRESS) if d in policy.types
                ],
                "ingress_rules": len(policy.ingress),
                "egress_rules": len(policy.egress),
                "selects": sum(policy.selector.matches(e.labels) for e in endpoints),
                "status": "ok",
            }
        )
    for key, reason in state.rejected_policies.items():
        rows.append(
            {
                "name": key.rsplit("/", 1)[-1],
                "key": key,
                "revision": state.policy_revisions.get(key, 0),
                "selector": "",
                "types": [],
                "ingress_rules": 0,
                "egress_rules": 0,
                "selects": 0,
                "status": f"NOT USED: {reason}",
            }
        )
    return sorted(rows, key=lambda r: str(r["key"]))


def render_policy_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "no policies: every endpoint is open in both directions"
    return table(
        [
            [
                r["name"],
                r["selector"] or "-",
                ",".join(r["types"]) or "-",
                r["ingress_rules"],
                r["egress_rules"],
                r["selects"],
                r["revision"],
                r["status"],
            ]
            for r in rows
        ],
        ["NAME", "SELECTOR", "TYPES", "INGRESS", "EGRESS", "SELECTS", "REVISION", "STATUS"],
    )


async def show_policy(store: Store, own_prefix: str, name: str) -> dict[str, Any]:
    key = policy_key(own_prefix, name)
    found = await store.get_with_revision(key)
    if found is None:
        raise OverlaydError(f"no policy {name!r} under {policies_prefix(own_prefix)}")
    value, revision = found
    answer: dict[str, Any] = {"name": name, "key": key, "revision": revision}
    try:
        policy = parse_policy(value, name=name)
    except PolicyError as exc:
        answer.update(valid=False, error=str(exc), raw=value.decode(errors="replace"))
        return answer
    answer.update(valid=True, policy=json.loads(render_policy(policy)))
    return answer


def render_shown(shown: Mapping[str, Any]) -> str:
    head = f"# {shown['key']} (revision {shown['revision']})"
    if not shown["valid"]:
        return f"{head}\n# NOT USED by any host: {shown['error']}\n{shown['raw']}"
    order = ("name", "selector", "policyTypes", "ingress", "egress")
    document = {key: shown["policy"][key] for key in order if key in shown["policy"]}
    body = yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
    return f"{head}\n{body.rstrip()}"


# --- policy wait --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostProgress:
    host: str  # the host id, "10.244.1.0-24"
    hostname: str
    revision: int  # what its status says it enforces (0: unreadable)


@dataclass(frozen=True, slots=True)
class Progress:
    revision: int  # waited for
    live: tuple[HostProgress, ...]
    without_status: tuple[str, ...]  # host ids with a lease and no status key

    @property
    def behind(self) -> tuple[HostProgress, ...]:
        return tuple(h for h in self.live if h.revision < self.revision)

    @property
    def done(self) -> bool:
        return not self.behind


def _status_revision(value: bytes) -> tuple[int, str]:
    try:
        raw = json.loads(value)
    except (ValueError, RecursionError):  # a status key is a host's, untrusted
        return 0, ""
    if not isinstance(raw, dict):
        return 0, ""
    revision = raw.get("revision")
    hostname = raw.get("hostname")
    return (
        revision if isinstance(revision, int) and not isinstance(revision, bool) else 0,
        hostname if isinstance(hostname, str) else "",
    )


async def progress(store: Store, etcd_prefix: str, own_prefix: str, revision: int) -> Progress:
    leased = await lease_hosts(store, etcd_prefix)
    prefix = status_prefix(own_prefix)
    statuses, _ = await store.get_prefix(prefix)
    live = []
    for host in leased:
        value = statuses.get(prefix + host)
        if value is not None:
            enforced, hostname = _status_revision(value)
            live.append(HostProgress(host, hostname, enforced))
    without = tuple(host for host in leased if prefix + host not in statuses)
    return Progress(revision, tuple(live), without)


async def newest_revision(store: Store, own_prefix: str) -> int:
    """The newest mod revision among the keys under policies/ and endpoints/."""
    newest = 0
    for prefix in (policies_prefix(own_prefix), endpoints_prefix(own_prefix)):
        found, _ = await store.get_prefix_revisions(prefix)
        newest = max([newest, *(rev for _, rev in found.values())])
    return newest


async def wait_enforced(
    store: Store,
    etcd_prefix: str,
    own_prefix: str,
    revision: int,
    within: float,
) -> tuple[Progress, float]:
    """Until every live host enforces `revision`, or `within` seconds;
    the last progress seen and the seconds waited. A watch on the status
    keys wakes the wait; the leases are read again at least every
    REREAD_SECONDS (a host that goes stops being waited for)."""
    started = time.monotonic()
    changed = asyncio.Event()
    _, header = await store.get(status_prefix(own_prefix))

    async def watch() -> None:
        # Without a watch (etcd restarting, a compacted revision), the
        # rereads below still get there: only later.
        with contextlib.suppress(StoreUnavailable, WatchCompacted):
            async for _ in store.watch_prefix(status_prefix(own_prefix), header + 1):
                changed.set()

    watcher = asyncio.create_task(watch())
    try:
        while True:
            changed.clear()
            found = await progress(store, etcd_prefix, own_prefix, revision)
            left = within - (time.monotonic() - started)
            if found.done or left <= 0:
                return found, time.monotonic() - started
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, REREAD_SECONDS))
    finally:
        # Cancelled until it is done: a cancellation that arrives just as
        # aetcd's watch creation completes is swallowed by Python 3.11's
        # asyncio.wait_for inside it (the watch then runs on, and a single
        # cancel-and-await hangs; seen in the lab, about 1 in 20 waits).
        while not watcher.done():
            watcher.cancel()
            await asyncio.wait({watcher}, timeout=0.1)
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def render_progress(found: Progress, seconds: float, timeout: float) -> str:
    lines = []
    live = len(found.live)
    if found.done:
        lines.append(
            f"revision {found.revision} is in force on {live} of {live} live host(s)"
            f" ({seconds * 1000:.0f} ms)"
        )
    else:
        behind = ", ".join(f"{h.host} (at {h.revision})" for h in found.behind)
        lines.append(
            f"timed out after {timeout:g} s: revision {found.revision} is not in force on"
            f" {len(found.behind)} of {live} live host(s): {behind}"
        )
    for h in found.live:
        mark = "ok" if h.revision >= found.revision else "BEHIND"
        lines.append(f"  {h.host:<20} {h.hostname or '-':<24} revision {h.revision}  {mark}")
    return "\n".join(lines)


def warn_without_status(found: Progress) -> None:
    if found.without_status:
        print(
            f"warning: {len(found.without_status)} host(s) hold a lease but publish no"
            f" status: {', '.join(found.without_status)}. They do not enforce policies"
            " (flannel, or an overlayd without network policy); their containers are"
            " open in both directions.",
            file=sys.stderr,
        )
    if not found.live:
        print("warning: no live host enforces policies", file=sys.stderr)


def progress_json(found: Progress, seconds: float) -> dict[str, Any]:
    return {
        "revision": found.revision,
        "done": found.done,
        "seconds": round(seconds, 4),
        "hosts": [
            {"host": h.host, "hostname": h.hostname, "revision": h.revision} for h in found.live
        ],
        "without_status": list(found.without_status),
    }


# --- policy check ---------------------------------------------------------------------


def parse_port(text: str) -> tuple[Protocol, int]:
    """`80/tcp` (the protocol's case does not matter; a bare port is TCP)."""
    port_text, slash, protocol_text = text.partition("/")
    protocols = {p.value: p for p in Protocol}
    protocol = protocols.get(protocol_text.upper() if slash else "TCP")
    if protocol is None:
        raise Refused(f"{show(text)}: the protocol is one of tcp, udp, sctp")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise Refused(f"{show(text)}: write PORT/PROTO, e.g. 80/tcp (ports 1 to 65535)")
    return protocol, int(port_text)


def find_endpoints(text: str, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
    """Endpoints named `text`: by key, by id, else by name."""
    for found in (
        [e for e in endpoints if e.key == text],
        [e for e in endpoints if e.id == text],
        [e for e in endpoints if e.name == text],
    ):
        if found:
            return found
    return []


def resolve(text: str, state: PolicyState, role: str) -> tuple[list[IPAddress], Endpoint | None]:
    """An address (of anyone), or an endpoint's addresses by its name, id
    or key; Refused when neither, or when the name is ambiguous."""
    with contextlib.suppress(ValueError):
        return [ip_address(text)], None
    found = find_endpoints(text, state.selection.endpoints)
    if len(found) > 1:
        keys = ", ".join(e.key for e in found)
        raise Refused(f"{role} {show(text)} names {len(found)} endpoints ({keys}): give a key")
    if not found:
        rejected = [
            f"{key} ({reason})"
            for key, reason in state.selection.rejected.items()
            if key.rsplit("/", 1)[-1] == text or _raw_name(state.raw_endpoints.get(key)) == text
        ]
        hint = f"; not used: {'; '.join(rejected)}" if rejected else ""
        raise Refused(f"{role} {show(text)} is no address and no usable endpoint's name{hint}")
    return list(found[0].addresses), found[0]


def _raw_name(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        raw = json.loads(value)
    except (ValueError, RecursionError):
        return None
    name = raw.get("name") if isinstance(raw, dict) else None
    return name if isinstance(name, str) else None


def pick_family(
    sources: list[IPAddress], destinations: list[IPAddress], version: int | None
) -> tuple[IPAddress, IPAddress]:
    versions = [version] if version is not None else [4, 6]
    for wanted in versions:
        src = next((a for a in sources if a.version == wanted), None)
        dst = next((a for a in destinations if a.version == wanted), None)
        if src is not None and dst is not None:
            return src, dst
    raise Refused(
        "the source and destination have no address of "
        + (f"IPv{version}" if version is not None else "one family")
    )


def own_host_note(
    src: IPAddress, dst: IPAddress, checker: PolicyChecker, hosts: Mapping[str, HostSubnets]
) -> str | None:
    """Traffic between an endpoint and its own host's bridge address never
    crosses the forward hook: never judged (as in Kubernetes)."""
    for local, other in ((checker.endpoint(src), dst), (checker.endpoint(dst), src)):
        if local is None:
            continue
        subnets = hosts.get(local.host)
        if subnets is None:
            continue
        gateways: set[IPAddress] = {gateway_address(subnets.subnet)}
        if subnets.subnet6 is not None:
            gateways.add(gateway_address(subnets.subnet6))
        if other in gateways:
            return (
                f"{other} is the bridge address of {local.name}'s own host: traffic between"
                " a container and its own host is never judged"
            )
    return None


@dataclass(frozen=True, slots=True)
class CheckResult:
    src: IPAddress
    dst: IPAddress
    protocol: Protocol
    port: int
    verdict: Verdict
    note: str | None

    @property
    def allowed(self) -> bool:
        return self.note is not None or self.verdict.allowed


def check(
    state: PolicyState, src_text: str, dst_text: str, port_text: str, version: int | None = None
) -> CheckResult:
    protocol, port = parse_port(port_text)
    sources, _ = resolve(src_text, state, "SRC")
    destinations, _ = resolve(dst_text, state, "DST")
    src, dst = pick_family(sources, destinations, version)
    checker = PolicyChecker(state.policies, state.selection.endpoints)
    return CheckResult(
        src,
        dst,
        protocol,
        port,
        checker.verdict(src, dst, protocol, port),
        own_host_note(src, dst, checker, state.hosts),
    )


def _side(address: IPAddress, endpoint: Endpoint | None) -> str:
    if endpoint is None:
        return f"{address} (no endpoint's)"
    return f"{address} ({endpoint.name} on {endpoint.hostname or endpoint.host})"


def _direction_text(name: str, where: Endpoint | None, judged: Any) -> str:
    at = f"{name} at {where.name if where is not None else 'the other end'}"
    if where is None:
        return f"{at}: not judged (no endpoint has the address)"
    if not judged.isolated:
        return f"{at}: open (no policy selects it for {name})"
    allowed = ", ".join(judged.allowed_by) or "none"
    return f"{at}: selected by {', '.join(judged.selected_by)}; allowed by {allowed}"


def render_check(result: CheckResult) -> str:
    v = result.verdict
    head = (
        f"{'allowed' if result.allowed else 'denied'}: {_side(result.src, v.source)} ->"
        f" {_side(result.dst, v.destination)} {result.port}/{result.protocol.value.lower()}"
    )
    lines = [head]
    if result.note is not None:
        lines.append(f"  {result.note}")
    else:
        lines.append("  " + _direction_text("egress", v.source, v.egress))
        lines.append("  " + _direction_text("ingress", v.destination, v.ingress))
    return "\n".join(lines)


def check_json(result: CheckResult) -> dict[str, Any]:
    v = result.verdict

    def side(address: IPAddress, endpoint: Endpoint | None) -> dict[str, Any]:
        found: dict[str, Any] = {"address": str(address), "endpoint": None}
        if endpoint is not None:
            found["endpoint"] = {"key": endpoint.key, "name": endpoint.name, "host": endpoint.host}
        return found

    def direction(judged: Any) -> dict[str, Any]:
        return {
            "isolated": judged.isolated,
            "selected_by": list(judged.selected_by),
            "allowed_by": list(judged.allowed_by),
            "allowed": judged.allowed,
        }

    return {
        "allowed": result.allowed,
        "source": side(result.src, v.source),
        "destination": side(result.dst, v.destination),
        "protocol": result.protocol.value,
        "port": result.port,
        "egress": direction(v.egress),
        "ingress": direction(v.ingress),
        "note": result.note,
    }


# --- endpoints ---------------------------------------------------------------------------


def endpoint_rows(state: PolicyState) -> dict[str, Any]:
    usable = [
        {
            "key": e.key,
            "id": e.id,
            "name": e.name,
            "host": e.host,
            "hostname": e.hostname,
            "addresses": [str(a) for a in e.addresses],
            "labels": dict(e.labels),
            "registered": e.registered,
        }
        for e in sorted(state.selection.endpoints, key=lambda e: (e.host, e.name, e.id))
    ]
    rejected = [
        {"key": key, "name": _raw_name(state.raw_endpoints.get(key)), "reason": reason}
        for key, reason in sorted(state.selection.rejected.items())
    ]
    return {"endpoints": usable, "rejected": rejected}


def render_endpoint_rows(rows: Mapping[str, Any]) -> str:
    lines = []
    if rows["endpoints"]:
        lines.append(
            table(
                [
                    [
                        e["name"],
                        f"{e['hostname'] or '-'} ({e['host']})",
                        ",".join(e["addresses"]),
                        ",".join(f"{k}={v}" for k, v in sorted(e["labels"].items())) or "-",
                        e["id"][:12],
                    ]
                    for e in rows["endpoints"]
                ],
                ["NAME", "HOST", "ADDRESSES", "LABELS", "ID"],
            )
        )
    else:
        lines.append("no usable endpoints")
    if rows["rejected"]:
        lines.append(f"\nnot used ({len(rows['rejected'])}):")
        lines += [f"  {r['key']}: {r['reason']}" for r in rows["rejected"]]
    return "\n".join(lines)


# --- endpoint label ------------------------------------------------------------------------


def label_target(raw: Mapping[str, bytes], own_prefix: str, target: str) -> str:
    """The key of the one registration `target` names: its key, its id, or
    its name (usable or not: a rejected endpoint can be relabelled too).
    EndpointError when none or several."""
    if target in raw:
        return target
    prefix = endpoints_prefix(own_prefix)
    by_id, by_name = [], []
    for key, value in raw.items():
        if not key.startswith(prefix):
            continue
        if key.rsplit("/", 1)[-1] == target:
            by_id.append(key)
        elif _raw_name(value) == target:
            by_name.append(key)
    found = sorted(set(by_id or by_name))
    if not found:
        raise EndpointError(f"no endpoint is named {show(target)} (a name, an id or a key)")
    if len(found) > 1:
        raise EndpointError(
            f"{show(target)} names {len(found)} endpoints ({', '.join(found)}): give the key"
        )
    return found[0]


@dataclass(frozen=True, slots=True)
class Labelled:
    key: str
    labels: dict[str, str]
    revision: int  # of the write (the key's mod revision after it)
    changed: bool


def relabelled(value: bytes, changes: LabelChanges, key: str) -> tuple[bytes, dict[str, str]]:
    """The registration with its labels changed (every other field as it
    was); EndpointError for a value that is no registration, or one the
    labels would make too large."""
    try:
        raw = json.loads(value)
    except RecursionError as exc:
        raise EndpointError(f"{key}: the value is not JSON: nested too deeply") from exc
    except ValueError as exc:
        raise EndpointError(f"{key}: the value is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise EndpointError(f"{key}: the value is not a JSON object")
    labels = check_labels(raw.get("labels", {}), f"{key}: labels")
    new = changes.apply(labels)
    raw["labels"] = new
    # The registry's spelling (render_endpoint): sorted keys, no spaces.
    text = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > MAX_ENDPOINT_BYTES:
        raise EndpointError(
            f"{key}: with these labels the value is {len(text)} bytes, more than"
            f" {MAX_ENDPOINT_BYTES}"
        )
    return text, new


async def label_endpoint(
    store: Store, own_prefix: str, target: str, changes: LabelChanges
) -> Labelled:
    """Change one registration's labels in place: read with its lease,
    written back bound to the same lease (replace_bound), so it still goes
    with its host; another writer in between makes it read and try again."""
    raw, _ = await store.get_prefix(endpoints_prefix(own_prefix))
    key = label_target(raw, own_prefix, target)
    parse_endpoint_key(key, own_prefix)  # only endpoint keys are written
    for _ in range(LABEL_ATTEMPTS):
        found = await store.get_with_lease(key)
        if found is None:
            raise EndpointError(f"{key} is gone (its container stopped, or its host's lease ended)")
        value, mod_revision, _lease = found
        new_value, labels = relabelled(value, changes, key)
        if new_value == value:
            return Labelled(key, labels, mod_revision, changed=False)
        if await store.replace_bound(key, new_value, mod_revision):
            after = await store.get_with_revision(key)
            return Labelled(key, labels, after[1] if after is not None else 0, changed=True)
    raise EndpointError(f"{key} changed {LABEL_ATTEMPTS} times while being labelled: try again")


# --- commands ----------------------------------------------------------------------------


def _own(s: AgentConfig) -> str:
    return s.overlayd_prefix


def _wait_and_report(
    s: AgentConfig, revision: int, timeout: float, as_json: bool, head: dict[str, Any]
) -> int:
    async def go() -> tuple[Progress, float]:
        async with connect(s) as store:
            return await wait_enforced(store, s.etcd_prefix, _own(s), revision, timeout)

    found, seconds = asyncio.run(go())
    if as_json:
        print_json({**head, "wait": progress_json(found, seconds)})
    else:
        warn_without_status(found)
        print(render_progress(found, seconds, timeout))
    return 0 if found.done else 1


def cmd_policy_apply(args: argparse.Namespace) -> int:
    s = settings_from(args)
    document = read_document(args.file)

    async def go() -> tuple[str, int]:
        # Refused before etcd is dialled: a bad document never waits on it.
        validate(document)
        async with connect(s) as store:
            return await apply_policy(store, _own(s), document)

    name, revision = asyncio.run(go())
    head = {"name": name, "key": policy_key(_own(s), name), "revision": revision}
    if args.wait:
        if not args.json:
            print(f"policy {name} applied at revision {revision}")
        return _wait_and_report(s, revision, args.timeout, args.json, head)
    print(json.dumps(head) if args.json else f"policy {name} applied at revision {revision}")
    return 0


def cmd_policy_delete(args: argparse.Namespace) -> int:
    s = settings_from(args)

    async def go() -> int:
        async with connect(s) as store:
            return await delete_policy(store, _own(s), args.name)

    revision = asyncio.run(go())
    head = {"name": args.name, "deleted": True, "revision": revision}
    if args.wait:
        if not args.json:
            print(f"policy {args.name} deleted at revision {revision}")
        return _wait_and_report(s, revision, args.timeout, args.json, head)
    print(json.dumps(head) if args.json else f"policy {args.name} deleted at revision {revision}")
    return 0


def _state(s: AgentConfig) -> PolicyState:
    async def go() -> PolicyState:
        async with connect(s) as store:
            return await read_state(store, s.etcd_prefix, _own(s))

    return asyncio.run(go())


def cmd_policy_list(args: argparse.Namespace) -> int:
    s = settings_from(args)
    rows = policy_rows(_state(s), _own(s))
    if args.json:
        print_json(rows)
    else:
        print(render_policy_rows(rows))
    return 0


def cmd_policy_show(args: argparse.Namespace) -> int:
    s = settings_from(args)

    async def go() -> dict[str, Any]:
        async with connect(s) as store:
            return await show_policy(store, _own(s), args.name)

    shown = asyncio.run(go())
    if args.json:
        print_json(shown)
    else:
        print(render_shown(shown))
    return 0 if shown["valid"] else 1


def cmd_policy_check(args: argparse.Namespace) -> int:
    s = settings_from(args)
    result = check(_state(s), args.src, args.dst, args.port, 6 if args.ipv6 else None)
    if args.json:
        print_json(check_json(result))
    else:
        print(render_check(result))
    return 0 if result.allowed else 1


def cmd_policy_wait(args: argparse.Namespace) -> int:
    s = settings_from(args)
    revision = args.revision
    if revision is None:

        async def newest() -> int:
            async with connect(s) as store:
                return await newest_revision(store, _own(s))

        revision = asyncio.run(newest())
    return _wait_and_report(s, revision, args.timeout, args.json, {})


def cmd_endpoints(args: argparse.Namespace) -> int:
    s = settings_from(args)
    rows = endpoint_rows(_state(s))
    if args.json:
        print_json(rows)
    else:
        print(render_endpoint_rows(rows))
    return 0


def cmd_endpoint_label(args: argparse.Namespace) -> int:
    s = settings_from(args)
    try:
        changes = parse_label_changes(args.labels)
    except EndpointError as exc:
        raise Refused(str(exc)) from exc

    async def go() -> Labelled:
        async with connect(s) as store:
            return await label_endpoint(store, _own(s), args.endpoint, changes)

    done = asyncio.run(go())
    head = {
        "key": done.key,
        "labels": done.labels,
        "revision": done.revision,
        "changed": done.changed,
    }
    labels = ",".join(f"{k}={v}" for k, v in sorted(done.labels.items())) or "(none)"
    text = f"{done.key}: labels {labels}" + (
        f" at revision {done.revision}" if done.changed else " (unchanged)"
    )
    if args.wait:
        if not args.json:
            print(text)
        return _wait_and_report(s, done.revision, args.timeout, args.json, head)
    print(json.dumps(head) if args.json else text)
    return 0


def refused_exit(exc: Refused) -> int:
    print(f"overlayctl: {exc}", file=sys.stderr)
    return EXIT_REFUSED


def guarded(func: Any) -> Any:
    """A command that exits 2 when it refused its input before writing."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except Refused as exc:
            return refused_exit(exc)

    return run


# --- the argument tree ------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    add_settings_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _wait_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--wait", action="store_true", help=f"then wait until every live host enforces {what}"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_WAIT_SECONDS,
        help="seconds --wait waits (default %(default)g); exit status 1 after it",
    )


def add_commands(sub: Any) -> None:
    """`policy ...`, `endpoints` and `endpoint label` under overlayctl's subparsers."""
    policy_help = "network policy: apply, list, show, delete, check, wait"
    policy = sub.add_parser("policy", help=policy_help, description=policy_help)
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)

    apply = policy_sub.add_parser(
        "apply",
        help="validate a policy document (JSON or YAML; overlayd's shape or a Kubernetes"
        " NetworkPolicy) and write it; exit status 2 when it is refused",
    )
    _common(apply)
    apply.add_argument("file", help="the document, or - for stdin")
    _wait_flags(apply, "it")
    apply.set_defaults(func=guarded(cmd_policy_apply))

    listing = policy_sub.add_parser("list", help="the policies, usable and not")
    _common(listing)
    listing.set_defaults(func=cmd_policy_list)

    show_cmd = policy_sub.add_parser("show", help="one policy's canonical document")
    _common(show_cmd)
    show_cmd.add_argument("name")
    show_cmd.set_defaults(func=cmd_policy_show)

    delete = policy_sub.add_parser("delete", help="delete a policy; prints the revision")
    _common(delete)
    delete.add_argument("name")
    _wait_flags(delete, "the deletion")
    delete.set_defaults(func=cmd_policy_delete)

    check_cmd = policy_sub.add_parser(
        "check",
        help="whether SRC may open a connection to DST on PORT/PROTO, and which policies"
        " decide, from etcd; exit status 0 allowed, 1 denied",
    )
    _common(check_cmd)
    check_cmd.add_argument("src", help="an address, or an endpoint's name, id or key")
    check_cmd.add_argument("dst", help="an address, or an endpoint's name, id or key")
    check_cmd.add_argument("port", help="PORT/PROTO, e.g. 80/tcp, 53/udp")
    check_cmd.add_argument(
        "--ipv6", action="store_true", help="judge the endpoints' IPv6 addresses (default IPv4)"
    )
    check_cmd.set_defaults(func=guarded(cmd_policy_check))

    wait = policy_sub.add_parser(
        "wait",
        help="wait until every live host enforces a revision (default: the newest change"
        " to policies and endpoints); exit status 1 on timeout",
    )
    _common(wait)
    wait.add_argument("--revision", type=int, help="the etcd revision to wait for")
    wait.add_argument("--timeout", type=float, default=DEFAULT_WAIT_SECONDS)
    wait.set_defaults(func=cmd_policy_wait)

    endpoints_help = "the registered endpoints (containers), usable and not, with reasons"
    endpoints = sub.add_parser("endpoints", help=endpoints_help, description=endpoints_help)
    _common(endpoints)
    endpoints.set_defaults(func=cmd_endpoints)

    endpoint = sub.add_parser("endpoint", help="change an endpoint's labels")
    endpoint_sub = endpoint.add_subparsers(dest="endpoint_command", required=True)
    label = endpoint_sub.add_parser(
        "label",
        help="set (key=value) and remove (key-) labels of one endpoint, named by its name,"
        " id or key",
    )
    _common(label)
    label.add_argument("endpoint", help="the endpoint's name, id or etcd key")
    label.add_argument("labels", nargs="+", help="key=value to set, key- to remove")
    _wait_flags(label, "the change")
    label.set_defaults(func=guarded(cmd_endpoint_label))
