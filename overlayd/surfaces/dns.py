"""The per-host DNS responder: answers containers' queries for services and
containers from the current records (plan/dns_records.py), and passes every
other name on to the host's own resolvers. UDP, and TCP for answers that do
not fit a datagram. dnspython does all of the wire format.

What a query gets:

    name with records here          the records (AA); NOERROR without an
                                    answer for a type the name has none of
    name under the domain (or in a  NXDOMAIN (AA), with the domain's SOA in
    reverse zone), no records       the authority section (negative caching)
    any other name                  forwarded to the upstream resolvers in
                                    turn, the client's id kept; none answers
                                    in time: SERVFAIL
    shorter than a header, or a     nothing (a response is never answered:
    response                        two servers must not talk forever)
    not parseable                   FORMERR with the query's id
    opcode other than QUERY         NOTIMP
    QDCOUNT other than 1, a meta    FORMERR
    qtype (OPT, TSIG, ...)
    EDNS version above 0            BADVERS
    class other than IN, AXFR/IXFR  REFUSED
    over the client's rate          nothing; counted (an answer would spend
                                    the same work the limit exists to save)

An answer larger than the datagram size the client offers (512 bytes
without EDNS, at most 1232 with it, the DNS flag day size) is cut at a
record set and sent with TC, so the client asks again over TCP.

The daemon sets `records` to a new DnsRecords after each change (a plain
attribute swap: every query sees one version whole) and exports `counters`.
Nothing here raises out of a protocol callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from overlayd.plan.dns_records import DnsRecords, NameRecords

log = logging.getLogger(__name__)

HEADER_BYTES = 12
PLAIN_UDP_SIZE = 512  # without EDNS (RFC 1035)
OUR_UDP_SIZE = 1232  # the most we send over UDP, and what we advertise
DEFAULT_RATE = 200.0  # queries per second per client address
DEFAULT_BURST = 400.0
FORWARD_TIMEOUT_SECONDS = 2.0  # per upstream
MAX_FORWARDS = 256  # forwarded queries in flight at once
MAX_TCP_CLIENTS = 64
TCP_IDLE_SECONDS = 10.0
ANSWER_CACHE_ENTRIES = 4096  # answers kept per records version (each cache)
# SOA timers (RFC 1912 figures); the negative TTL is the records' TTL.
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 600, 86400

Upstream = tuple[str, int]  # address text, port

_IN = dns.rdataclass.IN
_A, _AAAA, _SRV, _PTR, _SOA = (
    dns.rdatatype.A,
    dns.rdatatype.AAAA,
    dns.rdatatype.SRV,
    dns.rdatatype.PTR,
    dns.rdatatype.SOA,
)
_REFUSED_TYPES = frozenset({dns.rdatatype.AXFR, dns.rdatatype.IXFR})


def resolv_conf_upstreams(path: Path = Path("/etc/resolv.conf")) -> tuple[Upstream, ...]:
    """The `nameserver` lines of a resolv.conf, port 53; none if it cannot
    be read."""
    try:
        text = path.read_text()
    except OSError as err:
        log.warning("cannot read %s for upstream resolvers: %s", path, err)
        return ()
    found: list[Upstream] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                found.append((str(ipaddress.ip_address(words[1])), 53))
            except ValueError:
                log.warning("skipping nameserver %r in %s", words[1], path)
    return tuple(found)


class TokenBuckets:
    """One token bucket per key (client address): `rate` tokens a second,
    at most `burst` saved up. A rate of 0 or less lets everything through.
    Idle buckets (full again) are forgotten when there are more than
    `max_keys`, so that spoofed source addresses cannot grow it without
    bound."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 65536) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_keys = max_keys
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, last refill]

    def allow(self, key: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._forget_idle(now)
            self._buckets[key] = [self.burst - 1.0, now]
            return True
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _forget_idle(self, now: float) -> None:
        full = self.burst / self.rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b[1] < full}
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()  # all busy: start afresh rather than grow


@dataclass
class DnsCounters:
    """For metrics: responses sent, by rcode text ("NOERROR", "NXDOMAIN",
    ...); queries dropped for the rate limit; dropped because they were
    not queries at all; forwarded upstream, and of those failed (SERVFAIL);
    answers sent truncated (TC)."""

    responses: Counter[str] = field(default_factory=Counter)
    rate_limited: int = 0
    malformed_dropped: int = 0
    forwarded: int = 0
    forward_failures: int = 0
    truncated: int = 0
    errors: int = 0  # a bug caught at the protocol boundary


