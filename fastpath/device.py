"""Opening the fast path's two file descriptors: the TUN device and the UDP socket.

Setup only: plain Python, run once per start. The descriptors are opened in the calling thread's
network namespace.
"""

import fcntl
import os
import socket
import struct

TUN_CLONE_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16

# Missing from Python's socket module: as root these lift the net.core.[rw]mem_max cap.
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33


def open_tun(name: str) -> tuple[int, str]:
    """Open a TUN device (IFF_TUN | IFF_NO_PI: bare IP packets) named `name`, which may be a
    pattern such as "flannel%d" for the kernel to number. Returns (non-blocking fd, actual name).
    The device lives as long as the fd stays open."""
    if len(name.encode()) >= IFNAMSIZ:
        raise ValueError(f"TUN name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    fd = os.open(TUN_CLONE_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifreq = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
        ifreq = fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except OSError:
        os.close(fd)
        raise
    return fd, ifreq[:IFNAMSIZ].rstrip(b"\0").decode()


def open_udp(ip: str, port: int, buffer_bytes: int) -> socket.socket:
    """A UDP socket bound to ip:port with send and receive buffers of buffer_bytes. The buffers
    are forced past the system cap when we may (root), else as large as the cap allows."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        buffers = ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF))
        for forced, plain in buffers:
            try:
                sock.setsockopt(socket.SOL_SOCKET, forced, buffer_bytes)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, plain, buffer_bytes)
        sock.bind((ip, port))
    except OSError:
        sock.close()
        raise
    return sock
