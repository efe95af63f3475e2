"""`overlayctl service create|list|show|delete`: services as etcd holds
them, written and read with the daemon's settings and judged by the same
pure code the daemons run (plan/service.py).

    service create FILE|-   validate (parse_service against the network
                            config's ServiceNetwork/IPv6ServiceNetwork), then
                            write the service with its VIPs and node ports
                            claimed in one etcd transaction (store/services.py)
    service list            every usable service: VIPs, ports, selector, and
                            how many endpoints it selects now; a stored
                            value no host uses is a warning on stderr
    service show NAME       one service's canonical definition and backends
    service delete NAME     the service, its VIPs and node ports, at once

Exit status: 0 done; 1 a failure (etcd, no such service); 2 a definition
or argument refused before anything was written (the field named), or a
name, VIP or node port already taken (by which service, said).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from overlayd.cli.common import add_settings_flags, print_json, settings_from, table
from overlayd.cli.policy import Refused, cluster_hosts, connect, guarded, read_document
from overlayd.config import AgentConfig, parse_network_config
from overlayd.errors import ConfigError, OverlaydError, ServiceError
from overlayd.model import IPNetwork
from overlayd.plan.endpoints import endpoints_prefix, select_endpoints
from overlayd.plan.leases import config_key, subnets_prefix
from overlayd.plan.policy_model import Endpoint, LabelSelector
from overlayd.plan.service import (
    NO_SERVICE_NETWORK,
    parse_service,
    render_service,
    service_key,
    services_prefix,
    stored_services,
)
from overlayd.plan.service_model import Service, backends
from overlayd.store.base import Store
from overlayd.store.services import (
    Created,
    ServiceConflict,
    ServiceNetworkFull,
    create_service,
    delete_service,
)

EXAMPLE = """\
example (our shape; a Kubernetes v1 Service is read too):

  name: web
  selector: {matchLabels: {app: web}}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: admin, port: 9000, nodePort: 30900}
  sessionAffinity: ClientIP          # None (default) or ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  externalTrafficPolicy: Cluster     # or Local; only with node ports
  # vip: 10.96.0.10                  # else allocated from ServiceNetwork

The network config needs "ServiceNetwork" (and, for IPv6 VIPs,
"IPv6ServiceNetwork"): see `overlayctl network set`.
"""


# --- etcd ---------------------------------------------------------------------------


async def service_networks(store: Store, etcd_prefix: str) -> tuple[IPNetwork, ...]:
    """The network config's service networks (none: no ServiceNetwork)."""
    value, _ = await store.get(config_key(etcd_prefix))
    if value is None:
        raise ConfigError("Network", f"no network config at {config_key(etcd_prefix)}")
    return parse_network_config(value).service_networks


def validate(document: bytes, networks: Sequence[IPNetwork]) -> Service:
    """The service; Refused naming the field (or ServiceNetwork)."""
    if not networks:
        raise Refused(f"service refused, nothing written: {NO_SERVICE_NETWORK}")
    try:
        service = parse_service(document, service_networks=networks)
        render_service(service)
    except ServiceError as exc:
        raise Refused(f"service refused, nothing written: {exc}") from exc
    return service


async def create(store: Store, etcd_prefix: str, own_prefix: str, document: bytes) -> Created:
    networks = await service_networks(store, etcd_prefix)
    service = validate(document, networks)
    try:
        return await create_service(store, own_prefix, service, networks)
    except (ServiceConflict, ServiceNetworkFull) as exc:
        raise Refused(f"service {service.name} refused, nothing written: {exc}") from exc


@dataclass(frozen=True, slots=True)
class ServiceState:
    """What etcd holds, as the daemons read it."""

    services: dict[str, Service]
    rejected: dict[str, str]  # key -> why no host uses it
    unserved: dict[str, str]  # key -> which of its VIPs no host serves
    revisions: dict[str, int]  # key -> mod revision
    endpoints: tuple[Endpoint, ...]


