"""The DNS responder's place in the daemon: one server (surfaces/dns.py)
per gateway address of the bridge, port 53, all answering from the same
records, which the services manager's state rebuilds (plan/dns_records.py)
after every pass that changed a service, a backend or an endpoint. So a
name leaves DNS in the pass its endpoint leaves the service's map.

Started once the first pass has put the gateway addresses on the bridge,
and only while the network config has a ServiceNetwork (read at start).
A failure to bind (the port taken, an IPv6 address still tentative) is
retried in the background and never stops the daemon: the overlay does not
depend on its DNS.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from overlayd.daemon.managers.services import ServiceState
from overlayd.model import IPAddress, IPNetwork, Lease
from overlayd.plan.dns_records import DnsRecords, build_records
from overlayd.plan.ipam import gateway_address
from overlayd.surfaces.dns import DnsServer, Upstream, resolv_conf_upstreams

log = logging.getLogger("overlayd.dns")

DNS_PORT = 53
BIND_RETRY_SECONDS = 2.0
BIND_ATTEMPTS = 30


def gateways(own: Lease) -> tuple[IPAddress, ...]:
    """The bridge's gateway addresses for a lease: where the responder listens."""
    found: list[IPAddress] = [gateway_address(own.subnet)]
    if own.ipv6_subnet is not None:
        found.append(gateway_address(own.ipv6_subnet))
    return tuple(found)


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
        self.servers: list[DnsServer] = []

    def update(self, state: ServiceState) -> None:
        """New records from what the services table was made from."""
        self.records = build_records(
            state.services.values(),
            state.backends,
            state.endpoints,
            domain=self.domain,
            reverse_zones=self.reverse_zones,
        )
        for server in self.servers:
            server.records = self.records

    async def serve(self, addresses: Sequence[IPAddress]) -> None:
        """Listen on each address (retrying a failed bind for a minute),
        then keep running until cancelled."""
        try:
            await asyncio.gather(*(self._bind(a) for a in addresses))
            await asyncio.Event().wait()
        finally:
            for server in self.servers:
                await server.close()

    async def _bind(self, address: IPAddress) -> None:
        for attempt in range(BIND_ATTEMPTS):
            server = DnsServer(self.records, upstreams=self.upstreams)
            try:
                await server.start(str(address), self.port)
            except OSError as exc:
                await server.close()
                if attempt == 0 or attempt == BIND_ATTEMPTS - 1:
                    log.warning(
                        "event=dns_bind_failed address=%s port=%d error=%r retrying=%s",
                        address,
                        self.port,
                        str(exc),
                        attempt < BIND_ATTEMPTS - 1,
                    )
                await asyncio.sleep(BIND_RETRY_SECONDS)
                continue
            server.records = self.records
            self.servers.append(server)
            log.info(
                "event=dns_serving address=%s port=%d domain=%s upstreams=%s",
                address,
                self.port,
                self.domain,
                ",".join(f"{a}:{p}" for a, p in server.upstreams) or "none",
            )
            return
