"""The devices overlayd owns: the container bridge with its gateway address,
the VTEP as a port of it, and in gwbridge mode the egress bridge. Devices
are compared with the kernel on every check; netlink tells of changes too."""

from __future__ import annotations

from overlayd.daemon.managers import Level, PassContext
from overlayd.dataplane import DataplanePort
from overlayd.model import Observed


class DeviceManager:
    name = "devices"

    def __init__(self, dataplane: DataplanePort) -> None:
        self._dataplane = dataplane

    async def sync(self, context: PassContext) -> None:
        if context.level < Level.CHECK:
            return
        inputs = context.inputs
        context.remade_all("device", await self._dataplane.ensure_devices(inputs.spec))
        egress = inputs.egress
        if egress.mode == "gwbridge":
            assert egress.gwbridge_gateway is not None
            context.remade_all(
                "device",
                await self._dataplane.ensure_gwbridge(
                    egress.gwbridge, egress.gwbridge_gateway, egress.gwbridge_mac
                ),
            )

    def expects(self, observed: Observed) -> bool:
        # A device event is never just an echo: somebody else changed it, or
        # we did on a pass that will look again anyway.
        return False

    def forget(self) -> None:
        pass
