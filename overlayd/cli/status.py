"""`overlayctl status` and `peers`: what the running daemon says about
itself, asked over its control socket."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from overlayd.cli.common import duration, print_json, settings_from, table
from overlayd.surfaces.control import ask


def render_status(s: dict[str, Any]) -> str:
    lease = s.get("lease") or {}
    last = s.get("last_reconcile")
    if last:
        outcome = "ok" if last["ok"] else f"FAILED ({last['error']})"
        level = last.get("level") or ("full" if last["full"] else "light")
        reconcile = (
            f"{outcome} {duration(last['ago_seconds'])} ago"
            f" ({level}, {last['changes']} changes,"
            f" {last['seconds'] * 1000:.1f} ms)"
        )
    else:
        reconcile = "not yet"
    drift = ", ".join(f"{kind} {n}" for kind, n in s.get("drift_repairs", {}).items())
    allow = s.get("vxlan_filter") or {}
    if allow.get("setting") == "off":
        vxlan_filter = "off (VXLAN accepted from any source)"
    elif allow.get("problem"):
        vxlan_filter = f"NOT INSTALLED: {allow['problem']}"
    elif allow.get("allowed_peers") is not None:
        vxlan_filter = f"on, {allow['allowed_peers']} peer address(es) allowed"
    else:
        vxlan_filter = "on, nothing to filter (no VTEP)" if s.get("mode") == "host-gw" else "-"
    expiry = duration(lease.get("expires_in_seconds"))
    enforced = s.get("policy") or {}
    policy = (
        f"{enforced.get('policies', 0)} policies over {enforced.get('endpoints', 0)} endpoints,"
        f" etcd revision {enforced.get('revision', 0)} in force"
        if enforced
        else "-"
    )
    rows = [
        ["host", f"{lease.get('public_ip', '-')}  (overlayd {s['version']}, pid {s['pid']},"
         f" up {duration(s['uptime_seconds'])})"],
        ["subnet", lease.get("subnet", "none")],
        ["lease", f"{lease.get('key', '-')}  expires in {expiry}"
         if lease else "none held"],
        ["vtep mac", lease.get("vtep_mac") or "-"],
        ["mode", f"{s.get('mode') or '-'}, egress {s.get('egress')}"],
        ["peers", str(s.get("peers", 0))],
        ["vxlan filter", vxlan_filter],
        ["policy", policy],
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
        print_json(status)
    else:
        print(render_status(status))
    return 0 if status.get("ready") else 1


def cmd_peers(args: argparse.Namespace) -> int:
    peers = asyncio.run(ask(settings_from(args).control_socket, "peers"))
    if args.json:
        print_json(peers)
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
