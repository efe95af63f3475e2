"""The DNS responder's place in the daemon: one server (surfaces/dns.py)
per gateway address of the bridge, port 53, all answering from the same
records, which the services manager's state rebuilds (plan/dns_records.py)
after every pass that changed a service, a backend or an endpoint. So a
name leaves DNS in the pass its endpoint leaves the service's map.

Started once the first pass has put the gateway addresses on the bridge,
and only while the network config has a ServiceNetwork (read at start).
When the lease moves to another subnet, it moves to the new gateways.
A failure to bind (the port taken, an IPv6 address still tentative) is
retried in the background and never stops the daemon: the overlay does not
depend on its DNS. Containers are told only of the addresses it listens on
(`advertised`, for the subnet file): a nameserver that never answers would
leave a container with no name resolution at all, outside names included,
since it is the only one its resolv.conf names. A late bind calls
`on_bound`, so that the subnet file can name it then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from overlayd.daemon.managers.services import ServiceState
from overlayd.model import IPAddress, IPNetwork
from overlayd.plan.dns_records import DnsRecords, build_records
from overlayd.surfaces.dns import DnsCounters, DnsServer, Upstream, resolv_conf_upstreams

log = logging.getLogger("overlayd.dns")

DNS_PORT = 53
BIND_RETRY_SECONDS = 2.0
BIND_ATTEMPTS = 30


class DnsResponder:
    def __init__(
        self,
        *,
        domain: str,
        upstreams: Sequence[IPAddress] | None,
        reverse_zones: Sequence[IPNetwork],
        resolv_conf: Path = Path("/etc/resolv.conf"),
        port: int = DNS_PORT,
    ) -> None:
        self.domain = domain
        self.reverse_zones = tuple(reverse_zones)
        self.port = port
        found: tuple[Upstream, ...] = (
            resolv_conf_upstreams(resolv_conf)
            if upstreams is None
            else tuple((str(a), DNS_PORT) for a in upstreams)
        )
        self.upstreams = found
        self.records: DnsRecords = build_records((), {}, (), domain=domain)
        self.servers: dict[IPAddress, DnsServer] = {}  # by the address each listens on
        # Called after a bind that succeeded in the background (serve).
        self.on_bound: Callable[[], None] | None = None
        self._failed: set[IPAddress] = set()  # addresses whose bind failed (logged once)
        # Where it should listen: a retry for an address the lease has left stops.
        self._wanted: set[IPAddress] = set()

    def update(self, state: ServiceState) -> None:
        """New records from what the services table was made from."""
        self.records = build_records(
            state.services.values(),
            state.backends,
            state.endpoints,
            domain=self.domain,
            reverse_zones=self.reverse_zones,
        )
        for server in self.servers.values():
            server.records = self.records

    def counters(self) -> list[DnsCounters]:
        """Each listening server's counters (metrics)."""
        return [server.counters for server in self.servers.values()]

    def advertised(self, addresses: Sequence[IPAddress]) -> tuple[IPAddress, ...]:
        """Those of `addresses` a server listens on: what containers may be
        told to ask."""
        return tuple(a for a in addresses if a in self.servers)

    async def bind_now(self, addresses: Sequence[IPAddress]) -> None:
        """One attempt to listen on each address not yet served (before the
        subnet file is first written, so that it names what answers)."""
        await asyncio.gather(*(self._try(a) for a in addresses if a not in self.servers))

    async def serve(self, addresses: Sequence[IPAddress]) -> None:
        """Listen on each address (retrying a failed bind for a minute),
        then keep running until cancelled."""
        try:
            self._wanted = set(addresses)
            await asyncio.gather(*(self._bind(a) for a in addresses))
            await asyncio.Event().wait()
        finally:
            servers, self.servers = list(self.servers.values()), {}
            for server in servers:
                await server.close()

    async def move(self, addresses: Sequence[IPAddress]) -> None:
        """The lease moved to another subnet: stop listening on the old
        gateways and listen on `addresses`, retrying until the pass has put
        them on the bridge (each late bind calls `on_bound`, so the subnet
        file then names the new ones)."""
        self._wanted = set(addresses)
        for address in [a for a in self.servers if a not in addresses]:
            server = self.servers.pop(address)
            await server.close()
            log.info("event=dns_stopped address=%s reason=%r", address, "the lease moved")
        self._failed -= set(addresses)
        await asyncio.gather(*(self._bind(a) for a in addresses))

    async def _bind(self, address: IPAddress) -> None:
        for attempt in range(BIND_ATTEMPTS):
            if address in self.servers or address not in self._wanted:
                return
            if attempt:
                await asyncio.sleep(BIND_RETRY_SECONDS)
            if await self._try(address, last=attempt == BIND_ATTEMPTS - 1):
                if self.on_bound is not None:
                    try:
                        self.on_bound()
                    except Exception as exc:  # the responder serves all the same
                        log.error("event=dns_on_bound_failed error=%r", exc)
                return

    async def _try(self, address: IPAddress, *, last: bool = False) -> bool:
        """One bind; True when it took. A failure is logged the first
        time and the last."""
        server = DnsServer(self.records, upstreams=self.upstreams)
        try:
            await server.start(str(address), self.port)
        except OSError as exc:
            await server.close()
            if address not in self._failed or last:
                self._failed.add(address)
                log.warning(
                    "event=dns_bind_failed address=%s port=%d error=%r retrying=%s",
                    address,
                    self.port,
                    str(exc),
                    not last,
                )
            return False
        server.records = self.records
        self.servers[address] = server
        log.info(
            "event=dns_serving address=%s port=%d domain=%s upstreams=%s",
            address,
            self.port,
            self.domain,
            ",".join(f"{a}:{p}" for a, p in server.upstreams) or "none",
        )
        return True
