"""The pure parts of the policy benchmarks (`lab policybench --cold`, `lab
bench --policies`): the synthetic endpoints and policies are valid to the
daemon's own parsers and realistic enough to select something; the bench's
policies allow the bench's connection and nothing else on its port; the
counter check, the paired table and the cold-start summary; the arguments.
No lab is built and nothing is timed here."""

from __future__ import annotations

import json
from collections import Counter
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

import pytest

from overlayd.cli import ctl
from overlayd.lab import bench, policycold, policycost, policyload
from overlayd.lab.policycheck import (
    OWN_PREFIX,
    Expected,
    RulesetSize,
    endpoint_items,
    policy_items,
    ruleset_size,
)
from overlayd.plan.endpoints import endpoint_key, host_id, render_endpoint, select_endpoints
from overlayd.plan.policy import PolicyChecker, parse_policy, render_policy, stored_policies
from overlayd.plan.policy_model import Direction, Endpoint, HostSubnets, Protocol
from overlayd.plan.policy_rules import (
    EMPTY,
    LocalSubnets,
    counter_name,
    policy_ruleset,
    policy_transaction,
)

CLUSTER = IPv4Network("10.128.0.0/9")


def hosts(count: int, *, dual: bool = False) -> list[HostSubnets]:
    return [
        HostSubnets(
            IPv4Network(f"10.128.{i}.0/24"),
            IPv6Network(f"fd00:128:0:{i:x}::/64") if dual else None,
        )
        for i in range(1, count + 1)
    ]


def host_map(subnets: list[HostSubnets]) -> dict[str, HostSubnets]:
    return {host_id(h.subnet): h for h in subnets}


# --- endpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("dual", [False, True])
def test_synthetic_endpoints_read_back_as_themselves_and_none_is_refused(dual: bool) -> None:
    subnets = hosts(5, dual=dual)
    made = policyload.synthetic_endpoints(subnets, 230, per_host=50, own_prefix=OWN_PREFIX)
    assert len(made) == 230
    assert Counter(e.host for e in made) == {
        **{host_id(h.subnet): 50 for h in subnets[:4]},
        host_id(subnets[4].subnet): 30,
    }
    raw = {key: value.encode() for key, value in endpoint_items(made)}
    selection = select_endpoints(raw, OWN_PREFIX, host_map(subnets))
    assert selection.rejected == {}
    assert list(selection.endpoints) == made  # read back field for field
    assert all(len(e.addresses) == (2 if dual else 1) for e in made)
    # The same reader refuses an endpoint moved off its host's subnet: the
    # check above is a real one.
    moved = json.loads(raw[made[0].key])
    moved["addresses"] = ["10.129.0.5"]
    raw[made[0].key] = json.dumps(moved).encode()
    assert list(select_endpoints(raw, OWN_PREFIX, host_map(subnets)).rejected) == [made[0].key]


def test_synthetic_labels_come_from_a_few_hundred_values() -> None:
    made = policyload.synthetic_endpoints(hosts(40), 2000, per_host=50, own_prefix=OWN_PREFIX)
    values = {(key, value) for e in made for key, value in e.labels.items()}
    assert 250 <= len(values) <= policyload.APPS + 5 + 3 + policyload.TEAMS
    assert {key for key, _ in values} == {"app", "tier", "env", "team"}
    # The same seed, the same cluster: runs are comparable.
    again = policyload.synthetic_endpoints(hosts(40), 2000, per_host=50, own_prefix=OWN_PREFIX)
    assert again == made


