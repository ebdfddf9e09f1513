"""Just the rtnetlink that pyflanneld needs, over a plain AF_NETLINK socket: list links, IPv4
addresses and default routes; add and delete an address; set a link's MTU and bring it up;
replace a route.

pyroute2 did this before, but importing it cost pyflanneld 10 MiB of resident memory (its package
imports every netlink family it knows), a fifth of the 50Mi that flannel's manifest gives
flanneld.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_MIN_TYPE = 16  # below: netlink's own control messages
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
IFLA_IFNAME = 3
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RTA_TABLE = 15
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4  # what `ip route` and pyroute2 set by default
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change mask
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst/src length, tos, table, protocol, scope, type
RTATTR = struct.Struct("=HH")  # length, type
NLMSGERR = struct.Struct("=i")
RECV_BYTES = 1 << 16  # a dump message is at most 32 KiB
DUMP_ATTEMPTS = 5  # a dump that the kernel marks interrupted (links changed meanwhile) is redone


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mtu: int


def _align(length: int) -> int:
    return (length + 3) & ~3


def _attr(kind: int, value: bytes) -> bytes:
    return RTATTR.pack(RTATTR.size + len(value), kind) + value.ljust(_align(len(value)), b"\0")


def _attrs(data: bytes, offset: int) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    while offset + RTATTR.size <= len(data):
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size:
            break
        found[kind & 0x3FFF] = data[offset + RTATTR.size:offset + length]  # without flag bits
        offset += _align(length)
    return found


def _u32(value: bytes) -> int:
    return struct.unpack_from("=I", value)[0]


class RtNetlink:
    """One NETLINK_ROUTE socket in the calling thread's network namespace. Each call is one
    request answered at once by the kernel; a failure raises OSError with the kernel's errno."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def _send(self, kind: int, flags: int, body: bytes) -> int:
        self._seq += 1
        self._sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags,
                                      self._seq, 0) + body)
        return self._seq

    def _replies(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """(flags, message) of each reply to request `seq`, up to NLMSG_DONE or the
        acknowledgement; an error reply raises."""
        while True:
            data = self._sock.recv(RECV_BYTES)
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, kind, flags, msg_seq, _ = NLMSGHDR.unpack_from(data, offset)
                if length < NLMSGHDR.size:
                    break
                message = data[offset:offset + length]
                offset += _align(length)
                if msg_seq != seq:
                    continue  # a late reply to an earlier request
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    (error,) = NLMSGERR.unpack_from(message, NLMSGHDR.size)
                    if error:
                        raise OSError(-error, os.strerror(-error))
                    return
                if kind >= NLMSG_MIN_TYPE:
                    yield flags, message

    def _dump(self, kind: int, body: bytes) -> list[bytes]:
        for _ in range(DUMP_ATTEMPTS):
            replies = list(self._replies(self._send(kind, NLM_F_DUMP, body)))
            if not any(flags & NLM_F_DUMP_INTR for flags, _ in replies):
                return [message for _, message in replies]
        raise OSError(f"netlink dump {kind} kept being interrupted")

    def _change(self, kind: int, flags: int, body: bytes) -> None:
        for _ in self._replies(self._send(kind, NLM_F_ACK | flags, body)):
            pass

    def links(self) -> list[Link]:
        links = []
        for message in self._dump(RTM_GETLINK, IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            _, _, index, _, _ = IFINFOMSG.unpack_from(message, NLMSGHDR.size)
            attrs = _attrs(message, NLMSGHDR.size + IFINFOMSG.size)
            name = attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace")
            links.append(Link(index, name, _u32(attrs.get(IFLA_MTU, b"\0\0\0\0"))))
        return links

    def ipv4_addresses(self) -> list[tuple[int, ipaddress.IPv4Address]]:
        """(interface index, address) of every IPv4 address, in the kernel's order."""
        found = []
        for message in self._dump(RTM_GETADDR, IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)):
            family, _, _, _, index = IFADDRMSG.unpack_from(message, NLMSGHDR.size)
            attrs = _attrs(message, NLMSGHDR.size + IFADDRMSG.size)
            # IFA_LOCAL is this end's address (IFA_ADDRESS is the peer's on point-to-point).
            address = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if family == socket.AF_INET and address and len(address) == 4:
                found.append((index, ipaddress.IPv4Address(address)))
        return found

    def default_route_interfaces(self) -> list[int]:
        """The output interface of each IPv4 default route in the main table (multipath
        routes, which have none, are left out)."""
        found = []
        for message in self._dump(RTM_GETROUTE, RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0,
                                                            0)):
            family, dst_len, _, _, table, _, _, _, _ = RTMSG.unpack_from(message, NLMSGHDR.size)
            attrs = _attrs(message, NLMSGHDR.size + RTMSG.size)
            if RTA_TABLE in attrs:
                table = _u32(attrs[RTA_TABLE])
            if (family == socket.AF_INET and dst_len == 0 and table == RT_TABLE_MAIN
                    and RTA_OIF in attrs):
                found.append(_u32(attrs[RTA_OIF]))
        return found

    def _address(self, kind: int, flags: int, index: int,
                 address: ipaddress.IPv4Address, prefixlen: int) -> None:
        body = (IFADDRMSG.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
                + _attr(IFA_LOCAL, address.packed) + _attr(IFA_ADDRESS, address.packed))
        self._change(kind, flags, body)

    def add_address(self, index: int, address: ipaddress.IPv4Address, prefixlen: int) -> None:
        self._address(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, index, address, prefixlen)

    def delete_address(self, index: int, address: ipaddress.IPv4Address,
                       prefixlen: int) -> None:
        self._address(RTM_DELADDR, 0, index, address, prefixlen)

    def set_up(self, index: int, mtu: int) -> None:
        """Set the link's MTU and bring it up."""
        body = (IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)
                + _attr(IFLA_MTU, struct.pack("=I", mtu)))
        self._change(RTM_NEWLINK, 0, body)

    def replace_route(self, destination: ipaddress.IPv4Network, index: int) -> None:
        """A route for `destination` out of the link in the main table, scope universe as
        flanneld's udp backend makes it."""
        body = (RTMSG.pack(socket.AF_INET, destination.prefixlen, 0, 0, RT_TABLE_MAIN,
                           RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
                + _attr(RTA_DST, destination.network_address.packed)
                + _attr(RTA_OIF, struct.pack("=I", index)))
        self._change(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)
