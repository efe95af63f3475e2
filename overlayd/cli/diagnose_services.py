"""`overlayctl diagnose`'s look at services on a live host: what etcd's
services and endpoints make (plan/service_check.services_in_force, the
daemon's own pure code), the services table as nft lists it (its maps and
sets as JSON, its chains as `nft -t` text: nothing else), and the DNS
responder's answers, asked for real on every address it listens on (the
subnet file's OVERLAYD_DNS). The verdicts are plan/diagnose.service_findings'.

The responder drops a client's queries over its rate limit (200 a second,
a burst of 400, surfaces/dns.py): the questions are paced under it, so
that diagnose never mistakes its own flood for a silent responder, and a
large cluster takes a while (10,000 services: about 3 minutes).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from ipaddress import ip_address

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from overlayd.config import AgentConfig
from overlayd.daemon.dns import DNS_PORT
from overlayd.dataplane.command import run
from overlayd.dataplane.nft import Nft, NftError
from overlayd.model import IPNetwork, Lease, NetworkConfig
from overlayd.plan.diagnose import ServiceFacts
from overlayd.plan.dns_records import validate_domain
from overlayd.plan.endpoints import endpoints_prefix
from overlayd.plan.policy_rules import Chain
from overlayd.plan.service import services_prefix
from overlayd.plan.service_check import (
    DnsAnswer,
    DnsQuestion,
    dns_questions,
    services_in_force,
    vips_in_table,
)
from overlayd.plan.service_listing import listed_chains, listed_elements
from overlayd.plan.service_rules import TABLE, TABLES, WHERE, MapId
from overlayd.surfaces.subnetfile import read_dns

# Under the responder's limit (surfaces/dns.DEFAULT_RATE, DEFAULT_BURST),
# with room for a container of this host asking at the same time.
PACE_BURST = 300
PACE_PER_SECOND = 150.0
IN_FLIGHT = 16
TIMEOUT_SECONDS = 1.0
ATTEMPTS = 3
EDNS_PAYLOAD = 1232


async def service_facts(
    s: AgentConfig,
    config: NetworkConfig,
    ours: Mapping[str, bytes],
    own: Lease,
    peers: Sequence[Lease],
    gwbridge: tuple[IPNetwork, ...],
) -> ServiceFacts:
    look = ServiceFacts(networks=config.service_networks)
    await _table(look)
    if not look.networks:
        return look
    cluster: tuple[IPNetwork, ...] = (config.network,)
    if config.ipv6 is not None:
        cluster += (config.ipv6.network,)
    servers, _ = read_dns(s.subnet_file)
    domain: str | None = None
    if not s.dns:
        look.dns_off = "off (dns = off in overlayd's settings): no responder to ask"
    elif not servers:
        look.dns_problem = (
            f"{s.subnet_file} names no DNS server (OVERLAYD_DNS): the responder listens"
            " nowhere (it starts only if the network config had a ServiceNetwork when"
            " overlayd started: restart overlayd)"
        )
    else:
        domain = validate_domain(s.dns_domain)
    try:
        look.in_force = services_in_force(
            {k: v for k, v in ours.items() if k.startswith(services_prefix(s.overlayd_prefix))},
            {k: v for k, v in ours.items() if k.startswith(endpoints_prefix(s.overlayd_prefix))},
            s.overlayd_prefix,
            service_networks=config.service_networks,
            cluster=cluster,
            own=own,
            peers=peers,
            gwbridge=gwbridge,
            domain=domain,
        )
    except ValueError as exc:
        look.error = f"the services cannot be served: {exc}"
        return look
    if domain is None:
        return look
    look.questions = dns_questions(look.in_force, vips_in_table(look.elements))
    silent: list[str] = []
    answers: dict[str, dict[DnsQuestion, DnsAnswer]] = {}
    for address in map(str, servers):
        # One question first: a responder that does not answer at all (the
        # daemon down) is one finding, not a timeout per question.
        first = await ask(address, look.questions[0]) if look.questions else DnsAnswer()
        if first.error is not None:
            silent.append(f"the responder at {address} does not answer: {first.error}")
            continue
        answers[address] = await ask_all(address, look.questions)
    look.answers, look.dns_problem = answers, "; ".join(silent) or None
    return look


async def _table(look: ServiceFacts) -> None:
    try:
        look.elements, look.chains = await table_listing(Nft())
    except (NftError, OSError) as exc:
        look.table_error = str(exc)


async def table_listing(
    nft: Nft,
) -> tuple[dict[MapId, frozenset[str]] | None, dict[str, Chain] | None]:
    """The tables' map and set elements (`nft -j list maps|sets`) and their
    chains (`nft -t list table`, each table); both None when there is no
    front table. A shard table missing lists no chains and no maps, which
    the comparison reports. NftError when nft lists the one and not the
    other."""
    listing = await nft.maps_and_sets_json(WHERE)
    if listing is None:
        return None, None
    text = ""
    for table in TABLES:
        code, out, err = await run([*nft.prefix, "-t", "list", "table", "inet", table])
        if code != 0 and table == TABLE:
            raise NftError(err.decode(errors="replace").strip() or f"nft exit {code}")
        text += out.decode(errors="replace") if code == 0 else ""
    return listed_elements(listing), listed_chains(text)


async def ask_all(
    server: str, questions: Sequence[DnsQuestion], *, port: int = DNS_PORT
) -> dict[DnsQuestion, DnsAnswer]:
    """Each question asked of the responder at server:port, IN_FLIGHT at a
    time, paced under its rate limit."""
    started = time.monotonic()
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(number: int, question: DnsQuestion) -> tuple[DnsQuestion, DnsAnswer]:
        due = started + max(0, number - PACE_BURST) / PACE_PER_SECOND
        async with gate:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            return question, await ask(server, question, port=port)

    done = await asyncio.gather(*(one(n, q) for n, q in enumerate(questions)))
    return dict(done)


async def ask(server: str, question: DnsQuestion, *, port: int = DNS_PORT) -> DnsAnswer:
    """One question over UDP (TCP when the answer comes truncated), tried
    ATTEMPTS times: the records of the type asked, by value."""
    rdtype = dns.rdatatype.from_text(question.rdtype)
    name = dns.name.from_text(question.name)
    query = dns.message.make_query(name, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
    for _ in range(ATTEMPTS):
        try:
            response = await dns.asyncquery.udp(query, server, timeout=TIMEOUT_SECONDS, port=port)
            if response.flags & dns.flags.TC:
                response = await dns.asyncquery.tcp(
                    query, server, timeout=TIMEOUT_SECONDS, port=port
                )
        except dns.exception.Timeout:
            continue
        except (OSError, dns.exception.DNSException) as exc:
            return DnsAnswer(error=str(exc) or type(exc).__name__)
        values: set[str] = set()
        for rrset in response.answer:
            if rrset.name != name or rrset.rdtype != rdtype:
                continue
            for rdata in rrset:
                text = rdata.to_text().lower()
                # Addresses compared as the records spell them (ipaddress's).
                values.add(str(ip_address(text)) if question.rdtype != "PTR" else text)
        return DnsAnswer(dns.rcode.to_text(response.rcode()), frozenset(values))
    return DnsAnswer(error=f"no answer in {ATTEMPTS} tries of {TIMEOUT_SECONDS:g} s")