async def read_state(store: Store, etcd_prefix: str, own_prefix: str) -> ServiceState:
    config_value, _ = await store.get(config_key(etcd_prefix))
    if config_value is None:
        raise ConfigError("Network", f"no network config at {config_key(etcd_prefix)}")
    networks = parse_network_config(config_value).service_networks
    leases, _ = await store.get_prefix(subnets_prefix(etcd_prefix))
    raw, _ = await store.get_prefix_revisions(services_prefix(own_prefix))
    endpoints_raw, _ = await store.get_prefix(endpoints_prefix(own_prefix))
    hosts = cluster_hosts(config_value, leases, etcd_prefix)
    found = stored_services({k: v for k, (v, _) in raw.items()}, own_prefix, networks)
    return ServiceState(
        services=found.services,
        rejected=found.rejected,
        unserved=found.unserved,
        revisions={k: rev for k, (_, rev) in raw.items()},
        endpoints=tuple(select_endpoints(endpoints_raw, own_prefix, hosts).endpoints),
    )


# --- output ---------------------------------------------------------------------------


def selector_text(selector: LabelSelector) -> str:
    parts = [f"{k}={v}" for k, v in selector.match_labels]
    parts += [
        f"{r.key} {r.operator.value}" + (f" ({','.join(sorted(r.values))})" if r.values else "")
        for r in selector.match_expressions
    ]
    return ",".join(parts)


def port_texts(service: Service) -> list[str]:
    """`80/TCP->8080`, with `,node 30080` when the port has a node port."""
    return [
        f"{p.port}/{p.protocol.value}->{p.target_port}"
        + (f",node {p.node_port}" if p.node_port is not None else "")
        + (f" ({p.name})" if p.name else "")
        for p in service.ports
    ]


def service_row(service: Service, state: ServiceState, own_prefix: str) -> dict[str, Any]:
    key = service_key(own_prefix, service.name)
    return {
        "name": service.name,
        "key": key,
        "revision": state.revisions.get(key, 0),
        "vips": [str(v) for v in service.vips],
        "ports": [
            {
                "name": p.name,
                "protocol": p.protocol.value,
                "port": p.port,
                "targetPort": p.target_port,
                "nodePort": p.node_port,
            }
            for p in service.ports
        ],
        "selector": selector_text(service.selector),
        "sessionAffinity": service.affinity.value,
        "externalTrafficPolicy": service.traffic_policy.value,
        "backends": len(backends(service, state.endpoints)),
    }


def render_rows(rows: Sequence[Mapping[str, Any]], state: ServiceState) -> str:
    if not rows:
        return "no services"
    by_name = state.services
    return table(
        [
            [
                r["name"],
                ",".join(r["vips"]),
                ", ".join(port_texts(by_name[r["name"]])),
                r["selector"],
                r["backends"],
            ]
            for r in rows
        ],
        ["NAME", "VIPS", "PORTS", "SELECTOR", "BACKENDS"],
    )


def warn_rejected(rejected: Mapping[str, str], unserved: Mapping[str, str]) -> None:
    for key, reason in sorted(rejected.items()):
        print(f"warning: {key} is not used by any host: {reason}", file=sys.stderr)
    for key, reason in sorted(unserved.items()):
        print(f"warning: {key} is served without a VIP: {reason}", file=sys.stderr)


async def show(store: Store, etcd_prefix: str, own_prefix: str, name: str) -> dict[str, Any]:
    state = await read_state(store, etcd_prefix, own_prefix)
    key = service_key(own_prefix, name)
    service = state.services.get(name)
    if service is not None:
        return {
            **service_row(service, state, own_prefix),
            "valid": True,
            "unserved": state.unserved.get(key),
            "service": json.loads(render_service(service)),
            "endpoints": [
                {"name": e.name, "key": e.key, "addresses": [str(a) for a in e.addresses]}
                for e in backends(service, state.endpoints)
            ],
        }
    if key in state.rejected:
        found = await store.get_with_revision(key)
        raw = found[0].decode(errors="replace") if found is not None else ""
        return {
            "name": name,
            "key": key,
            "revision": state.revisions.get(key, 0),
            "valid": False,
            "error": state.rejected[key],
            "raw": raw,
        }
    raise OverlaydError(f"no service {name!r} under {services_prefix(own_prefix)}")


