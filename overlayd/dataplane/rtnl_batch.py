"""Per-peer entry writes (route, neighbour, tunnel FDB, bridge FDB) packed
by hand and sent to the kernel as one netlink batch, one ACK per message.

Why by hand: pyroute2's request path costs 150 to 300 us per message on
this machine (its pure-Python encoder alone about 100 us for a route), and
a peer joining a dual-stack host writes eight. That was the largest cost of
a light pass at 5,000 peers after planning became O(changes). The four
message shapes are fixed rtnetlink ABI (linux/rtnetlink.h, neighbour.h);
`tests/unit/test_rtnl_batch.py` checks every one against pyroute2's encoding
of the same request, so the bytes are the library's, only cheaper. pyroute2
still does everything else (devices, dumps, the drift monitor), and creates
this socket inside a named namespace.

The kernel handles the messages of one send in order and answers each, so
one failed write does not stop the others: the same semantics as writing
them one by one.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pyroute2.netns import create_socket

from overlayd.model import ROUTE_PROTOCOL, BridgeFdb, Change, Neighbour, Op, Route, TunnelFdb

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWNEIGH, RTM_DELNEIGH = 24, 25, 28, 29
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
WRITE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE
DELETE = NLM_F_REQUEST | NLM_F_ACK
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR = 1, 2
RT_TABLE_MAIN = 254
RTN_UNSPEC, RTN_UNICAST = 0, 1
RTNH_F_ONLINK = 0x04
AF_BRIDGE = 7
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80
NTF_SELF, NTF_MASTER = 0x02, 0x04
ACK_SECONDS = 5.0
# Messages per send: every ACK is queued on our socket while the kernel
# still works through the send, and a few hundred would overflow a default
# receive buffer (ENOBUFS, answers lost).
BATCH_MAX = 128

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, port
# rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BBHiHBB")  # family, pad, pad, ifindex, state, flags, type
_ATTR = struct.Struct("=HH")
_ERRNO = struct.Struct("=i")
_TABLE_MAIN = struct.pack("=I", RT_TABLE_MAIN)


@dataclass(frozen=True, slots=True)
class Devices:
    """Interface indexes a write needs: bridge, the family's VTEP, underlay."""

    bridge: int
    vtep: int
    underlay: int


def _attr(kind: int, payload: bytes) -> bytes:
    length = _ATTR.size + len(payload)
    return _ATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _mac(mac: str) -> bytes:
    return _attr(NDA_LLADDR, bytes.fromhex(mac.replace(":", "")))


def _body(change: Change, dev: Devices) -> tuple[int, int, bytes]:
    """The message type, flags and body (after the header) of one change,
    as pyroute2 would encode the same request."""
    entry, write = change.entry, change.op is Op.REPLACE
    if isinstance(entry, Route):
        dst = entry.dst
        family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
        where = _attr(RTA_DST, dst.network_address.packed)
        if not write:
            head = _RTMSG.pack(
                family, dst.prefixlen, 0, 0, RT_TABLE_MAIN, ROUTE_PROTOCOL, 0, RTN_UNSPEC, 0
            )
            return RTM_DELROUTE, DELETE, head + where + _attr(RTA_TABLE, _TABLE_MAIN)
        head = _RTMSG.pack(
            family,
            dst.prefixlen,
            0,
            0,
            RT_TABLE_MAIN,
            ROUTE_PROTOCOL,
            0,
            RTN_UNICAST,
            0 if entry.direct else RTNH_F_ONLINK,
        )
        oif = struct.pack("=I", dev.underlay if entry.direct else dev.bridge)
        return (
            RTM_NEWROUTE,
            WRITE,
            head
            + where
            + _attr(RTA_GATEWAY, entry.gateway.packed)
            + _attr(RTA_OIF, oif)
            + _attr(RTA_TABLE, _TABLE_MAIN),
        )
    if isinstance(entry, Neighbour):
        family = socket.AF_INET if entry.ip.version == 4 else socket.AF_INET6
        head = _NDMSG.pack(family, 0, 0, dev.bridge, NUD_PERMANENT, 0, 0)
        where = _attr(NDA_DST, entry.ip.packed)
        if write:
            return RTM_NEWNEIGH, WRITE, head + where + _mac(entry.mac)
        return RTM_DELNEIGH, DELETE, head + where
    if isinstance(entry, TunnelFdb):
        # NTF_SELF: the entry is the VXLAN device's own, with its remote
        # (without it the bridge takes it and `dst` is lost; FACTS.md).
        state = NUD_PERMANENT if write else NUD_PERMANENT | NUD_NOARP
        head = _NDMSG.pack(AF_BRIDGE, 0, 0, dev.vtep, state, NTF_SELF, 0)
        body = head + _mac(entry.mac) + _attr(NDA_DST, entry.remote.packed)
        return (RTM_NEWNEIGH, WRITE, body) if write else (RTM_DELNEIGH, DELETE, body)
    if isinstance(entry, BridgeFdb):
        head = _NDMSG.pack(AF_BRIDGE, 0, 0, dev.vtep, NUD_NOARP, NTF_MASTER, 0)
        body = head + _mac(entry.mac)
        return (RTM_NEWNEIGH, WRITE, body) if write else (RTM_DELNEIGH, DELETE, body)
    raise TypeError(f"not a per-peer entry: {entry!r}")


