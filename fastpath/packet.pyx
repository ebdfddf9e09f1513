"""Python wrappers over the packet helpers in packet.pxd, so tests run the very code the loops run."""

from libc.stdint cimport uint8_t


def ipv4_checksum(const uint8_t[:] data) -> int:
    """The Internet checksum of data, from scratch."""
    return checksum(&data[0], data.shape[0]) if data.shape[0] else 0xFFFF


def validate(const uint8_t[:] datagram, size_t mtu) -> Verdict:
    """What the receive loop of a fast path with an IPv6 Network decides about a datagram from
    the underlay: an IPv4 packet, or failing that one whose version is 6 is judged as IPv6."""
    if datagram.shape[0] == 0:
        return Verdict.TOO_SHORT
    cdef Verdict verdict = check_ipv4(&datagram[0], datagram.shape[0], mtu)
    if verdict != OK and datagram[0] >> 4 == 6:
        return check_ipv6(&datagram[0], datagram.shape[0], mtu)
    return verdict


def ttl_decrement(uint8_t[:] packet) -> bool:
    """Decrement the TTL of a valid IPv4 packet in place; False if it would reach 0."""
    if packet.shape[0] < IPV4_HEADER_LEN:
        raise ValueError("shorter than an IPv4 header")
    return decrement_ttl(&packet[0])


def net_unreachable(const uint8_t[:] packet):
    """The ICMP error the send loop writes back for a valid IPv4 packet with no route, or None
    when none is due."""
    if packet.shape[0] < IPV4_HEADER_LEN:
        raise ValueError("shorter than an IPv4 header")
    if not wants_unreachable(&packet[0], packet.shape[0]):
        return None
    cdef uint8_t out[ICMP_UNREACH_MAX_LEN]
    cdef size_t n = build_net_unreachable(&packet[0], packet.shape[0], out)
    return bytes(out[:n])


def hop_limit_decrement(uint8_t[:] packet) -> bool:
    """Decrement the hop limit of a valid IPv6 packet in place; False if it would reach 0."""
    if packet.shape[0] < IPV6_HEADER_LEN:
        raise ValueError("shorter than an IPv6 header")
    return decrement_hop_limit(&packet[0])


def icmp6_error(const uint8_t[:] packet, int kind, int code, unsigned int param,
                const uint8_t[:] source):
    """The ICMPv6 error (kind, code, its 32-bit field param) the loops send from the 16-byte
    address `source` for a valid IPv6 packet they cannot forward, or None when none is due."""
    if packet.shape[0] < IPV6_HEADER_LEN:
        raise ValueError("shorter than an IPv6 header")
    if source.shape[0] != 16:
        raise ValueError("an IPv6 address is 16 bytes")
    if not wants_icmp6_error(&packet[0], packet.shape[0]):
        return None
    cdef uint8_t out[ICMP6_ERROR_MAX_LEN]
    cdef size_t n = build_icmp6_error(&packet[0], packet.shape[0], kind, code, param,
                                      &source[0], out)
    return bytes(out[:n])
