"""The daemon's event stream, in memory: listeners (the MQTT publisher,
tests) subscribe; the lease keeper, the loop and the managers emit. And the
one producer of peer events that needs memory of its own: `PeerChanges`
turns the peers of successive passes into added, changed and removed.

No I/O here: a listener that talks to the world queues the event itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

from overlayd.model import Lease
from overlayd.plan.desired import PeerMoves, PeerPlan

log = logging.getLogger("overlayd.surfaces.telemetry")

EventListener = Callable[[str, dict[str, Any]], None]


class EventBus:
    def __init__(self) -> None:
        self.listeners: list[EventListener] = []

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(kind, payload)
            except Exception:  # a listener's bug must not stop the daemon
                log.exception("event=listener_failed kind=%s", kind)


def peer_view(peer: Lease, *, direct: bool) -> dict[str, Any]:
    view = {
        "subnet": str(peer.subnet),
        "public_ip": str(peer.public_ip),
        "vtep_mac": peer.vtep_mac,
        "path": "direct" if direct else "vxlan",
    }
    if peer.has_ipv6:
        view |= {
            "ipv6_subnet": str(peer.ipv6_subnet),
            "public_ipv6": str(peer.public_ipv6),
            "vtep_mac_v6": peer.vtep_mac_v6,
        }
    return view


class PeerChanges:
    """The peers after the last successful pass, as views by subnet, and the
    events that tell how they changed from the pass before."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self.peers: dict[str, dict[str, Any]] = {}
        # id(lease) -> (lease, direct, subnet text, view): see update.
        self._views: dict[int, tuple[Lease, bool, str, dict[str, Any]]] = {}
        self._plan: PeerPlan | None = None  # the plan the views are of, if known

    def update(
        self,
        tunneled: Sequence[Lease],
        direct: Sequence[Lease],
        *,
        plan: PeerPlan | None = None,
        moved: PeerMoves | None = None,
    ) -> None:
        """Runs after every pass, light ones included, so views are memoized
        by lease object (the parse cache hands back the same object for an
        unchanged lease): with thousands of peers, rebuilding them all would
        cost tens of milliseconds a pass. Better still, `moved` from the
        very plan these views are of touches only the peers that moved."""
        previous, self._plan = self._plan, None  # the plan is known again once this is done
        if moved is not None and previous is not None and moved.before is previous:
            self._move(moved)
            self._plan = plan
            return
        fresh: dict[int, tuple[Lease, bool, str, dict[str, Any]]] = {}
        now: dict[str, dict[str, Any]] = {}
        for is_direct, group in ((False, tunneled), (True, direct)):
            for peer in group:
                found = self._views.get(id(peer))
                if found is None or found[0] is not peer or found[1] is not is_direct:
                    found = (peer, is_direct, str(peer.subnet), peer_view(peer, direct=is_direct))
                fresh[id(peer)] = found
                now[found[2]] = found[3]
        self._views = fresh
        if self._bus.listeners:
            for subnet, view in now.items():
                before = self.peers.get(subnet)
                if before is None:
                    self._bus.emit("peer_added", view)
                elif before is not view and before != view:
                    self._bus.emit("peer_changed", {**view, "before": before})
            for subnet, view in self.peers.items():
                if subnet not in now:
                    self._bus.emit("peer_removed", view)
        self.peers = now
        self._plan = plan

    def _move(self, moved: PeerMoves) -> None:
        before = self.peers
        now = dict(before)  # handed out as `peers`: never changed in place
        touched: dict[str, None] = {}
        for peer, _ in moved.left:
            self._views.pop(id(peer), None)
            subnet = str(peer.subnet)
            now.pop(subnet, None)
            touched[subnet] = None
        for peer, is_direct in moved.joined:
            # The IPv4 plan's peers are the leases themselves.
            lease = cast(Lease, peer)
            found = (lease, is_direct, str(lease.subnet), peer_view(lease, direct=is_direct))
            self._views[id(peer)] = found
            now[found[2]] = found[3]
            touched[found[2]] = None
        if self._bus.listeners:
            for subnet in touched:
                view, was = now.get(subnet), before.get(subnet)
                if view is None:
                    continue
                if was is None:
                    self._bus.emit("peer_added", view)
                elif was is not view and was != view:
                    self._bus.emit("peer_changed", {**view, "before": was})
            for subnet in touched:
                was = before.get(subnet)
                if was is not None and subnet not in now:
                    self._bus.emit("peer_removed", was)
        self.peers = now
