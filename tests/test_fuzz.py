"""Property-based tests (hypothesis) of the packet code the loops run: every output against a
plain-Python reference of the same rule, with checksums recomputed from scratch and segments
joined back into the payload they came from. Inputs range over IP and TCP options, odd lengths,
sequence numbers that wrap, segments out of order, duplicated and overlapping, and arbitrary
virtio headers and datagrams."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.backend.vxlan import vtep_mac
from control.subnet.config import ConfigError, parse_config
from control.subnet.lease import LeaseError, decode_lease
from fastpath import offload, packet
from tests.test_offload import (
    ACK,
    CWR,
    FIN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    NEEDS_CSUM,
    PSH,
    assert_checksums_valid,
    assert_checksums_valid6,
    pseudo,
    tcp6_fields,
    tcp6_packet,
    tcp_fields,
    vnet,
)
from tests.test_packet import ipv6, reference_checksum, reference_icmp6

settings.register_profile("pyflannel", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("pyflannel")

SRC, DST = "10.244.1.2", "10.244.2.2"
MTU = 1472


def ip_header(total: int, proto: int, *, ttl: int = 64, ident: int = 7, tos: int = 0,
              options: bytes = b"", flags_frag: int = 0x4000) -> bytes:
    """An IPv4 header with `options` (a multiple of 4 bytes) and a correct checksum."""
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, total, ident, flags_frag, ttl,
                         proto, 0, socket.inet_aton(SRC), socket.inet_aton(DST)) + options
    return header[:10] + struct.pack("!H", reference_checksum(header)) + header[12:]


def tcp(payload: bytes, *, seq: int, flags: int = ACK, options: bytes = b"",
        ident: int = 7) -> bytes:
    """A TCP/IPv4 packet (no IP options: the offload stage cuts and merges only those) with
    both checksums correct."""
    header_len = 20 + len(options)
    segment = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 99, (header_len // 4) << 4, flags,
                          512, 0, 0) + options + payload
    whole = ip_header(20 + len(segment), socket.IPPROTO_TCP, ident=ident) + segment
    checksum = reference_checksum(pseudo(whole) + segment)
    return whole[:36] + struct.pack("!H", checksum) + whole[38:]


options_4 = st.integers(0, 10).map(lambda words: b"\x01" * (4 * words))  # NOPs: any length
seqs = st.integers(0, 2**32 - 1) | st.integers(2**32 - 70000, 2**32 - 1)  # near the wrap too


# ---- checksums, validation, TTL, ICMP --------------------------------------------------------

@given(st.binary(max_size=3000))
def test_the_checksum_is_rfc_1071_s(data: bytes) -> None:
    expected = reference_checksum(data) if data else 0xFFFF
    assert packet.ipv4_checksum(data) == expected


def reference_verdict(datagram: bytes, mtu: int) -> int:
    """The receive loop's rule in plain words: at most the MTU, at least a header, version 4
    with a header length of 5 words or more that fits, and a total length equal to what came;
    or, where that fails and the version is 6 (a fast path with an IPv6 Network), the IPv6
    rule."""
    verdict = reference_verdict4(datagram, mtu)
    if verdict != packet.Verdict.OK and datagram and datagram[0] >> 4 == 6:
        return reference_verdict6(datagram, mtu)
    return verdict


def reference_verdict6(datagram: bytes, mtu: int) -> int:
    """At most the MTU, at least the 40-byte header, version 6, a payload length equal to what
    came after the header."""
    if len(datagram) > mtu:
        return packet.Verdict.TOO_BIG
    if len(datagram) < 40:
        return packet.Verdict.TOO_SHORT
    if datagram[0] >> 4 != 6:
        return packet.Verdict.BAD_HEADER
    if int.from_bytes(datagram[4:6], "big") != len(datagram) - 40:
        return packet.Verdict.BAD_LENGTH
    return packet.Verdict.OK


def reference_verdict4(datagram: bytes, mtu: int) -> int:
    if len(datagram) > mtu:
        return packet.Verdict.TOO_BIG
    if len(datagram) < 20:
        return packet.Verdict.TOO_SHORT
    ihl = (datagram[0] & 0x0F) * 4
    if datagram[0] >> 4 != 4 or ihl < 20 or ihl > len(datagram):
        return packet.Verdict.BAD_HEADER
    if int.from_bytes(datagram[2:4], "big") != len(datagram):
        return packet.Verdict.BAD_LENGTH
    return packet.Verdict.OK


def near_valid(draw: st.DrawFn) -> bytes:
    """Datagrams that are often valid and often wrong in exactly one field."""
    options = draw(options_4)
    body = draw(st.binary(max_size=200))
    header = bytearray(ip_header(20 + len(options) + len(body), 17, options=options))
    if draw(st.booleans()):
        header[draw(st.integers(0, len(header) - 1))] = draw(st.integers(0, 255))
    return bytes(header) + body


def near_valid6(draw: st.DrawFn) -> bytes:
    """IPv6 datagrams, often valid and often wrong in exactly one byte."""
    datagram = ipv6(draw(st.binary(max_size=200)), nh=draw(st.integers(0, 255)))
    if draw(st.booleans()):
        datagram[draw(st.integers(0, len(datagram) - 1))] = draw(st.integers(0, 255))
    return bytes(datagram)


@given(st.binary(max_size=1600) | st.composite(near_valid)() | st.composite(near_valid6)(),
       st.integers(20, 1600))
def test_validation_follows_the_rule(datagram: bytes, mtu: int) -> None:
    assert packet.validate(datagram, mtu) == reference_verdict(datagram, mtu)


@given(st.integers(0, 255), options_4, st.binary(max_size=100), st.integers(0, 0xFFFF),
       st.integers(0, 255))
def test_the_ttl_goes_down_by_one_with_the_checksum_exact(ttl: int, options: bytes, body: bytes,
                                                         ident: int, tos: int) -> None:
    original = ip_header(20 + len(options) + len(body), 6, ttl=ttl, ident=ident, tos=tos,
                         options=options) + body
    data = bytearray(original)
    assert packet.ttl_decrement(data) == (ttl > 1)
    if ttl <= 1:
        assert bytes(data) == original  # refused untouched
        return
    ihl = len(options) + 20
    assert data[8] == ttl - 1
    assert reference_checksum(bytes(data[:ihl])) == 0
    assert data[:8] + data[9:10] + data[12:] == original[:8] + original[9:10] + original[12:]


def reference_unreachable(offender: bytes) -> bytes | None:
    ihl = (offender[0] & 0x0F) * 4
    if int.from_bytes(offender[6:8], "big") & 0x1FFF:
        return None  # a later fragment
    if offender[9] == 1 and (len(offender) <= ihl or offender[ihl] not in (0, 8, 13, 14, 15, 16)):
        return None  # an ICMP error, or nothing to tell
    quote = offender[:ihl + 8]
    icmp = struct.pack("!BBHI", 3, 0, 0, 0) + quote
    icmp = icmp[:2] + struct.pack("!H", reference_checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0,
                         offender[16:20], offender[12:16])
    return header[:10] + struct.pack("!H", reference_checksum(header)) + header[12:] + icmp


@given(st.sampled_from([1, 6, 17, 47]), st.integers(0, 255), options_4,
       st.binary(max_size=60), st.sampled_from([0x4000, 0x2000, 0x0000, 0x2001, 0x00FF]))
def test_net_unreachable_matches_rfc_792(proto: int, first: int, options: bytes, body: bytes,
                                         flags_frag: int) -> None:
    body = bytes([first]) + body
    offender = ip_header(20 + len(options) + len(body), proto, options=options,
                         flags_frag=flags_frag) + body
    assert packet.net_unreachable(offender) == reference_unreachable(offender)


@given(st.integers(0, 255), st.binary(max_size=100))
def test_the_hop_limit_goes_down_by_one_and_nothing_else_changes(hops: int, body: bytes) -> None:
    original = bytes(ipv6(body, hops=hops))
    data = bytearray(original)
    assert packet.hop_limit_decrement(data) == (hops > 1)
    expected = bytearray(original)
    if hops > 1:
        expected[7] = hops - 1
    assert data == expected


def reference_wants_icmp6(offender: bytes) -> bool:
    """RFC 4443 2.4 (e) in plain words, as the loops read it: no error for a packet from the
    unspecified or a multicast address, to a multicast address, for a later fragment, for an
    ICMPv6 error (types below 128) or for one whose headers cannot be followed to the end."""
    if offender[8] == 0xFF or offender[24] == 0xFF or not any(offender[8:24]):
        return False
    nh, at = offender[6], 40
    for _ in range(8):
        if nh == 44:
            if at + 8 > len(offender) or int.from_bytes(offender[at + 2:at + 4], "big") >> 3:
                return False
            nh, at = offender[at], at + 8
        elif nh in (0, 43, 60):
            if at + 2 > len(offender):
                return False
            nh, at = offender[at], at + 8 * (offender[at + 1] + 1)
        elif nh == 58:
            return at < len(offender) and offender[at] >= 128
        else:
            return True
    return False


extension_chains = st.lists(
    st.tuples(st.sampled_from([0, 43, 60, 44]), st.integers(0, 2), st.integers(0, 0xFFFF)),
    max_size=4)


@given(extension_chains, st.sampled_from([6, 17, 58, 59]), st.integers(0, 255),
       st.binary(max_size=1400), st.sampled_from(["fd00:0:0:1::2", "::", "ff02::1", "fe80::1"]),
       st.sampled_from(["fd00:0:0:2::2", "ff05::2"]), st.sampled_from([(1, 0), (3, 0), (2, 0)]),
       st.integers(0, 2**32 - 1), st.binary(min_size=16, max_size=16), st.integers(0, 60))
def test_icmp6_errors_match_rfc_4443(chain: list[tuple[int, int, int]], last: int, kind: int,
                                     body: bytes, src: str, dst: str, error: tuple[int, int],
                                     param: int, source: bytes, cut: int) -> None:
    """Random chains of extension headers (of random lengths, fragments with random offsets)
    before an upper layer, ICMPv6 among them, cut short at random: the error, or none, as the
    reference says, byte for byte."""
    nexts = [nh for nh, _, _ in chain[1:]] + [last] if chain else []
    headers = b"".join(
        struct.pack("!BBHI", following, 0, word, 7) if nh == 44
        else struct.pack("!BB", following, length) + bytes(6 + 8 * length)
        for (nh, length, word), following in zip(chain, nexts, strict=True))
    payload = headers + (bytes([kind]) + body if last == 58 else body)
    offender = bytes(ipv6(payload, nh=chain[0][0] if chain else last, src=src, dst=dst))
    if cut:
        offender = offender[:max(40, len(offender) - cut)]
    expected = reference_icmp6(offender, *error, param, source) \
        if reference_wants_icmp6(offender) else None
    assert packet.icmp6_error(offender, *error, param, source) == expected


# ---- the TSO split ---------------------------------------------------------------------------

@given(st.integers(1, 20000), st.integers(1, 3000), seqs, st.integers(0, 0xFFFF),
       st.integers(0, 10).map(lambda words: b"\x01" * (4 * words)),
       st.sets(st.sampled_from([PSH, FIN, CWR])))
def test_split_segments_join_back_into_the_super_packet(
        payload_len: int, gso_size: int, seq: int, ident: int, options: bytes,
        extra: set[int]) -> None:
    flags = ACK | sum(extra)
    payload = bytes((i * 7 + payload_len) % 256 for i in range(payload_len))
    headers = 40 + len(options)
    if headers + payload_len > 65535:
        return
    super_packet = tcp(payload, seq=seq, flags=flags, options=options, ident=ident)
    if headers + min(gso_size, payload_len) + 28 > 65535 or gso_size == 0:
        return
    segments = offload.split(super_packet, gso_size)
    assert len(segments) == -(-payload_len // gso_size)
    for i, segment in enumerate(segments):
        assert_checksums_valid(segment)  # from scratch
        seg_ident, seg_seq, seg_flags, data = tcp_fields(segment)
        last = i == len(segments) - 1
        assert seg_ident == (ident + i) & 0xFFFF
        assert seg_seq == (seq + i * gso_size) & 0xFFFFFFFF
        assert seg_flags == ACK | (flags & (PSH | FIN) if last else 0) | (
            flags & CWR if i == 0 else 0)
        assert segment[40:headers] == options
    assert b"".join(tcp_fields(s)[3] for s in segments) == payload


@given(st.integers(1, 20000), st.integers(1, 3000), seqs,
       st.integers(0, 10).map(lambda words: b"\x01" * (4 * words)),
       st.sets(st.sampled_from([PSH, FIN, CWR])))
def test_tso6_split_segments_join_back_into_the_super_packet(
        payload_len: int, gso_size: int, seq: int, options: bytes, extra: set[int]) -> None:
    flags = ACK | sum(extra)
    payload = bytes((i * 7 + payload_len) % 256 for i in range(payload_len))
    headers = 60 + len(options)
    if headers - 40 + payload_len > 65535:
        return
    super_packet = tcp6_packet(payload, seq=seq, flags=flags, options=options)
    segments = offload.split(super_packet, gso_size)
    assert len(segments) == -(-payload_len // gso_size)
    for i, segment in enumerate(segments):
        assert_checksums_valid6(segment)  # from scratch
        seg_seq, seg_flags, _ = tcp6_fields(segment)
        last = i == len(segments) - 1
        assert seg_seq == (seq + i * gso_size) & 0xFFFFFFFF
        assert seg_flags == ACK | (flags & (PSH | FIN) if last else 0) | (
            flags & CWR if i == 0 else 0)
        assert segment[60:headers] == options
    assert b"".join(tcp6_fields(s)[2] for s in segments) == payload


# ---- the GRO coalesce ------------------------------------------------------------------------

def stream_segments(draw: st.DrawFn) -> tuple[list[bytes], list[tuple[int, bytes]]]:
    """Segments of one flow (IPv4 or IPv6), cut from a stream at random sizes, then shuffled,
    duplicated and overlapped at random; also (seq, payload) of each, in the order given."""
    build = tcp6_packet if draw(st.booleans()) else tcp
    start = draw(seqs)
    sizes = draw(st.lists(st.integers(0, 1400), min_size=1, max_size=12))
    pieces, seq = [], start
    for size in sizes:
        pieces.append((seq, bytes((seq + i) % 256 for i in range(size))))
        seq = (seq + size) & 0xFFFFFFFF
    ops = draw(st.lists(st.sampled_from(["keep", "swap", "dup", "overlap"]),
                        min_size=len(pieces), max_size=len(pieces)))
    out: list[tuple[int, bytes]] = []
    for (seg_seq, data), op in zip(pieces, ops, strict=True):
        out.append((seg_seq, data))
        if op == "swap" and len(out) > 1:
            out[-1], out[-2] = out[-2], out[-1]
        elif op == "dup":
            out.append((seg_seq, data))
        elif op == "overlap" and data:
            cut = len(data) // 2
            out.append(((seg_seq + cut) & 0xFFFFFFFF, data[cut:]))
    flags = draw(st.lists(st.sampled_from([ACK, ACK, ACK, ACK | PSH]), min_size=len(out),
                          max_size=len(out)))
    packets = [build(data, seq=seg_seq, flags=flag)
               for (seg_seq, data), flag in zip(out, flags, strict=True)]
    return packets, out


@given(st.composite(stream_segments)())
def test_coalesce_writes_every_segment_once_in_order_and_merges_only_what_follows(
        case: tuple[list[bytes], list[tuple[int, bytes]]]) -> None:
    packets, pieces = case
    writes = offload.coalesce(packets)
    consumed = 0
    for header, written in writes:
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack(
            "=BBHHHH", header)
        if gso_type == GSO_NONE:
            assert written == packets[consumed]  # written as it came
            consumed += 1
            continue
        if written[0] >> 4 == 6:
            assert (flags, gso_type, hdr_len, csum_start, csum_offset) == (
                NEEDS_CSUM, GSO_TCPV6, 60, 40, 16)
            # The kernel finishes the TCP checksum from the pseudo-header sum left in its field.
            assert_checksums_valid6(offload.finish(header, written))
            seq, _, payload = tcp6_fields(written)
        else:
            assert (flags, gso_type, hdr_len, csum_start, csum_offset) == (
                NEEDS_CSUM, GSO_TCPV4, 40, 20, 16)
            assert reference_checksum(written[:20]) == 0
            assert struct.unpack("!H", written[2:4])[0] == len(written)
            assert_checksums_valid(offload.finish(header, written))
            _, seq, _, payload = tcp_fields(written)
        # A merge holds two or more segments that each follow the one before, the first as
        # long as gso_size and none longer.
        joined, expected_seq, merged = b"", seq, 0
        while len(joined) < len(payload):
            seg_seq, data = pieces[consumed + merged]
            assert seg_seq == expected_seq and 0 < len(data) <= gso_size
            joined += data
            expected_seq = (expected_seq + len(data)) & 0xFFFFFFFF
            merged += 1
        assert joined == payload and merged >= 2 and len(pieces[consumed][1]) == gso_size
        consumed += merged
    assert consumed == len(packets)


# ---- checksums the kernel left partial, under arbitrary virtio headers -----------------------

@given(st.binary(min_size=10, max_size=10), st.binary(max_size=300))
def test_finish_either_refuses_or_completes_the_checksum_it_was_told_to(
        header: bytes, body: bytes) -> None:
    data = tcp(body, seq=1)
    _, _, _, _, csum_start, csum_offset = struct.unpack("=BBHHHH", header)
    try:
        done = offload.finish(header, data)
    except ValueError:
        assert csum_start + csum_offset + 2 > len(data)
        return
    assert csum_start + csum_offset + 2 <= len(data)
    field = csum_start + csum_offset
    # The sum from csum_start to the end, the field as it was included, complemented; for UDP's
    # field a 0 is sent as 0xFFFF.
    expected = reference_checksum(data[csum_start:])
    if expected == 0 and csum_offset == 6:
        expected = 0xFFFF
    assert done == data[:field] + struct.pack("!H", expected) + data[field + 2:]


def test_the_reference_rules_above_are_the_suite_s_own() -> None:
    # The table-driven tests and these share their builders: a packet from one is valid here.
    assert packet.validate(tcp(b"x", seq=0), MTU) == packet.Verdict.OK
    assert vnet(NEEDS_CSUM)[0] == NEEDS_CSUM and GSO_TCPV4 == 1


# ---- what etcd holds: configs and lease values -----------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=20)
config_keys = st.sampled_from(["Network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend",
                               "EnableIPv4", "EnableIPv6", "network", "Type", "VNI", "Port",
                               "DirectRouting", "VtepMAC", "PublicIP", "BackendType",
                               "BackendData", "publicip", "IPv6Network", "IPv6SubnetLen",
                               "IPv6SubnetMin", "IPv6SubnetMax", "Networks", "PublicIPv6",
                               "BackendV6Data"])
# Objects with the keys that matter, holding anything: deeper than random JSON gets.
keyed = st.recursive(json_values, lambda inner: st.dictionaries(config_keys, inner, max_size=6),
                     max_leaves=12)


@given(st.binary(max_size=300) | keyed.map(lambda value: json.dumps(value).encode()))
def test_any_config_in_etcd_is_parsed_or_refused_with_a_reason(raw: bytes) -> None:
    try:
        config = parse_config(raw)
    except ConfigError as err:
        assert str(err)
        return
    assert config.enable_ipv4 or config.enable_ipv6
    if config.network is not None:
        assert config.network.prefixlen < config.subnet_len <= 30
        assert config.subnet_fits(next(config.subnets()))
    if config.ipv6_network is not None:
        assert config.ipv6_network.prefixlen < config.ipv6_subnet_len <= 126
        assert config.ipv6_subnet_fits(next(config.ipv6_subnets()))


@given(st.binary(max_size=300) | keyed.map(lambda value: json.dumps(value).encode()))
def test_any_lease_value_is_read_or_refused_with_a_reason(raw: bytes) -> None:
    try:
        lease = decode_lease(raw)
    except LeaseError as err:
        assert str(err)
        return
    assert lease.public_ip != ipaddress.IPv4Address(0)
    assert lease.public_ip is not None or lease.public_ipv6 is not None
    try:
        mac = vtep_mac(lease.backend_data)
    except ValueError as err:
        assert str(err)
        return
    assert len(mac) == 17 and mac == mac.lower()
