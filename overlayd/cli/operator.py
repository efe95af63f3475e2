"""The operator commands of `overlayctl`: status, peers, diagnose, network
show|set, events and docker-opts. `status` and `peers` ask the running
daemon over its control socket; `diagnose` asks the daemon and also looks
at the kernel and etcd itself, so that it still helps when the daemon is
down; `network` and `leases` talk to etcd directly."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import aiomqtt

from overlayd.cli.cni import call_plugin, runtime_env
from overlayd.config import (
    AGENT_SETTINGS,
    AgentConfig,
    build_agent_config,
    parse_network_config,
    read_toml,
)
from overlayd.dataplane import entries, inspect
from overlayd.dataplane.netlink import Netlink
from overlayd.errors import ConfigError, LeaseError, OverlaydError
from overlayd.plan.cluster import cluster_plan
from overlayd.plan.desired import device_spec
from overlayd.plan.diagnose import Finding, HostFacts, diagnose
from overlayd.plan.ipam import is_candidate
from overlayd.plan.leases import (
    config_key,
    parse_lease,
    parse_subnet_key,
    subnet_key,
    subnets_prefix,
)
from overlayd.store.etcd import EtcdStore, StoreUnavailable
from overlayd.surfaces.control import DaemonUnreachable, ask
from overlayd.surfaces.mqtt import broker_address
from overlayd.surfaces.subnetfile import read_subnet, read_variables
from overlayd.surfaces.telemetry import subnet_order

DEFAULT_CONFIG_FILE = Path("/etc/overlayd/overlayd.toml")


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def add_settings_flags(p: argparse.ArgumentParser) -> None:
    """The daemon's settings that overlayctl needs, read the way the daemon
    reads them: flags, then OVERLAYD_* variables, then the config file."""
    p.add_argument(
        "--config",
        type=Path,
        help=f"the daemon's TOML settings (default {DEFAULT_CONFIG_FILE} if it exists)",
    )
    p.add_argument("--etcd-endpoints", help="comma-separated etcd URLs")
    p.add_argument("--etcd-prefix", help="etcd key prefix")
    p.add_argument("--control-socket", help="the daemon's control socket")
    p.add_argument("--subnet-file", help="the daemon's subnet file")
    p.add_argument("--iface", help="the daemon's underlay interface (name or address)")
    p.add_argument("--bridge", help="the daemon's container bridge")


def settings_from(args: argparse.Namespace) -> AgentConfig:
    flags = {
        name: getattr(args, name.replace("-", "_"), None)
        for name in AGENT_SETTINGS
        if hasattr(args, name.replace("-", "_"))
    }
    path = args.config
    if path is None and DEFAULT_CONFIG_FILE.exists():
        path = DEFAULT_CONFIG_FILE
    return build_agent_config(flags=flags, file=read_toml(path) if path else None)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


# --- status and peers ----------------------------------------------------------


def render_status(s: dict[str, Any]) -> str:
    lease = s.get("lease") or {}
    last = s.get("last_reconcile")
    if last:
        outcome = "ok" if last["ok"] else f"FAILED ({last['error']})"
        reconcile = (
            f"{outcome} {_duration(last['ago_seconds'])} ago"
            f" ({'full' if last['full'] else 'light'}, {last['changes']} changes,"
            f" {last['seconds'] * 1000:.1f} ms)"
        )
    else:
        reconcile = "not yet"
    drift = ", ".join(f"{kind} {n}" for kind, n in s.get("drift_repairs", {}).items())
    expiry = _duration(lease.get("expires_in_seconds"))
    rows = [
        ["host", f"{lease.get('public_ip', '-')}  (overlayd {s['version']}, pid {s['pid']},"
         f" up {_duration(s['uptime_seconds'])})"],
        ["subnet", lease.get("subnet", "none")],
        ["lease", f"{lease.get('key', '-')}  expires in {expiry}"
         if lease else "none held"],
        ["vtep mac", lease.get("vtep_mac") or "-"],
        ["mode", f"{s.get('mode') or '-'}, egress {s.get('egress')}"],
        ["peers", str(s.get("peers", 0))],
        ["reconcile", reconcile],
        ["drift repaired", drift or "none"],
        ["skipped leases", str(len(s.get("skipped_leases", {})))],
        ["ready", "yes" if s.get("ready") else f"no: {s.get('ready_reason')}"],
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def cmd_status(args: argparse.Namespace) -> int:
    status = asyncio.run(ask(settings_from(args).control_socket, "status"))
    if args.json:
        _print_json(status)
    else:
        print(render_status(status))
    return 0 if status.get("ready") else 1


def cmd_peers(args: argparse.Namespace) -> int:
    peers = asyncio.run(ask(settings_from(args).control_socket, "peers"))
    if args.json:
        _print_json(peers)
    elif not peers:
        print("no peers programmed")
    else:
        print(
            table(
                [[p["subnet"], p["public_ip"], p["vtep_mac"] or "-", p["path"]] for p in peers],
                ["SUBNET", "PUBLIC IP", "VTEP MAC", "PATH"],
            )
        )
    return 0


# --- leases ----------------------------------------------------------------------


async def lease_rows(endpoints: Sequence[str], prefix: str) -> list[dict[str, str]]:
    async with EtcdStore(endpoints) as store:
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
        row = {"key": key, "subnet": "", "public_ip": "", "vtep_mac": "", "status": "ok"}
        try:
            lease = parse_lease(parse_subnet_key(key, prefix), value)
            row.update(
                subnet=str(lease.subnet), public_ip=str(lease.public_ip), vtep_mac=lease.vtep_mac
            )
            if config is not None and not is_candidate(config, lease.subnet):
                row["status"] = f"does not fit {config.network}/{config.subnet_len}"
        except LeaseError as exc:
            row["status"] = f"invalid: {exc}"
        rows.append(row)
    # Invalid leases (no subnet) last.
    return sorted(rows, key=lambda r: subnet_order(r["subnet"]) if r["subnet"] else (999,))


def cmd_leases(args: argparse.Namespace) -> int:
    s = settings_from(args)
    rows = asyncio.run(lease_rows(s.etcd_endpoints, s.etcd_prefix))
    if args.json:
        _print_json(rows)
    elif not rows:
        print(f"no leases under {subnets_prefix(s.etcd_prefix)}")
    else:
        print(
            table(
                [
                    [r["subnet"] or r["key"], r["public_ip"], r["vtep_mac"] or "-", r["status"]]
                    for r in rows
                ],
                ["SUBNET", "PUBLIC IP", "VTEP MAC", "STATUS"],
            )
        )
    return 0


# --- diagnose --------------------------------------------------------------------


def _with_daemon_settings(s: AgentConfig, status: dict[str, Any]) -> AgentConfig:
    """The running daemon knows best where it looks: use its settings."""
    d = status.get("settings") or {}
    try:
        return replace(
            s,
            etcd_endpoints=tuple(d.get("etcd_endpoints") or s.etcd_endpoints),
            etcd_prefix=d.get("etcd_prefix") or s.etcd_prefix,
            iface=d.get("iface") or s.iface,
            public_ip=IPv4Address(d["public_ip"]) if d.get("public_ip") else s.public_ip,
            subnet_file=Path(d["subnet_file"]) if d.get("subnet_file") else s.subnet_file,
            bridge=d.get("bridge") or s.bridge,
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
    try:
        async with EtcdStore(s.etcd_endpoints) as store:
            everything, _ = await store.get_prefix(s.etcd_prefix.rstrip("/") + "/")
    except StoreUnavailable as exc:
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
    own_key = subnet_key(s.etcd_prefix, subnet)
    netlink = Netlink()
    try:
        underlay = await netlink.find_underlay(s.iface, s.public_ip)
        onlink = await netlink.connected_networks(underlay.ifindex)
    finally:
        await netlink.close()
    own_raw = leases.get(own_key)
    try:
        own = parse_lease(subnet, own_raw) if own_raw is not None else None
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
    plan = cluster_plan(config, own, leases, s.etcd_prefix, onlink, underlay=underlay.name)
    facts.desired = plan.desired
    facts.rejected = plan.rejected
    facts.cluster_peers = {
        str(p.subnet): str(p.public_ip) for p in (*plan.peers.tunneled, *plan.peers.direct)
    }
    facts.actual = await entries.read_entries(spec)
    for name in (spec.bridge, spec.vtep):
        if name:
            facts.devices[name] = await inspect.device(name)
    if spec.vtep and facts.devices.get(spec.vtep) is not None:
        facts.vtep_tx_checksumming = await inspect.tx_checksumming(spec.vtep)
    for key in ("net.ipv4.ip_forward", f"net.ipv4.conf.{spec.bridge}.forwarding"):
        facts.sysctls[key] = inspect.sysctl(key)
    facts.ruleset = await inspect.nft_ruleset()
    return facts


def cmd_diagnose(args: argparse.Namespace) -> int:
    findings = diagnose(asyncio.run(gather(settings_from(args))))
    healthy = all(f.ok for f in findings)
    if args.json:
        _print_json({"ok": healthy, "findings": [asdict(f) for f in findings]})
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


# --- network show | set --------------------------------------------------------


async def _network_show(s: AgentConfig) -> tuple[str, bytes | None]:
    key = config_key(s.etcd_prefix)
    async with EtcdStore(s.etcd_endpoints) as store:
        value, _ = await store.get(key)
    return key, value


async def _network_set(s: AgentConfig, text: bytes, *, force: bool, dry_run: bool) -> str:
    config = parse_network_config(text)  # ConfigError names the field
    key = config_key(s.etcd_prefix)
    async with EtcdStore(s.etcd_endpoints) as store:
        raw, _ = await store.get_prefix(subnets_prefix(s.etcd_prefix))
        orphans = []
        for lease_key in sorted(raw):
            try:
                subnet = parse_subnet_key(lease_key, s.etcd_prefix)
            except LeaseError:
                continue
            if not is_candidate(config, subnet):
                orphans.append(str(subnet))
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
            _print_json({"key": key, "config": parsed, "valid": error is None, "error": error})
        else:
            print(json.dumps(parsed, indent=2) if parsed is not None else value.decode())
            print(f"# {key}: {'valid' if error is None else 'INVALID: ' + error}")
        return 0 if error is None else 1
    text = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    outcome = asyncio.run(_network_set(s, text, force=args.force, dry_run=args.dry_run))
    print(json.dumps({"result": outcome}) if args.json else outcome)
    return 0


# --- docker-opts -------------------------------------------------------------------


def docker_options(subnet_file: Path) -> dict[str, Any]:
    """Docker on overlayd's bridge: what flannel's mk-docker-opts.sh derives
    from the subnet file, for a bridge overlayd already made."""
    found = read_variables(subnet_file)
    subnet_text = found.get("FLANNEL_SUBNET")
    if not subnet_text or not found.get("FLANNEL_MTU"):
        raise OverlaydError(f"{subnet_file} has no FLANNEL_SUBNET/FLANNEL_MTU: is overlayd ready?")
    gateway = subnet_text.split("/")[0]
    subnet = IPv4Network(subnet_text, strict=False)
    egress = found.get("OVERLAYD_EGRESS", "masquerade")
    return {
        "bridge": found.get("OVERLAYD_BRIDGE", "ovl0"),
        "subnet": str(subnet),
        "gateway": gateway,
        "mtu": int(found["FLANNEL_MTU"]),
        # overlayd masquerades (or egress is off); Docker must not NAT too,
        # or container-to-container traffic across hosts would be NATed.
        "ip_masq": False,
        "egress": egress,
    }


def cmd_docker_opts(args: argparse.Namespace) -> int:
    o = docker_options(Path(args.subnet_file))
    if o["egress"] == "gwbridge":
        print(
            "overlayctl: warning: egress=gwbridge gives containers their way out through a"
            " second interface, which Docker's bridge driver does not add; run overlayd with"
            " egress=masquerade on Docker hosts",
            file=sys.stderr,
        )
    if args.format == "daemon-json":
        text = json.dumps(
            {"bridge": o["bridge"], "fixed-cidr": o["subnet"], "mtu": o["mtu"], "ip-masq": False},
            indent=2,
        )
    elif args.format == "network-create":
        text = (
            f"docker network create --driver bridge --subnet {o['subnet']} --gateway"
            f" {o['gateway']} -o com.docker.network.bridge.name={o['bridge']}"
            f" -o com.docker.network.driver.mtu={o['mtu']}"
            " -o com.docker.network.bridge.enable_ip_masquerade=false overlay"
        )
    else:
        opts = f"--bridge={o['bridge']} --fixed-cidr={o['subnet']} --mtu={o['mtu']} --ip-masq=false"
        text = (
            f"DOCKER_OPT_BIP=\nDOCKER_OPT_BRIDGE=--bridge={o['bridge']}\n"
            f"DOCKER_OPT_FIXED_CIDR=--fixed-cidr={o['subnet']}\n"
            f"DOCKER_OPT_MTU=--mtu={o['mtu']}\nDOCKER_OPT_IPMASQ=--ip-masq=false\n"
            f'{args.key}="{opts}"'
        )
    if args.json:  # the derived options themselves, for scripts
        print(json.dumps(o, indent=2))
    elif args.out == "-":
        print(text)
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}")
    return 0


# --- events ------------------------------------------------------------------------


def render_event(topic: str, payload: dict[str, Any]) -> str:
    """One line per message: time, host, what, and the rest as key=value."""
    stamp = time.strftime("%H:%M:%S", time.localtime(payload.get("ts", time.time())))
    host = payload.get("host", topic.split("/")[-2])
    if topic.endswith("/status"):
        what = "online" if payload.get("online") else f"OFFLINE ({payload.get('reason')})"
        rest = {k: payload.get(k) for k in ("subnet", "peers", "ready")}
        kind = f"status {what}"
    else:
        kind = str(payload.get("event"))
        rest = {k: v for k, v in payload.items() if k not in ("event", "host", "ts")}
    fields = " ".join(f"{k}={v}" for k, v in rest.items() if v is not None)
    return f"{stamp}  {host:<15}  {kind:<16}  {fields}".rstrip()


async def _events(url: str, prefix: str, count: int | None, as_json: bool) -> int:
    host, port = broker_address(url)
    seen = 0
    async with aiomqtt.Client(host, port, timeout=5) as client:
        await client.subscribe(f"{prefix}/+/status", qos=1)
        await client.subscribe(f"{prefix}/+/events", qos=1)
        async for message in client.messages:
            try:
                payload = json.loads(bytes(message.payload))
            except (TypeError, ValueError):
                continue
            topic = str(message.topic)
            if as_json:
                print(json.dumps({"topic": topic, **payload}), flush=True)
            else:
                print(render_event(topic, payload), flush=True)
            seen += 1
            if count is not None and seen >= count:
                break
    return seen


def cmd_events(args: argparse.Namespace) -> int:
    s = settings_from(args)
    url = args.mqtt_url or s.mqtt_url
    if url is None:
        raise ConfigError("mqtt-url", "no broker: pass --mqtt-url or set it in the config")
    try:
        asyncio.run(_events(url, s.mqtt_topic, args.count, args.json))
    except aiomqtt.MqttError as exc:
        raise OverlaydError(f"MQTT broker {url}: {exc}") from exc
    except KeyboardInterrupt:
        pass
    return 0


# --- check (a real host's version of `lab check`) --------------------------------

PROBE_CNI_CONFIG = {"cniVersion": "1.0.0", "name": "overlayd-probe", "type": "overlay-cni"}


def _run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, **kwargs)


def _overlay_cni(command: str, probe: str, s: AgentConfig) -> dict[str, Any] | None:
    """Attach or detach the probe exactly as a runtime would: overlay-cni."""
    plugin = shutil.which("overlay-cni") or str(Path(sys.executable).parent / "overlay-cni")
    env = runtime_env(command, probe, "/opt/cni/bin:/usr/lib/cni", os.environ)
    conf = {
        **PROBE_CNI_CONFIG,
        "subnetFile": str(s.subnet_file),
        "dataDir": str(s.subnet_file.parent / "overlayd-probe-cni"),
    }
    ok, result, raw = call_plugin([plugin], conf, env)
    if not ok:
        raise OverlaydError(f"overlay-cni {command} for the probe failed: {raw}")
    return result


def ping_from(ns: str, address: str, *, count: int = 3) -> float | None:
    """Median-ish RTT in ms of `count` pings from a namespace, None if none came back."""
    proc = _run(["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2",
                 "-W", "1", address], timeout=count + 10)  # fmt: skip
    for line in proc.stdout.splitlines():
        if "min/avg/max" in line:
            return float(line.split("=")[1].split("/")[1])
    return None


def cmd_check(args: argparse.Namespace) -> int:
    """From a probe container on this host, ping every peer host's overlay
    gateway (its bridge address, behind its VTEP): the tunnel both ways."""
    s = settings_from(args)
    own = read_subnet(s.subnet_file)
    if own is None:
        raise OverlaydError(f"{s.subnet_file} names no subnet: is overlayd running here?")
    deadline = time.monotonic() + args.timeout
    while True:
        rows = asyncio.run(lease_rows(s.etcd_endpoints, s.etcd_prefix))
        peers = [r for r in rows if r["status"] == "ok" and r["subnet"] != str(own)]
        if len(peers) + 1 >= args.expect_hosts or time.monotonic() > deadline:
            break
        time.sleep(1)
    probe = args.probe_name
    if _run(["ip", "netns", "add", probe]).returncode != 0:
        raise OverlaydError(f"cannot create the probe namespace {probe!r} (does it exist?)")
    try:
        _overlay_cni("ADD", probe, s)
        results: list[dict[str, Any]] = []
        for peer in peers:
            gateway = str(IPv4Network(peer["subnet"]).network_address + 1)
            rtt = None
            while rtt is None:
                rtt = ping_from(probe, gateway)
                if rtt is not None or time.monotonic() > deadline:
                    break
            results.append({**peer, "target": gateway, "ok": rtt is not None, "rtt_ms": rtt})
    finally:
        try:
            _overlay_cni("DEL", probe, s)
        finally:
            _run(["ip", "netns", "delete", probe])
    reachable = sum(r["ok"] for r in results)
    healthy = reachable == len(results) and len(results) + 1 >= args.expect_hosts
    if args.json:
        _print_json({"ok": healthy, "hosts": len(results) + 1, "peers": results})
    else:
        print(
            f"check: {reachable}/{len(results)} peer hosts reachable through the overlay"
            f" from a container on {own}"
        )
        for r in results:
            shown = f"{r['rtt_ms']:.3f} ms" if r["ok"] else "UNREACHABLE"
            print(f"  {r['subnet']:<18} via {r['public_ip']:<15} {r['target']:<15} {shown}")
        if len(results) + 1 < args.expect_hosts:
            print(
                f"  only {len(results) + 1} of the {args.expect_hosts} expected hosts hold leases"
            )
    return 0 if healthy else 1
