# IPv4 packet helpers for the loops: validation, TTL with an incremental checksum fix, and the ICMP
# "destination net unreachable" reply. All inline and GIL-free; packet.pyx wraps them for tests.

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

# Why a datagram from the underlay is not written to the TUN.
cpdef enum Verdict:
    OK = 0
    TOO_SHORT = 1      # shorter than an IPv4 header
    BAD_HEADER = 2     # version is not 4, or IHL below 5 or past the end
    BAD_LENGTH = 3     # IPv4 total length differs from the datagram's length
    TOO_BIG = 4        # longer than the MTU


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
