"""A small model of what `nft -f` does with the statements overlayd writes
for one table: tables, maps, sets, chains, rules and elements, with nft's
own refusals where a wrong order would bite (a rule or element going to a
chain not yet declared, a chain deleted while something still goes to it
or while it has rules, an element added twice with another value, an
element deleted that is not there). Enough to check that a transaction,
applied to the state an earlier one left, gives the state a from-scratch
render gives; the netns tests check the real nft."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_REF = re.compile(r"\b(?:goto|jump) (\w+)")
_MAP_REF = re.compile(r"@(\w+)")


class NftError(Exception):
    pass


@dataclass
class Table:
    maps: dict[str, dict[str, str]] = field(default_factory=dict)  # sets: value ""
    chains: dict[str, list[str]] = field(default_factory=dict)

    def referrers(self, chain: str) -> list[str]:
        found = [
            f"rule in {name}"
            for name, rules in self.chains.items()
            for rule in rules
            if chain in _REF.findall(rule)
        ]
        found += [
            f"element of {name}"
            for name, elements in self.maps.items()
            for value in elements.values()
            if chain in _REF.findall(value)
        ]
        return found


@dataclass
class Model:
    where: str
    table: Table | None = None

    def apply(self, statements: Iterable[str]) -> None:
        """All statements, or none (as one nft transaction)."""
        saved = None if self.table is None else _copy(self.table)
        try:
            for statement in statements:
                self._one(statement)
        except NftError:
            self.table = saved
            raise

    def _one(self, statement: str) -> None:
        where = self.where
        if statement in (f"table {where}", f"add table {where}"):
            self.table = self.table or Table()
            return
        if statement == f"delete table {where}":
            if self.table is None:
                raise NftError("no such table")
            self.table = None
            return
        t = self.table
        if t is None:
            raise NftError(f"no table for {statement!r}")
        verb, kind, rest = _split(statement, where)
        name, _, body = rest.partition(" ")
        if kind in ("map", "set") and verb == "add":
            t.maps.setdefault(name, {})
        elif kind == "chain" and verb == "add":
            t.chains.setdefault(name, [])
        elif kind == "chain" and verb == "flush":
            _need(t.chains, name)
            t.chains[name] = []
        elif kind == "chain" and verb == "delete":
            _need(t.chains, name)
            if t.chains[name]:
                raise NftError(f"chain {name} is not empty")
            if refs := t.referrers(name):
                raise NftError(f"chain {name} is in use: {refs}")
            del t.chains[name]
        elif kind == "rule" and verb == "add":
            _need(t.chains, name)
            for target in _REF.findall(body):
                _need(t.chains, target)
            for used in _MAP_REF.findall(body):
                _need(t.maps, used)
            t.chains[name].append(body)
        elif kind == "element":
            _need(t.maps, name)
            elements = t.maps[name]
            for item in _items(body):
                key, _, value = item.partition(" : ")
                if verb == "add":
                    for target in _REF.findall(value):
                        _need(t.chains, target)
                    if key in elements and elements[key] != value:
                        raise NftError(f"element {key} of {name} exists")
                    elements[key] = value
                elif verb == "delete":
                    if key not in elements:
                        raise NftError(f"no element {key} in {name}")
                    del elements[key]
                else:
                    raise NftError(f"unknown statement {statement!r}")
        else:
            raise NftError(f"unknown statement {statement!r}")


def _split(statement: str, where: str) -> tuple[str, str, str]:
    verb, kind, rest = statement.split(" ", 2)
    if not rest.startswith(where + " "):
        raise NftError(f"{statement!r} is not about {where}")
    return verb, kind, rest[len(where) + 1 :]


def _items(body: str) -> list[str]:
    inner = body.strip()
    if not (inner.startswith("{ ") and inner.endswith(" }")):
        raise NftError(f"bad element list {body!r}")
    return inner[2:-2].split(", ")


def _need(
    objects: dict[str, object] | dict[str, list[str]] | dict[str, dict[str, str]], name: str
) -> None:
    if name not in objects:
        raise NftError(f"no such object {name}")


def _copy(table: Table) -> Table:
    return Table(
        {n: dict(e) for n, e in table.maps.items()}, {n: list(r) for n, r in table.chains.items()}
    )


@dataclass
class Tables:
    """Several tables changed by one transaction (one `nft -f`), each
    statement going to the table it names: all of them, or none."""

    models: dict[str, Model]  # where ("inet NAME") -> its model

    @classmethod
    def of(cls, wheres: Iterable[str]) -> Tables:
        return cls({where: Model(where) for where in wheres})

    def apply(self, statements: Iterable[str]) -> None:
        saved = {w: None if m.table is None else _copy(m.table) for w, m in self.models.items()}
        try:
            for statement in statements:
                self._model(statement)._one(statement)
        except NftError:
            for where, table in saved.items():
                self.models[where].table = table
            raise

    def _model(self, statement: str) -> Model:
        words = statement.split()
        if "inet" not in words or words.index("inet") + 1 >= len(words):
            raise NftError(f"{statement!r} names no table")
        where = f"inet {words[words.index('inet') + 1]}"
        if where not in self.models:
            raise NftError(f"{statement!r} is about no table of ours")
        return self.models[where]

    def maps(self) -> dict[str, dict[str, str]]:
        """Every table's maps and sets by name, same-named ones merged."""
        found: dict[str, dict[str, str]] = {}
        for model in self.models.values():
            if model.table is not None:
                for name, elements in model.table.maps.items():
                    found.setdefault(name, {}).update(elements)
        return found
