"""Just the rtnetlink that pyflanneld needs, over a plain AF_NETLINK socket: list links, IPv4
addresses and default routes; add and delete an address; set a link's MTU and bring it up;
replace a route. For flanneld's vxlan and host-gw backends also: read, create and delete a vxlan
link; replace, list and delete routes through a gateway, permanent neighbours (ARP entries) and
a vxlan link's forwarding database (fdb) entries.

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
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30
NLA_F_NESTED = 0x8000
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_TXQLEN = 13
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_VXLAN_ID = 1
IFLA_VXLAN_LINK = 3
IFLA_VXLAN_LOCAL = 4
IFLA_VXLAN_LEARNING = 7
IFLA_VXLAN_PORT = 15  # big-endian
IFLA_VXLAN_GBP = 23  # a flag: present or absent
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_TABLE = 15
RTNH_F_ONLINK = 0x4
RTM_F_CLONED = 0x200
NDA_DST = 1
NDA_LLADDR = 2
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
AF_BRIDGE = 7
ENODEV = 19
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_UNSPEC = 0  # in a delete: whoever made the route
# What flanneld's routes carry: vishvananda/netlink's RouteAdd leaves its request's default
# protocol, boot, which `ip route` shows without any `proto`.
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_NOWHERE = 255  # in a delete: any scope
RTN_UNSPEC = 0  # in a delete: any type
RTN_UNICAST = 1

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change mask
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst/src length, tos, table, protocol, scope, type
NDMSG = struct.Struct("=BxxxiHBB")  # family, index, state, flags, type
RTATTR = struct.Struct("=HH")  # length, type
NLMSGERR = struct.Struct("=i")
RECV_BYTES = 1 << 16  # a dump message is at most 32 KiB
HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
DUMP_ATTEMPTS = 5  # a dump that the kernel marks interrupted (links changed meanwhile) is redone


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mtu: int


@dataclass(frozen=True)
class VxlanLink:
    """An existing vxlan link as the kernel reports it."""

    index: int
    name: str
    mtu: int
    mac: str  # "1a:fd:f4:c0:3d:3b", lower case
    up: bool
    vni: int
    local: ipaddress.IPv4Address | None  # IFLA_VXLAN_LOCAL: the address packets leave from
    link: int  # IFLA_VXLAN_LINK: the underlay's index, 0 if none
    port: int  # IFLA_VXLAN_PORT: the UDP destination port
    learning: bool
    gbp: bool


def parse_mac(text: str) -> bytes:
    """The six bytes of "1a:fd:f4:c0:3d:3b" (either case); a ValueError if the text is not six
    colon-separated hex octets."""
    octets = text.split(":")
    if len(octets) != 6 or not all(0 < len(o) <= 2 and set(o) <= HEX_DIGITS for o in octets):
        raise ValueError(f"{text!r} is not a MAC address")
    return bytes(int(o, 16) for o in octets)


def format_mac(value: bytes) -> str:
    """"1a:fd:f4:c0:3d:3b", lower case as iproute2 prints it."""
    return ":".join(f"{octet:02x}" for octet in value)


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


def _nested(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _u32(value: bytes) -> int:
    return struct.unpack_from("=I", value)[0]


def _ipv4(value: bytes | None) -> ipaddress.IPv4Address | None:
    return ipaddress.IPv4Address(value) if value is not None and len(value) == 4 else None


def _kind(attrs: dict[int, bytes]) -> str | None:
    """IFLA_INFO_KIND of a link message's attributes: None for a link with no kind (lo, most
    physical NICs)."""
    info = _attrs(attrs.get(IFLA_LINKINFO, b""), 0)
    kind = info.get(IFLA_INFO_KIND)
    return None if kind is None else kind.rstrip(b"\0").decode(errors="replace")


def _vxlan_link(message: bytes) -> VxlanLink:
    _, _, index, flags, _ = IFINFOMSG.unpack_from(message, NLMSGHDR.size)
    attrs = _attrs(message, NLMSGHDR.size + IFINFOMSG.size)
    data = _attrs(_attrs(attrs.get(IFLA_LINKINFO, b""), 0).get(IFLA_INFO_DATA, b""), 0)
    return VxlanLink(
        index=index,
        name=attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace"),
        mtu=_u32(attrs.get(IFLA_MTU, b"\0\0\0\0")),
        mac=format_mac(attrs.get(IFLA_ADDRESS, b"")),
        up=bool(flags & IFF_UP),
        vni=_u32(data.get(IFLA_VXLAN_ID, b"\0\0\0\0")),
        # The kernel leaves out LOCAL when none was set and LINK when no underlay was given.
        local=_ipv4(data.get(IFLA_VXLAN_LOCAL)),
        link=_u32(data.get(IFLA_VXLAN_LINK, b"\0\0\0\0")),
        port=struct.unpack("!H", data.get(IFLA_VXLAN_PORT, b"\0\0"))[0],
        learning=bool(data.get(IFLA_VXLAN_LEARNING, b"\0")[0]),
        gbp=IFLA_VXLAN_GBP in data,
    )


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

    def _get(self, kind: int, body: bytes) -> list[bytes]:
        """The messages the kernel answers a request (not a dump) with; the acknowledgement
        that NLM_F_ACK asks for marks their end."""
        return [message for _, message in self._replies(self._send(kind, NLM_F_ACK, body))]

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

    def set_only_address(self, index: int, address: ipaddress.IPv4Address,
                         prefixlen: int) -> None:
        """Make `address` the link's one IPv4 address: a device kept from an earlier run may
        have it already, or another lease's."""
        present = [a for i, a in self.ipv4_addresses() if i == index]
        if address not in present:
            self.add_address(index, address, prefixlen)
        for other in present:
            if other != address:
                self.delete_address(index, other, prefixlen)

    def set_up(self, index: int, mtu: int) -> None:
        """Set the link's MTU and bring it up."""
        body = (IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)
                + _attr(IFLA_MTU, struct.pack("=I", mtu)))
        self._change(RTM_NEWLINK, 0, body)

    def replace_route(self, destination: ipaddress.IPv4Network, index: int,
                      gateway: ipaddress.IPv4Address | None = None, onlink: bool = False) -> None:
        """A route for `destination` out of the link in the main table, protocol boot and
        scope universe as flanneld's backends make it. With `gateway`, through it: host-gw's
        `ip route replace 10.244.2.0/24 via 198.18.0.12 dev eth0 proto boot`. `onlink` has the
        kernel take the gateway as on the link though no route says so: vxlan's `ip route
        replace 10.244.64.0/24 via 10.244.64.0 dev flannel.1 proto boot onlink`, whose gateway
        is the remote subnet's own address."""
        body = (RTMSG.pack(socket.AF_INET, destination.prefixlen, 0, 0, RT_TABLE_MAIN,
                           RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST,
                           RTNH_F_ONLINK if onlink else 0)
                + _attr(RTA_DST, destination.network_address.packed)
                + _attr(RTA_OIF, struct.pack("=I", index)))
        if gateway is not None:
            body += _attr(RTA_GATEWAY, gateway.packed)
        self._change(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)

    def _link_message(self, index: int = 0, name: str | None = None) -> bytes | None:
        """The kernel's RTM_NEWLINK message for one link, by index or by name; None if there is
        no such link."""
        body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
        if name is not None:
            body += _attr(IFLA_IFNAME, name.encode() + b"\0")
        try:
            messages = self._get(RTM_GETLINK, body)
        except OSError as err:
            if err.errno == ENODEV:
                return None
            raise
        return next((m for m in messages if NLMSGHDR.unpack_from(m)[1] == RTM_NEWLINK), None)

    def link_kind(self, index: int) -> str | None:
        """The link's IFLA_INFO_KIND ("vxlan", "veth", "tun", ...), None for a link that has
        none; OSError ENODEV if there is no such link."""
        message = self._link_message(index)
        if message is None:
            raise OSError(ENODEV, f"{os.strerror(ENODEV)}: link {index}")
        return _kind(_attrs(message, NLMSGHDR.size + IFINFOMSG.size))

    def vxlan(self, name: str) -> VxlanLink | None:
        """The vxlan link of that name, None if there is no link of that name; a ValueError if
        the link exists but is not vxlan (flanneld must not take it over or delete it)."""
        message = self._link_message(name=name)
        if message is None:
            return None
        if _kind(_attrs(message, NLMSGHDR.size + IFINFOMSG.size)) != "vxlan":
            raise ValueError(f"{name} exists and is not a vxlan device")
        return _vxlan_link(message)

    def add_vxlan(self, name: str, vni: int, local: ipaddress.IPv4Address, link: int, port: int,
                  learning: bool, gbp: bool, mtu: int | None, mac: str | None = None) -> int:
        """Create a vxlan link as `ip link add NAME [address MAC] [mtu MTU] type vxlan id VNI
        local LOCAL dev LINK dstport PORT [no]learning [gbp]` does, and return its index. It
        fails with EEXIST if a link of that name exists. link 0 gives no underlay, port 0 the
        kernel's default port (its udp_port parameter, 8472), mtu None the kernel's default
        (the underlay's MTU less 50; 1500 without an underlay), mac None a random MAC from the
        kernel. Its transmit queue length is 0, as flanneld's is (its netlink.LinkAttrs zero
        value sends IFLA_TXQLEN 0; `ip link add` would leave the kernel's 1000). The link is
        left down, as `ip link add` leaves it.

        The one exception to one request per call: the kernel acknowledges RTM_NEWLINK without
        the new index (it ignores NLM_F_ECHO there, 6.18 included), so a second request looks
        the link up by name."""
        data = [_attr(IFLA_VXLAN_ID, struct.pack("=I", vni)),
                _attr(IFLA_VXLAN_LOCAL, local.packed),
                _attr(IFLA_VXLAN_LEARNING, struct.pack("=B", learning))]
        if link:
            data.append(_attr(IFLA_VXLAN_LINK, struct.pack("=I", link)))
        if port:
            data.append(_attr(IFLA_VXLAN_PORT, struct.pack("!H", port)))
        if gbp:
            data.append(_attr(IFLA_VXLAN_GBP, b""))
        body = (IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
                + _attr(IFLA_IFNAME, name.encode() + b"\0")
                + _attr(IFLA_TXQLEN, struct.pack("=I", 0)))
        if mtu is not None:
            body += _attr(IFLA_MTU, struct.pack("=I", mtu))
        if mac is not None:
            body += _attr(IFLA_ADDRESS, parse_mac(mac))
        body += _nested(IFLA_LINKINFO, _attr(IFLA_INFO_KIND, b"vxlan\0"),
                        _nested(IFLA_INFO_DATA, *data))
        self._change(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)
        message = self._link_message(name=name)
        if message is None:
            raise OSError(ENODEV, f"{os.strerror(ENODEV)}: {name} is gone right after creation")
        return IFINFOMSG.unpack_from(message, NLMSGHDR.size)[2]

    def delete_link(self, index: int) -> None:
        self._change(RTM_DELLINK, 0, IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0))

    def delete_route(self, destination: ipaddress.IPv4Network, index: int,
                     gateway: ipaddress.IPv4Address | None = None) -> None:
        """Delete the main table's route for `destination` out of the link (and through
        `gateway` if given), whatever its protocol, scope and type, as `ip route del` does;
        ESRCH if there is none."""
        body = (RTMSG.pack(socket.AF_INET, destination.prefixlen, 0, 0, RT_TABLE_MAIN,
                           RTPROT_UNSPEC, RT_SCOPE_NOWHERE, RTN_UNSPEC, 0)
                + _attr(RTA_DST, destination.network_address.packed)
                + _attr(RTA_OIF, struct.pack("=I", index)))
        if gateway is not None:
            body += _attr(RTA_GATEWAY, gateway.packed)
        self._change(RTM_DELROUTE, 0, body)

    def routes(self, index: int
               ) -> list[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address | None]]:
        """(destination, gateway) of each IPv4 route in the main table out of the link, the
        default route as 0.0.0.0/0 and gateway None for a route without one. Multipath routes,
        which have no single output interface, are left out."""
        found = []
        for message in self._dump(RTM_GETROUTE, RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0,
                                                            0)):
            (family, dst_len, _, _, table, _, _, _,
             flags) = RTMSG.unpack_from(message, NLMSGHDR.size)
            attrs = _attrs(message, NLMSGHDR.size + RTMSG.size)
            if RTA_TABLE in attrs:
                table = _u32(attrs[RTA_TABLE])
            if (family != socket.AF_INET or table != RT_TABLE_MAIN or flags & RTM_F_CLONED
                    or RTA_OIF not in attrs or _u32(attrs[RTA_OIF]) != index):
                continue
            destination = attrs.get(RTA_DST, bytes(4))
            found.append((ipaddress.IPv4Network((destination, dst_len)),
                          _ipv4(attrs.get(RTA_GATEWAY))))
        return found

    def _neigh(self, kind: int, flags: int, family: int, index: int, state: int, ntf: int,
               attrs: bytes) -> None:
        # ndm_type RTN_UNICAST as flanneld's netlink library sends it; the kernel ignores it.
        self._change(kind, flags, NDMSG.pack(family, index, state, ntf, RTN_UNICAST) + attrs)

    def replace_neigh(self, index: int, ip: ipaddress.IPv4Address, mac: str) -> None:
        """A permanent ARP entry, as `ip neigh replace IP lladdr MAC dev LINK nud permanent`:
        flanneld's vxlan backend answers ARP for each remote subnet's gateway address with it."""
        self._neigh(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, socket.AF_INET, index,
                    NUD_PERMANENT, 0, _attr(NDA_DST, ip.packed) + _attr(NDA_LLADDR, parse_mac(mac)))

    def delete_neigh(self, index: int, ip: ipaddress.IPv4Address) -> None:
        """Delete the link's ARP entry for `ip`; ENOENT if there is none."""
        self._neigh(RTM_DELNEIGH, 0, socket.AF_INET, index, 0, 0, _attr(NDA_DST, ip.packed))

    def neighbours(self, index: int) -> list[tuple[ipaddress.IPv4Address, str]]:
        """(address, MAC) of the link's permanent IPv4 neighbours. The dump is of every link's
        and is filtered here: the kernel filters on the header's index only for sockets that
        asked for strict checking."""
        found = []
        for message in self._dump(RTM_GETNEIGH, NDMSG.pack(socket.AF_INET, 0, 0, 0, 0)):
            family, link, state, _, _ = NDMSG.unpack_from(message, NLMSGHDR.size)
            attrs = _attrs(message, NLMSGHDR.size + NDMSG.size)
            ip = _ipv4(attrs.get(NDA_DST))
            if (family == socket.AF_INET and link == index and state & NUD_PERMANENT
                    and ip is not None and NDA_LLADDR in attrs):
                found.append((ip, format_mac(attrs[NDA_LLADDR])))
        return found

    def replace_fdb(self, index: int, mac: str, dst: ipaddress.IPv4Address) -> None:
        """A permanent fdb entry on the vxlan link itself, as `bridge fdb replace MAC dev LINK
        dst DST self permanent`: frames to MAC go in UDP to the remote host DST. Replacing sets
        the MAC's (first) remote, so a remote that moved is not left behind."""
        self._neigh(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, AF_BRIDGE, index, NUD_PERMANENT,
                    NTF_SELF, _attr(NDA_LLADDR, parse_mac(mac)) + _attr(NDA_DST, dst.packed))

    def delete_fdb(self, index: int, mac: str, dst: ipaddress.IPv4Address) -> None:
        """Delete the link's fdb entry for MAC to DST; ENOENT if the link has no entry for MAC.
        If MAC's entry goes to another remote, the kernel (vxlan's __vxlan_fdb_delete) answers
        success and deletes nothing, as `bridge fdb del` shows: a remote that moved keeps its
        entry."""
        self._neigh(RTM_DELNEIGH, 0, AF_BRIDGE, index, 0, NTF_SELF,
                    _attr(NDA_LLADDR, parse_mac(mac)) + _attr(NDA_DST, dst.packed))

    def fdb(self, index: int) -> list[tuple[str, ipaddress.IPv4Address]]:
        """(MAC, remote) of the link's fdb entries that have an IPv4 remote: a vxlan link's.
        Entries without one (a NIC's own and multicast addresses) are left out. The dump is of
        every link's, filtered here, as neighbours() explains."""
        found = []
        for message in self._dump(RTM_GETNEIGH, NDMSG.pack(AF_BRIDGE, 0, 0, 0, 0)):
            family, link, _, _, _ = NDMSG.unpack_from(message, NLMSGHDR.size)
            attrs = _attrs(message, NLMSGHDR.size + NDMSG.size)
            dst = _ipv4(attrs.get(NDA_DST))
            if family == AF_BRIDGE and link == index and dst is not None and NDA_LLADDR in attrs:
                found.append((format_mac(attrs[NDA_LLADDR]), dst))
        return found
