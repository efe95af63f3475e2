"""The devices overlayd owns: the container bridge with its gateway address,
the VTEP as a port of it, and in gwbridge mode the egress bridge. Devices
are compared with the kernel on every check; netlink tells of changes too.

A link event that describes a device exactly as this manager last made it
(the kernel reports a VTEP's carrier coming up a moment after we created
it, for instance) is an echo, not drift: it costs no pass. Anything else
about our devices (gone, another MAC, MTU or master, down) does."""

from __future__ import annotations

from overlayd.daemon.managers import CheckedEachPeriod, Level, PassContext
from overlayd.dataplane import DataplanePort
from overlayd.model import LinkFacts, Observed

# name -> (MAC, MTU or None when not ours to set, master or None)
Made = dict[str, tuple[str, int | None, str | None]]


class DeviceManager(CheckedEachPeriod):
    name = "devices"

    def __init__(self, dataplane: DataplanePort) -> None:
        super().__init__(dataplane)
        self._made: Made = {}

    async def check(self, context: PassContext) -> None:
        inputs = context.inputs
        context.remade_all("device", await self._dataplane.ensure_devices(inputs.spec))
        egress = inputs.egress
        if egress.mode == "gwbridge":
            assert egress.gwbridge_gateway is not None
            context.remade_all(
                "device",
                await self._dataplane.ensure_gwbridge(
                    egress.gwbridge,
                    egress.gwbridge_gateway,
                    egress.gwbridge_mac,
                    gateway6=egress.gwbridge_gateway6,
                ),
            )
        if any(kind == "device" for kind, _ in context.remade):
            # A device made again lost the routes, neighbours and FDB entries
            # on it: the rest of this pass reads the kernel instead of belief.
            context.level = Level.FULL
        spec = inputs.spec
        made: Made = {spec.bridge: (spec.bridge_mac, spec.mtu, None)}
        if spec.vtep:
            made[spec.vtep] = (spec.vtep_mac, spec.mtu, spec.bridge)
        if spec.vtep6:
            made[spec.vtep6] = (spec.vtep6_mac, spec.mtu, spec.bridge)
        if egress.mode == "gwbridge":
            made[egress.gwbridge] = (egress.gwbridge_mac, None, None)
        self._made = made

    def expects(self, observed: Observed) -> bool:
        link = observed.link
        return link is not None and observed.present and self._as_made(link)

    def _as_made(self, link: LinkFacts) -> bool:
        made = self._made.get(link.name)
        if made is None:
            return False
        mac, mtu, master = made
        return (
            link.up
            and link.mac == mac
            and (mtu is None or link.mtu == mtu)
            and link.master == master
        )

    def forget(self) -> None:
        self._made = {}
