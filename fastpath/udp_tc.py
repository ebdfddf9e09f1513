"""The udp backend in the kernel: loads udp_tc.bpf.o (see its comment) through libbpf, attaches
its programs (two, and one on the receive device), and keeps its route table equal to the fast
path's.

On Linux 6.6+ the programs hang on tcx links: a link holds its program where it is attached for
as long as any descriptor of it is open. So nothing is left behind by a killed daemon, and the
links and maps handed to systemd's fd store (kept()) go on forwarding through a restart, which
takes them back (start(handed)) without loading the programs again. Older kernels get classic tc
filters, which stay until removed (detach_underlay).

Setup and table writes only, run from the control plane; packets never reach this module. The
programs pass everything unusual to the fast path's own loops, so those keep running beside it.
libbpf is found at run time (Debian's libbpf1): a host without it, or a kernel that refuses the
programs, keeps the loops alone and says why (UdpTcUnavailable).
"""

import ctypes
import errno
import fcntl
import functools
import hashlib
import ipaddress
import os
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass

from fastpath.hello import boot_id

OBJECT_NAME = "udp_tc.bpf.o"
LIBBPF_SONAMES = ("libbpf.so.1", "libbpf.so.0")
# What `tc filter show` names our filters by: their priority is the udp backend's port.
FILTER_PRIORITY = 8285
FILTER_HANDLE = 1
# The daemon's --fastpath-kernel: off, or on (both programs, safe with any peer: see
# udp_tc.bpf.c).
KERNEL_MODES = ("off", "on")
# Its name in `python -m fastpath`'s report.
KERNEL_PATH = "the kernel path (tc-BPF programs through libbpf1, Linux 5.10+)"
TCX_LINKS = "tcx links (the kernel path forwards across a restart, Linux 6.6+)"
# One route entry per subnet; past this a kernel array would be a lot of locked memory for a
# Network nobody fills (the loops' table takes up to 2**24).
MAX_KERNEL_SUBNETS = 1 << 20

NETLINK_ROUTE = 0
RTM_DELTFILTER, RTM_GETQDISC = 45, 38
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCA_KIND = 1
# Queueing disciplines that may cut a TCP super-packet in software on its way out (tbf one
# longer than its burst, cake at low rates, taprio, netem corrupting): where the underlay has
# one, plain super-packets are not sent (udp_tc.bpf.c).
CUTTING_QDISCS = frozenset({"tbf", "cake", "taprio", "netem"})
ETH_P_ALL = 0x0003
TC_INGRESS_PARENT = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
NLMSGHDR = struct.Struct("=IHHII")
TCMSG = struct.Struct("=B3xiIII")  # family, ifindex, handle, parent, info (prio << 16 | proto)

SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x03
ETHTOOL_DRVINFO_SIZE = 196  # struct ethtool_drvinfo: cmd, then the driver's name in 32 bytes
ETHTOOL_GTSO = 0x1E  # struct ethtool_value: cmd, then whether TCP segmentation offload is on

# udp_tc.bpf.c's config flags.
SEND_WHOLE, LOOPS_TAKE_WHOLE, THROUGH_VXLAN, PLAIN_SUPERPACKETS = 1, 2, 4, 8
# The receive-only vxlan device through which the kernel's own VXLAN receive takes the headers
# off a peer's whole super-packet (udp_tc.bpf.c's RX_VXLAN_*). The control plane makes it.
RX_VXLAN_DEVICE = "pyflannel-rx"
RX_VXLAN_PORT = 8473
RX_VXLAN_VNI = 1
# refresh() gives the device up when this many super-packets were handed to it since the last
# refresh and none arrived (a firewall on its port, say): fewer may still be on their way.
RX_VXLAN_LOST = 8

BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_TC_F_REPLACE = 1
BPF_ANY = 0
BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47  # enum bpf_attach_type, Linux 6.6+
BPF_LINK_TYPE_TCX = 11
# struct bpf_link_info up to tcx's members: type, id, prog_id, then (the union is 8-aligned)
# the interface index (0 once the device is gone) and the attach type.
LINK_INFO = struct.Struct("=III4xII")
# struct bpf_map_info up to value_size: type, id, key size, value size.
MAP_INFO = struct.Struct("=IIII")
# udp_tc.bpf.c's struct udp_tc_config: the fields, then the build's hash (BUILD_LEN bytes).
BUILD_LEN = 16
CONFIG = struct.Struct(f"=IIIIIHHIIII16sQQQQIII4x{BUILD_LEN}s")
# Its fields that say which route maps fit it: the Network's (network, netmask, shift, size)
# and the IPv6 Network's (network6, netmask6, shift6, size6).
LAYOUT_FIELDS = (*range(4), *range(12, 18))
# udp_tc.bpf.c's struct peer, whole_peers' value: hello, same_kernel, plain_sent, plain_taken,
# confirmed, plain_received, first_plain, refused.
PEER = struct.Struct("=QQQQQQQQ")
# refresh() refuses a peer plain super-packets when some went to it between one refresh and the
# next and the count its kernel hellos give did not move from the first to three refreshes
# later (it says hello every 2 s): the last PLAIN_REFRESHES refreshes tell.
PLAIN_REFRESHES = 4
# What kept() hands the next run: the links and the maps (the programs live in the links), and
# the vxlan device's program, which its classic filter holds (see UdpTc).
LINKS = {"ingress": ("udp_ingress", BPF_TCX_INGRESS), "egress": ("tun_egress", BPF_TCX_EGRESS)}
MAPS = ("routes", "routes6", "counters", "config", "whole_peers")
VXLAN_PROGRAM = "vxlan_ingress"
KEPT = (*LINKS, *MAPS, VXLAN_PROGRAM)

# The counters of udp_tc.bpf.c's enum udp_tc_counter, in its order.
COUNTER_NAMES = ("tx_packets", "tx_bytes", "tx_passed", "rx_packets", "rx_bytes", "rx_passed",
                 "tx_superpackets", "rx_superpackets", "rx_hellos", "rx_vxlan_handed",
                 "rx_vxlan_arrived", "rx_vxlan_foreign", "rx_in_order", "tx_plain", "rx_plain")


@dataclass(frozen=True)
class PlainPeer:
    """What whole_peers says of a peer on this kernel (udp_tc.bpf.c's struct peer)."""
    sent: int  # plain super-packets sent to it
    taken: int  # of those, how many had arrived, by its last kernel hello
    confirmed: bool  # it said the first arrived: all go plain (before, only that probe)
    received: int  # plain super-packets that arrived from it
    refused: bool  # refused plain ones for good (refresh())


class UdpTcUnavailable(Exception):
    """The kernel path cannot run here; the message says what is missing."""


class _TcHook(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("ifindex", ctypes.c_int),
                ("attach_point", ctypes.c_int), ("parent", ctypes.c_uint32)]


class _TcOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("prog_fd", ctypes.c_int), ("flags", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("handle", ctypes.c_uint32),
                ("priority", ctypes.c_uint32)]


_libbpf: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libbpf
    if _libbpf is None:
        # By soname: ctypes.util.find_library would run ldconfig, on a restart's critical path.
        for soname in LIBBPF_SONAMES:
            try:
                lib = ctypes.CDLL(soname, use_errno=True)
                break
            except OSError:
                continue
        else:
            raise UdpTcUnavailable("libbpf (Debian: libbpf1) is not installed")
        vp = ctypes.c_void_p
        for name, restype, argtypes in (
            ("bpf_object__open_file", vp, [ctypes.c_char_p, vp]),
            ("bpf_object__find_map_by_name", vp, [vp, ctypes.c_char_p]),
            ("bpf_object__find_program_by_name", vp, [vp, ctypes.c_char_p]),
            ("bpf_map__set_max_entries", ctypes.c_int, [vp, ctypes.c_uint32]),
            ("bpf_map__fd", ctypes.c_int, [vp]),
            ("bpf_program__fd", ctypes.c_int, [vp]),
            ("bpf_object__load", ctypes.c_int, [vp]),
            ("bpf_object__close", None, [vp]),
            ("bpf_map_update_elem", ctypes.c_int, [ctypes.c_int, vp, vp, ctypes.c_uint64]),
            ("bpf_map_lookup_elem", ctypes.c_int, [ctypes.c_int, vp, vp]),
            ("bpf_map_get_next_key", ctypes.c_int, [ctypes.c_int, vp, vp]),
            ("bpf_tc_hook_create", ctypes.c_int, [vp]),
            ("bpf_tc_attach", ctypes.c_int, [vp, vp]),
            ("bpf_link_create", ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, vp]),
            ("bpf_obj_get_info_by_fd", ctypes.c_int, [ctypes.c_int, vp, vp]),
            ("bpf_obj_pin", ctypes.c_int, [ctypes.c_int, ctypes.c_char_p]),
            ("bpf_obj_get", ctypes.c_int, [ctypes.c_char_p]),
            ("libbpf_set_print", vp, [vp]),
        ):
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = argtypes
        lib.libbpf_set_print(None)  # its errors come back to us as return codes
        _libbpf = lib
    return _libbpf


def _check(result: int, what: str) -> int:
    if result < 0:
        raise UdpTcUnavailable(f"{what}: {os.strerror(-result)}")
    return result