def test_endpoints_that_would_take_a_broadcast_address_or_not_fit_are_refused() -> None:
    subnets = hosts(2)
    # .2 to .254: the most a /24 holds from offset 2, and every one is usable.
    full = policyload.synthetic_endpoints(subnets[:1], 253, per_host=253, own_prefix=OWN_PREFIX)
    raw = {key: value.encode() for key, value in endpoint_items(full)}
    assert select_endpoints(raw, OWN_PREFIX, host_map(subnets)).rejected == {}
    assert str(full[-1].addresses[0]) == "10.128.1.254"
    with pytest.raises(ValueError, match="do not fit"):
        policyload.synthetic_endpoints(subnets[:1], 254, per_host=254, own_prefix=OWN_PREFIX)
    with pytest.raises(ValueError, match="do not fit"):
        policyload.synthetic_endpoints(subnets, 101, per_host=50, own_prefix=OWN_PREFIX)
    with pytest.raises(ValueError, match="do not fit"):
        policyload.synthetic_endpoints(subnets, 2, per_host=1, own_prefix=OWN_PREFIX, offset=1)


def test_hosts_for_rounds_up() -> None:
    assert policyload.hosts_for(10_000, 50) == 200
    assert policyload.hosts_for(10_001, 50) == 201
    assert policyload.hosts_for(0, 50) == 1  # the daemon's own host, always
    with pytest.raises(ValueError):
        policyload.hosts_for(10, 0)


# --- policies ------------------------------------------------------------------------


def test_synthetic_policies_parse_with_the_daemons_parser_and_keep_their_meaning() -> None:
    documents = policyload.synthetic_policies(500, cluster=CLUSTER)
    names = [d["name"] for d in documents]
    assert len(set(names)) == 500 and names == sorted(names)
    for document in documents:
        policy = parse_policy(document)
        assert parse_policy(render_policy(policy)) == policy
    # As the daemon reads them from etcd: all usable, none skipped.
    raw = {key: value.encode() for key, value in policy_items(documents)}
    usable, rejected = stored_policies(raw, OWN_PREFIX)
    assert len(usable) == 500 and rejected == {}


def _shapes(document: dict[str, Any]) -> set[str]:
    text = json.dumps(document)
    found = {name for name in ("except", "endPort", "matchExpressions", "UDP") if name in text}
    types = set(document.get("policyTypes", ["Ingress"]))
    if types == {"Egress"}:
        found.add("egress only")
    if types == {"Ingress", "Egress"}:
        found.add("both")
    if types == {"Ingress"} and not document.get("ingress"):
        found.add("deny all")
    if "ipBlock" in text:
        found.add("ipBlock")
    return found


def test_the_mix_has_every_shape_people_write() -> None:
    documents = policyload.synthetic_policies(40, cluster=CLUSTER)
    seen = Counter(shape for d in documents for shape in _shapes(d))
    assert set(seen) == {
        "except",
        "endPort",
        "matchExpressions",
        "UDP",
        "egress only",
        "both",
        "deny all",
        "ipBlock",
    }
    assert seen["deny all"] == 2 and seen["egress only"] == 6 and seen["both"] == 4


def test_a_cold_start_ruleset_builds_and_most_of_its_sets_select_someone() -> None:
    subnets = hosts(40)
    made = policyload.synthetic_endpoints(subnets, 2000, per_host=50, own_prefix=OWN_PREFIX)
    policies = [parse_policy(d) for d in policyload.synthetic_policies(500, cluster=CLUSTER)]
    ruleset = policy_ruleset(policies, made, LocalSubnets(subnets[0].subnet))
    # The address sets; the MAC sets (link-local) hold only this host's
    # endpoints' MACs, and synthetic endpoints register none.
    addresses = [s for s in ruleset.sets.values() if s.type != "ether_addr"]
    assert sum(bool(s.elements) for s in addresses) >= 0.9 * len(addresses)
    size = ruleset_size(ruleset)
    assert size.statements == len(policy_transaction(None, ruleset))
    # The port sets count too: the kernel makes them as it makes the others.
    assert ruleset.port_sets
    assert size.sets == len(ruleset.sets) + len(ruleset.port_sets)
    assert size.chains == len(ruleset.chains)
    assert size.elements == sum(len(s.elements) for s in ruleset.sets.values()) + sum(
        len(p.elements) for p in ruleset.port_sets.values()
    )
    assert "nft statements" in size.text()


