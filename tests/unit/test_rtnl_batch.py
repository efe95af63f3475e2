"""The hand-packed entry messages are byte for byte what pyroute2 encodes
for the same requests (the writers it replaced), for every kind of entry,
both operations and both families; and ACKs are read back by sequence."""

from __future__ import annotations

import struct
from collections.abc import Callable
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from pyroute2 import IPBatch

from overlayd.dataplane.rtnl_batch import Devices, acks, pack
from overlayd.model import ROUTE_PROTOCOL, BridgeFdb, Change, Entry, Neighbour, Op, Route, TunnelFdb

DEV = Devices(bridge=3, vtep=4, underlay=2)
MAC = "02:00:00:0a:0b:01"
CASES = {
    4: ("10.244.7.0/24", "10.244.7.0", "198.51.100.7"),
    6: ("fd00:10:244:7::/64", "fd00:10:244:7::", "2001:db8::7"),
}


def pyroute2_bytes(call: Callable[[Any], None]) -> bytes:
    batch = IPBatch()
    try:
        call(batch)
        return bytes(batch.batch)
    finally:
        batch.close()


def without_seq(message: bytes) -> bytes:
    """The message with its sequence number and port zeroed."""
    return message[:8] + b"\0" * 8 + message[16:]


def expected(entry: Entry, write: bool) -> Callable[[Any], None]:
    """The pyroute2 call the entry writers used to make."""
    op = "replace" if write else "del"
    if isinstance(entry, Route):
        family = 2 if entry.dst.version == 4 else 10
        if not write:
            return lambda b: b.route(
                "del", dst=str(entry.dst), proto=ROUTE_PROTOCOL, table=254, family=family
            )
        extra = {} if entry.direct else {"flags": 4}
        oif = DEV.underlay if entry.direct else DEV.bridge
        return lambda b: b.route(
            "replace",
            dst=str(entry.dst),
            gateway=str(entry.gateway),
            oif=oif,
            proto=ROUTE_PROTOCOL,
            table=254,
            family=family,
            **extra,
        )
    if isinstance(entry, Neighbour):
        family = 2 if entry.ip.version == 4 else 10
        if write:
            return lambda b: b.neigh(
                "replace", dst=str(entry.ip), lladdr=entry.mac, ifindex=3, state=0x80, family=family
            )
        return lambda b: b.neigh("del", dst=str(entry.ip), ifindex=3, family=family)
    if isinstance(entry, TunnelFdb):
        return lambda b: b.fdb(
            op, ifindex=4, lladdr=entry.mac, dst=str(entry.remote), state=0x80, flags=2
        )
    assert isinstance(entry, BridgeFdb)
    return lambda b: b.fdb(op, ifindex=4, lladdr=entry.mac, state=0x40, flags=4)


def entries(version: int) -> list[Entry]:
    dst, gateway, remote = CASES[version]
    network = ip_network(dst)
    hop = ip_address(gateway)
    return [
        Route(network, hop),
        Route(network, ip_address(remote), direct=True),
        Neighbour(hop, MAC),
        TunnelFdb(MAC, ip_address(remote)),
        BridgeFdb(MAC),
    ]


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("op", [Op.REPLACE, Op.DELETE])
def test_every_entry_message_is_what_pyroute2_encodes(version: int, op: Op) -> None:
    for entry in entries(version):
        ours = pack(Change(op, entry), DEV, seq=77)
        theirs = pyroute2_bytes(expected(entry, op is Op.REPLACE))
        assert without_seq(ours) == without_seq(theirs), entry
        assert struct.unpack_from("=I", ours, 8)[0] == 77


def test_acks_are_read_by_sequence_with_their_errno() -> None:
    def answer(seq: int, errno: int) -> bytes:
        request = b"\0" * 16
        return (
            struct.pack("=IHHII", 16 + 4 + 16, 2, 0, seq, 0) + struct.pack("=i", -errno) + request
        )

    other = struct.pack("=IHHII", 20, 24, 0, 9, 0) + b"\0" * 4  # not an error message
    data = answer(5, 0) + other + answer(6, 2) + answer(7, 0)
    assert acks(data) == [(5, 0), (6, 2), (7, 0)]
    # A truncated or zero-length header ends the reading, not the daemon.
    assert acks(answer(5, 0) + struct.pack("=IHHII", 0, 2, 0, 6, 0)) == [(5, 0)]
    assert acks(b"\1\2\3") == []


def test_a_non_entry_is_refused() -> None:
    with pytest.raises(TypeError):
        pack(Change(Op.REPLACE, object()), DEV, seq=1)  # type: ignore[arg-type]


def test_the_monitor_skips_only_the_echoes_of_our_own_writer() -> None:
    from overlayd.dataplane.netlink import own_echoes_skipped

    def event(port: int, seq: int) -> bytes:
        return struct.pack("=IHHII", 20, 24, 0, seq, port) + b"\0" * 4

    data = event(77, 1) + event(0, 2) + event(78, 3)
    kept = own_echoes_skipped(data, 77)
    assert [struct.unpack_from("=I", m, 8)[0] for m in kept] == [2, 3]
    # Before our socket is open nothing is skipped, and port 0 (the
    # kernel's own events, FDB events) never is.
    assert len(own_echoes_skipped(data, None)) == 3
    assert len(own_echoes_skipped(data, 0)) == 3
