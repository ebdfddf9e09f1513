"""The offload stage, table-driven: finishing partial checksums, cutting TCP super-packets into
wire-sized segments, and coalescing received segments back, against from-scratch checksums."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from fastpath import offload
from tests.test_packet import reference_checksum

NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4 = 1, 0, 1, 4, 5
FIN, PSH, ACK, CWR = 0x01, 0x08, 0x10, 0x80
SRC, DST = "10.244.1.2", "10.244.2.2"


def vnet(flags: int = 0, gso_type: int = GSO_NONE, hdr_len: int = 0, gso_size: int = 0,
         csum_start: int = 0, csum_offset: int = 0) -> bytes:
    return struct.pack("=BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def pseudo(packet: bytes) -> bytes:
    return packet[12:20] + struct.pack("!BBH", 0, packet[9], len(packet) - 20)


def ip_header(total: int, proto: int, *, ident: int = 7, ttl: int = 63, tos: int = 0,
              src: str = SRC, dst: str = DST) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, tos, total, ident, 0x4000, ttl, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    return header[:10] + struct.pack("!H", reference_checksum(header)) + header[12:]


def tcp_packet(payload: bytes, *, seq: int = 1000, flags: int = ACK, options: bytes = b"",
               sport: int = 40000, dport: int = 5201, ack: int = 99, window: int = 512,
               **ip: object) -> bytes:
    """A TCP/IPv4 packet with both checksums correct."""
    header_len = 20 + len(options)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (header_len // 4) << 4, flags,
                      window, 0, 0) + options + payload
    packet = ip_header(20 + len(tcp), socket.IPPROTO_TCP, **ip) + tcp  # type: ignore[arg-type]
    checksum = reference_checksum(pseudo(packet) + tcp)
    return packet[:36] + struct.pack("!H", checksum) + packet[38:]


def udp_packet(payload: bytes, *, sport: int = 5000, **ip: object) -> bytes:
    udp = struct.pack("!HHHH", sport, 53, 8 + len(payload), 0) + payload
    packet = ip_header(20 + len(udp), socket.IPPROTO_UDP, **ip) + udp  # type: ignore[arg-type]
    checksum = reference_checksum(pseudo(packet) + udp) or 0xFFFF
    return packet[:26] + struct.pack("!H", checksum) + packet[28:]


def tcp_fields(packet: bytes) -> tuple[int, int, int, bytes]:
    """(ip id, seq, flags, payload)."""
    header_len = (packet[32] >> 4) * 4
    return (struct.unpack("!H", packet[4:6])[0], struct.unpack("!I", packet[24:28])[0],
            packet[33], packet[20 + header_len:])


def assert_checksums_valid(packet: bytes) -> None:
    assert reference_checksum(packet[:20]) == 0, "IPv4 header checksum"
    assert reference_checksum(pseudo(packet) + packet[20:]) == 0, "L4 checksum"
    assert struct.unpack("!H", packet[2:4])[0] == len(packet)


def partial(packet: bytes, csum_offset: int) -> bytes:
    """The packet as the kernel hands it over with NEEDS_CSUM: the L4 checksum field holds the
    folded pseudo-header sum."""
    folded = ~reference_checksum(pseudo(packet)) & 0xFFFF
    at = 20 + csum_offset
    return packet[:at] + struct.pack("!H", folded) + packet[at + 2:]


@pytest.mark.parametrize(("packet", "csum_offset"), [
    (udp_packet(b"hello"), 6), (udp_packet(bytes(1000)), 6), (tcp_packet(b"x" * 333), 16),
    (tcp_packet(b""), 16)])
def test_finish_completes_a_partial_checksum(packet: bytes, csum_offset: int) -> None:
    done = offload.finish(vnet(NEEDS_CSUM, csum_start=20, csum_offset=csum_offset),
                          partial(packet, csum_offset))
    assert done == packet


def test_finish_refuses_offsets_outside_the_packet() -> None:
    with pytest.raises(ValueError):
        offload.finish(vnet(NEEDS_CSUM, csum_start=20, csum_offset=100), udp_packet(b"x"))


@pytest.mark.parametrize(("payload_len", "gso_size", "options"), [
    (4000, 1000, b""),                                 # an exact multiple
    (65535 - 52, 1448, b"\x01\x01\x08\x0a" + bytes(8)),  # the largest, with timestamps
    (1500, 1448, b""),                                 # a short last segment
    (100, 1448, b""),                                  # one segment
])
def test_split_makes_valid_consecutive_segments(payload_len: int, gso_size: int,
                                                options: bytes) -> None:
    payload = bytes(i % 251 for i in range(payload_len))
    super_packet = tcp_packet(payload, seq=0xFFFFF000, flags=ACK | PSH | FIN | CWR,
                              options=options, ident=0xFFFE)
    segments = offload.split(super_packet, gso_size)
    assert len(segments) == -(-payload_len // gso_size)
    headers = 40 + len(options)
    for i, segment in enumerate(segments):
        assert_checksums_valid(segment)
        ident, seq, flags, data = tcp_fields(segment)
        assert ident == (0xFFFE + i) & 0xFFFF
        assert seq == (0xFFFFF000 + i * gso_size) & 0xFFFFFFFF
        last = i == len(segments) - 1
        assert flags == ACK | (PSH | FIN if last else 0) | (CWR if i == 0 else 0)
        assert len(data) == (gso_size if not last else payload_len - i * gso_size)
        assert segment[:20][8] == super_packet[8] and segment[40:headers] == options
    assert b"".join(tcp_fields(s)[3] for s in segments) == payload


@pytest.mark.parametrize(("packet", "gso_size"), [
    (udp_packet(bytes(3000)), 1000), (tcp_packet(b""), 1000),
    (tcp_packet(bytes(3000)), 0), (tcp_packet(bytes(3000)), 65500),  # no segment fits a datagram
])
def test_split_refuses_what_is_not_a_tcp_super_packet(packet: bytes, gso_size: int) -> None:
    with pytest.raises(ValueError):
        offload.split(packet, gso_size)


def test_coalescing_undoes_splitting() -> None:
    payload = bytes(i % 253 for i in range(20000))
    super_packet = tcp_packet(payload, flags=ACK | PSH)
    (header, merged), = offload.coalesce(offload.split(super_packet, 1448))
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack("=BBHHHH", header)
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == (
        NEEDS_CSUM, GSO_TCPV4, 40, 1448, 20, 16)
    assert reference_checksum(merged[:20]) == 0
    # The kernel finishes the TCP checksum from the pseudo-header sum left in its field.
    assert offload.finish(header, merged) == super_packet[:4] + merged[4:6] + super_packet[6:]


def plain(packet: bytes) -> tuple[bytes, bytes]:
    return (bytes(10), packet)


def run(*packets: bytes) -> list[tuple[int, int, bytes]]:
    """(gso_type, gso_size, TCP payload or whole packet) per TUN write."""
    result = []
    for header, packet in offload.coalesce(list(packets)):
        gso_type, gso_size = header[1], struct.unpack("=H", header[4:6])[0]
        result.append((gso_type, gso_size,
                       tcp_fields(packet)[3] if packet[9] == socket.IPPROTO_TCP else packet))
    return result


A, B, C = b"a" * 100, b"b" * 100, b"c" * 100


@pytest.mark.parametrize(("packets", "writes"), [
    # one flow, in order: one write
    ([tcp_packet(A), tcp_packet(B, seq=1100), tcp_packet(C, seq=1200)],
     [(GSO_TCPV4, 100, A + B + C)]),
    # a lone segment is written as it is, behind a plain header
    ([tcp_packet(A)], [(GSO_NONE, 0, A)]),
    # a gap in sequence numbers
    ([tcp_packet(A), tcp_packet(B, seq=1101)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    # PSH ends a super-packet
    ([tcp_packet(A, flags=ACK | PSH), tcp_packet(B, seq=1100)],
     [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp_packet(A), tcp_packet(B, seq=1100, flags=ACK | PSH), tcp_packet(C, seq=1200)],
     [(GSO_TCPV4, 100, A + B), (GSO_NONE, 0, C)]),
    # a short segment ends it; a longer one may not follow
    ([tcp_packet(A), tcp_packet(b"s" * 50, seq=1100), tcp_packet(C, seq=1150)],
     [(GSO_TCPV4, 100, A + b"s" * 50), (GSO_NONE, 0, C)]),
    ([tcp_packet(A), tcp_packet(b"L" * 150, seq=1100)],
     [(GSO_NONE, 0, A), (GSO_NONE, 0, b"L" * 150)]),
    # different flows, TTLs, ToS, ACKs, windows, options do not mix
    ([tcp_packet(A), tcp_packet(B, seq=1100, sport=40001)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp_packet(A), tcp_packet(B, seq=1100, ttl=62)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp_packet(A), tcp_packet(B, seq=1100, tos=4)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp_packet(A), tcp_packet(B, seq=1100, ack=100)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp_packet(A), tcp_packet(B, seq=1100, window=1)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp_packet(A, options=b"\x01" * 4), tcp_packet(B, seq=1100, options=b"\x00" * 4)],
     [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    # SYN, FIN, no payload: never coalesced
    ([tcp_packet(A, flags=0x02), tcp_packet(B, seq=1100)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp_packet(A), tcp_packet(B, seq=1100, flags=ACK | FIN)],
     [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp_packet(b""), tcp_packet(b"", seq=1000)], [(GSO_NONE, 0, b""), (GSO_NONE, 0, b"")]),
    # anything else in between is written in its place, and ends the super-packet
    ([tcp_packet(A), udp_packet(b"u"), tcp_packet(B, seq=1100)],
     [(GSO_NONE, 0, A), (GSO_NONE, 0, udp_packet(b"u")), (GSO_NONE, 0, B)]),
])
def test_what_coalesces_and_what_does_not(packets: list[bytes],
                                          writes: list[tuple[int, int, bytes]]) -> None:
    assert run(*packets) == writes


def test_unmerged_packets_are_written_unchanged() -> None:
    packets = [tcp_packet(A), udp_packet(b"u"), tcp_packet(B, seq=5000)]
    assert offload.coalesce(packets) == [plain(p) for p in packets]


def udp_run(*packets: bytes) -> list[tuple[int, int, bytes]]:
    """(gso_type, gso_size, UDP payload) per TUN write, UDP coalescing on."""
    return [(header[1], struct.unpack("=H", header[4:6])[0], packet[28:])
            for header, packet in offload.coalesce(list(packets), udp=True)]


@pytest.mark.parametrize(("packets", "writes"), [
    # one flow of equal datagrams, the last may be shorter: one write
    ([udp_packet(A), udp_packet(B), udp_packet(b"s" * 40)], [(GSO_UDP_L4, 100, A + B + b"s" * 40)]),
    # a longer one may not follow a shorter one
    ([udp_packet(b"s" * 40), udp_packet(A)], [(GSO_NONE, 0, b"s" * 40), (GSO_NONE, 0, A)]),
    # other ports, TTL, ToS: another flow
    ([udp_packet(A), udp_packet(B, sport=5001)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([udp_packet(A), udp_packet(B, ttl=1)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([udp_packet(A), udp_packet(B, tos=4)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    # TCP in between ends it; TCP and UDP never mix
    ([udp_packet(A), tcp_packet(B), udp_packet(C)],
     [(GSO_NONE, 0, A), (GSO_NONE, 0, tcp_packet(B)[28:]), (GSO_NONE, 0, C)]),
])
def test_what_udp_coalesces_and_what_does_not(packets: list[bytes],
                                              writes: list[tuple[int, int, bytes]]) -> None:
    assert udp_run(*packets) == writes


def test_merged_udp_headers_leave_the_checksum_to_the_kernel() -> None:
    (header, merged), = offload.coalesce([udp_packet(A), udp_packet(B)], udp=True)
    assert struct.unpack("=BBHHHH", header) == (NEEDS_CSUM, GSO_UDP_L4, 28, 100, 20, 6)
    assert reference_checksum(merged[:20]) == 0
    assert struct.unpack("!H", merged[2:4])[0] == len(merged) == 228
    assert struct.unpack("!H", merged[24:26])[0] == 208  # the UDP length covers both
    # The checksum field holds the pseudo-header sum that the kernel completes per segment.
    assert offload.finish(header, merged) == udp_packet(A + B)[:4] + merged[4:6] + \
        udp_packet(A + B)[6:]


def test_udp_without_dont_fragment_or_with_coalescing_off_is_written_as_it_is() -> None:
    no_df = udp_packet(A)[:6] + b"\0\0" + udp_packet(A)[8:]
    assert offload.coalesce([no_df, no_df], udp=True) == [plain(no_df), plain(no_df)]
    assert offload.coalesce([udp_packet(A), udp_packet(B)]) == [plain(udp_packet(A)),
                                                                 plain(udp_packet(B))]


# ---- IPv6 --------------------------------------------------------------------------------------

SRC6, DST6 = "fd00:0:0:1::2", "fd00:0:0:2::2"


def pseudo6(packet: bytes) -> bytes:
    """RFC 8200 8.1: source, destination, upper-layer length (32 bits), 3 zero bytes, next
    header."""
    return packet[8:40] + struct.pack("!I3xB", len(packet) - 40, packet[6])


def ip6_header(payload_len: int, nh: int, *, hops: int = 63, tclass: int = 0,
               flow: int = 0xABCDE, src: str = SRC6, dst: str = DST6) -> bytes:
    return struct.pack("!IHBB16s16s", (6 << 28) | (tclass << 20) | flow, payload_len, nh, hops,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)


def tcp6_packet(payload: bytes, *, seq: int = 1000, flags: int = ACK, options: bytes = b"",
                sport: int = 40000, ack: int = 99, window: int = 512, **ip: object) -> bytes:
    """A TCP/IPv6 packet with its checksum correct."""
    header_len = 20 + len(options)
    tcp = struct.pack("!HHIIBBHHH", sport, 5201, seq, ack, (header_len // 4) << 4, flags,
                      window, 0, 0) + options + payload
    packet = ip6_header(len(tcp), socket.IPPROTO_TCP, **ip) + tcp  # type: ignore[arg-type]
    checksum = reference_checksum(pseudo6(packet) + tcp)
    return packet[:56] + struct.pack("!H", checksum) + packet[58:]


def udp6_packet(payload: bytes, *, sport: int = 5000, **ip: object) -> bytes:
    udp = struct.pack("!HHHH", sport, 53, 8 + len(payload), 0) + payload
    packet = ip6_header(len(udp), socket.IPPROTO_UDP, **ip) + udp  # type: ignore[arg-type]
    checksum = reference_checksum(pseudo6(packet) + udp) or 0xFFFF
    return packet[:46] + struct.pack("!H", checksum) + packet[48:]


def tcp6_fields(packet: bytes) -> tuple[int, int, bytes]:
    """(seq, flags, payload)."""
    header_len = (packet[52] >> 4) * 4
    return struct.unpack("!I", packet[44:48])[0], packet[53], packet[40 + header_len:]


def assert_checksums_valid6(packet: bytes) -> None:
    assert struct.unpack("!H", packet[4:6])[0] == len(packet) - 40, "payload length"
    assert reference_checksum(pseudo6(packet) + packet[40:]) == 0, "L4 checksum"


def partial6(packet: bytes, csum_offset: int) -> bytes:
    folded = ~reference_checksum(pseudo6(packet)) & 0xFFFF
    at = 40 + csum_offset
    return packet[:at] + struct.pack("!H", folded) + packet[at + 2:]


@pytest.mark.parametrize(("packet", "csum_offset"), [
    (udp6_packet(b"hello"), 6), (tcp6_packet(b"x" * 333), 16), (tcp6_packet(b""), 16)])
def test_finish_completes_a_partial_ipv6_checksum(packet: bytes, csum_offset: int) -> None:
    done = offload.finish(vnet(NEEDS_CSUM, csum_start=40, csum_offset=csum_offset),
                          partial6(packet, csum_offset))
    assert done == packet


@pytest.mark.parametrize(("payload_len", "gso_size", "options"), [
    (4000, 1000, b""),
    (65535 - 32, 1428, b"\x01\x01\x08\x0a" + bytes(8)),  # the largest TSO6, timestamps
    (1500, 1428, b""),
    (100, 1428, b""),
])
def test_tso6_split_makes_valid_consecutive_segments(payload_len: int, gso_size: int,
                                                     options: bytes) -> None:
    payload = bytes(i % 251 for i in range(payload_len))
    super_packet = tcp6_packet(payload, seq=0xFFFFF000, flags=ACK | PSH | FIN | CWR,
                               options=options)
    segments = offload.split(super_packet, gso_size)
    assert len(segments) == -(-payload_len // gso_size)
    headers = 60 + len(options)
    for i, segment in enumerate(segments):
        assert_checksums_valid6(segment)
        seq, flags, data = tcp6_fields(segment)
        assert seq == (0xFFFFF000 + i * gso_size) & 0xFFFFFFFF
        last = i == len(segments) - 1
        assert flags == ACK | (PSH | FIN if last else 0) | (CWR if i == 0 else 0)
        assert len(data) == (gso_size if not last else payload_len - i * gso_size)
        # Everything else of the IPv6 header as it was: version, class, flow, hops, addresses.
        assert segment[:4] + segment[6:40] == super_packet[:4] + super_packet[6:40]
        assert segment[60:headers] == options
    assert b"".join(tcp6_fields(s)[2] for s in segments) == payload


@pytest.mark.parametrize("packet", [
    udp6_packet(bytes(3000)), tcp6_packet(b""),
    ip6_header(3020, 0) + bytes(3020),  # a hop-by-hop header before TCP: not cut
])
def test_split_refuses_what_is_not_a_tcp6_super_packet(packet: bytes) -> None:
    with pytest.raises(ValueError):
        offload.split(packet, 1000)


def test_coalescing_undoes_tso6_splitting() -> None:
    payload = bytes(i % 253 for i in range(20000))
    super_packet = tcp6_packet(payload, flags=ACK | PSH)
    (header, merged), = offload.coalesce(offload.split(super_packet, 1428))
    assert struct.unpack("=BBHHHH", header) == (NEEDS_CSUM, GSO_TCPV6, 60, 1428, 40, 16)
    assert offload.finish(header, merged) == super_packet


def run6(*packets: bytes, udp: bool = False) -> list[tuple[int, int, bytes]]:
    """(gso_type, gso_size, L4 payload or whole packet) per TUN write."""
    result = []
    for header, packet in offload.coalesce(list(packets), udp=udp):
        gso_type, gso_size = header[1], struct.unpack("=H", header[4:6])[0]
        if packet[0] >> 4 == 6 and packet[6] == socket.IPPROTO_TCP:
            packet = tcp6_fields(packet)[2]
        elif packet[0] >> 4 == 6 and packet[6] == socket.IPPROTO_UDP:
            packet = packet[48:]
        result.append((gso_type, gso_size, packet))
    return result


@pytest.mark.parametrize(("packets", "writes"), [
    ([tcp6_packet(A), tcp6_packet(B, seq=1100), tcp6_packet(C, seq=1200)],
     [(GSO_TCPV6, 100, A + B + C)]),
    ([tcp6_packet(A)], [(GSO_NONE, 0, A)]),
    ([tcp6_packet(A), tcp6_packet(B, seq=1101)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp6_packet(A, flags=ACK | PSH), tcp6_packet(B, seq=1100)],
     [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp6_packet(A), tcp6_packet(b"s" * 50, seq=1100), tcp6_packet(C, seq=1150)],
     [(GSO_TCPV6, 100, A + b"s" * 50), (GSO_NONE, 0, C)]),
    # other flows, flow labels, classes, hop limits, ACKs, windows, options do not mix
    ([tcp6_packet(A), tcp6_packet(B, seq=1100, sport=40001)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp6_packet(A), tcp6_packet(B, seq=1100, flow=1)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp6_packet(A), tcp6_packet(B, seq=1100, tclass=4)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp6_packet(A), tcp6_packet(B, seq=1100, hops=62)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp6_packet(A), tcp6_packet(B, seq=1100, ack=100)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp6_packet(A), tcp6_packet(B, seq=1100, window=1)], [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp6_packet(A, options=b"\x01" * 4), tcp6_packet(B, seq=1100, options=b"\x00" * 4)],
     [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    ([tcp6_packet(A), tcp6_packet(B, seq=1100, dst="fd00:0:0:2::3")],
     [(GSO_NONE, 0, A), (GSO_NONE, 0, B)]),
    # IPv4 and IPv6 of the same ports never mix, whichever comes first
    ([tcp6_packet(A), tcp_packet(B, seq=1100)],
     [(GSO_NONE, 0, A), (GSO_NONE, 0, tcp_packet(B, seq=1100))]),
    ([tcp_packet(A), tcp6_packet(B, seq=1100)], [(GSO_NONE, 0, tcp_packet(A)), (GSO_NONE, 0, B)]),
])
def test_what_coalesces_over_ipv6_and_what_does_not(packets: list[bytes],
                                                    writes: list[tuple[int, int, bytes]]) -> None:
    assert run6(*packets) == writes


def test_ipv6_udp_coalesces_only_with_udp_coalescing_on() -> None:
    packets = [udp6_packet(A), udp6_packet(B), udp6_packet(b"s" * 40)]
    assert run6(*packets, udp=True) == [(GSO_UDP_L4, 100, A + B + b"s" * 40)]
    (header, merged), = offload.coalesce(packets, udp=True)
    assert struct.unpack("=BBHHHH", header) == (NEEDS_CSUM, GSO_UDP_L4, 48, 100, 40, 6)
    assert offload.finish(header, merged) == udp6_packet(A + B + b"s" * 40)
    assert offload.coalesce(packets) == [plain(p) for p in packets]
