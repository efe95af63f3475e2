"""The DNS responder's place in the daemon (overlayd/daemon/dns.py): the
addresses containers are told of are the ones it listens on, and a bind
that succeeds late is announced, on loopback addresses only."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import IPv4Address

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import pytest

from overlayd.daemon import dns as daemon_dns
from overlayd.daemon.dns import DnsResponder
from overlayd.model import IPAddress

TAKEN, FREE = IPv4Address("127.0.0.1"), IPv4Address("127.0.0.2")


async def test_only_addresses_it_listens_on_are_advertised_and_a_late_bind_is_announced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Port 53 of one address held by someone else (as a resolver on the
    # host may hold it): the same port on another address is free.
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind((str(TAKEN), 0))
    port = blocker.getsockname()[1]
    monkeypatch.setattr(daemon_dns, "BIND_RETRY_SECONDS", 0.05)
    responder = DnsResponder(domain="overlay.internal", upstreams=(), reverse_zones=(), port=port)
    bound: list[tuple[IPAddress, ...]] = []
    announced = asyncio.Event()

    def on_bound() -> None:
        bound.append(responder.advertised((TAKEN, FREE)))
        announced.set()

    responder.on_bound = on_bound
    assert responder.advertised((TAKEN, FREE)) == ()  # nothing before a bind
    serving: asyncio.Task[None] | None = None
    try:
        await responder.bind_now((TAKEN, FREE))
        # Control: the free address is bound, advertised, and answers.
        assert responder.advertised((TAKEN, FREE)) == (FREE,)
        query = dns.message.make_query("overlay.internal", "SOA")
        answer = await dns.asyncquery.udp(query, str(FREE), port=port, timeout=2)
        assert answer.rcode() == dns.rcode.NOERROR and answer.answer
        # The taken one is not: a container told of it would get no answer.
        serving = asyncio.create_task(responder.serve((TAKEN, FREE)))
        await asyncio.sleep(0.2)
        assert responder.advertised((TAKEN, FREE)) == (FREE,) and bound == []
        # Once the port is given up, the retry takes it and says so.
        blocker.close()
        async with asyncio.timeout(5):
            await announced.wait()
        assert bound == [(TAKEN, FREE)]
    finally:
        blocker.close()
        if serving is not None:
            serving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await serving
        else:
            for server in responder.servers.values():
                await server.close()
    assert responder.advertised((TAKEN, FREE)) == ()  # closed with the task


async def test_the_responders_answers_and_drops_are_counted_in_the_metrics() -> None:
    """Scraped from the servers at collection time: answers by rcode and
    queries dropped for the rate limit (a burst of 1 per client here)."""
    from prometheus_client import generate_latest

    from overlayd.surfaces.telemetry import Telemetry

    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind((str(FREE), 0))
    port = probe.getsockname()[1]
    probe.close()
    responder = DnsResponder(domain="overlay.internal", upstreams=(), reverse_zones=(), port=port)
    telemetry = Telemetry()
    assert "overlayd_dns_responses_total" not in generate_latest(telemetry.registry).decode()
    telemetry.dns.source = responder.counters
    try:
        await responder.bind_now((FREE,))
        [server] = responder.servers.values()
        server.limiter.rate, server.limiter.burst = 0.001, 1.0
        answered = dns.message.make_query("overlay.internal", "SOA")
        reply = await dns.asyncquery.udp(answered, str(FREE), port=port, timeout=2)
        assert reply.rcode() == dns.rcode.NOERROR  # the control: one answered
        with pytest.raises(dns.exception.Timeout):  # the next is over the limit
            await dns.asyncquery.udp(answered, str(FREE), port=port, timeout=0.3)
        text = generate_latest(telemetry.registry).decode()
        assert 'overlayd_dns_responses_total{rcode="NOERROR"} 1.0' in text
        assert 'overlayd_dns_dropped_total{reason="rate_limited"} 1.0' in text
    finally:
        for server in responder.servers.values():
            await server.close()


async def test_a_moved_lease_moves_the_responder_to_the_new_gateways(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The old address stops answering and the new one answers once it
    exists: bound late (as the pass puts it on the bridge), and announced."""
    old, new = IPv4Address("127.0.0.3"), IPv4Address("127.0.0.4")
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind((str(new), 0))  # not yet usable, as before the pass
    port = blocker.getsockname()[1]
    monkeypatch.setattr(daemon_dns, "BIND_RETRY_SECONDS", 0.05)
    responder = DnsResponder(domain="overlay.internal", upstreams=(), reverse_zones=(), port=port)
    announced = asyncio.Event()
    responder.on_bound = announced.set
    query = dns.message.make_query("overlay.internal", "SOA")
    await responder.bind_now((old,))  # as at start: announced by the subnet file itself
    serving = asyncio.create_task(responder.serve((old,)))
    moving: asyncio.Task[None] | None = None
    try:
        # Control: the old gateway answers before the move.
        assert (await dns.asyncquery.udp(query, str(old), port=port, timeout=2)).answer
        moving = asyncio.create_task(responder.move((new,)))
        await asyncio.sleep(0.2)
        assert responder.advertised((old, new)) == ()  # the old closed, the new not yet bound
        with pytest.raises(dns.exception.Timeout):
            await dns.asyncquery.udp(query, str(old), port=port, timeout=0.3)
        blocker.close()
        async with asyncio.timeout(5):
            await announced.wait()
        assert responder.advertised((old, new)) == (new,)
        assert (await dns.asyncquery.udp(query, str(new), port=port, timeout=2)).answer
    finally:
        blocker.close()
        if moving is not None:
            await moving
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
    assert responder.servers == {}