def bench_cluster() -> tuple[Endpoint, Endpoint, list[Endpoint]]:
    """The bench's two containers (one per host, at .2) and synthetic
    endpoints on the same two hosts from .16, as `lab bench --policies`
    registers them."""
    subnets = hosts(2, dual=True)

    def container(h: HostSubnets, name: str) -> Endpoint:
        host = host_id(h.subnet)
        assert h.subnet6 is not None
        return Endpoint(
            key=endpoint_key(OWN_PREFIX, host, name),
            id=name,
            host=host,
            name=name,
            addresses=(h.subnet.network_address + 2, h.subnet6.network_address + 2),
            labels=dict(policyload.BENCH_LABELS),
        )

    a, b = container(subnets[0], "a"), container(subnets[1], "b")
    others = policyload.synthetic_endpoints(
        subnets, 400, per_host=200, own_prefix=OWN_PREFIX, offset=policycost.ENDPOINT_OFFSET
    )
    return a, b, others


def test_the_bench_policies_allow_the_bench_connection_and_nothing_else_on_its_port() -> None:
    a, b, others = bench_cluster()
    endpoints = [a, b, *others]
    # Valid registrations, addresses distinct from the synthetic ones.
    raw = {e.key: render_endpoint(e) for e in endpoints}
    assert select_endpoints(raw, OWN_PREFIX, host_map(hosts(2, dual=True))).rejected == {}
    documents = policyload.bench_policy_mix(500, cluster=CLUSTER)
    assert len(documents) == 500
    assert [d["name"] for d in documents[-2:]] == list(policyload.BENCH_POLICY_NAMES)
    policies = [parse_policy(d) for d in documents]
    checker = PolicyChecker(policies, endpoints)
    found = checker.verdict(a.addresses[0], b.addresses[0], Protocol.TCP, bench.IPERF_PORT)
    assert found.allowed
    assert found.egress.isolated and found.ingress.isolated
    assert found.egress.allowed_by == ("zz-bench-egress",)
    assert found.ingress.allowed_by == ("zz-bench-ingress",)
    # Synthetic policies select the bench containers too (their common labels).
    assert len(found.ingress.selected_by) + len(found.egress.selected_by) > 2
    # Over IPv6 as well (a dual-stack lab's sets hold both families).
    assert checker.verdict(a.addresses[1], b.addresses[1], Protocol.TCP, 5201).allowed
    # Another endpoint of the cluster may not reach the bench's port.
    stranger = others[0]
    denied = checker.verdict(stranger.addresses[0], b.addresses[0], Protocol.TCP, 5201)
    assert not denied.allowed and denied.ingress.isolated


def test_the_bench_needs_room_for_its_own_two_policies() -> None:
    assert len(policyload.bench_policy_mix(2, cluster=CLUSTER)) == 2
    with pytest.raises(ValueError, match="at least 2"):
        policyload.bench_policy_mix(1, cluster=CLUSTER)


# --- the checks and the reports ---------------------------------------------------------

ALLOW_OUT = counter_name("zz-bench-egress", Direction.EGRESS, "allow")
ALLOW_IN = counter_name("zz-bench-ingress", Direction.INGRESS, "allow")
DENY = counter_name("syn-0001", Direction.INGRESS, "deny")


def test_the_counter_check_wants_both_hosts_judging_and_nothing_dropped() -> None:
    before = ({ALLOW_OUT: 3, DENY: 0}, {ALLOW_IN: 3, DENY: 0})
    good = policycost.judged(before, ({ALLOW_OUT: 9, DENY: 0}, {ALLOW_IN: 8, DENY: 0}))
    assert good == policycost.Judged(6, 5, 0) and good.ok
    dropped = policycost.judged(before, ({ALLOW_OUT: 9, DENY: 0}, {ALLOW_IN: 8, DENY: 1}))
    assert dropped.dropped == 1 and not dropped.ok
    unjudged = policycost.judged(before, ({ALLOW_OUT: 3, DENY: 0}, {ALLOW_IN: 8, DENY: 0}))
    assert unjudged.egress_allowed == 0 and not unjudged.ok
    # No table at all (the counters gone) is no judging either.
    assert not policycost.judged(({}, {}), ({}, {})).ok


