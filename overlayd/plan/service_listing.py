"""The services tables' elements as the kernel lists them, in the text the
render writes (plan/service_rules.py), so that a check pass can compare
what the kernel holds with what it believes it wrote.

Pure: `nft -j` listings in, element texts out. Only elements are compared:
a container coming or going changes nothing else, so drift of the maps
and sets (somebody deleting an element, or the table) is what a check can
find cheaply; the chains are made again on every full pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from overlayd.plan.service_rules import TABLE, TABLES, MapId, ServiceRuleset, hairpin_set

Listing = Mapping[str, Any]


def _text(value: object) -> str:
    """One key part or value as the render writes it."""
    if isinstance(value, Mapping):
        if "concat" in value:
            parts = value["concat"]
            return " . ".join(_text(p) for p in parts) if isinstance(parts, list) else "?"
        if "goto" in value or "jump" in value:
            kind = "goto" if "goto" in value else "jump"
            target = value[kind].get("target") if isinstance(value[kind], Mapping) else None
            return f"{kind} {target}"
        if len(value) == 1:  # {"drop": null}, {"accept": null}
            return str(next(iter(value)))
        return "?"
    return str(value)


def listed_elements(listing: Listing) -> dict[MapId, frozenset[str]]:
    """(table, map or set name) -> its elements as text ("key : verdict"
    for a map), for the services tables' maps and sets in `nft -j list
    maps` and `nft -j list sets` output (other tables' are ignored)."""
    found: dict[MapId, frozenset[str]] = {}
    items = listing.get("nftables", [])
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, Mapping):
            continue
        for kind in ("map", "set"):
            found_item = item.get(kind)
            if not isinstance(found_item, Mapping) or found_item.get("table") not in TABLES:
                continue
            if found_item.get("family") != "inet":
                continue
            texts = []
            for elem in found_item.get("elem", []):
                if kind == "map" and isinstance(elem, list) and len(elem) == 2:
                    texts.append(f"{_text(elem[0])} : {_text(elem[1])}")
                else:
                    texts.append(_text(elem))
            found[str(found_item["table"]), str(found_item.get("name"))] = frozenset(texts)
    return found


def believed_elements(ruleset: ServiceRuleset) -> dict[MapId, frozenset[str]]:
    """The same, for what the ruleset writes."""
    found = {
        at: frozenset(f"{key} : {verdict}" for key, verdict in elements.items())
        for at, elements in ruleset.maps().items()
    }
    for version in ruleset.versions:
        found[TABLE, hairpin_set(version)] = frozenset(ruleset.hairpin_elements(version))
    return found
