"""Just the rtnetlink that pyflanneld needs: list links, IPv4 addresses and default routes; add and
delete an address; set a link's MTU and bring it up; replace a route. For flanneld's vxlan and
host-gw backends also: read, create and delete a vxlan link; replace, list and delete routes
through a gateway, permanent neighbours (ARP entries) and a vxlan link's forwarding database (fdb)
entries.

The messages are pyroute2's (ifinfmsg, ifaddrmsg, rtmsg, ndmsg: their fields and attributes,
nested vxlan data included, encoded and parsed by pyroute2); the socket is this module's own, a
plain AF_NETLINK one. pyroute2's package __init__ is never run: it imports the whole library (NDB
with sqlite3, IPDB, the asyncio sockets, unittest.mock), and `from pyroute2 import IPRoute` costs
pyflanneld 10.5 MiB, where this module costs 1.4 MiB imported and 2.3 MiB with every request run
(docs/netlink.md; tests/test_netlink_footprint.py keeps both figures).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import ipaddress
import os
import socket
import struct
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

# pyroute2's modules that this one reaches; the whole set that importing them loads is
# tests/test_netlink_footprint.py's to keep small.
PYROUTE2_MESSAGE_MODULES = ("pyroute2.netlink.rtnl.ifinfmsg", "pyroute2.netlink.rtnl.ifaddrmsg",
                            "pyroute2.netlink.rtnl.rtmsg", "pyroute2.netlink.rtnl.ndmsg")


def _pyroute2_messages() -> tuple[Any, Any, Any, Any]:
    """pyroute2's ifinfmsg, ifaddrmsg, rtmsg and ndmsg classes, imported without running
    pyroute2/__init__.py. Where the package is imported already (by whatever else shares the
    process) its modules serve as they are; otherwise a bare package object named pyroute2,
    pointing at the installed package's folder, stands in for it, and Python imports the four
    modules (and pyroute2.netlink, .common and .config, which they import) from there. That
    depends on pyroute2's layout, the same from 0.7.12 to 0.9.7; pyproject.toml pins the version
    and a layout that moved fails this import, not a request."""
    if "pyroute2" not in sys.modules:
        found = importlib.util.find_spec("pyroute2")  # finds; runs nothing
        if found is None or not found.submodule_search_locations:
            raise ImportError("pyroute2 is not installed", name="pyroute2")
        package = types.ModuleType("pyroute2", "pyroute2's folder, its __init__ not run: "
                                   "control.host.rtnl imports only its rtnetlink messages")
        package.__path__ = list(found.submodule_search_locations)
        package.__spec__ = importlib.machinery.ModuleSpec(
            "pyroute2", None, origin=found.origin, is_package=True)
        package.__spec__.submodule_search_locations = package.__path__
        sys.modules["pyroute2"] = package
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    from pyroute2.netlink.rtnl.ndmsg import ndmsg
    from pyroute2.netlink.rtnl.rtmsg import rtmsg
    return ifinfmsg, ifaddrmsg, rtmsg, ndmsg


IfInfMsg, IfAddrMsg, RtMsg, NdMsg = _pyroute2_messages()

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_MIN_TYPE = 16  # below: netlink's own control messages
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
# ROOT | MATCH. Its 0x200 is also NLM_F_EXCL's (and 0x100 NLM_F_REPLACE's): a flags word does
# not tell a dump from a create, so a request says which it is by how it is sent (_dump).
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
RTNH_F_ONLINK = 0x4
RTM_F_CLONED = 0x200
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
AF_UNSPEC = socket.AF_UNSPEC
AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6
FAMILY = {4: AF_INET, 6: AF_INET6}  # an address's version -> its netlink family
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
NLMSGERR = struct.Struct("=i")
RECV_BYTES = 1 << 16  # a dump message is at most 32 KiB
HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
DUMP_ATTEMPTS = 5  # a dump that the kernel marks interrupted (links changed meanwhile) is redone

T = TypeVar("T")

# pyroute2's attribute list: (name, value) pairs, a nested one's value {"attrs": [...]}
Attrs = Sequence[tuple[str, Any]]


# Each request's fixed header with every field given, zero unless the request sets it; the
# family always is (a route dump of family 0 would list IPv6 routes too, and rtmsg() left alone
# makes it AF_INET).
_LINK = {"family": AF_UNSPEC, "ifi_type": 0, "index": 0, "flags": 0, "change": 0}
_ADDRESS = {"family": AF_UNSPEC, "prefixlen": 0, "flags": 0, "scope": RT_SCOPE_UNIVERSE,
            "index": 0}
_ROUTE = {"family": AF_UNSPEC, "dst_len": 0, "src_len": 0, "tos": 0, "table": 0, "proto": 0,
          "scope": 0, "type": 0, "flags": 0}
_NEIGH = {"family": AF_UNSPEC, "ifindex": 0, "state": 0, "flags": 0, "ndm_type": 0}


# Routes, neighbours and fdb remotes are of either family; a call's addresses choose it.
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _route_attrs(destination: IPNetwork, index: int, gateway: IPAddress | None) -> Attrs:
    attrs: list[tuple[str, Any]] = [("RTA_DST", str(destination.network_address)),
                                    ("RTA_OIF", index)]
    if gateway is not None:
        attrs.append(("RTA_GATEWAY", str(gateway)))
    return attrs


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
    local: IPAddress | None  # IFLA_VXLAN_LOCAL (or LOCAL6): the address packets leave from
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


def _text(value: Any) -> str:
    """A string attribute as pyroute2 parsed it: str, or bytes where it was not UTF-8."""
    if isinstance(value, bytes):
        return value.rstrip(b"\0").decode(errors="replace")
    return "" if value is None else str(value)


def _ip(value: Any) -> IPAddress | None:
    """An address attribute of either family as pyroute2 parsed it; None if absent."""
    try:
        return ipaddress.ip_address(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _kind(message: Any) -> str | None:
    """IFLA_INFO_KIND of a link message: None for a link with no kind (lo, most physical
    NICs)."""
    kind = message.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    return None if kind is None else _text(kind)


def _vxlan_link(message: Any) -> VxlanLink:
    data = message.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")  # pyroute2's vxlan class

    def vxlan(name: str) -> Any:
        return data.get_attr(name) if hasattr(data, "get_attr") else None

    return VxlanLink(
        index=message["index"],
        name=_text(message.get_attr("IFLA_IFNAME")),
        mtu=message.get_attr("IFLA_MTU") or 0,
        mac=(message.get_attr("IFLA_ADDRESS") or "").lower(),
        up=bool(message["flags"] & IFF_UP),
        vni=vxlan("IFLA_VXLAN_ID") or 0,
        # The kernel leaves out LOCAL when none was set and LINK when no underlay was given.
        local=_ip(vxlan("IFLA_VXLAN_LOCAL")) or _ip(vxlan("IFLA_VXLAN_LOCAL6")),
        link=vxlan("IFLA_VXLAN_LINK") or 0,
        port=vxlan("IFLA_VXLAN_PORT") or 0,
        learning=bool(vxlan("IFLA_VXLAN_LEARNING")),
        gbp=bool(vxlan("IFLA_VXLAN_GBP")),
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

    def _send(self, kind: int, flags: int, cls: Any, fields: dict[str, int],
              attrs: Attrs = ()) -> int:
        """Send a request as pyroute2's message class `cls`, with every field of its fixed
        header given (pyroute2's defaults, such as rtmsg's family AF_INET, are not relied on)
        and its attributes by name; pyroute2 encodes it, this socket sends it."""
        self._seq += 1
        message = cls()
        message.update(fields)
        message["attrs"] = list(attrs)
        message["header"].update(type=kind, flags=NLM_F_REQUEST | flags,
                                 sequence_number=self._seq, pid=0)
        message.encode()  # the header's length too
        self._sock.send(bytes(message.data))
        return self._seq

    def _replies(self, seq: int, cls: Any) -> Iterator[tuple[int, Any]]:
        """(flags, message parsed as `cls`) of each reply to request `seq`, up to NLMSG_DONE or
        the acknowledgement; an error reply raises."""
        while True:
            data = self._sock.recv(RECV_BYTES)
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, kind, flags, msg_seq, _ = NLMSGHDR.unpack_from(data, offset)
                if length < NLMSGHDR.size:
                    break
                message = data[offset:offset + length]
                offset += (length + 3) & ~3
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
                    parsed = cls(message)
                    parsed.decode()  # attributes are parsed when first read
                    yield flags, parsed

    def _dump(self, kind: int, cls: Any, fields: dict[str, int],
              pick: Callable[[Any], T | None]) -> list[T]:
        """What `pick` keeps of each message of a dump (None: nothing), taken as the messages
        arrive: held whole, pyroute2's messages of a dump of 5,000 routes or neighbours cost
        the daemon 16-20 MiB each (perf/SCALE.md)."""
        for _ in range(DUMP_ATTEMPTS):
            picked, interrupted = [], False
            for flags, message in self._replies(self._send(kind, NLM_F_DUMP, cls, fields), cls):
                interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
                value = pick(message)
                if value is not None:
                    picked.append(value)
            if not interrupted:
                return picked
        raise OSError(f"netlink dump {kind} kept being interrupted")

    def _change(self, kind: int, flags: int, cls: Any, fields: dict[str, int],
                attrs: Attrs = ()) -> None:
        for _ in self._replies(self._send(kind, NLM_F_ACK | flags, cls, fields, attrs), cls):
            pass

    def _get(self, kind: int, cls: Any, fields: dict[str, int], attrs: Attrs = ()) -> list[Any]:
        """The messages the kernel answers a request (not a dump) with; the acknowledgement
        that NLM_F_ACK asks for marks their end."""
        return [message for _, message in
                self._replies(self._send(kind, NLM_F_ACK, cls, fields, attrs), cls)]

    def links(self) -> list[Link]:
        return self._dump(RTM_GETLINK, IfInfMsg, _LINK, lambda message: Link(
            message["index"], _text(message.get_attr("IFLA_IFNAME")),
            message.get_attr("IFLA_MTU") or 0))

    def addresses(self, version: int = 4) -> list[tuple[int, IPAddress]]:
        """(interface index, address) of every IPv4 (or IPv6) address, in the kernel's
        order."""
        family = FAMILY[version]

        def pick(message: Any) -> tuple[int, IPAddress] | None:
            # IFA_LOCAL is this end's address (IFA_ADDRESS is the peer's on point-to-point).
            address = _ip(message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS"))
            if message["family"] == family and address is not None:
                return message["index"], address
            return None

        return self._dump(RTM_GETADDR, IfAddrMsg, {**_ADDRESS, "family": family}, pick)

    def _main_table_routes(self, pick: Callable[[Any], T | None], version: int = 4
                           ) -> list[T]:
        """What `pick` keeps of the IPv4 (or IPv6) routes of the main table, cached (cloned)
        ones left out."""
        family = FAMILY[version]

        def main(message: Any) -> T | None:
            table = message.get_attr("RTA_TABLE") or message["table"]
            if (message["family"] == family and table == RT_TABLE_MAIN
                    and not message["flags"] & RTM_F_CLONED):
                return pick(message)
            return None

        return self._dump(RTM_GETROUTE, RtMsg, {**_ROUTE, "family": family}, main)

    def default_route_interfaces(self, version: int = 4) -> list[int]:
        """The output interface of each IPv4 (or IPv6) default route in the main table
        (multipath routes, which have none, are left out)."""
        return self._main_table_routes(
            lambda message: message.get_attr("RTA_OIF") if message["dst_len"] == 0 else None,
            version)

    def _address(self, kind: int, flags: int, index: int, address: IPAddress,
                 prefixlen: int) -> None:
        self._change(kind, flags, IfAddrMsg,
                     {**_ADDRESS, "family": FAMILY[address.version], "prefixlen": prefixlen,
                      "index": index},
                     [("IFA_LOCAL", str(address)), ("IFA_ADDRESS", str(address))])

    def add_address(self, index: int, address: IPAddress, prefixlen: int) -> None:
        self._address(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, index, address, prefixlen)

    def delete_address(self, index: int, address: IPAddress, prefixlen: int) -> None:
        self._address(RTM_DELADDR, 0, index, address, prefixlen)

    def set_only_address(self, index: int, address: IPAddress, prefixlen: int) -> None:
        """Make `address` the link's one address of its family (IPv6 link-local ones left
        alone, as flanneld's EnsureV6AddressOnLink leaves them): a device kept from an earlier
        run may have it already, or another lease's."""
        present = [a for i, a in self.addresses(address.version)
                   if i == index and not a.is_link_local]
        if address not in present:
            self.add_address(index, address, prefixlen)
        for other in present:
            if other != address:
                self.delete_address(index, other, prefixlen)

    def set_up(self, index: int, mtu: int) -> None:
        """Set the link's MTU and bring it up."""
        self._change(RTM_NEWLINK, 0, IfInfMsg,
                     {**_LINK, "index": index, "flags": IFF_UP, "change": IFF_UP},
                     [("IFLA_MTU", mtu)])

    def replace_route(self, destination: IPNetwork, index: int,
                      gateway: IPAddress | None = None, onlink: bool = False) -> None:
        """A route for `destination` out of the link in the main table, protocol boot and
        scope universe as flanneld's backends make it. With `gateway`, through it: host-gw's
        `ip route replace 10.244.2.0/24 via 198.18.0.12 dev eth0 proto boot`. `onlink` has the
        kernel take the gateway as on the link though no route says so: vxlan's `ip route
        replace 10.244.64.0/24 via 10.244.64.0 dev flannel.1 proto boot onlink`, whose gateway
        is the remote subnet's own address."""
        self._change(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, RtMsg,
                     {**_ROUTE, "family": FAMILY[destination.version],
                      "dst_len": destination.prefixlen, "table": RT_TABLE_MAIN,
                      "proto": RTPROT_BOOT, "scope": RT_SCOPE_UNIVERSE,
                      "type": RTN_UNICAST, "flags": RTNH_F_ONLINK if onlink else 0},
                     _route_attrs(destination, index, gateway))

    def _link_message(self, index: int = 0, name: str | None = None) -> Any | None:
        """The kernel's RTM_NEWLINK message for one link, by index or by name; None if there is
        no such link."""
        try:
            messages = self._get(RTM_GETLINK, IfInfMsg, {**_LINK, "index": index},
                                 [] if name is None else [("IFLA_IFNAME", name)])
        except OSError as err:
            if err.errno == ENODEV:
                return None
            raise
        return next((m for m in messages if m["header"]["type"] == RTM_NEWLINK), None)

    def link_kind(self, index: int) -> str | None:
        """The link's IFLA_INFO_KIND ("vxlan", "veth", "tun", ...), None for a link that has
        none; OSError ENODEV if there is no such link."""
        message = self._link_message(index)
        if message is None:
            raise OSError(ENODEV, f"{os.strerror(ENODEV)}: link {index}")
        return _kind(message)

    def vxlan(self, name: str) -> VxlanLink | None:
        """The vxlan link of that name, None if there is no link of that name; a ValueError if
        the link exists but is not vxlan (flanneld must not take it over or delete it)."""
        message = self._link_message(name=name)
        if message is None:
            return None
        if _kind(message) != "vxlan":
            raise ValueError(f"{name} exists and is not a vxlan device")
        return _vxlan_link(message)

    def add_vxlan(self, name: str, vni: int, local: IPAddress, link: int, port: int,
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
        local_attr = "IFLA_VXLAN_LOCAL" if local.version == 4 else "IFLA_VXLAN_LOCAL6"
        data: list[tuple[str, Any]] = [("IFLA_VXLAN_ID", vni), (local_attr, str(local)),
                                       ("IFLA_VXLAN_LEARNING", int(learning))]
        if link:
            data.append(("IFLA_VXLAN_LINK", link))
        if port:
            data.append(("IFLA_VXLAN_PORT", port))
        if gbp:
            data.append(("IFLA_VXLAN_GBP", True))
        attrs: list[tuple[str, Any]] = [("IFLA_IFNAME", name), ("IFLA_TXQLEN", 0)]
        if mtu is not None:
            attrs.append(("IFLA_MTU", mtu))
        if mac is not None:
            attrs.append(("IFLA_ADDRESS", format_mac(parse_mac(mac))))
        attrs.append(("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "vxlan"),
                                                  ("IFLA_INFO_DATA", {"attrs": data})]}))
        self._change(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, IfInfMsg, _LINK, attrs)
        message = self._link_message(name=name)
        if message is None:
            raise OSError(ENODEV, f"{os.strerror(ENODEV)}: {name} is gone right after creation")
        return message["index"]

    def delete_link(self, index: int) -> None:
        self._change(RTM_DELLINK, 0, IfInfMsg, {**_LINK, "index": index})

    def delete_route(self, destination: IPNetwork, index: int,
                     gateway: IPAddress | None = None) -> None:
        """Delete the main table's route for `destination` out of the link (and through
        `gateway` if given), whatever its protocol, scope and type, as `ip route del` does;
        ESRCH if there is none."""
        self._change(RTM_DELROUTE, 0, RtMsg,
                     {**_ROUTE, "family": FAMILY[destination.version],
                      "dst_len": destination.prefixlen, "table": RT_TABLE_MAIN,
                      "proto": RTPROT_UNSPEC, "scope": RT_SCOPE_NOWHERE,
                      "type": RTN_UNSPEC},
                     _route_attrs(destination, index, gateway))

    def routes(self, index: int, version: int = 4) -> list[tuple[IPNetwork, IPAddress | None]]:
        """(destination, gateway) of each IPv4 (or IPv6) route in the main table out of the
        link, the default route as 0.0.0.0/0 (::/0) and gateway None for a route without one.
        Multipath routes, which have no single output interface, are left out."""
        unspecified = "0.0.0.0" if version == 4 else "::"

        def pick(message: Any) -> tuple[IPNetwork, IPAddress | None] | None:
            if message.get_attr("RTA_OIF") != index:
                return None
            return (ipaddress.ip_network((message.get_attr("RTA_DST") or unspecified,
                                          message["dst_len"])),
                    _ip(message.get_attr("RTA_GATEWAY")))

        return self._main_table_routes(pick, version)

    def _neigh(self, kind: int, flags: int, family: int, index: int, state: int, ntf: int,
               attrs: Attrs) -> None:
        # ndm_type RTN_UNICAST as flanneld's netlink library sends it; the kernel ignores it.
        self._change(kind, flags, NdMsg, {"family": family, "ifindex": index, "state": state,
                                          "flags": ntf, "ndm_type": RTN_UNICAST}, attrs)

    def replace_neigh(self, index: int, ip: IPAddress, mac: str) -> None:
        """A permanent ARP (or NDP) entry, as `ip neigh replace IP lladdr MAC dev LINK nud
        permanent`: flanneld's vxlan backend answers for each remote subnet's gateway address
        with it."""
        self._neigh(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, FAMILY[ip.version], index,
                    NUD_PERMANENT, 0,
                    [("NDA_DST", str(ip)), ("NDA_LLADDR", format_mac(parse_mac(mac)))])

    def delete_neigh(self, index: int, ip: IPAddress) -> None:
        """Delete the link's neighbour entry for `ip`; ENOENT if there is none."""
        self._neigh(RTM_DELNEIGH, 0, FAMILY[ip.version], index, 0, 0, [("NDA_DST", str(ip))])

    def _neighbour_dump(self, family: int, index: int, pick: Callable[[Any], T | None]
                        ) -> list[T]:
        """The dump is of every link's and is filtered here: the kernel filters on the header's
        index only for sockets that asked for strict checking."""
        return self._dump(RTM_GETNEIGH, NdMsg, {**_NEIGH, "family": family},
                          lambda message: pick(message) if message["family"] == family
                          and message["ifindex"] == index else None)

    def neighbours(self, index: int, version: int = 4) -> list[tuple[IPAddress, str]]:
        """(address, MAC) of the link's permanent IPv4 (or IPv6) neighbours."""
        def pick(message: Any) -> tuple[IPAddress, str] | None:
            ip, mac = _ip(message.get_attr("NDA_DST")), message.get_attr("NDA_LLADDR")
            if message["state"] & NUD_PERMANENT and ip is not None and mac:
                return ip, _text(mac).lower()
            return None

        return self._neighbour_dump(FAMILY[version], index, pick)

    def replace_fdb(self, index: int, mac: str, dst: IPAddress) -> None:
        """A permanent fdb entry on the vxlan link itself, as `bridge fdb replace MAC dev LINK
        dst DST self permanent`: frames to MAC go in UDP to the remote host DST. Replacing sets
        the MAC's (first) remote, so a remote that moved is not left behind."""
        self._neigh(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, AF_BRIDGE, index, NUD_PERMANENT,
                    NTF_SELF, [("NDA_LLADDR", format_mac(parse_mac(mac))), ("NDA_DST", str(dst))])

    def delete_fdb(self, index: int, mac: str, dst: IPAddress) -> None:
        """Delete the link's fdb entry for MAC to DST; ENOENT if the link has no entry for MAC.
        If MAC's entry goes to another remote, the kernel (vxlan's __vxlan_fdb_delete) answers
        success and deletes nothing, as `bridge fdb del` shows: a remote that moved keeps its
        entry."""
        self._neigh(RTM_DELNEIGH, 0, AF_BRIDGE, index, 0, NTF_SELF,
                    [("NDA_LLADDR", format_mac(parse_mac(mac))), ("NDA_DST", str(dst))])

    def fdb(self, index: int) -> list[tuple[str, IPAddress]]:
        """(MAC, remote) of the link's fdb entries that have a remote (IPv4 or IPv6): a vxlan
        link's. Entries without one (a NIC's own and multicast addresses) are left out."""
        def pick(message: Any) -> tuple[str, IPAddress] | None:
            dst, mac = _ip(message.get_attr("NDA_DST")), message.get_attr("NDA_LLADDR")
            return (_text(mac).lower(), dst) if dst is not None and mac else None

        return self._neighbour_dump(AF_BRIDGE, index, pick)
