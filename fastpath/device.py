"""Opening the fast path's two file descriptors: the TUN device and the UDP socket.

Setup only: plain Python, run once per start. The descriptors are opened in the calling thread's
network namespace.
"""

import fcntl
import os
import socket
import struct

from fastpath.udp_tc import KERNEL_PATH, TCX_LINKS, probe

TUN_CLONE_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETPERSIST = 0x400454CB
SIOCGIFADDR = 0x8915
SIOCGIFMTU = 0x8921
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
# We finish partial checksums and cut TCP super-packets of both families (also ECN-marked ones)
# ourselves.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
TSO_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
IFNAMSIZ = 16

# Missing from Python's socket module: as root these lift the net.core.[rw]mem_max cap; UDP_GRO
# lets one receive return many datagrams of one peer (Linux 5.0); UDP_SEGMENT sends many in one
# buffer (Linux 4.18).
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104


# What the offloaded path needs, by the names the log, FastPath.offload_missing and
# `python -m fastpath` give them.
TUN_OFFLOADS = "TUN offloads (IFF_VNET_HDR, TSO4, TSO6)"
TUN_USO = "UDP segmentation for TUN (USO, Linux 6.2)"


def missing_udp_offloads() -> list[str]:
    """The UDP socket options the offloaded path needs that this kernel lacks (none on 5.0+)."""
    missing = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for name, option in (("UDP_SEGMENT", UDP_SEGMENT), ("UDP_GRO", UDP_GRO)):
            try:
                probe.setsockopt(SOL_UDP, option, 0)
            except OSError:
                missing.append(name)
    return missing


