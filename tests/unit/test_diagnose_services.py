"""diagnose's services check, from data: etcd's services and endpoints,
the services table and the DNS responder agree, or every difference is
named (map and key, set element, chain and rule, DNS record) with the
service it belongs to; without a ServiceNetwork the check says services
are off and passes. What diagnose computes from etcd is what the daemon
wrote after incremental passes (a fake data plane), and the responder is
asked for real over loopback."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import AsyncIterator
from ipaddress import IPv4Network, ip_address

import pytest

from overlayd.cli import diagnose_services
from overlayd.cli.diagnose_services import ask_all
from overlayd.daemon.loop import Knowledge, Reconciler, standard_managers
from overlayd.daemon.managers import Level
from overlayd.daemon.managers.services import ServiceManager, ServiceState
from overlayd.plan.diagnose import MAX_LISTED, ServiceFacts, service_findings
from overlayd.plan.dns_records import build_records
from overlayd.plan.endpoints import render_endpoint
from overlayd.plan.policy_inputs import gwbridge_subnets
from overlayd.plan.policy_model import Endpoint, LabelSelector, Protocol
from overlayd.plan.policy_rules import Chain
from overlayd.plan.service import render_service, service_key
from overlayd.plan.service_check import (
    DnsAnswer,
    DnsQuestion,
    ServicesInForce,
    dns_questions,
    services_in_force,
    vips_in_table,
)
from overlayd.plan.service_listing import believed_elements, listed_chains
from overlayd.plan.service_model import Affinity, Service, ServicePort
from overlayd.plan.service_rules import (
    SHARD_TABLES,
    TABLE,
    chain_label,
    render_ruleset,
    service_chain,
    shard_of,
)
from overlayd.surfaces.dns import DnsServer
from overlayd.surfaces.telemetry import Telemetry
from tests.unit.test_loop import CONFIG, OWN, PEER, FakeDataplane, knowledge
from tests.unit.test_policy_daemon import OWN_PREFIX, endpoint

SERVICE_NETWORK = IPv4Network("10.96.0.0/16")
DOMAIN = "overlay.internal"
HTTP = ServicePort("http", Protocol.TCP, 80, 8080)


def service(name: str, vip: str, *, node_port: int | None = None, **labels: str) -> Service:
    return Service(
        name=name,
        selector=LabelSelector(tuple(sorted(labels.items()))),
        ports=(dataclasses.replace(HTTP, node_port=node_port),),
        vips=(ip_address(vip),),
        affinity=Affinity.CLIENT_IP if name == "sticky" else Affinity.NONE,
    )


WEB = service("web", "10.96.0.10", app="web")
STICKY = service("sticky", "10.96.0.11", app="web")
NODE = service("node", "10.96.0.12", node_port=30080, app="db")
EMPTY = service("empty", "10.96.0.13", app="nobody")
WEB1 = endpoint("web1", "10.244.1.5", app="web")
WEB2 = endpoint("web2", "10.244.2.9", PEER, app="web")
DB = endpoint("db", "10.244.2.7", PEER, app="db")


def raw(services: tuple[Service, ...], endpoints: tuple[Endpoint, ...]) -> Knowledge:
    inputs = knowledge(PEER)
    inputs.config = dataclasses.replace(CONFIG, service_network=SERVICE_NETWORK)
    inputs.raw_services = {
        service_key(OWN_PREFIX, s.name): render_service(s).encode() for s in services
    }
    inputs.raw_endpoints = {e.key: render_endpoint(e) for e in endpoints}
    return inputs


def in_force_of(inputs: Knowledge, domain: str | None = DOMAIN) -> ServicesInForce:
    """What diagnose computes from the same raw values the daemon saw."""
    return services_in_force(
        inputs.raw_services,
        inputs.raw_endpoints,
        OWN_PREFIX,
        service_networks=inputs.config.service_networks,
        cluster=(inputs.config.network,),
        own=OWN,
        peers=[PEER],
        gwbridge=gwbridge_subnets(inputs.egress),
        domain=domain,
    )


def cluster() -> ServicesInForce:
    return in_force_of(raw((WEB, STICKY, NODE, EMPTY), (WEB1, WEB2, DB)))


def true_answers(questions: list[DnsQuestion]) -> dict[DnsQuestion, DnsAnswer]:
    """What a responder that agrees with etcd says."""
    return {
        q: DnsAnswer("NXDOMAIN") if q.expected is None else DnsAnswer("NOERROR", q.expected)
        for q in questions
    }


def agreeing(in_force: ServicesInForce) -> ServiceFacts:
    """Facts of a host whose table and responder hold exactly what etcd
    makes (the render's text has nft's listing layout)."""
    ruleset = in_force.ruleset
    questions = dns_questions(in_force)
    return ServiceFacts(
        networks=(SERVICE_NETWORK,),
        in_force=in_force,
        elements=believed_elements(ruleset) if not ruleset.empty else None,
        chains=listed_chains(render_ruleset(ruleset)) if not ruleset.empty else None,
        questions=questions,
        answers={"10.244.1.1": true_answers(questions)},
    )


def failures(facts: ServiceFacts) -> list[str]:
    return [f"{f.check}: {f.detail}" for f in service_findings(facts) if not f.ok]


# --- what diagnose computes is what the daemon wrote --------------------------------


async def test_diagnose_computes_the_table_and_records_the_daemon_made_pass_by_pass() -> None:
    """The daemon moves its table one service at a time; diagnose renders
    from scratch, from the same etcd values: equal after every pass."""
    dataplane, heard = FakeDataplane(), list[ServiceState]()
    inputs = raw((WEB, STICKY, EMPTY), (WEB1, DB))
    managers = standard_managers(dataplane, Telemetry(), on_service_records=heard.append)
    [manager] = [m for m in managers if isinstance(m, ServiceManager)]
    loop = Reconciler(inputs, dataplane, managers=managers)
    steps = [
        ((WEB, STICKY, EMPTY), (WEB1, DB)),
        ((WEB, STICKY, EMPTY), (WEB1, DB, WEB2)),  # a backend comes
        ((WEB, STICKY, EMPTY, NODE), (WEB1, DB, WEB2)),  # a service comes
        ((WEB, STICKY, NODE), (WEB2, DB)),  # a backend and a service go
        ((WEB, STICKY, NODE), (WEB2, dataclasses.replace(DB, labels={"app": "web"}))),
    ]
    for number, (services, endpoints) in enumerate(steps):
        fresh = raw(services, endpoints)
        inputs.raw_services, inputs.raw_endpoints = fresh.raw_services, fresh.raw_endpoints
        level = Level.FULL if number == 0 else Level.LIGHT
        assert (await loop.reconcile_once(level=level)).ok
        in_force = in_force_of(inputs)
        assert manager.believed == in_force.ruleset, number
        state = heard[-1]
        records = build_records(
            state.services.values(),
            state.backends,
            state.endpoints,
            domain=DOMAIN,
            reverse_zones=[CONFIG.network, SERVICE_NETWORK],
        )
        assert records == in_force.records, number
        assert not failures(agreeing(in_force)), number


# --- the table ------------------------------------------------------------------------


def test_an_agreeing_host_passes_with_one_finding_per_part() -> None:
    found = service_findings(agreeing(cluster()))
    assert [f.check for f in found] == ["services", "services table", "services dns"]
    assert all(f.ok for f in found), found
    assert "4 service(s) in etcd, 3 with backends, 3 usable endpoint(s)" in found[0].detail
    assert "as etcd says" in found[2].detail


def web_shard() -> str:
    return SHARD_TABLES[shard_of("web")]


def front(name: str) -> tuple[str, str]:
    return (TABLE, name)


def test_a_missing_map_element_is_named_with_its_key_and_service() -> None:
    in_force = cluster()
    facts = agreeing(in_force)
    assert not failures(facts)  # the control
    chain = service_chain("web", HTTP, 4)
    element = f"10.96.0.10 . tcp . 80 : goto {chain}"
    elements = dict(facts.elements or {})
    vips = (web_shard(), "vips_v4")
    assert element in elements[vips]
    facts.elements = {**elements, vips: elements[vips] - {element}}
    assert failures(facts) == [
        f"services table: map vips_v4 of table {web_shard()}: no element for 10.96.0.10 . tcp"
        f" . 80 (service web), which must goto {chain}"
    ]


def test_a_stale_element_and_a_wrong_verdict_are_named() -> None:
    facts = agreeing(cluster())
    assert facts.elements is not None and facts.chains is not None
    web_chain = service_chain("web", HTTP, 4)
    stale = "10.96.0.99 . tcp . 80 : goto svc_gone_v4"
    gone = chain_label(web_shard(), "svc_gone_v4")
    facts.chains = {**facts.chains, gone: Chain(("accept",), "service gone tcp/80")}
    at = (web_shard(), "vips_v4")
    vips = {e for e in facts.elements[at] if not e.startswith("10.96.0.10 ")}
    facts.elements = {
        **facts.elements,
        at: frozenset({*vips, stale, "10.96.0.10 . tcp . 80 : goto reject_chain"}),
    }
    assert failures(facts) == [
        f"services table: map vips_v4 of table {web_shard()}: element 10.96.0.99 . tcp . 80 :"
        " goto svc_gone_v4 is no service's in etcd (its chain says: service gone tcp/80)",
        f"services table: map vips_v4 of table {web_shard()}: element 10.96.0.10 . tcp . 80"
        f" (service web) does goto reject_chain, must goto {web_chain}",
        f"services table: chain {gone} (its comment: service gone tcp/80) is no service's in etcd",
    ]


def test_hairpin_elements_missing_and_extra_are_named_with_the_local_backends_services() -> None:
    facts = agreeing(cluster())
    assert facts.elements is not None
    assert facts.elements[front("hairpin_v4")] == {"10.244.1.5 . 10.244.1.5"}  # web1 is local
    facts.elements = {
        **facts.elements,
        front("hairpin_v4"): frozenset({"10.244.1.77 . 10.244.1.77"}),
    }
    assert failures(facts) == [
        "services table: set hairpin_v4: no element 10.244.1.5 . 10.244.1.5 (a local backend"
        " of sticky, web)",
        "services table: set hairpin_v4: element 10.244.1.77 . 10.244.1.77 is no service's"
        " local backend in etcd",
    ]


def test_a_changed_missing_or_extra_rule_and_a_missing_chain_are_named() -> None:
    in_force = cluster()
    facts = agreeing(in_force)
    chains = dict(facts.chains or {})
    chain = chain_label(web_shard(), service_chain("web", HTTP, 4))
    rules = chains[chain].rules
    assert len(rules) == 3  # the mark, and one rule per backend
    cases = {
        "changed": (rules[0], rules[1].replace("10.244.1.5", "10.244.1.6"), rules[2]),
        "missing": rules[:2],
        "extra": (*rules, "accept"),
    }
    wanted = {
        "changed": f"rule 2 is `{rules[1].replace('10.244.1.5', '10.244.1.6')}`, must be"
        f" `{rules[1]}`",
        "missing": f"rule 3 `{rules[2]}` is missing (2 of 3 rules)",
        "extra": "extra rule 4 `accept` (4 rules, must be 3)",
    }
    for case, changed in cases.items():
        facts.chains = {**chains, chain: chains[chain]._replace(rules=changed)}
        assert failures(facts) == [f"services table: chain {chain} (service web): {wanted[case]}"]
    nat_output = chain_label(SHARD_TABLES[0], "nat_output")
    facts.chains = {k: v for k, v in chains.items() if k != nat_output}
    assert failures(facts) == [f"services table: chain {nat_output} is missing"]


def test_a_priority_listed_as_a_number_is_the_same_hook() -> None:
    """nft lists `priority filter - 20` back as `priority -20`."""
    facts = agreeing(cluster())
    assert facts.chains is not None
    filter_input = chain_label(TABLE, "filter_input")
    hook = facts.chains[filter_input].hook
    assert "priority filter - 20;" in hook
    listed = facts.chains[filter_input]._replace(hook=hook.replace("filter - 20", "-20"))
    facts.chains = {**facts.chains, filter_input: listed}
    assert not failures(facts)
    facts.chains = {**facts.chains, filter_input: listed._replace(hook=hook.replace("20", "10"))}
    assert [f.split(":")[1] for f in failures(facts)] == [f" chain {filter_input}"]


def test_a_missing_table_or_a_table_without_services_fails() -> None:
    facts = agreeing(cluster())
    facts.elements, facts.chains = None, None
    assert failures(facts) == [
        f"services table: table inet {TABLE} is missing: the VIPs and node ports of 4"
        " service(s) are not served here"
    ]
    none = agreeing(in_force_of(raw((), (WEB1,))))
    assert not failures(none)  # the control: no services, no table
    none.elements, none.chains = {front("noep_vips_v4"): frozenset()}, {}
    assert failures(none) == [
        f"services table: table inet {TABLE} exists, but etcd has no service this host must serve"
    ]


def test_without_a_service_network_services_are_off_and_pass_unless_a_table_lingers() -> None:
    [finding] = service_findings(ServiceFacts())
    assert finding.ok and finding.detail.startswith("off: the network config has no ServiceNetwork")
    lingering = ServiceFacts(elements={}, chains={})
    assert failures(lingering) == [
        f"services table: table inet {TABLE} exists, but the network config has no ServiceNetwork"
    ]


def test_a_skipped_definition_fails_naming_its_key() -> None:
    inputs = raw((WEB,), (WEB1,))
    inputs.raw_services = {
        **inputs.raw_services,
        service_key(OWN_PREFIX, "bad"): b'{"name": "bad"}',
    }
    found = failures(agreeing(in_force_of(inputs)))
    assert len(found) == 1 and found[0].startswith("services: skipped /overlayd/services/bad: ")


def test_a_long_list_of_differences_ends_in_one_line_that_counts_the_rest() -> None:
    facts = agreeing(cluster())
    facts.elements = {**(facts.elements or {}), front("hairpin_v4"): frozenset(
        f"10.244.1.{i} . 10.244.1.{i}" for i in range(100, 130)
    ) | {"10.244.1.5 . 10.244.1.5"}}  # fmt: skip
    found = [f for f in service_findings(facts) if not f.ok]
    assert len(found) == MAX_LISTED + 1
    assert found[-1].detail == f"and {30 - MAX_LISTED} more difference(s) like these"
    assert sum(f.count for f in found) == 30


# --- DNS ------------------------------------------------------------------------------


def test_the_questions_are_every_services_names_and_vip_ptrs_and_stale_vips() -> None:
    in_force = cluster()
    questions = dns_questions(in_force, {ip_address("10.96.0.10"), ip_address("10.96.0.99")})
    asked = {(q.name, q.rdtype): q.expected for q in questions}
    assert asked[("web.overlay.internal.", "A")] == frozenset({"10.96.0.10"})
    assert asked[("tasks.web.overlay.internal.", "A")] == frozenset({"10.244.1.5", "10.244.2.9"})
    assert asked[("tasks.empty.overlay.internal.", "A")] == frozenset()
    assert asked[("10.0.96.10.in-addr.arpa.", "PTR")] == frozenset({"web.overlay.internal."})
    assert asked[("99.0.96.10.in-addr.arpa.", "PTR")] is None  # stale: NXDOMAIN
    assert len(questions) == 4 * 3 + 1


def test_each_kind_of_dns_disagreement_is_named_with_the_record_and_server() -> None:
    facts = agreeing(cluster())
    assert not failures(facts)  # the control
    by_name = {(q.name, q.rdtype): q for q in facts.questions}
    tasks = by_name[("tasks.web.overlay.internal.", "A")]
    web = by_name[("web.overlay.internal.", "A")]
    ptr = by_name[("12.0.96.10.in-addr.arpa.", "PTR")]
    stale = DnsQuestion("99.0.96.10.in-addr.arpa.", "PTR", None, "VIP 10.96.0.99, stale")
    answers = dict(facts.answers["10.244.1.1"])
    answers[tasks] = DnsAnswer("NOERROR", frozenset({"10.244.1.5", "10.244.3.3"}))
    answers[web] = DnsAnswer("NXDOMAIN")
    answers[ptr] = DnsAnswer(error="no answer in 3 tries of 1 s")
    answers[stale] = DnsAnswer("NOERROR", frozenset({"gone.overlay.internal."}))
    facts.questions = [*facts.questions, stale]
    facts.answers = {"10.244.1.1": answers}
    # In the order asked: services by name, each one's names then its PTRs.
    assert failures(facts) == [
        "services dns: 12.0.96.10.in-addr.arpa. PTR at 10.244.1.1 (service node): no answer:"
        " no answer in 3 tries of 1 s",
        "services dns: web.overlay.internal. A at 10.244.1.1 (service web): NXDOMAIN, must be"
        " NOERROR with 10.96.0.10",
        "services dns: tasks.web.overlay.internal. A at 10.244.1.1 (service web): 10.244.2.9"
        " missing; 10.244.3.3 extra",
        "services dns: 99.0.96.10.in-addr.arpa. PTR at 10.244.1.1 (VIP 10.96.0.99, stale):"
        " NOERROR gone.overlay.internal., must be NXDOMAIN",
    ]


def test_dns_off_passes_and_a_responder_listening_nowhere_fails() -> None:
    facts = agreeing(cluster())
    facts.questions, facts.answers = [], {}
    facts.dns_off = "off (dns = off in overlayd's settings): no responder to ask"
    assert not failures(facts)
    facts.dns_off, facts.dns_problem = None, "the subnet file names no DNS server"
    assert failures(facts) == ["services dns: the subnet file names no DNS server"]
    # One responder silent, the other answering: one finding each.
    questions = dns_questions(cluster())
    facts.questions, facts.answers = questions, {"10.244.1.1": true_answers(questions)}
    facts.dns_problem = "the responder at fd00::1 does not answer: no answer in 3 tries of 1 s"
    found = [(f.ok, f.detail) for f in service_findings(facts) if f.check == "services dns"]
    assert found[0] == (False, facts.dns_problem)
    assert found[1][0] and found[1][1].startswith("the responder at 10.244.1.1 answers all")
    assert len(found) == 2


async def test_a_question_nobody_answers_is_tried_a_few_times_then_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon that is down: no answer (dnspython's UDP socket is not
    connected, so no ICMP error comes back), so ATTEMPTS timeouts; diagnose
    asks one question first and leaves that responder at that."""
    monkeypatch.setattr(diagnose_services, "TIMEOUT_SECONDS", 0.1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    question = dns_questions(cluster())[0]
    started = time.monotonic()
    answer = await diagnose_services.ask("127.0.0.1", question, port=port)
    assert answer == DnsAnswer(error=f"no answer in {diagnose_services.ATTEMPTS} tries of 0.1 s")
    assert time.monotonic() - started >= diagnose_services.ATTEMPTS * 0.1


def test_vips_in_table_reads_both_vip_maps_and_nothing_else() -> None:
    elements = {
        (SHARD_TABLES[1], "vips_v4"): frozenset({"10.96.0.10 . tcp . 80 : goto x"}),
        front("noep_vips_v4"): frozenset({"10.96.0.13 . tcp . 80 : goto reject_chain"}),
        (SHARD_TABLES[1], "nodeports_v4"): frozenset({"tcp . 30080 : goto y"}),
    }
    assert vips_in_table(elements) == {ip_address("10.96.0.10"), ip_address("10.96.0.13")}
    assert vips_in_table(None) == set()


@pytest.fixture
async def responder() -> AsyncIterator[DnsServer]:
    in_force = cluster()
    assert in_force.records is not None
    server = DnsServer(in_force.records, upstreams=[])
    await server.start("127.0.0.1", 0)
    yield server
    await server.close()


async def test_a_live_responder_agrees_then_a_departed_backend_is_named(
    responder: DnsServer,
) -> None:
    """Real queries over loopback to the daemon's own server class: it
    agrees with etcd; then it answers from records that still have web2
    while etcd does not: exactly that record differs."""
    assert responder.address is not None
    host, port = responder.address
    in_force = cluster()
    questions = dns_questions(in_force, {ip_address("10.96.0.99")})
    answers = await ask_all(host, questions, port=port)
    facts = dataclasses.replace(agreeing(in_force), questions=questions, answers={host: answers})
    assert not failures(facts)
    assert answers[questions[0]].rcode == "NOERROR"  # positive control: it answered
    # etcd loses web2; the responder still has it.
    gone = in_force_of(raw((WEB, STICKY, NODE, EMPTY), (WEB1, DB)))
    questions = dns_questions(gone)
    answers = await ask_all(host, questions, port=port)
    facts = dataclasses.replace(agreeing(gone), questions=questions, answers={host: answers})
    assert failures(facts) == [
        f"services dns: tasks.sticky.overlay.internal. A at {host} (service sticky): 10.244.2.9"
        " extra",
        f"services dns: tasks.web.overlay.internal. A at {host} (service web): 10.244.2.9 extra",
    ]
