"""The one place overlayd writes outside its own nftables tables, and why.

nftables runs every base chain on a hook: an accept in our table cannot undo
a drop policy in iptables' FORWARD chain (which Docker sets). So when the
iptables `filter` table has a FORWARD chain, overlayd keeps, like flannel and
Calico, its own chain OVERLAYD-FORWARD in that table (accepting cluster and
gwbridge traffic) and one jump to it at the top of FORWARD. IPv6 has its own
FORWARD chain in ip6tables' `filter` table (Docker's ip6tables support sets
its policy to drop too), so with an IPv6 cluster network the same chain and
jump are kept there, through ip6tables. It never edits or removes anybody
else's rule, and when nobody uses a family's FORWARD chain it writes nothing
there at all. The restrictions (no ICC, no connections from outside) stay
in our nftables tables, where a drop is final.
"""

from __future__ import annotations

import json
import shutil

from overlayd.dataplane.command import run
from overlayd.errors import OverlaydError
from overlayd.model import Family
from overlayd.plan.egress import FAMILIES, FORWARD_CHAIN, EgressSpec, forward_accept_rules
from overlayd.plan.nftables import nft_family

JUMP = ["-m", "comment", "--comment", "overlayd: cluster and gwbridge traffic", "-j", FORWARD_CHAIN]


class IptablesError(OverlaydError):
    pass


def _tool(family: Family) -> str:
    return "ip6tables" if family.version == 6 else "iptables"


class ForwardAccept:
    def __init__(self, netns: str | None = None) -> None:
        self._exec = ["ip", "netns", "exec", netns] if netns else []
        self._available = {
            family.version: shutil.which(_tool(family)) is not None
            and shutil.which("nft") is not None
            for family in FAMILIES
        }

    async def _forward_chain_exists(self, family: Family) -> bool:
        if not self._available[family.version]:
            return False
        # Asked through nft, which, unlike `iptables -S`, creates nothing.
        code, out, _ = await run(
            [*self._exec, "nft", "-j", "list", "chain", nft_family(family), "filter", "FORWARD"]
        )
        if code != 0:
            return False
        return any("chain" in item for item in json.loads(out).get("nftables", []))

    async def _iptables(self, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
        code, out, err = await run([*self._exec, *args], stdin)
        return code, (out + err).decode(errors="replace")

    async def ensure(self, spec: EgressSpec) -> list[str]:
        """Our chain and jump for each family the cluster has; a family it
        has not (any more) loses them."""
        done = []
        for family in FAMILIES:
            if spec.cluster_for(family) is None:
                done += await self._remove(family)
            elif await self._forward_chain_exists(family):
                done += await self._ensure(spec, family)
        return done

    async def _ensure(self, spec: EgressSpec, family: Family) -> list[str]:
        tool = _tool(family)
        done = []
        wanted = forward_accept_rules(spec, family)
        code, listing = await self._iptables(tool, "-w", "-S", FORWARD_CHAIN)
        present = [line for line in listing.splitlines() if line.startswith("-A ")]
        if code != 0 or present != wanted:
            # Declaring the chain in a restore flushes it; --noflush leaves
            # every other chain of the table alone.
            restore = "\n".join(["*filter", f":{FORWARD_CHAIN} - [0:0]", *wanted, "COMMIT", ""])
            code, err = await self._iptables(
                f"{tool}-restore", "-w", "--noflush", stdin=restore.encode()
            )
            if code != 0:
                raise IptablesError(f"{tool}-restore failed: {err.strip()}")
            done.append(f"wrote {tool} chain {FORWARD_CHAIN} ({len(wanted)} rules)")
        code, _ = await self._iptables(tool, "-w", "-C", "FORWARD", *JUMP)
        if code != 0:
            code, err = await self._iptables(tool, "-w", "-I", "FORWARD", "1", *JUMP)
            if code != 0:
                raise IptablesError(f"{tool} -I FORWARD failed: {err.strip()}")
            done.append(f"inserted the jump to {FORWARD_CHAIN} at the top of {tool} FORWARD")
        return done

    async def remove(self) -> list[str]:
        """Our jumps and our chains, for teardown; nobody else's rule."""
        done = []
        for family in FAMILIES:
            done += await self._remove(family)
        return done

    async def _remove(self, family: Family) -> list[str]:
        if not await self._forward_chain_exists(family):
            return []
        tool = _tool(family)
        # Without our chain there is no jump to it either (iptables refuses one).
        if (await self._iptables(tool, "-w", "-S", FORWARD_CHAIN))[0] != 0:
            return []
        done = []
        while (await self._iptables(tool, "-w", "-D", "FORWARD", *JUMP))[0] == 0:
            done.append(f"removed the jump to {FORWARD_CHAIN} from {tool} FORWARD")
        if (await self._iptables(tool, "-w", "-F", FORWARD_CHAIN))[0] == 0:
            await self._iptables(tool, "-w", "-X", FORWARD_CHAIN)
            done.append(f"removed {tool} chain {FORWARD_CHAIN}")
        return done
