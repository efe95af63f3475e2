"""The DNS responder on loopback, asked by dnspython's own client: every
record type over UDP and TCP, NXDOMAIN and NODATA, truncation to TCP,
forwarding (to a fake upstream on another loopback port, standing in for
the host's resolvers) with the client's id kept, SERVFAIL when the
upstream is silent, malformed and unusual queries answered per RFC or
dropped without harm, and a per-client rate limit that leaves other
clients answered. Every refusal or drop is followed by a normal query
that must still be answered."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import cast

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from hypothesis import given
from hypothesis import strategies as st

from overlayd.plan.dns_records import DnsRecords, build_records
from overlayd.plan.policy_model import Endpoint, LabelSelector, Protocol
from overlayd.plan.service_model import Service, ServicePort, backends_by_service
from overlayd.surfaces.dns import DnsServer, TokenBuckets, Upstream, resolv_conf_upstreams

HOST = "127.0.0.1"
TIMEOUT = 2.0
UPSTREAM_ANSWER = "192.0.2.53"  # what the fake outside world says about any name


def endpoint(name: str, *addresses: str, app: str = "web") -> Endpoint:
    return Endpoint(
        key=f"/overlayd/endpoints/h1/{name}",
        id=name,
        host="h1",
        name=name,
        addresses=tuple(ip_address(a) for a in addresses),
        labels={"app": app},
    )


def make_records(*, backends: int = 2, extra: tuple[Endpoint, ...] = ()) -> DnsRecords:
    web = Service(
        name="web",
        selector=LabelSelector(match_labels=(("app", "web"),)),
        ports=(ServicePort("http", Protocol.TCP, 80, 8080),),
        vips=(ip_address("10.96.0.10"), ip_address("fd00:96::10")),
    )
    endpoints = [
        endpoint(f"web-{i}", f"10.244.1.{i + 2}", f"fd00:244:1::{i + 2:x}") for i in range(backends)
    ]
    endpoints += [endpoint("db", "10.244.2.3", app="db"), *extra]
    return build_records(
        [web],
        backends_by_service({"web": web}, endpoints),
        endpoints,
        reverse_zones=[ip_network("10.244.0.0/16")],
    )


class FakeUpstream(asyncio.DatagramProtocol):
    """The outside world's resolver: answers every query, over UDP or TCP,
    with an A record of UPSTREAM_ANSWER (or stays silent), and remembers
    what it was asked."""

    def __init__(self, *, silent: bool = False) -> None:
        self.silent = silent
        self.asked: list[dns.message.Message] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        wire = self.answer(data)
        if wire is not None and self.transport is not None:
            self.transport.sendto(wire, addr)

    def answer(self, data: bytes) -> bytes | None:
        query = dns.message.from_wire(data)
        self.asked.append(query)
        if self.silent:
            return None
        response = dns.message.make_response(query)
        response.answer.append(
            dns.rrset.from_text(query.question[0].name, 60, "IN", "A", UPSTREAM_ANSWER)
        )
        return response.to_wire()

    async def stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The same over TCP: one query, one answer."""
        size = int.from_bytes(await reader.readexactly(2), "big")
        wire = self.answer(await reader.readexactly(size))
        if wire is not None:
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def upstream(*, silent: bool = False) -> AsyncIterator[tuple[FakeUpstream, Upstream]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: FakeUpstream(silent=silent), local_addr=("127.0.0.2", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    tcp = await asyncio.start_server(protocol.stream, "127.0.0.2", port)
    try:
        yield protocol, ("127.0.0.2", port)
    finally:
        transport.close()
        tcp.close()
        await tcp.wait_closed()


@contextlib.asynccontextmanager
async def serving(server: DnsServer, port: int = 0) -> AsyncIterator[Upstream]:
    address = await server.start(HOST, port)
    try:
        yield address
    finally:
        await server.close()


async def ask(
    address: Upstream,
    name: str,
    rdtype: str | int = "A",
    *,
    tcp: bool = False,
    source: str = HOST,
    **options: object,
) -> dns.message.Message:
    query = dns.message.make_query(
        name,
        dns.rdatatype.RdataType.make(rdtype),
        **options,  # type: ignore[arg-type]
    )
    if tcp:
        return await dns.asyncquery.tcp(query, address[0], timeout=TIMEOUT, port=address[1])
    return await dns.asyncquery.udp(
        query, address[0], timeout=TIMEOUT, port=address[1], source=source
    )


async def raw(
    address: Upstream, data: bytes, *, source: str = HOST, wait: float = 0.3
) -> bytes | None:
    """Send bytes as they are; the answer, or None if none came in `wait`."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(
        Client, local_addr=(source, 0), remote_addr=address
    )
    try:
        transport.sendto(data)
        try:
            return await asyncio.wait_for(got, wait)
        except TimeoutError:
            return None
    finally:
        transport.close()


def texts(response: dns.message.Message, rdtype: str) -> set[str]:
    kind = dns.rdatatype.from_text(rdtype)
    return {r.to_text() for rrset in response.answer if rrset.rdtype == kind for r in rrset}


async def answered(address: Upstream, *, source: str = HOST) -> bool:
    """The positive control: a plain query still gets its answer."""
    response = await ask(address, "web.overlay.internal", source=source)
    return texts(response, "A") == {"10.96.0.10"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# Answers from the records


async def test_each_record_type_is_answered_with_authority_over_udp() -> None:
    server = DnsServer(make_records(), upstreams=[])
    async with serving(server) as address:
        a = await ask(address, "web.overlay.internal", "A")
        assert a.rcode() == dns.rcode.NOERROR and a.flags & dns.flags.AA
        assert texts(a, "A") == {"10.96.0.10"}
        aaaa = await ask(address, "web.overlay.internal", "AAAA")
        assert texts(aaaa, "AAAA") == {"fd00:96::10"}
        tasks = await ask(address, "tasks.web.overlay.internal", "A")
        assert texts(tasks, "A") == {"10.244.1.2", "10.244.1.3"}
        container = await ask(address, "web-1.overlay.internal", "AAAA")
        assert texts(container, "AAAA") == {"fd00:244:1::3"}
        srv = await ask(address, "_http._tcp.web.overlay.internal", "SRV")
        assert texts(srv, "SRV") == {"0 100 80 web.overlay.internal."}
        # The target's addresses come along in the additional section.
        assert {r.to_text() for rrset in srv.additional for r in rrset} >= {
            "10.96.0.10",
            "fd00:96::10",
        }
        vip_ptr = await ask(address, "10.0.96.10.in-addr.arpa", "PTR")
        assert texts(vip_ptr, "PTR") == {"web.overlay.internal."}
        ptr6 = await ask(address, ip_address("fd00:244:1::2").reverse_pointer, "PTR")
        assert texts(ptr6, "PTR") == {"web-0.overlay.internal."}
        soa = await ask(address, "overlay.internal", "SOA")
        assert texts(soa, "SOA") and soa.rcode() == dns.rcode.NOERROR


async def test_names_are_answered_in_any_case_with_the_question_and_id_echoed() -> None:
    server = DnsServer(make_records(), upstreams=[])
    async with serving(server) as address:
        # Asked twice, the second time answered from the cached wire: each
        # answer carries its own query's id and spelling.
        for spelling in ("WeB.OVERLAY.Internal", "WeB.OVERLAY.Internal", "web.overlay.INTERNAL"):
            query = dns.message.make_query(spelling, "A")
            response = await dns.asyncquery.udp(query, HOST, timeout=TIMEOUT, port=address[1])
            assert response.id == query.id
            assert texts(response, "A") == {"10.96.0.10"}
            assert response.question[0].name.to_text() == spelling + "."
        assert server.counters.responses["NOERROR"] == 3


async def test_tcp_answers_like_udp() -> None:
    server = DnsServer(make_records(), upstreams=[])
    async with serving(server) as address:
        response = await ask(address, "tasks.web.overlay.internal", "AAAA", tcp=True)
        assert texts(response, "AAAA") == {"fd00:244:1::2", "fd00:244:1::3"}
        # Two queries on one connection are both answered.
        query = dns.message.make_query("web.overlay.internal", "A")
        reader, writer = await asyncio.open_connection(*address)
        for _ in range(2):
            writer.write(query.to_wire(prepend_length=True))
            size = int.from_bytes(await reader.readexactly(2), "big")
            reply = dns.message.from_wire(await reader.readexactly(size))
            assert texts(reply, "A") == {"10.96.0.10"}
        writer.close()
        await writer.wait_closed()


async def test_a_missing_name_under_the_domain_is_nxdomain_with_the_soa() -> None:
    upstream_calls: list[dns.message.Message] = []
    async with upstream() as (fake, upstream_address):
        server = DnsServer(make_records(), upstreams=[upstream_address])
        async with serving(server) as address:
            response = await ask(address, "nobody.overlay.internal", "A")
            assert response.rcode() == dns.rcode.NXDOMAIN and response.flags & dns.flags.AA
            assert [rrset.rdtype for rrset in response.authority] == [dns.rdatatype.SOA]
            # In a reverse zone of ours too, without asking anyone.
            reverse = await ask(address, ip_address("10.244.9.9").reverse_pointer, "PTR")
            assert reverse.rcode() == dns.rcode.NXDOMAIN
            upstream_calls = fake.asked
            assert await answered(address)
    assert upstream_calls == []


async def test_an_existing_name_asked_for_another_type_is_noerror_and_empty() -> None:
    server = DnsServer(make_records(), upstreams=[])
    async with serving(server) as address:
        cases: list[tuple[str, str | int]] = [
            ("web.overlay.internal", "MX"),
            ("db.overlay.internal", "AAAA"),  # an IPv4-only container
            ("_tcp.web.overlay.internal", "A"),  # an empty non-terminal
            ("web.overlay.internal", 65000),  # a type nobody knows
        ]
        for name, rdtype in cases:
            response = await ask(address, name, rdtype)
            assert response.rcode() == dns.rcode.NOERROR, (name, rdtype)
            assert response.answer == [], (name, rdtype)
            assert [rrset.rdtype for rrset in response.authority] == [dns.rdatatype.SOA]
        assert await answered(address)


async def test_swapped_records_are_answered_at_once_and_a_departed_name_is_gone() -> None:
    server = DnsServer(make_records(extra=(endpoint("job", "10.244.3.4", app="x"),)), upstreams=[])
    async with serving(server) as address:
        assert texts(await ask(address, "job.overlay.internal"), "A") == {"10.244.3.4"}
        server.records = make_records()
        gone = await ask(address, "job.overlay.internal")
        assert gone.rcode() == dns.rcode.NXDOMAIN
        assert await answered(address)


async def test_an_answer_too_big_for_udp_is_truncated_and_complete_over_tcp() -> None:
    # 40 backends: 40 A records, over 512 bytes, under 1232.
    server = DnsServer(make_records(backends=40), upstreams=[])
    async with serving(server) as address:
        plain = await ask(address, "tasks.web.overlay.internal", "A")
        assert plain.flags & dns.flags.TC
        edns = await ask(address, "tasks.web.overlay.internal", "A", use_edns=0, payload=1232)
        assert not edns.flags & dns.flags.TC and len(texts(edns, "A")) == 40
        # A client offering 65535 bytes still gets no more than 1232 over UDP.
        server.records = make_records(backends=100)
        huge = await ask(address, "tasks.web.overlay.internal", "A", use_edns=0, payload=65535)
        assert huge.flags & dns.flags.TC
        full = await ask(address, "tasks.web.overlay.internal", "A", tcp=True)
        assert not full.flags & dns.flags.TC and len(texts(full, "A")) == 100
        assert server.counters.truncated == 2


# Forwarding


async def test_other_names_are_forwarded_with_the_clients_id() -> None:
    async with upstream() as (fake, upstream_address):
        server = DnsServer(make_records(), upstreams=[upstream_address])
        async with serving(server) as address:
            query = dns.message.make_query("example.com", "A")
            response = await dns.asyncquery.udp(query, HOST, timeout=TIMEOUT, port=address[1])
            assert response.id == query.id
            assert texts(response, "A") == {UPSTREAM_ANSWER}
            assert [q.question[0].name.to_text() for q in fake.asked] == ["example.com."]
            # A reverse name outside our zones is the outside world's too.
            outside = await ask(address, "1.2.0.192.in-addr.arpa", "PTR")
            assert outside.rcode() == dns.rcode.NOERROR and len(fake.asked) == 2
            # So is a type nobody knows, for a name outside the domain.
            unknown = await ask(address, "example.com", 65000)
            assert (
                unknown.rcode() == dns.rcode.NOERROR and fake.asked[2].question[0].rdtype == 65000
            )
            # Asked over TCP, forwarded over TCP.
            query = dns.message.make_query("example.net", "A")
            response = await dns.asyncquery.tcp(query, HOST, timeout=TIMEOUT, port=address[1])
            assert response.id == query.id and texts(response, "A") == {UPSTREAM_ANSWER}
            assert server.counters.forwarded == 4
            assert await answered(address)


async def test_a_silent_upstream_gives_servfail_and_the_next_one_is_tried() -> None:
    async with upstream(silent=True) as (_, silent), upstream() as (fake, good):
        server = DnsServer(make_records(), upstreams=[silent], forward_timeout=0.3)
        async with serving(server) as address:
            failed = await ask(address, "example.com")
            assert failed.rcode() == dns.rcode.SERVFAIL
            assert server.counters.forward_failures == 1
            assert await answered(address)
            # With a working resolver after the silent one: answered.
            server.upstreams = (silent, good)
            response = await ask(address, "example.org")
            assert texts(response, "A") == {UPSTREAM_ANSWER} and len(fake.asked) == 1


async def test_never_forwards_to_itself() -> None:
    port = free_port()
    async with upstream() as (_, good):
        server = DnsServer(make_records(), upstreams=[(HOST, port), good])
        async with serving(server, port) as address:
            assert address == (HOST, port)
            assert server.upstreams == (good,)
            response = await ask(address, "example.com")
            assert texts(response, "A") == {UPSTREAM_ANSWER}


def test_upstreams_come_from_resolv_conf(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text(
        "# a comment\nsearch example.com\nnameserver 192.0.2.1\nnameserver bogus\n"
        "nameserver 2001:db8::1\noptions ndots:2\n"
    )
    assert resolv_conf_upstreams(path) == (("192.0.2.1", 53), ("2001:db8::1", 53))
    assert resolv_conf_upstreams(path.parent / "missing") == ()


# Malformed and unusual queries


def query_bytes(name: str = "web.overlay.internal", rdtype: str | int = "A") -> bytes:
    return dns.message.make_query(name, dns.rdatatype.RdataType.make(rdtype)).to_wire()


def parsed(wire: bytes | None) -> dns.message.Message:
    assert wire is not None
    return dns.message.from_wire(wire)


async def test_unusual_queries_get_the_rcode_the_rfcs_give() -> None:
    server = DnsServer(make_records(), upstreams=[])
    async with serving(server) as address:
        base = query_bytes()
        qid = int.from_bytes(base[:2], "big")

        # QDCOUNT 2 (the same question twice): FORMERR.
        two = dns.message.make_query("web.overlay.internal", "A")
        two.question.append(two.question[0])
        reply = parsed(await raw(address, two.to_wire()))
        assert reply.rcode() == dns.rcode.FORMERR and reply.id == two.id
        assert await answered(address)

        # A header promising a question that is not there: FORMERR, same id.
        reply = parsed(await raw(address, base[:12]))
        assert reply.rcode() == dns.rcode.FORMERR and reply.id == qid
        assert await answered(address)

        # Opcodes other than QUERY: NOTIMP.
        for opcode in (dns.opcode.NOTIFY, dns.opcode.UPDATE, dns.opcode.STATUS, 9):
            message = dns.message.make_query("web.overlay.internal", "A")
            message.set_opcode(opcode)  # type: ignore[arg-type]
            reply = parsed(await raw(address, message.to_wire()))
            assert reply.rcode() == dns.rcode.NOTIMP and reply.id == message.id, opcode
        assert await answered(address)

        # EDNS version 1: BADVERS.
        message = dns.message.make_query("web.overlay.internal", "A", use_edns=1)
        reply = parsed(await raw(address, message.to_wire()))
        assert reply.rcode() == dns.rcode.BADVERS

        # Zone transfers and other classes: REFUSED; meta types: FORMERR.
        for rdtype, rcode in [("AXFR", dns.rcode.REFUSED), ("OPT", dns.rcode.FORMERR)]:
            reply = parsed(await raw(address, query_bytes(rdtype=rdtype)))
            assert reply.rcode() == rcode, rdtype
        chaos = dns.message.make_query("version.bind", "TXT", rdclass=dns.rdataclass.CH)
        assert parsed(await raw(address, chaos.to_wire())).rcode() == dns.rcode.REFUSED
        assert await answered(address)

        # Trailing junk after the question: FORMERR.
        reply = parsed(await raw(address, base + b"\x00junk"))
        assert reply.rcode() == dns.rcode.FORMERR
        assert await answered(address)


async def test_bytes_that_are_no_query_get_no_answer_and_harm_nothing() -> None:
    server = DnsServer(make_records(), upstreams=[])
    async with serving(server) as address:
        # (asyncio sends no empty datagram, so b"" is not among them.)
        for data in [b"\x00", b"\x12\x34\x01\x00\x00", b"x" * 11]:
            assert await raw(address, data, wait=0.1) is None
        # A response (QR set) is never answered: two servers must not chat forever.
        response = dns.message.make_response(dns.message.make_query("a.example", "A"))
        assert await raw(address, response.to_wire(), wait=0.1) is None
        assert server.counters.malformed_dropped == 4
        assert await answered(address)
        # TCP: garbage closes the stream, the server stays.
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"\x00\x05\x80\x00\x00\x00\x00")
        assert await reader.read() == b""
        writer.close()
        assert await answered(address)
        assert server.counters.errors == 0


async def test_random_garbage_never_kills_the_server() -> None:
    server = DnsServer(make_records(), upstreams=[])
    rng = random.Random(15)
    base = query_bytes()
    async with serving(server) as address:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.5", 0), remote_addr=address
        )
        try:
            for _ in range(300):
                if rng.random() < 0.5:
                    data = rng.randbytes(rng.randrange(0, 600))
                else:  # a real query with a few bytes changed: gets deeper into the parser
                    mutable = bytearray(base)
                    for _ in range(rng.randrange(1, 4)):
                        mutable[rng.randrange(len(mutable))] = rng.randrange(256)
                    data = bytes(mutable)
                transport.sendto(data)
            await asyncio.sleep(0.2)
        finally:
            transport.close()
        assert sum(server.counters.responses.values()) + server.counters.malformed_dropped > 0
        assert server.counters.errors == 0
        assert await answered(address)


@given(st.binary(max_size=700))
def test_any_bytes_get_a_well_formed_answer_or_none(data: bytes) -> None:
    server = DnsServer(make_records(), upstreams=[])
    result = server.respond(data, tcp=False)
    assert server.counters.errors == 0
    if isinstance(result, bytes):
        reply = dns.message.from_wire(result)
        assert reply.id == int.from_bytes(data[:2], "big")
        assert reply.flags & dns.flags.QR and len(result) <= 1232


# Rate limit


async def test_a_bursting_client_is_limited_while_another_is_answered() -> None:
    server = DnsServer(make_records(), upstreams=[], rate=20.0, burst=10.0)
    async with serving(server) as address:
        loop = asyncio.get_running_loop()
        replies: list[bytes] = []

        class Burster(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                replies.append(data)

        transport, _ = await loop.create_datagram_endpoint(
            Burster, local_addr=("127.0.0.3", 0), remote_addr=address
        )
        try:
            for _ in range(100):
                transport.sendto(query_bytes())
            # Meanwhile, another client is answered.
            assert await answered(address, source="127.0.0.4")
            await asyncio.sleep(0.3)
        finally:
            transport.close()
        # The burst (10) and what 20/s refilled while it lasted.
        assert 10 <= len(replies) <= 30
        assert server.counters.rate_limited == 100 - len(replies)


def test_token_bucket_refills_at_its_rate_and_forgets_idle_clients() -> None:
    buckets = TokenBuckets(rate=10.0, burst=5.0, max_keys=2)
    assert [buckets.allow("a", 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert buckets.allow("a", 0.1) and not buckets.allow("a", 0.1)  # one token in 0.1 s
    assert buckets.allow("b", 0.1)
    # A third client, once "a" and "b" are idle long enough to be full again.
    assert buckets.allow("c", 10.0)
    assert len(buckets._buckets) <= 2
    assert TokenBuckets(rate=0, burst=0).allow("x", 0.0)