def render_shown(shown: Mapping[str, Any]) -> str:
    head = f"# {shown['key']} (revision {shown['revision']})"
    if not shown["valid"]:
        return f"{head}\n# NOT USED by any host: {shown['error']}\n{shown['raw']}"
    order = (
        "name",
        "vips",
        "selector",
        "ports",
        "sessionAffinity",
        "sessionAffinityConfig",
        "externalTrafficPolicy",
    )
    document = {k: shown["service"][k] for k in order if k in shown["service"]}
    body = yaml.safe_dump(document, sort_keys=False, default_flow_style=False).rstrip()
    lines = [head, body, f"# {len(shown['endpoints'])} backend(s) now"]
    if shown.get("unserved"):
        lines.insert(1, f"# served without a VIP: {shown['unserved']}")
    lines += [f"#   {e['name']} {','.join(e['addresses'])}" for e in shown["endpoints"]]
    return "\n".join(lines)


# --- commands ---------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    s = settings_from(args)
    document = read_document(args.file)

    async def go() -> Created:
        async with connect(s) as store:
            return await create(store, s.etcd_prefix, s.overlayd_prefix, document)

    done = asyncio.run(go())
    vips = [str(v) for v in done.service.vips]
    key = service_key(s.overlayd_prefix, done.service.name)
    if args.json:
        print(
            json.dumps(
                {"name": done.service.name, "key": key, "vips": vips, "revision": done.revision}
            )
        )
    else:
        print(
            f"service {done.service.name} created with VIP {', '.join(vips)}"
            f" at revision {done.revision}"
        )
    return 0


def _state(s: AgentConfig) -> ServiceState:
    async def go() -> ServiceState:
        async with connect(s) as store:
            return await read_state(store, s.etcd_prefix, s.overlayd_prefix)

    return asyncio.run(go())


def cmd_list(args: argparse.Namespace) -> int:
    s = settings_from(args)
    state = _state(s)
    warn_rejected(state.rejected, state.unserved)
    rows = [service_row(svc, state, s.overlayd_prefix) for svc in state.services.values()]
    if args.json:
        print_json(
            {
                "services": rows,
                "rejected": [{"key": k, "reason": r} for k, r in sorted(state.rejected.items())],
            }
        )
    else:
        print(render_rows(rows, state))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    s = settings_from(args)

    async def go() -> dict[str, Any]:
        async with connect(s) as store:
            return await show(store, s.etcd_prefix, s.overlayd_prefix, args.name)

    shown = asyncio.run(go())
    if args.json:
        print_json(shown)
    else:
        print(render_shown(shown))
    return 0 if shown["valid"] else 1


def cmd_delete(args: argparse.Namespace) -> int:
    s = settings_from(args)

    async def go() -> int:
        async with connect(s) as store:
            return await delete_service(store, s.overlayd_prefix, args.name)

    revision = asyncio.run(go())
    if args.json:
        print(json.dumps({"name": args.name, "deleted": True, "revision": revision}))
    else:
        print(f"service {args.name} deleted at revision {revision}, with its VIPs and node ports")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    add_settings_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_commands(sub: Any) -> None:
    """`service ...` under overlayctl's subparsers."""
    service_help = (
        "services (stable VIPs in front of labelled endpoints): create, list, show, delete"
    )
    service = sub.add_parser("service", help=service_help, description=service_help)
    service_sub = service.add_subparsers(dest="service_command", required=True)

    create_cmd = service_sub.add_parser(
        "create",
        help="validate a service definition (JSON or YAML; overlayd's shape or a Kubernetes"
        " v1 Service) and write it, with its VIP allocated from ServiceNetwork unless given;"
        " exit status 2 when it is refused or its name, VIP or node port is taken",
        description="Validate a service definition and write it to etcd; the VIP (one per"
        " service network) is allocated unless the definition gives it (vip/vips, or"
        " clusterIP/clusterIPs).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(create_cmd)
    create_cmd.add_argument("file", help="the definition, or - for stdin")
    create_cmd.set_defaults(func=guarded(cmd_create))

    listing = service_sub.add_parser(
        "list",
        help="the services: VIPs, ports (port/proto->targetPort, node port), selector, and"
        " how many endpoints each selects now; stored values no host uses are warnings",
    )
    _common(listing)
    listing.set_defaults(func=cmd_list)

    show_cmd = service_sub.add_parser(
        "show", help="one service's canonical definition and its backends now"
    )
    _common(show_cmd)
    show_cmd.add_argument("name")
    show_cmd.set_defaults(func=cmd_show)

    delete = service_sub.add_parser(
        "delete", help="delete a service with its VIPs and node ports (one transaction)"
    )
    _common(delete)
    delete.add_argument("name")
    delete.set_defaults(func=cmd_delete)
