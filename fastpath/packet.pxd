# IPv4 and IPv6 packet helpers for the loops: validation, TTL (hop limit) with an incremental
# checksum fix, the ICMP "destination net unreachable" reply and ICMPv6's errors. All inline and
# GIL-free; packet.pyx wraps them for tests.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

cdef enum:
    IPV4_HEADER_LEN = 20
    ICMP_HEADER_LEN = 8
    # An ICMP error quotes the offending header plus its first 8 bytes of payload (RFC 792); with
    # IP options the header is up to 60 bytes.
    ICMP_UNREACH_MAX_LEN = IPV4_HEADER_LEN + ICMP_HEADER_LEN + 60 + 8
    IPPROTO_ICMP = 1
    ICMP_DEST_UNREACH = 3
    ICMP_NET_UNREACH = 0
    ICMP_REPLY_TTL = 64
    IPV6_HEADER_LEN = 40
    ICMP6_HEADER_LEN = 8
    IPPROTO_ICMPV6 = 58
    # An ICMPv6 error quotes as much of the offending packet as fits IPv6's minimum MTU (RFC 4443
    # 2.4 (c)): the whole error is at most 1280 bytes.
    ICMP6_ERROR_MAX_LEN = 1280
    ICMP6_DEST_UNREACH = 1
    ICMP6_NO_ROUTE = 0
    ICMP6_PACKET_TOO_BIG = 2
    ICMP6_TIME_EXCEEDED = 3
    ICMP6_HOP_LIMIT_EXCEEDED = 0
    # Extension headers walked to find whether a packet is an ICMPv6 error (RFC 8200 4.1's order
    # has at most 7 before the upper layer).
    IPV6_MAX_EXTENSIONS = 8

# Why a datagram from the underlay is not written to the TUN.
cpdef enum Verdict:
    OK = 0
    TOO_SHORT = 1      # shorter than an IPv4 header
    BAD_HEADER = 2     # version is not 4, or IHL below 5 or past the end
    BAD_LENGTH = 3     # IPv4 total length differs from the datagram's length
    TOO_BIG = 4        # longer than the MTU
    # (For IPv6 the same verdicts: shorter than its 40-byte header, version not 6, payload
    # length differs from the datagram's.)


cdef inline uint16_t load16(const uint8_t *p) noexcept nogil:
    return (p[0] << 8) | p[1]


cdef inline void store16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xFF


cdef inline uint32_t load32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


