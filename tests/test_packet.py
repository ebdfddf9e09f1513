"""Packet helpers against an independent, from-scratch reading of the IPv4, ICMP, IPv6 and ICMPv6
rules."""

import ipaddress
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
    (b"\x60" + bytes(ipv4())[1:], 1472, Verdict.TOO_SHORT),  # version 6: shorter than IPv6's 40
    (b"\x50" + bytes(ipv4())[1:], 1472, Verdict.BAD_HEADER),            # version 5
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


# ---- IPv6 ----------------------------------------------------------------------------------------

def ipv6(payload: bytes = b"x" * 12, *, hops: int = 64, nh: int = 17,
         src: str = "fd00:0:0:1::2", dst: str = "fd00:0:0:2::2", flow: int = 0x12345,
         tclass: int = 0) -> bytearray:
    """An IPv6 packet, its header packed field by field from RFC 8200 3."""
    first = (6 << 28) | (tclass << 20) | flow
    return bytearray(struct.pack("!IHBB16s16s", first, len(payload), nh, hops,
                                 ipaddress.IPv6Address(src).packed,
                                 ipaddress.IPv6Address(dst).packed) + payload)


def reference_icmp6(offender: bytes, kind: int, code: int, param: int, source: bytes) -> bytes:
    """RFC 4443's error for `offender` from `source`, its checksum over RFC 8200 8.1's
    pseudo-header (source, destination, upper-layer length as 32 bits, 3 zero bytes, 58),
    quoting as much of the offender as keeps the error within 1280 bytes."""
    quote = offender[:1280 - 48]
    destination = offender[8:24]
    body = struct.pack("!BBHI", kind, code, 0, param) + quote
    pseudo = source + destination + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", reference_checksum(pseudo + body)) + body[4:]
    header = struct.pack("!IHBB16s16s", 6 << 28, len(body), 58, 64, source, destination)
    return header + body


@pytest.mark.parametrize(("datagram", "mtu", "verdict"), [
    (bytes(ipv6()), 1472, Verdict.OK),
    (bytes(ipv6(b"")), 1472, Verdict.OK),
    (bytes(ipv6(b"y" * 1432)), 1472, Verdict.OK),
    (bytes(ipv6(b"y" * 1433)), 1472, Verdict.TOO_BIG),
    (bytes(ipv6())[:39], 1472, Verdict.TOO_SHORT),
    (bytes(ipv6()) + b"trailing", 1472, Verdict.BAD_LENGTH),
    (bytes(ipv6())[:-1], 1472, Verdict.BAD_LENGTH),
    (bytes(ipv6(b"")) + bytes(8), 1472, Verdict.BAD_LENGTH),  # payload length 0: a jumbogram
])
def test_validation_of_ipv6_datagrams_from_the_underlay(datagram: bytes, mtu: int,
                                                        verdict: Verdict) -> None:
    assert packet.validate(datagram, mtu) == verdict


def test_hop_limit_goes_down_by_one_and_nothing_else_changes() -> None:
    for hops in (2, 64, 255):
        pkt = ipv6(hops=hops)
        before = bytes(pkt)
        assert packet.hop_limit_decrement(pkt)
        assert pkt[7] == hops - 1
        assert pkt[:7] == before[:7] and pkt[8:] == before[8:]


@pytest.mark.parametrize("hops", [0, 1])
def test_hop_limit_that_would_reach_zero_is_refused_untouched(hops: int) -> None:
    pkt = ipv6(hops=hops)
    before = bytes(pkt)
    assert not packet.hop_limit_decrement(pkt)
    assert bytes(pkt) == before


HOST = ipaddress.IPv6Address("fd00:0:0:2::2").packed


@pytest.mark.parametrize(("kind", "code", "param"), [
    (1, 0, 0),        # destination unreachable: no route
    (3, 0, 0),        # time exceeded: hop limit
    (2, 0, 1472),     # packet too big, with the MTU
])
@pytest.mark.parametrize("length", [0, 8, 100, 1232, 1233, 1400])
def test_icmp6_errors_match_the_reference(kind: int, code: int, param: int, length: int) -> None:
    rng = random.Random(length)
    offender = bytes(ipv6(bytes(rng.getrandbits(8) for _ in range(length)), nh=6))
    reply = packet.icmp6_error(offender, kind, code, param, HOST)
    assert reply == reference_icmp6(offender, kind, code, param, HOST)
    assert len(reply) <= 1280


def test_icmp6_checksum_is_right_for_every_pseudo_header_sum() -> None:
    """Random addresses and lengths, so the pseudo-header's sum and its carries vary."""
    rng = random.Random(6)
    for _ in range(2000):
        src = str(ipaddress.IPv6Address(rng.getrandbits(120) | (0xFD << 120)))
        source = rng.getrandbits(128).to_bytes(16, "big")
        if source[0] == 0xFF:
            continue
        offender = bytes(ipv6(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 60))),
                              src=src, nh=rng.choice([6, 17, 50])))
        assert (packet.icmp6_error(offender, 1, 0, 0, source)
                == reference_icmp6(offender, 1, 0, 0, source))


def icmp6(kind: int) -> bytes:
    return struct.pack("!BBH", kind, 0, 0) + bytes(8)


def extension(nh: int, body: bytes = bytes(6)) -> bytes:
    """A hop-by-hop, routing or destination options header: next header, length in 8-byte units
    past the first 8."""
    return struct.pack("!BB", nh, (2 + len(body)) // 8 - 1) + body


@pytest.mark.parametrize(("offender", "answered"), [
    (ipv6(nh=6), True),
    (ipv6(icmp6(128), nh=58), True),                    # echo request
    (ipv6(icmp6(129), nh=58), True),                    # echo reply
    (ipv6(icmp6(1), nh=58), False),                     # an ICMPv6 error: never answer one
    (ipv6(icmp6(3), nh=58), False),                     # time exceeded
    (ipv6(icmp6(127), nh=58), False),                   # any type below 128 is an error
    (ipv6(extension(58) + icmp6(1), nh=0), False),      # an error behind a hop-by-hop header
    (ipv6(extension(60) + extension(58) + icmp6(2), nh=43), False),
    (ipv6(extension(58) + icmp6(128), nh=60), True),
    (ipv6(struct.pack("!BBHI", 17, 0, 0x0001, 7) + bytes(8), nh=44), True),  # first fragment
    (ipv6(struct.pack("!BBHI", 17, 0, 0x0010, 7) + bytes(8), nh=44), False),  # later one
    (ipv6(struct.pack("!BBHI", 58, 0, 0x0001, 7) + icmp6(1), nh=44), False),
    (ipv6(b"\x3a", nh=0), False),                       # an extension header cut short
    (ipv6(nh=58, payload=b""), False),                  # ICMPv6 without its type
    (ipv6(dst="ff02::1"), False),                       # to a multicast group
    (ipv6(src="ff02::1"), False),                       # from a multicast group
    (ipv6(src="::"), False),                            # from the unspecified address
    (ipv6(src="fe80::1"), True),
])
def test_which_ipv6_packets_get_an_icmp6_error(offender: bytearray, answered: bool) -> None:
    assert (packet.icmp6_error(offender, 1, 0, 0, HOST) is not None) == answered