@dataclass(frozen=True, slots=True)
class _Forward:
    """A query to pass upstream, with the size its answer may have."""

    query: dns.message.Message
    limit: int


def _header_response(data: bytes, rcode: dns.rcode.Rcode) -> dns.message.Message:
    """A response to a query that could not be parsed: its id and opcode,
    no question."""
    response = dns.message.Message(id=int.from_bytes(data[:2], "big"))
    response.flags = dns.flags.QR | dns.flags.RA
    response.set_opcode(dns.opcode.from_flags(int.from_bytes(data[2:4], "big")))
    response.set_rcode(rcode)
    return response


class DnsServer:
    """The responder. `records` may be replaced at any time."""

    def __init__(
        self,
        records: DnsRecords,
        *,
        upstreams: Sequence[Upstream],
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        forward_timeout: float = FORWARD_TIMEOUT_SECONDS,
        max_forwards: int = MAX_FORWARDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.records = records
        self.counters = DnsCounters()
        self.upstreams = tuple(upstreams)
        self.forward_timeout = forward_timeout
        self.max_forwards = max_forwards
        self.limiter = TokenBuckets(rate, burst)
        self._clock = clock
        self._forwards = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_clients = 0
        self._cache_for: DnsRecords | None = None
        self._cache: dict[tuple[str, int], tuple[dns.message.Message, bool]] = {}
        self._wires_for: DnsRecords | None = None
        self._wires: dict[tuple[bool, bytes], tuple[bytes, str]] = {}
        self.address: Upstream | None = None

    # Serving

    async def start(self, host: str, port: int, *, tcp: bool = True) -> Upstream:
        """Listen on (host, port), UDP and TCP (port 0: a free one, the
        same for both). Returns the address bound."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(host, port)
        )
        self._udp = transport
        bound = transport.get_extra_info("sockname")
        self.address = (str(ipaddress.ip_address(bound[0])), int(bound[1]))
        if tcp:
            self._tcp = await asyncio.start_server(self._tcp_client, host, self.address[1])
        # Never forward to ourselves: a resolv.conf naming this address
        # would make every unknown name loop until it timed out.
        ours = {self.address}
        if ipaddress.ip_address(self.address[0]).is_unspecified:
            ours |= {("127.0.0.1", self.address[1]), ("::1", self.address[1])}
        kept = tuple(
            u for u in self.upstreams if (str(ipaddress.ip_address(u[0])), u[1]) not in ours
        )
        if kept != self.upstreams:
            log.warning("not forwarding DNS to our own address %s:%d", *self.address)
        self.upstreams = kept
        return self.address

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def datagram(self, data: bytes, client: tuple[str, int]) -> None:
        """One datagram from a client: answered now, forwarded, or dropped."""
        if not self.limiter.allow(client[0], self._clock()):
            self.counters.rate_limited += 1
            return
        result = self.respond(data, tcp=False)
        if isinstance(result, bytes):
            self._send(result, client)
        elif isinstance(result, _Forward):
            self._spawn(self._forward_udp(result, client))

    def _send(self, wire: bytes, client: tuple[str, int]) -> None:
        if self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(wire, client)

    async def _forward_udp(self, forward: _Forward, client: tuple[str, int]) -> None:
        self._send(await self.forward(forward, tcp=False), client)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else "?"
        if self._tcp_clients >= MAX_TCP_CLIENTS:
            writer.close()
            return
        self._tcp_clients += 1
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_SECONDS):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(size)
                if not self.limiter.allow(client, self._clock()):
                    self.counters.rate_limited += 1
                    continue
                result = self.respond(data, tcp=True)
                if isinstance(result, _Forward):
                    result = await self.forward(result, tcp=True)
                if result is None:
                    break  # not a query: nothing more to say on this stream
                writer.write(len(result).to_bytes(2, "big") + result)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            self.counters.errors += 1
            log.exception("DNS over TCP from %s failed", client)
        finally:
            self._tcp_clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # Answering

    def respond(self, data: bytes, *, tcp: bool) -> bytes | _Forward | None:
        """The answer to one query's bytes, a query to forward, or None
        for bytes that get no answer. Never raises."""
        try:
            return self._respond(data, tcp)
        except Exception:
            self.counters.errors += 1
            log.exception("DNS query not answered")
            if len(data) < HEADER_BYTES:
                return None
            return self._render(_header_response(data, dns.rcode.SERVFAIL), PLAIN_UDP_SIZE)

    def _respond(self, data: bytes, tcp: bool) -> bytes | _Forward | None:
        if len(data) < HEADER_BYTES or data[2] & 0x80:  # too short, or QR: a response
            self.counters.malformed_dropped += 1
            return None
        if dns.opcode.from_flags(int.from_bytes(data[2:4], "big")) != dns.opcode.QUERY:
            return self._render(_header_response(data, dns.rcode.NOTIMP), PLAIN_UDP_SIZE)
        # The same query bytes (all but the id) get the same answer from the
        # same records: answered from the wire of the last time, with this
        # query's id, without parsing or rendering again. Most of a cached
        # name's cost otherwise (dnspython takes ~100 us for both).
        records = self.records
        if records is not self._wires_for or len(self._wires) >= ANSWER_CACHE_ENTRIES:
            self._wires_for = records
            self._wires = {}
        key = (tcp, data[2:])
        hit = self._wires.get(key)
        if hit is not None:
            wire, rcode = hit
            self.counters.responses[rcode] += 1
            if wire[2] & 0x02:
                self.counters.truncated += 1
            return data[:2] + wire[2:]
        try:
            query = dns.message.from_wire(data)
        except Exception as err:  # dnspython's FormError, BadEDNS, ShortHeader, ...
            log.debug("unparseable DNS query: %s", err)
            return self._render(_header_response(data, dns.rcode.FORMERR), PLAIN_UDP_SIZE)
        limit = 65535 if tcp else PLAIN_UDP_SIZE
        if query.edns >= 0 and not tcp:
            limit = max(PLAIN_UDP_SIZE, min(query.payload, OUR_UDP_SIZE))
        response = dns.message.make_response(
            query, recursion_available=True, our_payload=OUR_UDP_SIZE
        )
        if query.edns > 0:
            response.set_rcode(dns.rcode.BADVERS)
            return self._render(response, limit)
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return self._render(response, limit)
        question = query.question[0]
        qtype = question.rdtype
        if question.rdclass != _IN or qtype in _REFUSED_TYPES:
            response.set_rcode(dns.rcode.REFUSED)
            return self._render(response, limit)
        if dns.rdatatype.is_metatype(qtype) and qtype != dns.rdatatype.ANY:
            response.set_rcode(dns.rcode.FORMERR)
            return self._render(response, limit)

        text = question.name.to_text(omit_final_dot=True).lower()
        cached = self._answer(records, text, qtype)
        if cached is None:
            return _Forward(query, limit)
        answer, found = cached
        response.flags |= dns.flags.AA
        if not found:
            response.set_rcode(dns.rcode.NXDOMAIN)
        # The sections are shared with the cache and never changed.
        response.answer = answer.answer
        response.authority = answer.authority
        response.additional = answer.additional
        wire = self._render(response, limit)
        self._wires[key] = (wire, dns.rcode.to_text(response.rcode()))
        return wire

    def _answer(
        self, records: DnsRecords, name: str, qtype: int
    ) -> tuple[dns.message.Message, bool] | None:
        """The sections answering (name, qtype) from `records`, cached per
        records version, and whether the name exists; None: not ours."""
        if records is not self._cache_for or len(self._cache) >= ANSWER_CACHE_ENTRIES:
            self._cache_for = records
            self._cache = {}
        key = (name, qtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        found = records.lookup(name)
        sections = dns.message.Message()
        if found is None:
            if not records.authoritative(name):
                return None
            soa = _soa(records, name)
            if soa is not None:
                sections.authority.append(soa)
            self._cache[key] = (sections, False)
            return sections, False
        owner = dns.name.from_text(name)
        rrsets = _rrsets(records, owner, found, qtype)
        if qtype in (_SOA, dns.rdatatype.ANY) and name == records.domain:
            soa = _soa(records, name)
            if soa is not None:
                rrsets.append(soa)
        sections.answer = rrsets
        if not rrsets:
            soa = _soa(records, name)
            if soa is not None:
                sections.authority.append(soa)
        elif qtype in (_SRV, dns.rdatatype.ANY):
            # The targets' addresses, as CoreDNS adds them, saving a round trip.
            for target in sorted({s.target for s in found.srv}):
                held = records.lookup(target)
                if held is not None:
                    addresses = NameRecords(addresses=held.addresses)
                    for rdtype in (_A, _AAAA):
                        sections.additional.extend(
                            _rrsets(records, dns.name.from_text(target), addresses, rdtype)
                        )
        self._cache[key] = (sections, True)
        return sections, True

    def _render(self, response: dns.message.Message, limit: int) -> bytes:
        wire = response.to_wire(max_size=limit, prefer_truncation=True)
        if wire[2] & 0x02:
            self.counters.truncated += 1
        self.counters.responses[dns.rcode.to_text(response.rcode())] += 1
        return wire

    # Forwarding

    async def forward(self, forward: _Forward, *, tcp: bool) -> bytes:
        """The upstream's answer to a query, or SERVFAIL when none answers
        in time (or too many are already waiting)."""
        query = forward.query
        if self._forwards >= self.max_forwards or not self.upstreams:
            self.counters.forward_failures += 1
            return self._servfail(query, forward.limit)
        self.counters.forwarded += 1
        self._forwards += 1
        try:
            for host, port in self.upstreams:
                try:
                    if tcp:
                        answer = await dns.asyncquery.tcp(
                            query, host, timeout=self.forward_timeout, port=port
                        )
                    else:
                        answer = await dns.asyncquery.udp(
                            query,
                            host,
                            timeout=self.forward_timeout,
                            port=port,
                            ignore_unexpected=True,
                        )
                except (dns.exception.DNSException, OSError, EOFError, ValueError) as err:
                    log.debug("upstream %s:%d did not answer: %r", host, port, err)
                    continue
                answer.id = query.id
                return self._render(answer, forward.limit)
        finally:
            self._forwards -= 1
        self.counters.forward_failures += 1
        return self._servfail(query, forward.limit)

    def _servfail(self, query: dns.message.Message, limit: int) -> bytes:
        response = dns.message.make_response(
            query, recursion_available=True, our_payload=OUR_UDP_SIZE
        )
        response.set_rcode(dns.rcode.SERVFAIL)
        return self._render(response, limit)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            self.server.datagram(data, (str(addr[0]), int(addr[1])))
        except Exception:
            self.server.counters.errors += 1
            log.exception("DNS datagram from %s not handled", addr[0])

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier answer (the client went away): nothing to do.
        log.debug("DNS socket error: %s", exc)


def _rrsets(
    records: DnsRecords, owner: dns.name.Name, found: NameRecords, qtype: int
) -> list[dns.rrset.RRset]:
    """The record sets of `found` that answer `qtype` (ANY: all). Built
    from text by dnspython: only on a cache miss, so clarity wins here."""
    every = qtype == dns.rdatatype.ANY
    ttl = records.ttl
    wanted: list[tuple[dns.rdatatype.RdataType, list[str]]] = []
    if every or qtype == _A:
        wanted.append((_A, [str(a) for a in found.addresses if a.version == 4]))
    if every or qtype == _AAAA:
        wanted.append((_AAAA, [str(a) for a in found.addresses if a.version == 6]))
    if every or qtype == _SRV:
        wanted.append((_SRV, [f"{s.priority} {s.weight} {s.port} {s.target}." for s in found.srv]))
    if every or qtype == _PTR:
        wanted.append((_PTR, [f"{target}." for target in found.ptr]))
    return [
        dns.rrset.from_text_list(owner, ttl, _IN, rdtype, texts)
        for rdtype, texts in wanted
        if texts
    ]


def _soa(records: DnsRecords, name: str) -> dns.rrset.RRset | None:
    """The domain's SOA, for negative answers under it (none for a reverse
    zone: there the answer goes without authority)."""
    domain = records.domain
    if name != domain and not name.endswith("." + domain):
        return None
    text = (
        f"ns.{domain}. hostmaster.{domain}. 1 {SOA_REFRESH} {SOA_RETRY} {SOA_EXPIRE} {records.ttl}"
    )
    return dns.rrset.from_text_list(f"{domain}.", records.ttl, _IN, _SOA, [text])
