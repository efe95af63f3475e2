"""Services: the `inet overlayd_services` table (plan/service_rules.py)
from the services under overlayd's prefix and the endpoints they select,
and the DNS records made from the same state.

Desired state is the render over every usable service (bad definitions,
and a second claimant of a VIP or node port, are skipped with one warning
each: plan/service.stored_services) with its backends, the endpoints of
the pass's selection (managers/endpoints.py) its selector selects. It is
moved, not made again: a pass re-renders only the services whose
definition changed or whose selector selects an endpoint that came, went
or changed (`with_service`), so that one container starting costs its
services, not all of them; a full pass, new subnets or new networks make
it from scratch. What the kernel holds is believed: a light pass writes
`service_transaction(believed, desired)`, whose size depends on what
changed only. A check pass lists the table's maps and sets (elements
only, no rules) and writes the whole table again if they differ from the
belief; a full pass, or a failure, writes it afresh.

Services need a ServiceNetwork in the network config; without one every
stored service is skipped (with its warning) and the table goes.

After each pass that changed the services, their backends or the
endpoints, `on_records` hears of them (the DNS responder's records are
rebuilt from exactly what the rules were made from, so that a departed
endpoint leaves DNS in the pass it leaves the maps).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from overlayd.daemon.managers import Level, PassContext
from overlayd.daemon.managers.endpoints import EndpointProjection
from overlayd.dataplane import DataplanePort
from overlayd.errors import OverlaydError
from overlayd.model import IPNetwork, Observed
from overlayd.plan.policy_inputs import gwbridge_subnets, local_subnets
from overlayd.plan.policy_model import Endpoint, EndpointIndex
from overlayd.plan.policy_rules import LocalSubnets
from overlayd.plan.service import ServiceCache, stored_services
from overlayd.plan.service_listing import believed_elements, listed_elements
from overlayd.plan.service_model import Service, backends
from overlayd.plan.service_rules import (
    ServiceRuleset,
    service_ruleset,
    service_transaction,
    with_service,
)

log = logging.getLogger("overlayd.daemon.loop")


@dataclass(frozen=True, slots=True)
class ServiceState:
    """What the rules were made from: the usable services, each one's
    backends (by name), and every usable endpoint of the cluster."""

    services: Mapping[str, Service]
    backends: Mapping[str, tuple[Endpoint, ...]]
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class _Made:
    basis: tuple[LocalSubnets, tuple[IPNetwork, ...]]
    ruleset: ServiceRuleset
    state: ServiceState
    by_key: Mapping[str, Endpoint]


def _selects_some(service: Service) -> bool:
    # service_model.backends: an empty selector selects no endpoint.
    return bool(service.selector.match_labels or service.selector.match_expressions)


class ServiceManager:
    name = "services"

    def __init__(
        self,
        dataplane: DataplanePort,
        endpoints: EndpointProjection,
        *,
        on_records: Callable[[ServiceState], None] | None = None,
    ) -> None:
        self._dataplane = dataplane
        self._endpoints = endpoints
        self._on_records = on_records
        self.believed: ServiceRuleset | None = None
        self._cache: ServiceCache = {}
        self._cache_networks: tuple[IPNetwork, ...] = ()
        self._warned: dict[str, str] = {}
        self._made: _Made | None = None
        self.state = ServiceState({}, {}, ())
        self.repaired = 0  # whole-table rewrites a check pass had to make
        self._news = False  # the last pass changed services, backends or endpoints

    async def sync(self, context: PassContext) -> None:
        inputs = context.inputs
        networks = inputs.config.service_networks
        believed_empty = self.believed is not None and self.believed.empty
        if (
            not networks
            and believed_empty
            and context.level < Level.FULL
            and self._on_records is None
        ):
            # No services possible, none in the kernel: no endpoint needs
            # reading for them. Unless DNS listens (a responder started while
            # the config had a ServiceNetwork): container names are records
            # too, and must leave with their endpoints, not at the next full
            # pass.
            self._warn({}, {})
            return
        if networks != self._cache_networks:
            # A value was parsed (and its VIP checked) against the networks of
            # its time: new networks, parse again.
            self._cache, self._cache_networks = {}, networks
        # Without a ServiceNetwork, every stored service is skipped, saying so.
        stored = stored_services(inputs.raw_services, inputs.own_prefix, networks, self._cache)
        self._warn(stored.rejected, stored.unserved)
        # Endpoints matter only to services (none without a network) and to
        # DNS: otherwise a full pass would read 10,000 registrations (0.25 s)
        # just to make sure the table is gone.
        endpoints: tuple[Endpoint, ...] = ()
        if networks or self._on_records is not None:
            endpoints = (await self._endpoints.selection(context)).endpoints
        local = local_subnets(inputs.own, gwbridge_subnets(inputs.egress))
        cluster: tuple[IPNetwork, ...] = (inputs.config.network,)
        if inputs.config.ipv6 is not None:
            cluster += (inputs.config.ipv6.network,)
        desired = self._desired(stored.services, endpoints, local, cluster, context.level)
        statements = await self._statements(context, desired)
        if statements:
            # Believed only once nft took it: a refused transaction changed nothing.
            await self._dataplane.apply_services(statements)
        self.believed = desired
        if self._on_records is not None and (self._news or context.level >= Level.FULL):
            self._on_records(self.state)

    def _desired(
        self,
        services: Mapping[str, Service],
        endpoints: tuple[Endpoint, ...],
        local: LocalSubnets,
        cluster: tuple[IPNetwork, ...],
        level: Level,
    ) -> ServiceRuleset:
        basis = (local, cluster)
        made = self._made
        if made is None or made.basis != basis or level >= Level.FULL:
            index = EndpointIndex(endpoints)
            found = {
                name: backends(service, endpoints, index) for name, service in services.items()
            }
            try:
                ruleset = service_ruleset(services, found, local, cluster)
            except ValueError as exc:
                raise OverlaydError(f"services not applied: {exc}") from exc
            by_key = {e.key: e for e in endpoints}
            self._remember(basis, ruleset, ServiceState(services, found, endpoints), by_key)
            return ruleset
        old = made.state
        by_key = {e.key: e for e in endpoints}
        gone = [e for key, e in made.by_key.items() if by_key.get(key) is not e]
        came = [e for key, e in by_key.items() if made.by_key.get(key) is not e]
        redo = {
            name
            for name in services.keys() | old.services.keys()
            if services.get(name) is not old.services.get(name)
        }
        moved: dict[str, tuple[Endpoint, ...]] = {}
        if gone or came:
            gone_keys = {e.key for e in gone}
            for name, service in services.items():
                if name in redo or not _selects_some(service):
                    continue
                matches = service.selector.matches
                joined = [e for e in came if matches(e.labels)]
                if joined or any(matches(e.labels) for e in gone):
                    kept = [e for e in old.backends.get(name, ()) if e.key not in gone_keys]
                    moved[name] = tuple(sorted(kept + joined, key=lambda e: e.key))
        if not redo and not moved:
            self._news = bool(gone or came)  # container names, for DNS
            if self._news:
                self._remember(basis, made.ruleset, replace(old, endpoints=endpoints), by_key)
            return made.ruleset
        found = dict(old.backends)
        ruleset = made.ruleset
        redo_index = EndpointIndex(endpoints) if redo else None
        for name in sorted(redo):
            now = services.get(name)
            if now is None:
                found.pop(name, None)
                ruleset = with_service(ruleset, name, None)
            else:
                found[name] = backends(now, endpoints, redo_index)
                ruleset = with_service(ruleset, name, now, found[name])
        for name, chosen in moved.items():
            found[name] = chosen
            ruleset = with_service(ruleset, name, services[name], chosen)
        self._remember(basis, ruleset, ServiceState(services, found, endpoints), by_key)
        return ruleset

    def _remember(
        self,
        basis: tuple[LocalSubnets, tuple[IPNetwork, ...]],
        ruleset: ServiceRuleset,
        state: ServiceState,
        by_key: Mapping[str, Endpoint],
    ) -> None:
        self.state = state
        self._made = _Made(basis, ruleset, state, by_key)
        self._news = True

    async def _statements(self, context: PassContext, desired: ServiceRuleset) -> list[str]:
        believed = self.believed
        if context.level >= Level.FULL or believed is None:
            return service_transaction(None, desired)
        if context.level >= Level.CHECK and not (believed.empty and desired.empty):
            listing = await self._dataplane.services_listing()
            if listing is None:
                if believed.empty:
                    return service_transaction(believed, desired)
                self.repaired += 1
                context.remade.append(("nftables", "services table made again: it was gone"))
                return service_transaction(None, desired)
            have = listed_elements(listing)
            if any(
                have.get(name) != wanted for name, wanted in believed_elements(believed).items()
            ):
                self.repaired += 1
                context.remade.append(
                    ("nftables", "services table made again: its elements had changed")
                )
                return service_transaction(None, desired)
        return service_transaction(believed, desired)

    def _warn(self, rejected: Mapping[str, str], unserved: Mapping[str, str]) -> None:
        # One warning per bad definition, and per service served without
        # some of its VIPs (again if its reason changes).
        for key, reason in rejected.items():
            if self._warned.get(key) != reason:
                log.warning("event=service_skipped key=%s reason=%r", key, reason)
        for key, reason in unserved.items():
            if self._warned.get(key) != reason:
                log.warning("event=service_vip_unserved key=%s reason=%r", key, reason)
        self._warned = {**rejected, **unserved}

    def expects(self, observed: Observed) -> bool:
        return False  # nftables sends no netlink event we listen to

    def forget(self) -> None:
        self.believed = None
        self._made = None
        self._endpoints.forget()


def service_backends(state: ServiceState) -> Sequence[tuple[Service, tuple[Endpoint, ...]]]:
    """Each usable service with its backends, in name order (for status)."""
    return [(state.services[n], state.backends.get(n, ())) for n in sorted(state.services)]