def _hook(ifindex: int, point: int) -> _TcHook:
    return _TcHook(ctypes.sizeof(_TcHook), ifindex, point, 0)


def _opts(prog_fd: int, flags: int) -> _TcOpts:
    return _TcOpts(ctypes.sizeof(_TcOpts), prog_fd, flags, 0, FILTER_HANDLE, FILTER_PRIORITY)


def _netlink() -> socket.socket:
    """A route netlink socket: it stays in the network namespace it was opened in."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    sock.bind((0, 0))
    return sock


def detach_underlay(ifindex: int, sock: socket.socket | None = None) -> bool:
    """Remove our filter from the underlay's ingress (one a killed daemon left there points at
    a TUN that is gone), through `sock` or a new socket in the calling thread's namespace.
    Returns whether there was one."""
    owned = sock is None
    sock = sock or _netlink()
    try:
        body = TCMSG.pack(socket.AF_UNSPEC, ifindex, FILTER_HANDLE, TC_INGRESS_PARENT,
                          FILTER_PRIORITY << 16 | socket.htons(ETH_P_ALL))
        kind = b"bpf\0"
        body += struct.pack("=HH", 4 + len(kind), TCA_KIND) + kind
        sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), RTM_DELTFILTER,
                                NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body)
        reply = sock.recv(65536)
        error = struct.unpack_from("=i", reply, NLMSGHDR.size)[0]
        return error == 0
    finally:
        if owned:
            sock.close()


def _ethtool(ifname: str, command: int, size: int) -> bytes | None:
    """What ethtool's ioctl `command` answers for the interface, in the calling thread's
    namespace; None when it does not answer."""
    answer = ctypes.create_string_buffer(struct.pack("=I", command), size)
    ifreq = struct.pack("16sP16x", ifname.encode(), ctypes.addressof(answer))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            fcntl.ioctl(sock, SIOCETHTOOL, ifreq)
        except OSError:
            return None
    return answer.raw


def qdiscs(ifindex: int) -> set[str]:
    """The kinds of the queueing disciplines on the interface ("fq_codel", "tbf"...), of the
    calling thread's network namespace."""
    with _netlink() as sock:
        sock.send(NLMSGHDR.pack(NLMSGHDR.size + TCMSG.size, RTM_GETQDISC,
                                NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + bytes(TCMSG.size))
        kinds = set()
        while True:
            reply = sock.recv(1 << 16)
            offset = 0
            while offset < len(reply):
                length, kind, _, _, _ = NLMSGHDR.unpack_from(reply, offset)
                if kind in (NLMSG_DONE, NLMSG_ERROR):
                    return kinds
                if TCMSG.unpack_from(reply, offset + NLMSGHDR.size)[1] == ifindex:
                    attr = offset + NLMSGHDR.size + TCMSG.size
                    while attr + 4 <= offset + length:
                        size, name = struct.unpack_from("=HH", reply, attr)
                        if name == TCA_KIND:
                            kinds.add(reply[attr + 4:attr + size].rstrip(b"\0").decode())
                        attr += (size + 3) & ~3
                offset += (length + 3) & ~3


def driver(ifname: str) -> str:
    """The interface's driver ("veth", "virtio_net", "mlx5_core"...); "" when it has none to
    tell."""
    info = _ethtool(ifname, ETHTOOL_GDRVINFO, ETHTOOL_DRVINFO_SIZE)
    return "" if info is None else info[4:36].split(b"\0", 1)[0].decode()


def segments_tcp(ifname: str) -> bool:
    """Whether the interface takes TCP super-packets to send (TSO on): a veth then hands them
    to its peer whole; with it off the kernel cuts them in software first (make perf's `wire`)."""
    value = _ethtool(ifname, ETHTOOL_GTSO, 8)
    return value is not None and struct.unpack_from("=I", value, 4)[0] != 0


def _object_path() -> str:
    path = os.path.join(os.path.dirname(__file__), OBJECT_NAME)
    if not os.path.isfile(path):
        raise UdpTcUnavailable(f"{OBJECT_NAME} was not built (clang is needed at build time)")
    return path


@functools.cache
def _build() -> bytes:
    """This build's hash of the object: the config map carries it (udp_tc.bpf.c's build), so
    that a restart after an upgrade tells kept programs from its own."""
    with open(_object_path(), "rb") as f:
        return hashlib.sha256(f.read()).digest()[:BUILD_LEN]


def _load(lib: ctypes.CDLL, routes: int, routes6: int = 1) -> int:
    """Open the object and load its programs (the verifier checks them here) with a route map
    of `routes` entries, and a next-hop cache as long, and an IPv6 route map of `routes6`;
    returns the bpf_object, which the caller closes."""
    path = _object_path()
    obj = lib.bpf_object__open_file(path.encode(), None)
    if not obj:
        raise UdpTcUnavailable(f"opening {OBJECT_NAME}: {os.strerror(ctypes.get_errno())}")
    try:
        for name, entries in ((b"routes", routes), (b"next_hops", routes), (b"routes6", routes6)):
            _check(lib.bpf_map__set_max_entries(lib.bpf_object__find_map_by_name(obj, name),
                                                entries), f"sizing the map {name.decode()}")
        _check(lib.bpf_object__load(obj), "loading the tc programs (needs root and Linux 5.10+)")
    except UdpTcUnavailable:
        lib.bpf_object__close(obj)
        raise
    return obj


def probe() -> tuple[str, bool]:
    """Why the kernel path cannot run here ("" when it can), and whether the kernel links its
    programs (tcx): they are loaded and freed again, and nothing is attached. A link to no
    interface is refused for the interface (ENODEV) by a kernel with tcx, and for its attach
    type (EINVAL) by an older one."""
    try:
        lib = _lib()
        obj = _load(lib, 1)
    except UdpTcUnavailable as err:
        return str(err), False
    try:
        program = lib.bpf_program__fd(lib.bpf_object__find_program_by_name(obj, b"udp_ingress"))
        link = lib.bpf_link_create(program, 0, BPF_TCX_INGRESS, None)
        if link >= 0:  # no kernel links to interface 0; let go at once if one did
            os.close(link)
        return "", link == -errno.ENODEV
    finally:
        lib.bpf_object__close(obj)


def _halves(address: ipaddress.IPv6Address) -> tuple[int, int]:
    """An IPv6 address as udp_tc.bpf.c's config holds it: two host-order 64-bit halves."""
    return int(address) >> 64, int(address) & ((1 << 64) - 1)


def _int(address: ipaddress.IPv4Address | str) -> int:
    """An IPv4 address as the u32 that holds its network-order bytes in host memory (on either
    byte order: the programs compare it with the packet's bytes as they lie)."""
    return struct.unpack("=I", ipaddress.IPv4Address(address).packed)[0]


class UdpTc:
    """The programs, their maps and their attachments, for one TUN and one underlay interface
    (named; a veth gets tun_egress's care for peers that take frames as they come).

    With `receiver`, the name of the receive-only vxlan device (RX_VXLAN_DEVICE, made down by
    the caller) on a veth underlay where peers' whole super-packets arrive, those go through it
    (udp_tc.bpf.c): vxlan_ingress is attached to its ingress as a classic tc filter, which stays
    when this process is gone, so the device's port never takes anything but what udp_ingress
    hands it. through_vxlan says whether they do; why not, in vxlan_missing. tun_egress sends
    by a next hop it looks up ten times a second, not for every packet (udp_tc.bpf.c's struct
    next_hop).

    set_route/del_route take the same subnets as the fast path's tables (of either family) and
    may be called while packets flow; each is one map write. With ipv6_network (cut into
    ipv6_subnet_len subnets) the programs carry IPv6 too, within `mtu` (flannel0's); an IPv6
    Network of more than MAX_KERNEL_SUBNETS subnets is left to the loops (carries_ipv6 False).
    """

    def __init__(self, network: ipaddress.IPv4Network, subnet_len: int,
                 local_ip: ipaddress.IPv4Address | str, port: int, tun_ifindex: int,
                 underlay: str, verify_source: bool = True,
                 send_whole: bool = False, loops_take_whole: bool = False,
                 receiver: str = "", plain: bool = False,
                 ipv6_network: ipaddress.IPv6Network | str | None = None,
                 ipv6_subnet_len: int = 64, mtu: int = 1472) -> None:
        self.network = ipaddress.IPv4Network(network)
        self.subnet_len = subnet_len
        self.size = 1 << (subnet_len - self.network.prefixlen)
        if self.size > MAX_KERNEL_SUBNETS:
            raise UdpTcUnavailable(f"{self.network} cut into /{subnet_len} is {self.size} "
                                   f"subnets, more than the kernel path's {MAX_KERNEL_SUBNETS}")
        self.network6 = None if ipv6_network is None else ipaddress.IPv6Network(ipv6_network)
        self.subnet6_len = ipv6_subnet_len
        self.size6 = 0 if self.network6 is None else 1 << (
            ipv6_subnet_len - self.network6.prefixlen)
        if self.size6 > MAX_KERNEL_SUBNETS:
            self.size6 = 0
        self.carries_ipv6 = self.size6 != 0
        self.underlay_ifindex = socket.if_nametoindex(underlay)
        self.underlay = underlay
        self.underlay_is_veth = driver(underlay) == "veth"
        self.tun_ifindex = tun_ifindex
        self._send_whole = send_whole and self.underlay_is_veth
        self._loops_take_whole = loops_take_whole
        # Plain super-packets with peers on this kernel: taken from them whenever the programs
        # run (what says so is the kernel hello, fastpath/hello.py), sent where whole ones go
        # by the next-hop cache.
        self.plain = plain
        self._plain_seen: dict[str, deque[tuple[int, int]]] = {}  # (sent, taken) per refresh
        self.receiver_ifindex = 0
        self.vxlan_missing = _vxlan_missing(receiver, loops_take_whole, self.underlay_is_veth)
        if receiver and not self.vxlan_missing:
            try:
                self.receiver_ifindex = socket.if_nametoindex(receiver)
            except OSError:
                self.vxlan_missing = f"there is no device {receiver}"
        self.through_vxlan = self.receiver_ifindex != 0
        self._vxlan_seen = (0, 0)  # (handed, arrived) at the last refresh
        self._config_fields = (
            _int(self.network.network_address), _int(self.network.netmask), 32 - subnet_len,
            self.size, _int(local_ip), _port(port))
        network6 = self.network6 if self.carries_ipv6 else ipaddress.IPv6Network("::/128")
        self._config_tail = (self.underlay_ifindex, tun_ifindex, self.underlay_is_veth,
                             verify_source, boot_id(), *_halves(network6.network_address),
                             *_halves(network6.netmask), 128 - ipv6_subnet_len, self.size6, mtu)
        self.sends_whole = self.sends_plain = False
        self._config = self._pack_config()
        # Where each program goes: name in LINKS -> interface index (ingress first).
        self._targets = {"ingress": self.underlay_ifindex, "egress": tun_ifindex}
        self._fds: dict[str, int] = {}  # the links (tcx) and the maps, by name in KEPT
        self._ingress_filter = False  # a classic tc filter, which only a detach removes
        self._netlink: socket.socket | None = None

    def _pack_config(self) -> bytes:
        """udp_tc.bpf.c's struct udp_tc_config for now; sends_whole says whether it sends whole
        super-packets to the peers that said hello: asked for, and the veth hands them over
        whole, which it does with TSO on (on any other device they go out whole anyway, for the
        device to cut); sends_plain whether they go plain to peers on this kernel: asked for,
        with whole ones, and no queueing discipline on the underlay that could cut them
        (CUTTING_QDISCS)."""
        self.sends_whole = self._send_whole and segments_tcp(self.underlay)
        self.sends_plain = self.plain and self.sends_whole and not (
            qdiscs(self.underlay_ifindex) & CUTTING_QDISCS)
        flags = (SEND_WHOLE if self.sends_whole else 0) | (
            LOOPS_TAKE_WHOLE if self._loops_take_whole else 0) | (
            THROUGH_VXLAN if self.through_vxlan else 0) | (
            PLAIN_SUPERPACKETS if self.sends_plain else 0)
        return CONFIG.pack(*self._config_fields, flags, *self._config_tail, _build())

    def refresh(self) -> dict[str, str]:
        """Follow the underlay's TSO setting and queueing disciplines (ethtool -K and tc can
        change them at any time): whole
        super-packets onto a veth that cuts them in software would reach the peer as datagrams
        that its UDP GRO does not merge (their UDP checksum is 0), slower than the loops' way.
        And give the vxlan device up, for good, when what udp_ingress hands it does not arrive:
        the loops take whole super-packets then. Called every few seconds (the daemon: every
        HELLO_SECONDS); returns the peers refused plain super-packets by this call, and why
        (_check_plain)."""
        if self.through_vxlan and "counters" in self._fds:
            counters = self.counters()  # arrived is read after handed: never ahead of it
            seen = (counters["rx_vxlan_handed"], counters["rx_vxlan_arrived"])
            handed, arrived = seen[0] - self._vxlan_seen[0], seen[1] - self._vxlan_seen[1]
            self._vxlan_seen = seen
            if handed >= RX_VXLAN_LOST and arrived == 0:
                self.forgo_vxlan(f"{handed} super-packets handed to it did not arrive (a "
                                 f"firewall on UDP port {RX_VXLAN_PORT}?)")
        self._write_config()
        return self._check_plain() if self.plain and "whole_peers" in self._fds else {}

    def _check_plain(self) -> dict[str, str]:
        """Refuse, for good, plain super-packets to a peer whose kernel hellos say that none of
        those sent it between the last refresh but three and the one after arrived: something
        on the way cuts them (udp_tc.bpf.c), and so drops every one. Marked ones, which anything
        may cut, go there then. A loss here and there (a full queue) leaves the count moving,
        and a TCP flow whose every super-packet is lost sends few more, so one is enough. A
        probe that got lost (the programs hold the rest back already) is refused so, too."""
        refused = {}
        peers = self.plain_peers()
        for ip in self._plain_seen.keys() - peers.keys():
            del self._plain_seen[ip]
        for ip, peer in peers.items():
            if peer.refused:
                continue
            seen = self._plain_seen.setdefault(ip, deque(maxlen=PLAIN_REFRESHES))
            seen.append((peer.sent, peer.taken))
            if len(seen) < PLAIN_REFRESHES:
                continue
            (sent0, taken0), (sent1, _), _, (_, taken3) = seen
            if sent1 > sent0 and taken3 == taken0:
                self._refuse(ip)
                refused[ip] = (f"none of {sent1 - sent0} plain super-packets sent to it arrived "
                               f"(a device on the way with TSO off?)")
        return refused

    def _refuse(self, ip: str) -> None:
        lib, fd = _lib(), self._fds["whole_peers"]
        key, value = ctypes.c_uint32(_int(ip)), ctypes.create_string_buffer(PEER.size)
        if lib.bpf_map_lookup_elem(fd, ctypes.byref(key), value) == 0:
            fields = list(PEER.unpack(value.raw))
            fields[-1] = 1
            value.raw = PEER.pack(*fields)
            lib.bpf_map_update_elem(fd, ctypes.byref(key), value, BPF_ANY)

    def forgo_vxlan(self, why: str) -> None:
        """Leave whole super-packets to the loops from now on, not the vxlan device."""
        if self.through_vxlan:
            self.through_vxlan = False
            self.vxlan_missing = why
            self._write_config()

    def _write_config(self) -> None:
        config = self._pack_config()
        if config != self._config and "config" in self._fds:
            self._update(self._fds["config"], 0, config)
        self._config = config

    def whole_peers(self) -> dict[str, float]:
        """The peers whose hello the ingress program noted: PublicIP -> seconds since."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # bpf_ktime_get_ns()'s clock
        return {ip: (now - peer[0]) / 1e9 for ip, peer in self._peers().items() if peer[0]}

    def plain_peers(self) -> dict[str, PlainPeer]:
        """The peers on this kernel, by PublicIP: those whose kernel hello the ingress program
        noted or that sent plain super-packets."""
        return {ip: PlainPeer(sent, taken, bool(confirmed), received, bool(refused))
                for ip, (_, same, sent, taken, confirmed, received, _, refused)
                in self._peers().items() if same or received}

    def _peers(self) -> dict[str, tuple[int, ...]]:
        """whole_peers as it is: PublicIP -> PEER's fields."""
        lib, fd = _lib(), self._fds["whole_peers"]
        key, next_key = ctypes.c_uint32(), ctypes.c_uint32()
        value = ctypes.create_string_buffer(PEER.size)
        peers = {}
        previous = None
        while lib.bpf_map_get_next_key(fd, previous, ctypes.byref(next_key)) == 0:
            key.value = next_key.value
            if lib.bpf_map_lookup_elem(fd, ctypes.byref(key), value) == 0:
                peers[str(ipaddress.IPv4Address(bytes(key)))] = PEER.unpack(value.raw)
            previous = ctypes.byref(key)
        return peers

    @property
    def linked(self) -> bool:
        """Whether the programs hang on tcx links (Linux 6.6+), not classic tc filters."""
        return "ingress" in self._fds

    def start(self, handed: dict[str, int] | None = None) -> bool:
        """Go on with the links and maps an earlier run kept (kept()), taken out of `handed`
        (closed when they do not fit), or load the programs and attach them with an empty
        route map. Returns whether it went on with kept ones, routes included. On any failure
        nothing is left behind."""
        lib = _lib()
        try:
            self._netlink = _netlink()  # detaches in this namespace, whichever thread stops
            adopted = self._adopt(lib, handed or {})
            if not adopted:
                obj = _load(lib, self.size, max(self.size6, 1))
                try:  # what is attached holds its program, and a program its maps
                    self._attach(lib, obj)
                finally:
                    lib.bpf_object__close(obj)
            if self.through_vxlan:
                try:
                    self._guard_receiver(lib)
                except UdpTcUnavailable as err:
                    self.forgo_vxlan(str(err))
            return adopted
        except BaseException:
            self.stop()
            raise

    def _adopt(self, lib: ctypes.CDLL, handed: dict[str, int]) -> bool:
        kept = {name: handed.pop(name) for name in KEPT if name in handed}
        wanted = {*self._targets, *MAPS, *((VXLAN_PROGRAM,) if self.through_vxlan else ())}
        # Kept by another build (an upgrade), or for other Networks (route maps of other
        # sizes): its programs and maps are not this one's, so this run loads its own.
        config = _kept_config(lib, kept["config"]) if "config" in kept else None
        fits = set(kept) == wanted and all(
            _link_target(lib, kept[name]) == (ifindex, LINKS[name][1])
            for name, ifindex in self._targets.items()) and config is not None and \
            config[-BUILD_LEN:] == _build() and _layout(config) == _layout(self._config)
        if not fits:
            for fd in kept.values():
                os.close(fd)
            return False
        self._fds = kept
        self._update(kept["config"], 0, self._config)  # this run's verify_source and flags
        return True

    def _attach(self, lib: ctypes.CDLL, obj: int) -> None:
        """tcx links where the kernel has them, else classic tc filters (Linux 5.10+)."""
        for name in MAPS:
            self._fds[name] = os.dup(lib.bpf_map__fd(
                lib.bpf_object__find_map_by_name(obj, name.encode())))
        if self.through_vxlan:
            self._fds[VXLAN_PROGRAM] = os.dup(lib.bpf_program__fd(
                lib.bpf_object__find_program_by_name(obj, VXLAN_PROGRAM.encode())))
        self._update(self._fds["config"], 0, self._config)
        programs = {name: lib.bpf_program__fd(lib.bpf_object__find_program_by_name(
            obj, LINKS[name][0].encode())) for name in self._targets}
        for name, ifindex in self._targets.items():  # ingress first
            link = lib.bpf_link_create(programs[name], ifindex, LINKS[name][1], None)
            if name == "ingress" and -link in (errno.EINVAL, errno.EOPNOTSUPP):  # no tcx
                self._attach_filters(lib, programs)
                return
            self._fds[name] = _check(link, f"linking {LINKS[name][0]} to interface {ifindex}")
        # A classic filter that a killed daemon on an older kernel path left behind.
        detach_underlay(self.underlay_ifindex, self._netlink)

    def _guard_receiver(self, lib: ctypes.CDLL) -> None:
        """vxlan_ingress on the vxlan device's ingress, in place of the one a previous run put
        there: a classic filter, so that it outlives this process with the device."""
        _attach_filter(lib, self.receiver_ifindex, BPF_TC_INGRESS, self._fds[VXLAN_PROGRAM],
                       VXLAN_PROGRAM)

    def _attach_filters(self, lib: ctypes.CDLL, programs: dict[str, int]) -> None:
        for name, ifindex in self._targets.items():
            point = BPF_TC_INGRESS if name == "ingress" else BPF_TC_EGRESS
            _attach_filter(lib, ifindex, point, programs[name], LINKS[name][0])
            self._ingress_filter |= name == "ingress"

    def kept(self) -> dict[str, int]:
        """The descriptors that keep the programs forwarding after this process is gone, and
        let the next run go on with them (start(handed)), by name in KEPT; none with classic
        filters."""
        return dict(self._fds) if self.linked else {}

    def stop(self) -> None:
        """Detach the programs and free them, unless their links are also held elsewhere (the
        fd store): the last descriptor of a link detaches it. A TUN's filter goes with the
        TUN."""
        if self._netlink is not None:
            if self._ingress_filter:
                detach_underlay(self.underlay_ifindex, self._netlink)
            self._netlink.close()
            self._netlink = None
        self._ingress_filter = False
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def _entry(self, subnet: ipaddress.IPv4Network | ipaddress.IPv6Network | str
               ) -> tuple[str, int] | None:
        """The route map and key of `subnet`; None for an IPv6 one where IPv6 is not carried."""
        sub = ipaddress.ip_network(subnet)
        if isinstance(sub, ipaddress.IPv6Network):
            if self.network6 is None or not self.carries_ipv6:
                return None
            fits = sub.prefixlen == self.subnet6_len and sub.subnet_of(self.network6)
            network: ipaddress.IPv4Network | ipaddress.IPv6Network = self.network6
            length, name = self.subnet6_len, "routes6"
        else:
            fits = sub.prefixlen == self.subnet_len and sub.subnet_of(self.network)
            network, length, name = self.network, self.subnet_len, "routes"
        if not fits:
            raise ValueError(f"{sub} is not a /{length} subnet of {network}")
        return name, (int(sub.network_address) - int(network.network_address)) >> (
            network.max_prefixlen - length)

    def _update(self, fd: int, key: int, value: bytes) -> None:
        k = ctypes.c_uint32(key)
        v = ctypes.create_string_buffer(value, len(value))
        if _lib().bpf_map_update_elem(fd, ctypes.byref(k), v, BPF_ANY) < 0:
            raise OSError(ctypes.get_errno(), f"bpf map update: {os.strerror(ctypes.get_errno())}")

    def set_route(self, subnet: ipaddress.IPv4Network | ipaddress.IPv6Network | str,
                  ip: ipaddress.IPv4Address | str, port: int) -> None:
        entry = self._entry(subnet)
        if entry is not None:
            self._update(self._fds[entry[0]], entry[1],
                         struct.pack("=IHH", _int(ip), _port(port), 0))

    def del_route(self, subnet: ipaddress.IPv4Network | ipaddress.IPv6Network | str) -> None:
        entry = self._entry(subnet)
        if entry is not None:
            self._update(self._fds[entry[0]], entry[1], bytes(8))

    def counters(self) -> dict[str, int]:
        """The programs' counters, summed over the CPUs."""
        cpus = _possible_cpus()
        values = (ctypes.c_uint64 * cpus)()
        result = {}
        for key, name in enumerate(COUNTER_NAMES):
            k = ctypes.c_uint32(key)
            if _lib().bpf_map_lookup_elem(self._fds["counters"], ctypes.byref(k), values) < 0:
                raise OSError(ctypes.get_errno(), "bpf counter lookup")
            result[name] = sum(values)
        return result


def _attach_filter(lib: ctypes.CDLL, ifindex: int, point: int, program: int, name: str) -> None:
    """A classic tc filter (priority FILTER_PRIORITY) for the program at the interface's
    ingress or egress, in place of ours already there."""
    hook = _hook(ifindex, point)
    created = lib.bpf_tc_hook_create(ctypes.byref(hook))
    if created < 0 and created != -errno.EEXIST:
        _check(created, f"adding the clsact qdisc to interface {ifindex}")
    _check(lib.bpf_tc_attach(ctypes.byref(hook),
                             ctypes.byref(_opts(program, BPF_TC_F_REPLACE))),
           f"attaching {name} to interface {ifindex}")


def _vxlan_missing(receiver: str, loops_take_whole: bool, underlay_is_veth: bool) -> str:
    """Why whole super-packets do not go through the vxlan device ("" when they do)."""
    if not receiver:
        return "not asked for"
    if not loops_take_whole:
        return "no whole super-packets are taken (offloads off)"
    if not underlay_is_veth:
        return "super-packets arrive whole only over a veth"
    return ""


def _link_target(lib: ctypes.CDLL, fd: int) -> tuple[int, int] | None:
    """(interface index, attach type) of a tcx link; None for another descriptor."""
    info = ctypes.create_string_buffer(64)
    size = ctypes.c_uint32(len(info))
    if lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)) < 0:
        return None
    kind, _, _, ifindex, attach_type = LINK_INFO.unpack_from(info)
    return (ifindex, attach_type) if kind == BPF_LINK_TYPE_TCX else None


