"""The nftables table overlayd owns, through the `nft` command.

The table is replaced as a whole in one transaction (see
plan/egress.render_transaction). Drift is detected by listing the table and
comparing it with the listing taken right after our last write, so that
nft's own formatting never causes a rewrite and any change by hand does.
No other table is ever listed or written.
"""

from __future__ import annotations

import shutil

from overlayd.dataplane.command import run
from overlayd.errors import OverlaydError
from overlayd.plan.egress import FAMILY, TABLE, EgressSpec, render_table, render_transaction


class NftError(OverlaydError):
    pass


class NftTable:
    def __init__(self, netns: str | None = None) -> None:
        if shutil.which("nft") is None:
            raise NftError("the nft command is missing: apt-get install nftables")
        self._prefix = ["ip", "netns", "exec", netns, "nft"] if netns else ["nft"]
        self._written: tuple[str | None, str] | None = None  # (rendered, listing after)

    async def listing(self) -> str:
        """Our table as nft prints it; empty when it does not exist."""
        code, out, _ = await run([*self._prefix, "list", "table", FAMILY, TABLE])
        return out.decode() if code == 0 else ""

    async def ensure(self, spec: EgressSpec) -> str | None:
        """Rewrite the table if the wanted rules changed or someone changed
        the table; returns what was done, None when nothing was needed."""
        wanted = render_table(spec)
        current = await self.listing()
        if self._written is not None and self._written == (wanted, current):
            return None
        if self._written is None and wanted is None and not current:
            self._written = (None, "")
            return None
        reason = (
            "first write"
            if self._written is None
            else "rules changed"
            if self._written[0] != wanted
            else "table altered or deleted by hand"
        )
        code, _, err = await run([*self._prefix, "-f", "-"], render_transaction(spec).encode())
        if code != 0:
            self._written = None
            raise NftError(f"nft refused the ruleset: {err.decode(errors='replace').strip()}")
        self._written = (wanted, await self.listing())
        return f"{'removed' if wanted is None else 'replaced'} table {FAMILY} {TABLE} ({reason})"

    async def delete(self) -> bool:
        code, _, _ = await run([*self._prefix, "delete", "table", FAMILY, TABLE])
        self._written = None
        return code == 0
