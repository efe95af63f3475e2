"""The devices overlayd owns: the container bridge with its gateway address,
the VTEP as a port of it, and in gwbridge mode the egress bridge. Devices
are compared with the kernel on every check; netlink tells of changes too."""

from __future__ import annotations

from overlayd.daemon.managers import CheckedEachPeriod, PassContext


class DeviceManager(CheckedEachPeriod):
    name = "devices"

    async def check(self, context: PassContext) -> None:
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