def open_tun(name: str, offload: bool, handed: int = -1) -> tuple[int, str, bool, bool]:
    """Open a TUN device (IFF_TUN | IFF_NO_PI: bare IP packets) named `name`, which may be a
    pattern such as "flannel%d" for the kernel to number. With offload, every packet comes and
    goes behind a virtio_net_hdr and the kernel may hand over TCP super-packets and unfinished
    checksums; a kernel that refuses those offloads gets a plain TUN instead. Returns
    (non-blocking fd, actual name, whether the offloads are on, whether the kernel takes UDP
    super-packets written to the TUN). The device lives while the fd is open.

    `handed`: the fd of a TUN an earlier run kept open (its queue held what was sent to it
    meanwhile), taken instead of a new one when it matches `name` and the offload setting.
    It is closed when it does not."""
    if len(name.encode()) >= IFNAMSIZ:
        raise ValueError(f"TUN name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    if handed >= 0:
        adopted = adopt_tun(handed, name, offload)
        if adopted is not None:
            return adopted
    fd = os.open(TUN_CLONE_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
    try:
        ifreq = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        return offloaded(fd, ifreq[:IFNAMSIZ].rstrip(b"\0").decode(), offload)
    except OSError:
        os.close(fd)
        if offload:
            return open_tun(name, False)
        raise


def adopt_tun(fd: int, name: str, offload: bool) -> tuple[int, str, bool, bool] | None:
    """open_tun's answer for a handed-over TUN fd, or None (fd closed) when it does not fit."""
    try:
        ifreq = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
        actual = ifreq[:IFNAMSIZ].rstrip(b"\0").decode()
        flags = struct.unpack_from("H", ifreq, IFNAMSIZ)[0]
        fits = (flags & (IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
                == IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
                and (actual == name or ("%d" in name and actual.startswith(name.split("%d")[0]))))
        if fits:
            os.set_inheritable(fd, False)
            os.set_blocking(fd, False)
            return offloaded(fd, actual, offload)
    except OSError:
        pass
    os.close(fd)
    return None


def offloaded(fd: int, name: str, offload: bool) -> tuple[int, str, bool, bool]:
    """Turn the TUN's offloads on (when asked; raises when the kernel refuses): open_tun's
    answer."""
    uso = False
    if offload:
        # Linux 6.2+ knows UDP segmentation (USO) for TUN; a kernel that does not refuses
        # the flags. Only writes use it: the reads go back to TCP super-packets alone.
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TSO_OFFLOADS | TUN_F_USO4 | TUN_F_USO6)
            uso = True
        except OSError:
            pass
        fcntl.ioctl(fd, TUNSETOFFLOAD, TSO_OFFLOADS)
    return fd, name, offload, uso


def set_persistent(fd: int, persistent: bool) -> None:
    """Have the TUN behind `fd` outlive its last descriptor (IFF_PERSIST), or not: a persistent
    TUN stays, with its addresses, routes and tc programs, for the next run to open by its name;
    one that is not goes with its last descriptor."""
    fcntl.ioctl(fd, TUNSETPERSIST, int(persistent))


def tun_identity(fd: int) -> tuple[str, int]:
    """The name and MTU of the TUN device behind `fd`."""
    name = fcntl.ioctl(fd, TUNGETIFF, bytes(40))[:IFNAMSIZ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        ifreq = fcntl.ioctl(probe, SIOCGIFMTU, struct.pack("16s24x", name))
    return name.rstrip(b"\0").decode(), struct.unpack_from("i", ifreq, IFNAMSIZ)[0]


def interface_with(ip: str) -> str | None:
    """The name of the interface that has IPv4 address `ip`, if one has (its first address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                ifreq = fcntl.ioctl(probe, SIOCGIFADDR, struct.pack("16s24x", name.encode()))
            except OSError:  # no IPv4 address
                continue
            if socket.inet_ntoa(ifreq[IFNAMSIZ + 4:IFNAMSIZ + 8]) == ip:
                return name
    return None


def open_udp(ip: str, port: int, buffer_bytes: int, gro: bool, handed: int = -1
             ) -> socket.socket:
    """A UDP socket bound to ip:port (IPv4, or IPv6 for an outer-IPv6 fast path) with send
    and receive buffers of buffer_bytes (forced past the system cap when we may, as root),
    receiving with UDP_GRO if asked. `handed`: the fd of a socket an earlier run kept open
    (what arrived meanwhile waits in it), taken when it is bound to ip:port, closed when
    not."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    if handed >= 0:
        sock = socket.socket(fileno=handed)
        if sock.type == socket.SOCK_DGRAM and sock.getsockname()[:2] == (ip, port):
            sock.set_inheritable(False)
            sock.setblocking(True)
            if not gro:  # the earlier run may have had it on
                sock.setsockopt(SOL_UDP, UDP_GRO, 0)
            return configured(sock, buffer_bytes, gro)
        sock.close()
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        configured(sock, buffer_bytes, gro)
        if family == socket.AF_INET6:  # IPv6 peers only: an outer-IPv6 fast path's socket
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((ip, port))
    except OSError:
        sock.close()
        raise
    return sock


def configured(sock: socket.socket, buffer_bytes: int, gro: bool) -> socket.socket:
    """The socket with open_udp's buffers and UDP_GRO setting."""
    try:
        buffers = ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF))
        for forced, plain in buffers:
            try:
                sock.setsockopt(socket.SOL_SOCKET, forced, buffer_bytes)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, plain, buffer_bytes)
        if gro:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        sock.close()
        raise
    return sock


def kernel_features() -> dict[str, bool]:
    """What the fast path's offloads and its kernel path need, as this host offers it: a TUN is
    opened for a moment to ask (and is gone when closed), a socket probed, the tc programs
    loaded and freed; nothing else is touched."""
    missing = missing_udp_offloads()
    fd, _, tun_offload, tun_uso = open_tun("pfprobe%d", True)
    os.close(fd)
    kernel_missing, tcx = probe()
    return {TUN_OFFLOADS: tun_offload,
            "UDP_SEGMENT (send many datagrams at once, Linux 4.18)": "UDP_SEGMENT" not in missing,
            "UDP_GRO (receive many datagrams at once, Linux 5.0)": "UDP_GRO" not in missing,
            TUN_USO: tun_uso,
            KERNEL_PATH: not kernel_missing,
            TCX_LINKS: tcx}
