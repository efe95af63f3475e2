"""The `overlayctl` commands that work on the cluster's state in etcd
directly, with or without a daemon: `leases`, `network show|set`, and
`leave` (release this host's lease on purpose)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from overlayd.cli.common import print_json, settings_from, table
from overlayd.config import AgentConfig, parse_network_config
from overlayd.errors import ConfigError, LeaseError
from overlayd.plan.ipam import is_candidate
from overlayd.plan.leases import (
    config_key,
    parse_lease_key,
    read_lease,
    subnet_key,
    subnets_prefix,
)
from overlayd.store.etcd import EtcdAccess, EtcdStore
from overlayd.surfaces.subnetfile import read_subnet, read_subnet6
from overlayd.surfaces.telemetry import subnet_order


async def lease_rows(access: EtcdAccess, prefix: str) -> list[dict[str, str]]:
    async with EtcdStore(access) as store:
        config_raw, _ = await store.get(config_key(prefix))
        raw, _ = await store.get_prefix(subnets_prefix(prefix))
    config = None
    if config_raw is not None:
        try:
            config = parse_network_config(config_raw)
        except ConfigError:
            config = None
    rows = []
    for key, value in sorted(raw.items()):
        row = {
            "key": key,
            "subnet": "",
            "public_ip": "",
            "vtep_mac": "",
            "ipv6_subnet": "",
            "public_ipv6": "",
            "vtep_mac_v6": "",
            "status": "ok",
        }
        try:
            subnet, subnet6 = parse_lease_key(key, prefix)
            lease, why6 = read_lease(subnet, subnet6, value)
            row.update(
                subnet=str(lease.subnet), public_ip=str(lease.public_ip), vtep_mac=lease.vtep_mac
            )
            if lease.has_ipv6:
                row.update(
                    ipv6_subnet=str(lease.ipv6_subnet),
                    public_ipv6=str(lease.public_ipv6),
                    vtep_mac_v6=lease.vtep_mac_v6,
                )
            if config is not None and not is_candidate(config, lease.subnet):
                row["status"] = f"does not fit {config.network}/{config.subnet_len}"
            elif why6 is not None:
                row["status"] = f"IPv6 half unusable: {why6}"
        except LeaseError as exc:
            row["status"] = f"invalid: {exc}"
        rows.append(row)
    # Invalid leases (no subnet) last.
    return sorted(rows, key=lambda r: subnet_order(r["subnet"]) if r["subnet"] else (999,))


def cmd_leases(args: argparse.Namespace) -> int:
    s = settings_from(args)
    rows = asyncio.run(lease_rows(s.etcd, s.etcd_prefix))
    if args.json:
        print_json(rows)
    elif not rows:
        print(f"no leases under {subnets_prefix(s.etcd_prefix)}")
    else:
        print(
            table(
                [
                    [
                        r["subnet"] or r["key"],
                        r["public_ip"],
                        r["vtep_mac"] or "-",
                        r["ipv6_subnet"] or "-",
                        r["public_ipv6"] or "-",
                        r["status"],
                    ]
                    for r in rows
                ],
                ["SUBNET", "PUBLIC IP", "VTEP MAC", "IPV6 SUBNET", "PUBLIC IPV6", "STATUS"],
            )
        )
    return 0


async def _network_show(s: AgentConfig) -> tuple[str, bytes | None]:
    key = config_key(s.etcd_prefix)
    async with EtcdStore(s.etcd) as store:
        value, _ = await store.get(key)
    return key, value


async def _network_set(s: AgentConfig, text: bytes, *, force: bool, dry_run: bool) -> str:
    config = parse_network_config(text)  # ConfigError names the field
    key = config_key(s.etcd_prefix)
    async with EtcdStore(s.etcd) as store:
        raw, _ = await store.get_prefix(subnets_prefix(s.etcd_prefix))
        orphans = []
        for lease_key in sorted(raw):
            try:
                subnet, subnet6 = parse_lease_key(lease_key, s.etcd_prefix)
            except LeaseError:
                continue
            if not is_candidate(config, subnet):
                orphans.append(str(subnet))
            elif (
                subnet6 is not None
                and config.ipv6 is not None
                and not is_candidate(config.ipv6, subnet6)
            ):
                orphans.append(str(subnet6))
        if orphans and not force:
            raise ConfigError(
                "Network",
                f"{len(orphans)} existing lease(s) would not fit the new config"
                f" ({', '.join(orphans[:5])}{', ...' if len(orphans) > 5 else ''}); their hosts"
                " would have to lease again and their containers be renumbered. Use --force"
                " to write it anyway",
            )
        if dry_run:
            return f"{key}: valid; {len(orphans)} lease(s) would be orphaned; not written"
        await store.put(key, text)
    note = f"; {len(orphans)} host(s) will lease again" if orphans else ""
    return f"wrote {key}{note}"


def cmd_network(args: argparse.Namespace) -> int:
    s = settings_from(args)
    if args.network_command == "show":
        key, value = asyncio.run(_network_show(s))
        if value is None:
            raise ConfigError("Network", f"no network config at {key}")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        error = None
        try:
            parse_network_config(value)
        except ConfigError as exc:
            error = str(exc)
        if args.json:
            print_json({"key": key, "config": parsed, "valid": error is None, "error": error})
        else:
            print(json.dumps(parsed, indent=2) if parsed is not None else value.decode())
            print(f"# {key}: {'valid' if error is None else 'INVALID: ' + error}")
        return 0 if error is None else 1
    text = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    outcome = asyncio.run(_network_set(s, text, force=args.force, dry_run=args.dry_run))
    print(json.dumps({"result": outcome}) if args.json else outcome)
    return 0


# --- leave ---


async def _leave(access: EtcdAccess, prefix: str, subnet_file: Path) -> str:
    subnet = read_subnet(subnet_file)
    if subnet is None:
        raise LeaseError(f"{subnet_file} names no subnet: this host holds no lease to release")
    # A dual-stack host's key names its IPv6 subnet too.
    key = subnet_key(prefix, subnet, read_subnet6(subnet_file))
    async with EtcdStore(access) as store:
        if not await store.delete(key):
            return f"{key} was not leased"
        await asyncio.sleep(2)
        if (await store.get(key))[0] is not None:
            return (
                f"released {key}, but it was leased again at once: overlayd is still"
                " running on this host; stop it first (or use `overlayd --teardown`)"
            )
    return f"released {key}; peers remove this host's entries now"


def cmd_leave(args: argparse.Namespace) -> int:
    s = settings_from(args)
    outcome = asyncio.run(_leave(s.etcd, s.etcd_prefix, s.subnet_file))
    print(json.dumps({"result": outcome}) if args.json else outcome)
    return 0