def test_mode_rows_pair_within_rounds_and_name_the_modes() -> None:
    samples = {
        "policies": {"tcp1_fwd": [9.0, 8.0, 10.0], "ping_us": [110.0, 120.0, 100.0]},
        "none": {"tcp1_fwd": [10.0, 10.0, 10.0], "ping_us": [100.0, 100.0, 100.0]},
    }
    metrics = (("tcp1_fwd", "TCP 1 stream", "Gbit/s"), ("ping_us", "ping", "us"))
    lines, summary = bench.mode_rows(samples, ("policies", "none"), metrics)
    assert "policies/none paired" in lines[0]
    assert lines[2].startswith("| TCP 1 stream (Gbit/s) | 9.00 (8.00 to 10.00) | 10.00")
    assert "| 0.900 (0.800 to 1.000) |" in lines[2]
    tcp: Any = summary["tcp1_fwd"]
    assert tcp["paired"] == [0.9, 0.8, 1.0] and tcp["median"] == 0.9


def cold(policies: int, enforced: float) -> policycold.ColdResult:
    return policycold.ColdResult(
        endpoints=10_000,
        policies=policies,
        hosts=200,
        ready=enforced - 0.01,
        enforced=enforced,
        size=RulesetSize(statements=1000, sets=400, elements=9000, chains=600, rules=1200),
        peak_rss_mb=120.0,
        check="ok",
    )


def test_the_cold_start_summary_says_whether_the_goal_is_met() -> None:
    row = cold(500, 1.5).row()
    assert row.count("|") == policycold.HEADER.splitlines()[0].count("|")
    assert "1.50 s" in row and "120 MB" in row
    lines = list(policycold.summary([cold(0, 0.8), cold(500, 1.5), cold(500, 2.5)]))
    assert (
        lines[0].startswith("10000 endpoints, 0 policies, 1 run(s)") and "met in 1 of 1" in lines[0]
    )
    assert "500 policies, 2 run(s)" in lines[1] and "NOT met in 1 of 2" in lines[1]
    assert "2.00 s median (1.50 to 2.50)" in lines[1]


def test_policy_benchmark_arguments() -> None:
    args = ctl.parser().parse_args(["lab", "bench", "--policies", "500"])
    assert args.policies == 500 and args.policy_endpoints == 400 and not args.vxlan_filter
    assert ctl.parser().parse_args(["lab", "bench"]).policies == 0
    args = ctl.parser().parse_args(["lab", "policybench", "--cold"])
    assert args.cold and args.endpoints == 10_000 and args.policies == [0, 500]
    assert args.per_host == 50 and args.runs == 1
    args = ctl.parser().parse_args(["lab", "policybench", "--cold", "--policies", "500"])
    assert args.policies == [500]
    assert not ctl.parser().parse_args(["lab", "policybench"]).cold


def test_the_own_subnet_is_no_synthetic_peers() -> None:
    from overlayd.lab import cpbench

    first = cpbench.synthetic_lease(0).subnet
    assert not policycold.OWN_SUBNET.overlaps(first)
    assert policycold.OWN_SUBNET.subnet_of(cpbench.NETWORK)
    assert ip_address("10.128.1.2") in policycold.OWN_SUBNET


def test_the_report_names_the_policies_that_judge_the_bench_connection() -> None:
    a, b, others = bench_cluster()
    policies = [parse_policy(d) for d in policyload.bench_policy_mix(50, cluster=CLUSTER)]
    wanted = Expected(EMPTY, policies, (a, b, *others), {})
    ends = [bench.Endpoint("ns", e.addresses[0]) for e in (a, b)]
    line = policycost.verdict_line(wanted, *ends)
    assert "TCP 5201" in line and ": allowed;" in line
    assert "(allowed by zz-bench-egress)" in line and "(allowed by zz-bench-ingress)" in line
    # Without the bench's own policies, they allow nothing.
    alone = Expected(EMPTY, policies[:-2], (a, b, *others), {})
    assert "zz-bench" not in policycost.verdict_line(alone, *ends)
