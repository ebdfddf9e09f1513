"""Packet helpers against an independent, from-scratch reading of the IPv4 and ICMP rules."""

import random
import struct

import pytest

from fastpath import packet
from fastpath.packet import Verdict


def reference_checksum(data: bytes) -> int:
    """RFC 1071, the slow and obvious way."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(payload: bytes = b"x" * 12, *, ttl: int = 64, proto: int = 17, frag: int = 0,
         src: str = "10.244.1.2", dst: str = "10.244.2.2", options: bytes = b"",
         ident: int = 0x1234, tos: int = 0) -> bytearray:
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, ihl * 4 + len(payload), ident, frag,
                         ttl, proto, 0, bytes(map(int, src.split("."))),
                         bytes(map(int, dst.split(".")))) + options
    header = header[:10] + struct.pack("!H", reference_checksum(header)) + header[12:]
    return bytearray(header + payload)


def test_checksum_matches_reference() -> None:
    rng = random.Random(1)
    for n in (1, 2, 3, 20, 21, 60, 1500):
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert packet.ipv4_checksum(data) == reference_checksum(data)


def test_ttl_decrement_keeps_the_checksum_exact() -> None:
    """Against a checksum recomputed from scratch, over random headers and the edge checksums
    where the old HC + 0x0100 shortcut goes wrong."""
    rng = random.Random(2)
    cases = [ipv4(ttl=rng.randint(2, 255), proto=rng.randint(0, 255), ident=rng.getrandbits(16),
                  tos=rng.getrandbits(8), src=".".join(str(rng.getrandbits(8)) for _ in range(4)))
             for _ in range(5000)]
    for ident in range(0x10000):  # drive the checksum through every value, 0xFEFF..0xFFFF included
        if len(cases) > 70000:
            break
        cases.append(ipv4(ttl=2 + ident % 200, ident=ident))
    seen_checksums = set()
    for pkt in cases:
        before = bytes(pkt)
        assert packet.ttl_decrement(pkt)
        assert pkt[8] == before[8] - 1
        expected = bytearray(pkt)
        expected[10:12] = b"\0\0"
        assert struct.unpack("!H", pkt[10:12])[0] == reference_checksum(bytes(expected[:20]))
        assert pkt[:8] == before[:8] and pkt[12:] == before[12:]
        seen_checksums.add(struct.unpack("!H", before[10:12])[0])
    assert {0xFEFF, 0xFF00, 0xFFFE} <= seen_checksums


@pytest.mark.parametrize("ttl", [0, 1])
def test_ttl_that_would_reach_zero_is_refused_untouched(ttl: int) -> None:
    pkt = ipv4(ttl=ttl)
    before = bytes(pkt)
    assert not packet.ttl_decrement(pkt)
    assert bytes(pkt) == before


@pytest.mark.parametrize(("datagram", "mtu", "verdict"), [
    (bytes(ipv4()), 1472, Verdict.OK),
    (bytes(ipv4(options=b"\x01" * 4)), 1472, Verdict.OK),
    (bytes(ipv4(b"y" * 1452)), 1472, Verdict.OK),
    (bytes(ipv4(b"y" * 1453)), 1472, Verdict.TOO_BIG),
    (b"", 1472, Verdict.TOO_SHORT),
    (bytes(ipv4())[:19], 1472, Verdict.TOO_SHORT),
    (b"\x60" + bytes(ipv4())[1:], 1472, Verdict.BAD_HEADER),            # IPv6 version nibble
    (b"\x44" + bytes(ipv4())[1:], 1472, Verdict.BAD_HEADER),            # IHL 4
    (b"\x4f" + bytes(ipv4())[1:], 1472, Verdict.BAD_HEADER),            # IHL 15 > 32 bytes
    (bytes(ipv4()) + b"trailing", 1472, Verdict.BAD_LENGTH),
    (bytes(ipv4())[:-1], 1472, Verdict.BAD_LENGTH),
])
def test_validation_of_datagrams_from_the_underlay(datagram: bytes, mtu: int,
                                                   verdict: Verdict) -> None:
    assert packet.validate(datagram, mtu) == verdict


def test_net_unreachable_answers_from_the_destination_and_quotes_header_plus_8() -> None:
    offender = ipv4(b"0123456789abcdef", proto=17, options=b"\x01\x01\x01\x00",
                    src="10.244.1.2", dst="10.244.99.5")
    reply = packet.net_unreachable(offender)
    assert reply is not None
    version_ihl, _, total, _, frag, ttl, proto, _, src, dst = struct.unpack(
        "!BBHHHBBH4s4s", reply[:20])
    assert (version_ihl, total, frag, proto) == (0x45, len(reply), 0, 1)
    assert ttl > 1
    assert (src, dst) == (bytes(offender[16:20]), bytes(offender[12:16]))
    assert reference_checksum(reply[:20]) == 0
    icmp = reply[20:]
    assert (icmp[0], icmp[1], icmp[4:8]) == (3, 0, b"\0\0\0\0")
    assert reference_checksum(icmp) == 0
    assert icmp[8:] == bytes(offender[: 24 + 8])


def test_net_unreachable_quotes_a_short_packet_whole() -> None:
    offender = ipv4(b"abc", proto=6)
    reply = packet.net_unreachable(offender)
    assert reply[28:] == bytes(offender)


@pytest.mark.parametrize(("offender", "answered"), [
    (ipv4(proto=6), True),
    (ipv4(b"\x08\x00" + bytes(10), proto=1), True),       # echo request
    (ipv4(b"\x03\x01" + bytes(10), proto=1), False),      # an ICMP error: never answer one
    (ipv4(b"\x0b\x00" + bytes(10), proto=1), False),      # time exceeded
    (ipv4(proto=17, frag=0x2000), True),                  # first fragment (more-fragments set)
    (ipv4(proto=17, frag=0x0010), False),                 # later fragment
])
def test_which_packets_get_an_icmp_error(offender: bytearray, answered: bool) -> None:
    assert (packet.net_unreachable(offender) is not None) == answered
