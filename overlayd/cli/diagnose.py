"""`overlayctl diagnose`: asks the daemon and also looks at the kernel and
etcd itself, so that it still helps when the daemon is down; the verdicts
are overlayd.plan.diagnose's. The services' look (table and DNS) is
cli/diagnose_services.py's."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from overlayd.cli.common import print_json, settings_from, table
from overlayd.cli.diagnose_services import service_facts
from overlayd.config import AgentConfig, parse_network_config
from overlayd.dataplane import entries, inspect
from overlayd.dataplane.command import run
from overlayd.dataplane.netlink import Netlink
from overlayd.dataplane.nft import Nft, NftError, NftVxlanFilter
from overlayd.errors import ConfigError, LeaseError
from overlayd.model import IPV4, IPV6, IPNetwork, Lease
from overlayd.plan.cluster import family_plan
from overlayd.plan.desired import device_spec
from overlayd.plan.diagnose import (
    CertificateExpiry,
    FilterFacts,
    Finding,
    HostFacts,
    PolicyFacts,
    diagnose,
)
from overlayd.plan.endpoints import endpoints_prefix
from overlayd.plan.leases import config_key, read_lease, subnet_key, subnets_prefix
from overlayd.plan.policy import policies_prefix
from overlayd.plan.policy_inputs import enforced_ruleset
from overlayd.plan.policy_rules import WHERE
from overlayd.plan.selection import select_peers
from overlayd.plan.vxlan_filter import filter_spec
from overlayd.store.access import certificate_facts
from overlayd.store.etcd import EtcdStore, StoreUnavailable
from overlayd.surfaces.control import DaemonUnreachable, ask
from overlayd.surfaces.subnetfile import (
    read_gwbridge_subnets,
    read_subnet,
    read_subnet6,
    read_variables,
)


def _with_daemon_settings(s: AgentConfig, status: dict[str, Any]) -> AgentConfig:
    """The running daemon knows best where it looks: use its settings."""
    d = status.get("settings") or {}
    try:
        return replace(
            s,
            etcd_endpoints=tuple(d.get("etcd_endpoints") or s.etcd_endpoints),
            etcd_cafile=Path(d["etcd_cafile"]) if d.get("etcd_cafile") else s.etcd_cafile,
            etcd_certfile=Path(d["etcd_certfile"]) if d.get("etcd_certfile") else s.etcd_certfile,
            etcd_keyfile=Path(d["etcd_keyfile"]) if d.get("etcd_keyfile") else s.etcd_keyfile,
            etcd_prefix=d.get("etcd_prefix") or s.etcd_prefix,
            overlayd_prefix=d.get("overlayd_prefix") or s.overlayd_prefix,
            iface=d.get("iface") or s.iface,
            public_ip=IPv4Address(d["public_ip"]) if d.get("public_ip") else s.public_ip,
            subnet_file=Path(d["subnet_file"]) if d.get("subnet_file") else s.subnet_file,
            bridge=d.get("bridge") or s.bridge,
            vxlan_filter=d.get("vxlan_filter", "on" if s.vxlan_filter else "off") == "on",
            dns=d.get("dns", "on" if s.dns else "off") == "on",
            dns_domain=d.get("dns_domain") or s.dns_domain,
        )
    except (TypeError, ValueError):
        return s


async def gather(s: AgentConfig) -> HostFacts:
    facts = HostFacts()
    try:
        facts.daemon_status = await ask(s.control_socket, "status")
        facts.daemon_peers = await ask(s.control_socket, "peers")
        s = _with_daemon_settings(s, facts.daemon_status or {})
    except DaemonUnreachable as exc:
        facts.daemon_error = str(exc)
    subnet = read_subnet(s.subnet_file)
    mtu_text = read_variables(s.subnet_file).get("FLANNEL_MTU")
    facts.subnet_file_mtu = int(mtu_text) if mtu_text and mtu_text.isdigit() else None
    facts.etcd_certificates = [
        CertificateExpiry(c.setting, str(c.path), c.subject, c.not_after, c.problem)
        for c in certificate_facts(s.etcd)
    ]
    try:
        async with EtcdStore(s.etcd) as store:
            everything, _ = await store.get_prefix(s.etcd_prefix.rstrip("/") + "/")
            ours, _ = await store.get_prefix(s.overlayd_prefix.rstrip("/") + "/")
    except (StoreUnavailable, ConfigError) as exc:
        facts.config_error = f"cannot read etcd: {exc}"
        return facts
    raw_config = everything.get(config_key(s.etcd_prefix))
    if raw_config is None:
        facts.config_error = f"no network config at {config_key(s.etcd_prefix)}"
        return facts
    try:
        config = parse_network_config(raw_config)
    except ConfigError as exc:
        facts.config_error = f"the network config in etcd is invalid: {exc}"
        return facts
    if subnet is None:
        facts.lease_problem = f"{s.subnet_file} names no subnet: overlayd has not started here"
        return facts
    facts.own_subnet = str(subnet)
    leases = {k: v for k, v in everything.items() if k.startswith(subnets_prefix(s.etcd_prefix))}
    subnet6 = read_subnet6(s.subnet_file)
    own_key = subnet_key(s.etcd_prefix, subnet, subnet6)
    netlink = Netlink()
    try:
        underlay = await netlink.find_underlay(s.iface, s.public_ip, s.public_ipv6)
        onlink = await netlink.connected_networks(underlay.ifindex)
        onlink6 = await netlink.connected_networks(underlay.ifindex, IPV6)
    finally:
        await netlink.close()
    own_raw = leases.get(own_key)
    try:
        own = read_lease(subnet, subnet6, own_raw)[0] if own_raw is not None else None
    except LeaseError as exc:
        facts.lease_problem = f"{own_key} is not a valid lease: {exc}"
        return facts
    if own is None:
        facts.lease_problem = f"{own_key} is not in etcd: the lease expired or was deleted"
        return facts
    if own.public_ip != underlay.address:
        facts.lease_problem = f"{own_key} belongs to {own.public_ip}, not to this host"
        return facts
    spec = device_spec(
        config=config,
        own=own,
        bridge=s.bridge,
        underlay_ifindex=underlay.ifindex,
        underlay_mtu=underlay.mtu,
        underlay=underlay.name,
    )
    facts.spec = spec
    selection = select_peers(config, own, leases, s.etcd_prefix)
    plan = family_plan(selection, IPV4, config, onlink, s.etcd_prefix, underlay=underlay.name)
    plan6 = family_plan(selection, IPV6, config, onlink6, s.etcd_prefix, underlay=underlay.name)
    # Both families' entries in one comparison (their keys never meet).
    facts.desired = plan.desired | plan6.desired
    facts.rejected = dict(plan.rejected)
    for key, reason in plan6.rejected.items():  # a key may lose one half, or both
        before = facts.rejected.get(key)
        facts.rejected[key] = f"{before}; {reason}" if before else reason
    # Per family: the daemon lists its IPv4 peers one by one and counts
    # its IPv6 ones (the IPv6 halves of the same hosts).
    facts.cluster_peers = {
        str(p.subnet): str(p.public_ip) for p in (*plan.peers.tunneled, *plan.peers.direct)
    }
    facts.cluster_peers6 = {
        str(p.subnet): str(p.public_ip) for p in (*plan6.peers.tunneled, *plan6.peers.direct)
    }
    facts.actual = await entries.read_entries(spec) | await entries.read_entries(spec, family=IPV6)
    for name in (spec.bridge, spec.vtep, spec.vtep6):
        if name:
            facts.devices[name] = await inspect.device(name)
    if spec.vtep and facts.devices.get(spec.vtep) is not None:
        facts.vtep_tx_checksumming = await inspect.tx_checksumming(spec.vtep)
    for key in ("net.ipv4.ip_forward", f"net.ipv4.conf.{spec.bridge}.forwarding"):
        facts.sysctls[key] = inspect.sysctl(key)
    facts.ruleset = await inspect.nft_ruleset()
    gwbridge = read_gwbridge_subnets(s.subnet_file)
    facts.policy = await _policy_facts(s.overlayd_prefix, ours, own, selection.peers, gwbridge)
    facts.services = await service_facts(s, config, ours, own, selection.peers, gwbridge)
    facts.vxlan_filter = s.vxlan_filter
    if s.vxlan_filter:
        for family, planned in ((IPV4, plan), (IPV6, plan6)):
            fs = filter_spec(spec, family)
            if fs is None:
                continue
            tunneled = planned.peers.tunneled
            look = FilterFacts(fs, wanted={str(p.public_ip): str(p.subnet) for p in tunneled})
            try:
                allow = NftVxlanFilter(Nft())
                look.listing = await allow.listing(fs)
                look.sources = await allow.sources(fs)
            except NftError as exc:
                look.error = str(exc)
            facts.filters.append(look)
    return facts


async def _policy_facts(
    own_prefix: str,
    ours: Mapping[str, bytes],
    own: Lease,
    peers: Sequence[Lease],
    gwbridge: tuple[IPNetwork, ...] = (),
) -> PolicyFacts:
    look = PolicyFacts()
    try:
        look.desired, _, _, look.skipped = enforced_ruleset(
            {k: v for k, v in ours.items() if k.startswith(policies_prefix(own_prefix))},
            {k: v for k, v in ours.items() if k.startswith(endpoints_prefix(own_prefix))},
            own_prefix,
            own,
            peers,
            gwbridge=gwbridge,
        )
    except ValueError as exc:
        look.error = f"the policies cannot be enforced: {exc}"
        return look
    nft = Nft()
    look.listing = await nft.listing_json(WHERE)
    if look.listing is not None:
        code, out, _ = await run([*nft.prefix, "-t", "list", "table", *WHERE.split()])
        look.terse = out.decode() if code == 0 else None
    return look


def cmd_diagnose(args: argparse.Namespace) -> int:
    findings = diagnose(asyncio.run(gather(settings_from(args))))
    healthy = all(f.ok for f in findings)
    if args.json:
        print_json({"ok": healthy, "findings": [asdict(f) for f in findings]})
    else:
        print(render_findings(findings))
    return 0 if healthy else 1


def render_findings(findings: Sequence[Finding]) -> str:
    lines = [
        table(
            [["ok" if f.ok else "FAIL", f.check, f.detail] for f in findings],
            ["", "CHECK", "DETAIL"],
        )
    ]
    failed = sum(not f.ok for f in findings)
    lines.append("all is well" if not failed else f"{failed} problem(s) found")
    return "\n".join(lines)