def _layout(config: bytes) -> tuple[int, ...]:
    """The fields of a packed config that the route maps' sizes follow (LAYOUT_FIELDS)."""
    fields = CONFIG.unpack(config)
    return tuple(fields[i] for i in LAYOUT_FIELDS)


def _kept_config(lib: ctypes.CDLL, fd: int) -> bytes | None:
    """The value of a kept config map, the build hash last; None for a map of another layout
    (an older build's) or another descriptor."""
    info = ctypes.create_string_buffer(80)
    size = ctypes.c_uint32(len(info))
    if lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)) < 0 or \
            MAP_INFO.unpack_from(info)[2:] != (4, CONFIG.size):
        return None
    key, value = ctypes.c_uint32(0), ctypes.create_string_buffer(CONFIG.size)
    if lib.bpf_map_lookup_elem(fd, ctypes.byref(key), value) < 0:
        return None
    return value.raw


def _port(port: int) -> int:
    """A UDP port as the u16 that holds its network-order bytes in host memory."""
    return struct.unpack("=H", port.to_bytes(2, "big"))[0]


def _possible_cpus() -> int:
    """How many slots a per-CPU map has: the kernel's possible CPUs (e.g. "0-3")."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def pin(fd: int, path: str) -> None:
    """Pin the BPF link, map or program behind `fd` at `path` in a bpffs: it outlives this
    process (a pinned link stays attached) until the pin is removed. OSError when it cannot."""
    result = _lib().bpf_obj_pin(fd, path.encode())
    if result < 0:
        raise OSError(-result, f"pinning at {path}: {os.strerror(-result)}")


def pinned(path: str) -> int:
    """A new descriptor of the BPF object pinned at `path`. OSError when there is none."""
    fd = _lib().bpf_obj_get(path.encode())
    if fd < 0:
        raise OSError(-fd, f"{path}: {os.strerror(-fd)}")
    return fd
