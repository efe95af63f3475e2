"""Read-only looks at the host for `overlayctl diagnose`: devices, offloads,
sysctls and the firewall ruleset, through the standard tools (ip, ethtool,
nft) in the current network namespace. Nothing here changes anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from overlayd.dataplane.command import run
from overlayd.model import DeviceFacts


async def device(name: str) -> DeviceFacts | None:
    code, out, _ = await run(["ip", "-j", "-d", "link", "show", "dev", name])
    if code != 0:
        return None
    link = json.loads(out)[0]
    return DeviceFacts(
        name=name,
        kind=str(link.get("linkinfo", {}).get("info_kind", "")),
        mtu=int(link.get("mtu", 0)),
        up="UP" in link.get("flags", []),
        master=link.get("master"),
    )


async def tx_checksumming(name: str) -> bool | None:
    """Whether tx checksum offload is on; without it the kernel also turns
    TSO off and VXLAN throughput falls to a fifth (see README)."""
    code, out, _ = await run(["ethtool", "-k", name])
    if code != 0:
        return None
    for line in out.decode().splitlines():
        if line.startswith("tx-checksumming:"):
            return line.split(":", 1)[1].strip().startswith("on")
    return None


def sysctl(key: str) -> str | None:
    try:
        return Path("/proc/sys", *key.split(".")).read_text().strip()
    except OSError:
        return None


async def nft_ruleset() -> list[dict[str, Any]]:
    code, out, _ = await run(["nft", "-j", "list", "ruleset"])
    if code != 0:
        return []
    items: list[dict[str, Any]] = json.loads(out).get("nftables", [])
    return items
