"""nft's text listing of overlayd's tables, split into their objects.

overlayd owns one table per address family, `ip overlayd` and `ip6
overlayd`, with the same objects in each. Two managers own objects in a
table: the egress rules (chains `forward` and `postrouting`) and the VXLAN
allow-list (counter `vxlan_dropped`, set `vxlan_peers`, chain
`vxlan_in`). Each compares only
its own objects with the kernel, so neither rewrites the other's, and a
rewrite of one never resets the other's counter or set. This module cuts
`nft -t list table` (terse: no set elements) into those objects and puts a
selection of them back together in nft's own layout, so that a rendered
ruleset and a kernel listing compare as plain text.

A named counter's values change with every packet it counts; they are not
state we write, so a counter is kept as its name alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from overlayd.model import Family

# kind + " " + name, e.g. "chain vxlan_in", "set vxlan_peers" (the name is
# the last word: "ct helper ftp").
ObjectKey = str


def nft_family(family: Family) -> str:
    """The nftables family of our table for an address family; it is also
    nft's word for the network header's fields (`ip saddr`, `ip6 saddr`)."""
    return "ip" if family.version == 4 else "ip6"


def split_objects(listing: str) -> dict[ObjectKey, str]:
    """The top-level objects of a one-table listing, by "kind name", each as
    its lines from `\\t<kind> <name> {` to the matching `\\t}`."""
    found: dict[ObjectKey, str] = {}
    key: str | None = None
    lines: list[str] = []
    for line in listing.splitlines():
        if key is None:
            if line.startswith("\t") and not line.startswith("\t\t") and line.endswith(" {"):
                words = line.split()  # ["chain", "vxlan_in", "{"], ["ct", "helper", "x", "{"]
                if len(words) >= 3:
                    key, lines = " ".join(words[:-1]), [line]
            continue
        if line == "\t}":
            if key.startswith("counter "):
                lines = lines[:1]  # the name only: its values are not ours
            found[key] = "\n".join([*lines, line])
            key = None
        else:
            lines.append(line)
    return found


def table_text(family: str, table: str, blocks: Iterable[str]) -> str:
    """Objects in nft's listing layout: one table, a blank line between
    objects; "" when there are none."""
    present = [block for block in blocks if block]
    if not present:
        return ""
    return f"table {family} {table} {{\n" + "\n\n".join(present) + "\n}\n"


def select(objects: Mapping[ObjectKey, str], keys: Iterable[ObjectKey]) -> list[str]:
    """The blocks of `keys` that exist, in the order of `keys`."""
    return [objects[key] for key in keys if key in objects]