def pack(change: Change, dev: Devices, seq: int) -> bytes:
    """One change as a complete netlink message with sequence number `seq`."""
    kind, flags, body = _body(change, dev)
    return _HEADER.pack(_HEADER.size + len(body), kind, flags, seq, 0) + body


def acks(data: bytes) -> list[tuple[int, int]]:
    """(sequence number, errno) of each NLMSG_ERROR message in a datagram
    (errno 0: an ACK); other messages are skipped."""
    found = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _, seq, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            break  # malformed: nothing after it can be trusted
        if kind == NLMSG_ERROR and length >= _HEADER.size + _ERRNO.size:
            (error,) = _ERRNO.unpack_from(data, offset + _HEADER.size)
            found.append((seq, -error))
        offset += (length + 3) & ~3
    return found


class EntryWriter:
    """A netlink socket of its own (in the named namespace) for batches of
    entry writes; opened on first use."""

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._socket: socket.socket | None = None
        self._seq = 0
        # One batch at a time: the answers of two would interleave.
        self._lock = asyncio.Lock()

    def _open(self) -> socket.socket:
        if self._socket is None:
            sock = create_socket(
                self._netns or None,
                family=socket.AF_NETLINK,
                socket_type=socket.SOCK_RAW,
                proto=NETLINK_ROUTE,
            )
            sock.bind((0, 0))
            sock.setblocking(False)
            self._socket = sock
        return self._socket

    def port(self) -> int | None:
        """The socket's netlink port id (None before it is open): the kernel
        names it in the events our writes cause."""
        if self._socket is None:
            return None
        return int(self._socket.getsockname()[0])

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def write(self, changes: Sequence[Change], dev: Devices) -> list[int]:
        """Send the changes as one batch; each one's errno (0: done), in order.
        Raises OSError when the socket fails, TimeoutError when the kernel
        does not answer every message (then the socket is reopened)."""
        errors: list[int] = []
        async with self._lock:
            for start in range(0, len(changes), BATCH_MAX):
                errors += await self._write(changes[start : start + BATCH_MAX], dev)
        return errors

    async def _write(self, changes: Sequence[Change], dev: Devices) -> list[int]:
        sock = self._open()
        if self._seq + len(changes) >= 2**32 - 1:
            self._seq = 0  # sequence numbers are 32 bits
        first = self._seq + 1
        self._seq += len(changes)
        data = b"".join(pack(c, dev, first + i) for i, c in enumerate(changes))
        errors: dict[int, int] = {}
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(sock, data)
            async with asyncio.timeout(ACK_SECONDS):
                while len(errors) < len(changes):
                    for seq, error in acks(await loop.sock_recv(sock, 65536)):
                        # An answer to an earlier, abandoned batch is not ours.
                        if first <= seq < first + len(changes):
                            errors[seq] = error
        except BaseException:
            self.close()  # its unread answers would confuse the next batch
            raise
        return [errors[first + i] for i in range(len(changes))]


def describe_errno(code: int) -> str:
    return f"({code}, {os.strerror(code)!r})"
