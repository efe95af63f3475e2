"""What the policy benchmarks write to a lab's etcd and what they check in
its hosts, shared by `lab policybench` (propagation, `--cold`) and `lab
bench --policies`:

- endpoints and policies written in etcd transactions of TXN_OPS keys,
  each value rendered by the daemon's own renderers (a policy exactly as
  `overlayctl policy apply` writes it);
- labels put on a container's registration (the one overlay-cni made);
- the ruleset a host must hold, computed from etcd by the daemon's own
  pure code (plan/policy_inputs.enforced_ruleset), and compared with what
  its kernel holds by `overlayctl diagnose`'s comparison: every set with
  exactly its elements, every chain and rule as rendered;
- the policy table's counters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from overlayd.config import parse_network_config
from overlayd.lab import netns
from overlayd.lab.hosts import PREFIX
from overlayd.model import IPAddress, IPNetwork
from overlayd.plan.diagnose import Finding, PolicyFacts
from overlayd.plan.diagnose import _policy_findings as policy_findings
from overlayd.plan.endpoints import endpoints_prefix, render_endpoint
from overlayd.plan.leases import config_key, subnets_prefix
from overlayd.plan.policy import parse_policy, policies_prefix, policy_key, render_policy
from overlayd.plan.policy_inputs import enforced_ruleset
from overlayd.plan.policy_model import Endpoint, Policy
from overlayd.plan.policy_rules import TABLE, PolicyRuleset, listed_counters, policy_transaction
from overlayd.plan.selection import select_peers
from overlayd.store.etcd import EtcdStore

OWN_PREFIX = "/overlayd"  # the daemons' --overlayd-prefix (its default)
TXN_OPS = 100  # etcd allows 128 operations per transaction by default


# --- writing ------------------------------------------------------------------------


def endpoint_items(endpoints: Sequence[Endpoint]) -> list[tuple[str, str]]:
    return [(e.key, render_endpoint(e).decode()) for e in endpoints]


def policy_items(documents: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Each document validated and in its canonical form, under its key."""
    found = []
    for document in documents:
        policy = parse_policy(document)
        found.append((policy_key(OWN_PREFIX, policy.name), render_policy(policy)))
    return found


async def put_in_batches(store: EtcdStore, items: Sequence[tuple[str, str]]) -> int:
    """Every item written, TXN_OPS to a transaction; the store's revision
    afterwards (every item is in it)."""
    for start in range(0, len(items), TXN_OPS):
        await store.put_many(items[start : start + TXN_OPS])
    _, revision = await store.get(policies_prefix(OWN_PREFIX))
    return revision


async def label_endpoint(store: EtcdStore, address: IPAddress, labels: Mapping[str, str]) -> str:
    """Add `labels` to the registration that claims `address` (keeping the
    etcd lease it is bound to, as `overlayctl endpoint label` does); its key."""
    raw, _ = await store.get_prefix(endpoints_prefix(OWN_PREFIX))
    for key, value in raw.items():
        document = json.loads(value)
        if str(address) in document.get("addresses", []):
            found = await store.get_with_lease(key)
            assert found is not None
            document["labels"] = {**document.get("labels", {}), **labels}
            if await store.replace_bound(key, json.dumps(document).encode(), found[1]):
                return key
    raise RuntimeError(f"no endpoint registered for {address}: is overlay-cni registering?")


# --- what a host must hold -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expected:
    """The ruleset a host must hold, what it is made of, and every input
    skipped as invalid (the benchmarks write none)."""

    ruleset: PolicyRuleset
    policies: list[Policy]
    endpoints: tuple[Endpoint, ...]
    skipped: dict[str, str]


async def expected(
    store: EtcdStore, own_subnet: IPv4Network, gwbridge: tuple[IPNetwork, ...] = ()
) -> Expected:
    """What the host holding `own_subnet` must enforce, from etcd as it is
    now, by the daemon's rules: its peers are the leases select_peers keeps."""
    config_value, _ = await store.get(config_key(PREFIX))
    if config_value is None:
        raise RuntimeError("no network config in etcd")
    config = parse_network_config(config_value)
    leases, _ = await store.get_prefix(subnets_prefix(PREFIX))
    own = next(
        (s for s in select_peers(config, None, leases, PREFIX).peers if s.subnet == own_subnet),
        None,
    )
    if own is None:
        raise RuntimeError(f"no usable lease for {own_subnet} in etcd")
    peers = select_peers(config, own, leases, PREFIX).peers
    policies, _ = await store.get_prefix(policies_prefix(OWN_PREFIX))
    endpoints, _ = await store.get_prefix(endpoints_prefix(OWN_PREFIX))
    ruleset, usable, selection, skipped = enforced_ruleset(
        policies, endpoints, OWN_PREFIX, own, peers, gwbridge=gwbridge
    )
    return Expected(ruleset, usable, selection.endpoints, skipped)


def _nft(ns: str, *args: str) -> str | None:
    """nft's output in `ns`; None when it fails (no such table)."""
    out = netns.in_ns(ns, "nft", *args, check=False, timeout=60)
    return out or None


def kernel_finding(ns: str, wanted: Expected) -> Finding:
    """Whether the policy table in `ns` is exactly `wanted` (diagnose's
    comparison: sets with their elements, chains and rules as rendered;
    no table when there are no policies)."""
    where = ("table", "inet", TABLE)
    facts = PolicyFacts(
        wanted.ruleset,
        _nft(ns, "-j", "list", *where),
        _nft(ns, "-t", "list", *where),
        skipped=wanted.skipped,
    )
    findings = policy_findings(facts)
    bad = [f for f in findings if not f.ok]
    return bad[0] if bad else findings[-1]


def counters(ns: str) -> dict[str, int]:
    """Packets per counter of the policy table in `ns` ({} without one)."""
    listing = _nft(ns, "-j", "list", "counters", "table", "inet", TABLE)
    return listed_counters(listing) if listing is not None else {}


@dataclass(frozen=True, slots=True)
class RulesetSize:
    statements: int  # what a cold start writes: policy_transaction(None, ruleset)
    sets: int
    elements: int
    chains: int
    rules: int

    def text(self) -> str:
        return (
            f"{self.statements} nft statements ({self.sets} sets with {self.elements}"
            f" elements, {self.chains} chains, {self.rules} rules)"
        )


def ruleset_size(ruleset: PolicyRuleset) -> RulesetSize:
    return RulesetSize(
        statements=len(policy_transaction(None, ruleset)),
        sets=len(ruleset.sets) + len(ruleset.port_sets),
        elements=sum(len(s.elements) for s in ruleset.sets.values())
        + sum(len(p.elements) for p in ruleset.port_sets.values()),
        chains=len(ruleset.chains),
        rules=sum(len(c.rules) for c in ruleset.chains.values()),
    )
