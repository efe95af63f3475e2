"""The services tables as the kernel lists them, in the text the render
writes (plan/service_rules.py): their map and set elements, so that a
check pass can compare what the kernel holds with what it believes it
wrote, and their chains, so that `diagnose` can compare every rule too.

Pure: `nft -j` listings (elements) and `nft -t` listings (chains) in,
texts out. A check pass compares elements only: a container coming or
going changes nothing else, so drift of the maps and sets (somebody
deleting an element, or the table) is what a check can find cheaply; the
chains are made again on every full pass.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from overlayd.plan.policy_rules import Chain, unordered_sets
from overlayd.plan.service_rules import (
    TABLE,
    TABLES,
    MapId,
    ServiceRuleset,
    chain_label,
    hairpin_set,
)

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


# --- chains ----------------------------------------------------------------------

_TABLE_HEAD = re.compile(r"^table inet (\S+) \{$")
_CHAIN_HEAD = re.compile(r"^\tchain (\S+) \{$")
# nft's standard priority names in the inet family (nft(8), "PRIORITY"):
# the render writes names, nft lists some of them back as numbers
# (`filter - 20` comes back as `-20`).
_PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50,
               "srcnat": 100}  # fmt: skip
_PRIORITY = re.compile(r"priority (-?\w+)(?: ([-+]) (\d+))?;")


def listed_chains(text: str) -> dict[str, Chain]:
    """chain_label -> its hook line, comment and rules, from `nft -t list
    table inet T` of the services tables, one after another (or
    render_ruleset's text: the same layout), in listing order."""
    found: dict[str, Chain] = {}
    table = TABLE
    name: str | None = None
    hook, comment = "", ""
    rules: list[str] = []
    for line in text.splitlines():
        table_head = _TABLE_HEAD.match(line)
        if table_head is not None:
            table, name = table_head[1], None
            continue
        head = _CHAIN_HEAD.match(line)
        if head is not None:
            name, hook, comment, rules = head[1], "", "", []
            continue
        if name is None:
            continue
        if line == "\t}":
            found[chain_label(table, name)] = Chain(tuple(rules), comment, hook)
            name = None
            continue
        body = line.strip()
        if not body:
            continue
        if not rules and not hook and body.startswith("type ") and "hook" in body:
            hook = body
        elif not rules and not comment and body.startswith('comment "') and body.endswith('"'):
            comment = body[len('comment "') : -1]
        else:
            rules.append(body)
    return found


def comparable_chain(chain: Chain) -> Chain:
    """A chain as it must compare equal whether rendered or listed: the
    hook's priority as a number, and the elements of every anonymous set
    or map in a rule sorted (nft lists them in an order of its own)."""

    def number(match: re.Match[str]) -> str:
        base = match[1]
        if base in _PRIORITIES:
            value = _PRIORITIES[base]
        elif base.lstrip("-").isdigit():
            value = int(base)
        else:
            return match[0]
        if match[2]:
            value += int(match[3]) if match[2] == "+" else -int(match[3])
        return f"priority {value};"

    return Chain(
        tuple(unordered_sets(rule) for rule in chain.rules),
        chain.comment,
        _PRIORITY.sub(number, chain.hook),
    )
