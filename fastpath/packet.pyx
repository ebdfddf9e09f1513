"""Python wrappers over the packet helpers in packet.pxd, so tests run the very code the loops run."""

from libc.stdint cimport uint8_t


def ipv4_checksum(const uint8_t[:] data) -> int:
    """The Internet checksum of data, from scratch."""
    return checksum(&data[0], data.shape[0]) if data.shape[0] else 0xFFFF


def validate(const uint8_t[:] datagram, size_t mtu) -> Verdict:
    """What the receive loop decides about a datagram from the underlay."""
    if datagram.shape[0] == 0:
        return Verdict.TOO_SHORT
    return check_ipv4(&datagram[0], datagram.shape[0], mtu)


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