# The ones'-complement sum is the packet path's one pass over every payload byte (the TSO split
# checksums each segment), so it is written for vector units with the compiler's portable vector
# types (SSE2 on x86-64, NEON on arm64): 16 bytes a turn, each 32-bit lane's two 16-bit halves
# added into 32-bit accumulators, which cannot overflow within a 64 KiB block. RFC 1071's
# byte-order independence lets it sum in native order and swap once at the end.
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    typedef uint32_t pf_u32x4 __attribute__((vector_size(16)));
    static inline uint16_t pf_ones_sum(const uint8_t *p, size_t n) {
        uint64_t a = 0;
        uint32_t w;
        while (n >= 16) {
            size_t block = n < 65536 ? n & ~(size_t)15 : 65536;
            const pf_u32x4 low16 = {0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};
            pf_u32x4 lo = {0, 0, 0, 0}, hi = {0, 0, 0, 0}, x;
            for (size_t i = 0; i < block; i += 16) {
                memcpy(&x, p + i, 16);
                lo += x & low16;
                hi += x >> 16;
            }
            for (int k = 0; k < 4; k++) a += (uint64_t)lo[k] + hi[k];
            p += block;
            n -= block;
        }
        for (; n >= 4; p += 4, n -= 4) {
            memcpy(&w, p, 4);
            a += w;
        }
        if (n >= 2) {
            uint16_t h;
            memcpy(&h, p, 2);
            a += h;
            p += 2;
            n -= 2;
        }
    #if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        if (n) a += p[0];
    #else
        if (n) a += (uint32_t)p[0] << 8;
    #endif
        while (a >> 16) a = (a & 0xFFFF) + (a >> 16);
    #if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        a = ((a & 0xFF) << 8) | (a >> 8);
    #endif
        return (uint16_t)a;
    }
    """
    uint16_t pf_ones_sum(const uint8_t *p, size_t n) nogil


cdef inline uint64_t sum16(const uint8_t *p, size_t n, uint64_t total) noexcept nogil:
    """The ones'-complement sum of n bytes (as big-endian 16-bit words) added to total, not yet
    folded."""
    return total + pf_ones_sum(p, n)


cdef inline uint16_t fold(uint64_t s) noexcept nogil:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return <uint16_t>s


cdef inline uint16_t checksum(const uint8_t *p, size_t n) noexcept nogil:
    """The Internet checksum (RFC 1071) of n bytes, computed from scratch."""
    return ~fold(sum16(p, n, 0)) & 0xFFFF


cdef inline Verdict check_ipv4(const uint8_t *p, size_t n, size_t mtu) noexcept nogil:
    """Whether n bytes from the underlay hold exactly one IPv4 packet we may write to the TUN."""
    if n > mtu:
        return TOO_BIG
    if n < IPV4_HEADER_LEN:
        return TOO_SHORT
    cdef size_t ihl = (p[0] & 0x0F) * 4
    if p[0] >> 4 != 4 or ihl < IPV4_HEADER_LEN or ihl > n:
        return BAD_HEADER
    if load16(p + 2) != n:
        return BAD_LENGTH
    return OK


cdef inline bint decrement_ttl(uint8_t *p) noexcept nogil:
    """Decrement the TTL of the IPv4 header at p, as flanneld does on send and on receive.

    Returns False, leaving the packet alone, when the TTL would reach 0. The header checksum is
    fixed incrementally with RFC 1624's HC' = ~(~HC + ~m + m'), which (unlike the older
    HC + 0x0100 shortcut) gives exactly what a checksum computed from scratch gives.
    """
    if p[8] <= 1:
        return False
    cdef uint32_t old_word = load16(p + 8)     # TTL and protocol
    p[8] -= 1
    cdef uint32_t s = (~load16(p + 10) & 0xFFFF) + (~old_word & 0xFFFF) + load16(p + 8)
    store16(p + 10, ~fold(s) & 0xFFFF)
    return True


cdef inline bint wants_unreachable(const uint8_t *p, size_t n) noexcept nogil:
    """Whether a packet with no route should get an ICMP error: not for fragments after the
    first, and never in answer to an ICMP error (RFC 1122 3.2.2), so two hosts cannot loop."""
    cdef size_t ihl = (p[0] & 0x0F) * 4
    if load16(p + 6) & 0x1FFF:
        return False
    if p[9] == IPPROTO_ICMP:
        if n <= ihl:
            return False
        # Echo request/reply (8, 0), timestamp (13, 14) and info (15, 16) are queries.
        return p[ihl] in (0, 8, 13, 14, 15, 16)
    return True


cdef inline size_t build_net_unreachable(const uint8_t *p, size_t n, uint8_t *out) noexcept nogil:
    """Write into out (ICMP_UNREACH_MAX_LEN bytes) the ICMP "destination net unreachable" that
    answers the IPv4 packet p, from its destination back to its source; return its length."""
    cdef size_t quote = (p[0] & 0x0F) * 4 + 8
    if quote > n:
        quote = n
    cdef size_t total = IPV4_HEADER_LEN + ICMP_HEADER_LEN + quote
    memset(out, 0, IPV4_HEADER_LEN + ICMP_HEADER_LEN)
    out[0] = 0x45
    store16(out + 2, total)
    out[8] = ICMP_REPLY_TTL
    out[9] = IPPROTO_ICMP
    memcpy(out + 12, p + 16, 4)     # from the unreachable destination
    memcpy(out + 16, p + 12, 4)     # back to the sender
    store16(out + 10, checksum(out, IPV4_HEADER_LEN))
    cdef uint8_t *icmp = out + IPV4_HEADER_LEN
    icmp[0] = ICMP_DEST_UNREACH
    icmp[1] = ICMP_NET_UNREACH
    memcpy(icmp + ICMP_HEADER_LEN, p, quote)
    store16(icmp + 2, checksum(icmp, ICMP_HEADER_LEN + quote))
    return total


# ---- IPv6 ----------------------------------------------------------------------------------------

cdef inline Verdict check_ipv6(const uint8_t *p, size_t n, size_t mtu) noexcept nogil:
    """Whether n bytes from the underlay hold exactly one IPv6 packet we may write to the TUN
    (a jumbogram, payload length 0 with more behind it, is BAD_LENGTH: no TUN carries one)."""
    if n > mtu:
        return TOO_BIG
    if n < IPV6_HEADER_LEN:
        return TOO_SHORT
    if p[0] >> 4 != 6:
        return BAD_HEADER
    if load16(p + 4) + IPV6_HEADER_LEN != n:
        return BAD_LENGTH
    return OK


cdef inline bint decrement_hop_limit(uint8_t *p) noexcept nogil:
    """Decrement the hop limit of the IPv6 header at p where the IPv4 code decrements the TTL
    (IPv6 has no header checksum to fix). False, leaving the packet alone, when it would
    reach 0."""
    if p[7] <= 1:
        return False
    p[7] -= 1
    return True


cdef inline bint wants_icmp6_error(const uint8_t *p, size_t n) noexcept nogil:
    """Whether an IPv6 packet we cannot forward should get an ICMPv6 error (RFC 4443 2.4 (e)):
    not when its source is unspecified or multicast, not when it went to a multicast address,
    not for fragments after the first (as for IPv4), and never in answer to an ICMPv6 error, so
    two hosts cannot loop; a packet whose extension headers cannot be walked within it gets
    none, since whether it is an error cannot be told."""
    cdef size_t i, off = IPV6_HEADER_LEN
    cdef uint8_t nh = p[6]
    if p[8] == 0xFF or p[24] == 0xFF:
        return False
    for i in range(16):
        if p[8 + i]:
            break
    else:
        return False
    for i in range(IPV6_MAX_EXTENSIONS):
        if nh == 44:  # fragment header: 8 bytes, the offset in its upper 13 bits of bytes 2-3
            if off + 8 > n or load16(p + off + 2) & 0xFFF8:
                return False
            nh = p[off]
            off += 8
        elif nh == 0 or nh == 43 or nh == 60:  # hop-by-hop, routing, destination options
            if off + 2 > n:
                return False
            nh = p[off]
            off += (p[off + 1] + 1) * 8
        elif nh == IPPROTO_ICMPV6:
            # Informational messages are 128-255; errors 0-127.
            return off < n and p[off] >= 128
        else:
            return True
    return False


cdef inline size_t build_icmp6_error(const uint8_t *p, size_t n, uint8_t kind, uint8_t code,
                                     uint32_t param, const uint8_t *source,
                                     uint8_t *out) noexcept nogil:
    """Write into out (ICMP6_ERROR_MAX_LEN bytes) the ICMPv6 error `kind`/`code` (its 32-bit
    field `param`: the MTU of a packet too big, 0 otherwise) that answers the IPv6 packet p, from
    the 16-byte address at `source` back to p's source, quoting as much of p as fits 1280 bytes;
    return its length. The checksum covers RFC 8200 8.1's pseudo-header."""
    cdef size_t quote = n
    if quote > ICMP6_ERROR_MAX_LEN - IPV6_HEADER_LEN - ICMP6_HEADER_LEN:
        quote = ICMP6_ERROR_MAX_LEN - IPV6_HEADER_LEN - ICMP6_HEADER_LEN
    cdef size_t length = ICMP6_HEADER_LEN + quote
    memset(out, 0, IPV6_HEADER_LEN + ICMP6_HEADER_LEN)
    out[0] = 0x60
    store16(out + 4, <uint16_t>length)
    out[6] = IPPROTO_ICMPV6
    out[7] = ICMP_REPLY_TTL
    memcpy(out + 8, source, 16)
    memcpy(out + 24, p + 8, 16)     # back to the sender
    cdef uint8_t *icmp = out + IPV6_HEADER_LEN
    icmp[0] = kind
    icmp[1] = code
    store16(icmp + 4, <uint16_t>(param >> 16))
    store16(icmp + 6, <uint16_t>param)
    memcpy(icmp + ICMP6_HEADER_LEN, p, quote)
    cdef uint64_t s = sum16(out + 8, 32, length + IPPROTO_ICMPV6)
    store16(icmp + 2, ~fold(sum16(icmp, length, s)) & 0xFFFF)
    return IPV6_HEADER_LEN + length
