"""`overlayctl check`: a real host's version of `lab check`. A probe
container attached through overlay-cni pings every peer host's overlay
gateway, which crosses the tunnel both ways."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from overlayd.cli.common import print_json, settings_from
from overlayd.cli.leases import lease_rows
from overlayd.config import AgentConfig
from overlayd.errors import OverlaydError
from overlayd.nsexec import call_plugin, netns_argv, ping_rtt_ms, runtime_env
from overlayd.plan.ipam import gateway_address
from overlayd.surfaces.subnetfile import read_subnet

# Not registered as an endpoint: the probe pings host gateways only, and a
# policy selecting every endpoint ({}) must not break the check.
PROBE_CNI_CONFIG = {
    "cniVersion": "1.0.0",
    "name": "overlayd-probe",
    "type": "overlay-cni",
    "registerEndpoint": False,
}


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
    """Average RTT in ms of `count` pings from a namespace, None if none came back."""
    argv = netns_argv(ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1", address)
    return ping_rtt_ms(_run(argv, timeout=count + 10).stdout)


def cmd_check(args: argparse.Namespace) -> int:
    """From a probe container on this host, ping every peer host's overlay
    gateway (its bridge address, behind its VTEP): the tunnel both ways."""
    s = settings_from(args)
    own = read_subnet(s.subnet_file)
    if own is None:
        raise OverlaydError(f"{s.subnet_file} names no subnet: is overlayd running here?")
    deadline = time.monotonic() + args.timeout
    while True:
        rows = asyncio.run(lease_rows(s.etcd, s.etcd_prefix))
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
            gateway = str(gateway_address(IPv4Network(peer["subnet"])))
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
        print_json({"ok": healthy, "hosts": len(results) + 1, "peers": results})
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
