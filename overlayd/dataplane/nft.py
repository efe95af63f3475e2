"""The nftables table overlayd owns, through the `nft` command.

Two kinds of objects share the table `ip overlayd`, each with its adapter:

- `NftTable`: the egress chains, replaced together in one transaction when
  the rules change (see plan/egress.render_transaction);
- `NftVxlanFilter`: the VXLAN allow-list's counter, set and chain (see
  plan/vxlan_filter.py), whose rules are rewritten only when they change,
  and whose set changes element by element.

Drift is detected by listing the table tersely (`nft -t`: no set elements,
so the cost does not grow with the peers), cutting it into objects, and
comparing each adapter's objects with the listing taken right after its
last write, so that nft's own formatting never causes a rewrite and any
change by hand does. The allow-list's elements are listed on their own.
No other table is ever listed or written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from ipaddress import ip_address

from overlayd.dataplane.command import run
from overlayd.errors import OverlaydError
from overlayd.model import IPV4, Family, IPAddress
from overlayd.plan import vxlan_filter
from overlayd.plan.egress import EGRESS_CHAINS, FAMILY, TABLE, EgressSpec, render_table
from overlayd.plan.egress import render_transaction as render_egress
from overlayd.plan.nftables import ObjectKey, select, split_objects, table_text
from overlayd.plan.vxlan_filter import ElementChanges, FilterSpec, nft_family

EGRESS_KEYS = tuple(f"chain {chain}" for chain in EGRESS_CHAINS)
# Every object our table may hold; anything else in it is removed.
KNOWN_KEYS = frozenset(EGRESS_KEYS) | frozenset(vxlan_filter.KEYS)


class NftError(OverlaydError):
    pass


class Nft:
    """The nft command in one namespace (None: the current one)."""

    def __init__(self, netns: str | None = None) -> None:
        if shutil.which("nft") is None:
            raise NftError("the nft command is missing: apt-get install nftables")
        self.prefix = ["ip", "netns", "exec", netns, "nft"] if netns else ["nft"]

    async def apply(self, script: str) -> None:
        """One transaction: all of `script` or nothing."""
        code, _, err = await run([*self.prefix, "-f", "-"], script.encode())
        if code != 0:
            raise NftError(f"nft refused the ruleset: {err.decode(errors='replace').strip()}")

    async def terse(self, family: str = FAMILY) -> str | None:
        """Our table without set elements; None when it does not exist."""
        code, out, _ = await run([*self.prefix, "-t", "list", "table", family, TABLE])
        return out.decode() if code == 0 else None

    async def objects(self, family: str = FAMILY) -> dict[ObjectKey, str]:
        return split_objects(await self.terse(family) or "")

    async def drop_table_if_empty(self, family: str = FAMILY) -> bool:
        """Delete our table once neither the egress rules nor the allow-list
        have anything in it, so that `egress none` with the filter off leaves
        no trace."""
        listing = await self.terse(family)
        if listing is None or split_objects(listing):
            return False
        code, _, _ = await run([*self.prefix, "delete", "table", family, TABLE])
        return code == 0

    async def delete_table(self, family: str = FAMILY) -> bool:
        code, _, _ = await run([*self.prefix, "delete", "table", family, TABLE])
        return code == 0


class NftTable:
    """The egress chains of our table (and the removal of strangers in it)."""

    def __init__(self, netns: str | None = None, *, nft: Nft | None = None) -> None:
        self.nft = nft or Nft(netns)
        # (rendered, listing right after the write)
        self._written: tuple[str | None, str] | None = None

    async def listing(self) -> str:
        """Our egress chains as nft prints them; empty when there are none."""
        return table_text(FAMILY, TABLE, select(await self.nft.objects(), EGRESS_KEYS))

    async def _state(self) -> tuple[str, list[ObjectKey]]:
        objects = await self.nft.objects()
        strangers = sorted(key for key in objects if key not in KNOWN_KEYS)
        return table_text(FAMILY, TABLE, select(objects, EGRESS_KEYS)), strangers

    async def ensure(self, spec: EgressSpec) -> str | None:
        """Rewrite the egress chains if the wanted rules changed or someone
        changed them, and remove any object in our table that nobody of ours
        owns; returns what was done, None when nothing was needed."""
        wanted = render_table(spec)
        current, strangers = await self._state()
        if not strangers and self._written is not None and self._written == (wanted, current):
            return None
        if not strangers and self._written is None and wanted is None and not current:
            self._written = (None, "")
            return None
        reason = (
            "first write"
            if self._written is None
            else "rules changed"
            if self._written[0] != wanted
            else "altered or deleted by hand"
            if self._written[1] != current
            else f"removed {', '.join(strangers)} added by hand"
        )
        # Strangers go in the same transaction, chains first: a stray chain
        # may refer to a stray set.
        ordered = sorted(strangers, key=lambda key: not key.startswith("chain "))
        removals = "".join(
            f"delete {key.rsplit(' ', 1)[0]} {FAMILY} {TABLE} {key.rsplit(' ', 1)[1]}\n"
            for key in ordered
        )
        try:
            await self.nft.apply(render_egress(spec) + removals)
        except NftError:
            self._written = None
            raise
        if wanted is None:
            await self.nft.drop_table_if_empty()
        self._written = (wanted, await self.listing())
        what = "removed" if wanted is None else "replaced"
        return f"{what} the egress chains of table {FAMILY} {TABLE} ({reason})"

    async def delete(self) -> bool:
        """The whole table, allow-list included (teardown)."""
        self._written = None
        return await self.nft.delete_table()


class NftVxlanFilter:
    """The VXLAN allow-list's counter, set and chain in our table."""

    def __init__(self, nft: Nft) -> None:
        self.nft = nft
        self._written: tuple[str, str] | None = None  # (rendered, listing after)

    async def listing(self, f: FilterSpec) -> str:
        """Our counter (name only), set (no elements) and chain, as listed."""
        objects = await self.nft.objects(f.table_family)
        return table_text(f.table_family, TABLE, select(objects, vxlan_filter.KEYS))

    async def ensure(self, f: FilterSpec) -> str | None:
        """Install the rules if they are missing, differ from what we wrote,
        or the wanted rules changed; returns what was done, None when
        nothing was needed. A set made again comes back empty: the caller
        reads the elements back after any rewrite."""
        wanted = vxlan_filter.render_objects(f)
        objects = await self.nft.objects(f.table_family)
        current = table_text(f.table_family, TABLE, select(objects, vxlan_filter.KEYS))
        if self._written == (wanted, current):
            return None
        reason = (
            "first write"
            if self._written is None
            else "rules changed"
            if self._written[0] != wanted
            else "altered or deleted by hand"
        )
        # A set of another type (made by hand) cannot be updated in place.
        wanted_set = vxlan_filter.set_block(f)
        found_set = objects.get(f"set {vxlan_filter.SET}")
        recreate = found_set is not None and found_set != wanted_set
        try:
            await self.nft.apply(vxlan_filter.render_install(f, recreate_set=recreate))
        except NftError:
            self._written = None
            raise
        self._written = (wanted, await self.listing(f))
        return f"installed the VXLAN filter in table {f.table_family} {TABLE} ({reason})"

    async def sources(self, f: FilterSpec) -> frozenset[IPAddress] | None:
        """The set's elements; None when the set does not exist."""
        code, out, _ = await run(
            [*self.nft.prefix, "-j", "list", "set", f.table_family, TABLE, vxlan_filter.SET]
        )
        if code != 0:
            return None
        found: set[IPAddress] = set()
        for item in json.loads(out).get("nftables", []):
            for elem in item.get("set", {}).get("elem", []):
                # A plain address, or {"elem": {"val": ...}} with options.
                value = elem.get("elem", {}).get("val") if isinstance(elem, dict) else elem
                found.add(ip_address(value))
        return frozenset(found)

    async def update(self, f: FilterSpec, changes: ElementChanges) -> None:
        script = vxlan_filter.render_elements(f, changes)
        if script:
            await self.nft.apply(script)

    async def remove(self, family: Family = IPV4) -> str | None:
        """Delete our counter, set and chain (the filter is off, or there is
        no VTEP to protect); None when none existed."""
        fam = nft_family(family)
        present = [key for key in await self.nft.objects(fam) if key in vxlan_filter.KEYS]
        script = vxlan_filter.render_removal(present, family)
        self._written = None
        if not script:
            return None
        await self.nft.apply(script)
        await self.nft.drop_table_if_empty(fam)
        return f"removed the VXLAN filter from table {fam} {TABLE}"

    def dropped_packets(self, family: Family = IPV4) -> int | None:
        """The drop counter's packets, read synchronously: the metrics
        endpoint calls this from its own thread at scrape time, so the
        figure is current and costs nothing between scrapes."""
        argv = [
            *self.nft.prefix,
            "-j",
            "list",
            "counter",
            nft_family(family),
            TABLE,
            vxlan_filter.COUNTER,
        ]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0:
            return None
        for item in json.loads(done.stdout).get("nftables", []):
            counter = item.get("counter")
            if counter is not None:
                return int(counter.get("packets", 0))
        return None
