"""The hello by which a pyflannel host tells its peers that it takes whole TCP super-packets
(fastpath/udp_tc.bpf.c says why they matter and how a peer's kernel path notes it).

One datagram to each peer every HELLO_SECONDS, from the fast path's own socket; its payload an
IPv4 packet with TTL 1, protocol HELLO_PROTOCOL and HELLO_MAGIC as its payload, from this host's
subnet to the peer's. A flanneld drops it as a packet whose TTL ran out, so it never says hello
back and never gets a whole super-packet. A peer that stops saying it (a flanneld took its place)
stops getting them within the validity udp_tc.bpf.c gives a hello (HELLO_VALID_NS: 7 s).
"""

import ipaddress
import struct

from fastpath.packet import ipv4_checksum

HELLO_PROTOCOL = 253  # RFC 3692: for experiments
HELLO_MAGIC = b"pyflannel-whole1"
HELLO_SECONDS = 2.0
HELLO_TTL = 1
IPV4_DF = 0x4000


def hello_packet(source: ipaddress.IPv4Address, destination: ipaddress.IPv4Address) -> bytes:
    """The IPv4 packet of a hello from `source` (an address of this host's subnet) to
    `destination` (one of the peer's)."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(HELLO_MAGIC), 0, IPV4_DF, HELLO_TTL,
                         HELLO_PROTOCOL, 0, source.packed, destination.packed)
    return header[:10] + struct.pack("!H", ipv4_checksum(header)) + header[12:] + HELLO_MAGIC
