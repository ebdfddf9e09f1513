"""The hellos by which a pyflannel host tells its peers what it takes (fastpath/udp_tc.bpf.c says
why they matter and how a peer's kernel path notes them).

The hello says it takes whole TCP super-packets. One datagram to each peer every HELLO_SECONDS,
from the fast path's own socket; its payload an IPv4 packet with TTL 1, protocol HELLO_PROTOCOL
and HELLO_MAGIC as its payload, from this host's subnet to the peer's. A flanneld drops it as a
packet whose TTL ran out, so it never says hello back and never gets a whole super-packet. A
peer that stops saying it (a flanneld took its place) stops getting them within the validity
udp_tc.bpf.c gives a hello (HELLO_VALID_NS: 7 s).

The kernel hello, sent beside it where the kernel path takes plain super-packets, says which
kernel this host runs on (its boot ID) and how many plain super-packets from that peer have
arrived: KERNEL_MAGIC, the 16 bytes of the boot ID, and the count as 8 bytes, big-endian. A peer
on the same kernel sends plain ones while that count keeps up; an older pyflanneld drops the
kernel hello as it drops any packet whose TTL ran out.
"""

import functools
import ipaddress
import struct
import uuid

from fastpath.packet import ipv4_checksum

HELLO_PROTOCOL = 253  # RFC 3692: for experiments
HELLO_MAGIC = b"pyflannel-whole1"
KERNEL_MAGIC = b"pyflannel-kernel"
HELLO_SECONDS = 2.0
HELLO_TTL = 1
IPV4_DF = 0x4000
BOOT_ID = "/proc/sys/kernel/random/boot_id"


@functools.cache
def boot_id() -> bytes:
    """This kernel's boot ID, the same in every network namespace and for its whole life: 16
    bytes."""
    with open(BOOT_ID) as f:
        return uuid.UUID(f.read().strip()).bytes


def hello_packet(source: ipaddress.IPv4Address, destination: ipaddress.IPv4Address) -> bytes:
    """The IPv4 packet of a hello from `source` (an address of this host's subnet) to
    `destination` (one of the peer's)."""
    return _packet(source, destination, HELLO_MAGIC)


def kernel_hello_packet(source: ipaddress.IPv4Address, destination: ipaddress.IPv4Address,
                        kernel: bytes, taken: int) -> bytes:
    """The IPv4 packet of a kernel hello, as hello_packet: this kernel's boot ID, and how many
    plain super-packets from the peer have arrived."""
    return _packet(source, destination, KERNEL_MAGIC + kernel + struct.pack("!Q", taken))


def _packet(source: ipaddress.IPv4Address, destination: ipaddress.IPv4Address,
            payload: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, IPV4_DF, HELLO_TTL,
                         HELLO_PROTOCOL, 0, source.packed, destination.packed)
    return header[:10] + struct.pack("!H", ipv4_checksum(header)) + header[12:] + payload
