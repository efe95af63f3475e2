"""The one place overlayd writes outside its own nftables table, and why.

nftables runs every base chain on a hook: an accept in our table cannot undo
a drop policy in iptables' FORWARD chain (which Docker sets). So when the
iptables `filter` table has a FORWARD chain, overlayd keeps, like flannel and
Calico, its own chain OVERLAYD-FORWARD in that table (accepting cluster and
gwbridge traffic) and one jump to it at the top of FORWARD. It never edits or
removes anybody else's rule, and when nobody uses iptables' FORWARD chain it
writes nothing at all. The restrictions (no ICC, no connections from
outside) stay in our nftables table, where a drop is final.
"""

from __future__ import annotations

import json
import shutil

from overlayd.dataplane.command import run
from overlayd.errors import OverlaydError
from overlayd.plan.egress import FORWARD_CHAIN, EgressSpec, forward_accept_rules

JUMP = ["-m", "comment", "--comment", "overlayd: cluster and gwbridge traffic", "-j", FORWARD_CHAIN]


class IptablesError(OverlaydError):
    pass


class ForwardAccept:
    def __init__(self, netns: str | None = None) -> None:
        self._exec = ["ip", "netns", "exec", netns] if netns else []
        self._available = shutil.which("iptables") is not None and shutil.which("nft") is not None

    async def _forward_chain_exists(self) -> bool:
        # Asked through nft, which, unlike `iptables -S`, creates nothing.
        code, out, _ = await run(
            [*self._exec, "nft", "-j", "list", "chain", "ip", "filter", "FORWARD"]
        )
        if code != 0:
            return False
        return any("chain" in item for item in json.loads(out).get("nftables", []))

    async def _iptables(self, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
        code, out, err = await run([*self._exec, *args], stdin)
        return code, (out + err).decode(errors="replace")

    async def ensure(self, spec: EgressSpec) -> list[str]:
        if not self._available or not await self._forward_chain_exists():
            return []
        done = []
        wanted = forward_accept_rules(spec)
        code, listing = await self._iptables("iptables", "-w", "-S", FORWARD_CHAIN)
        present = [line for line in listing.splitlines() if line.startswith("-A ")]
        if code != 0 or present != wanted:
            # Declaring the chain in a restore flushes it; --noflush leaves
            # every other chain of the table alone.
            restore = "\n".join(["*filter", f":{FORWARD_CHAIN} - [0:0]", *wanted, "COMMIT", ""])
            code, err = await self._iptables(
                "iptables-restore", "-w", "--noflush", stdin=restore.encode()
            )
            if code != 0:
                raise IptablesError(f"iptables-restore failed: {err.strip()}")
            done.append(f"wrote iptables chain {FORWARD_CHAIN} ({len(wanted)} rules)")
        code, _ = await self._iptables("iptables", "-w", "-C", "FORWARD", *JUMP)
        if code != 0:
            code, err = await self._iptables("iptables", "-w", "-I", "FORWARD", "1", *JUMP)
            if code != 0:
                raise IptablesError(f"iptables -I FORWARD failed: {err.strip()}")
            done.append(f"inserted the jump to {FORWARD_CHAIN} at the top of FORWARD")
        return done

    async def remove(self) -> list[str]:
        """Our jump and our chain, for teardown; nobody else's rule."""
        if not self._available or not await self._forward_chain_exists():
            return []
        done = []
        while (await self._iptables("iptables", "-w", "-D", "FORWARD", *JUMP))[0] == 0:
            done.append(f"removed the jump to {FORWARD_CHAIN} from FORWARD")
        if (await self._iptables("iptables", "-w", "-F", FORWARD_CHAIN))[0] == 0:
            await self._iptables("iptables", "-w", "-X", FORWARD_CHAIN)
            done.append(f"removed iptables chain {FORWARD_CHAIN}")
        return done
