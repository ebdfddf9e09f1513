# TUN offloads as a stage on the packet vector, the way wireguard-go keeps them in its own module.
#
# With IFF_VNET_HDR and TUNSETOFFLOAD(CSUM | TSO4) the kernel hands the TUN reader TCP
# "super-packets" of up to 64 KiB with a virtio_net_hdr in front, and packets whose L4 checksum
# is left for us to finish. A super-packet is cut into the MTU-sized IPv4 packets that go on the
# wire (one UDP datagram each, as flanneld sends): tso_header() writes each segment's headers,
# and the payloads stay where the TUN read put them, so one sendmsg with UDP_SEGMENT sends them
# all from iovecs (header, payload, header, payload...). On the way in, UDP_GRO hands us many
# datagrams per receive; the Coalescer merges consecutive segments of one TCP flow back into one
# super-packet for one TUN write, again as iovecs into the receive buffer. Both work for IPv4 and
# IPv6 alike (TSO4/TSO6, GSO_TCPV4/GSO_TCPV6); IPv4 keeps functions of its own where the two
# differ on every packet.
# All inline and GIL-free; offload.pyx wraps them for the table-driven tests.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from posix.uio cimport iovec

from fastpath.packet cimport (
    IPV4_HEADER_LEN, IPV6_HEADER_LEN, checksum, fold, load16, load32, store16, sum16,
)


cdef extern from "<linux/virtio_net.h>" nogil:
    struct virtio_net_hdr:
        uint8_t flags
        uint8_t gso_type
        uint16_t hdr_len
        uint16_t gso_size
        uint16_t csum_start
        uint16_t csum_offset

    enum:
        VIRTIO_NET_HDR_F_NEEDS_CSUM
        VIRTIO_NET_HDR_GSO_NONE
        VIRTIO_NET_HDR_GSO_TCPV4
        VIRTIO_NET_HDR_GSO_TCPV6
        VIRTIO_NET_HDR_GSO_ECN


cdef enum:
    # Linux 6.2's UDP segmentation offload for TUN (not in every libc's headers yet).
    VIRTIO_NET_HDR_GSO_UDP_L4 = 5


cdef enum:
    VNET_HDR_LEN = 10           # sizeof(struct virtio_net_hdr)
    IPPROTO_TCP = 6
    IPPROTO_UDP = 17
    TCP_FIN = 0x01
    TCP_PSH = 0x08
    TCP_ACK = 0x10
    TCP_CWR = 0x80
    MAX_IPV4_PACKET = 65535
    # UDP_SEGMENT sends at most 64 segments and 65507 bytes of payload per message.
    UDP_MAX_SEGMENTS = 64
    UDP_MAX_PAYLOAD = 65507


cdef inline void store32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline uint64_t pseudo_header(const uint8_t *ip, uint8_t proto, size_t l4_len) noexcept nogil:
    """The IPv4 pseudo-header's contribution to a TCP/UDP checksum."""
    return sum16(ip + 12, 8, 0) + proto + l4_len


cdef inline uint64_t pseudo_header6(const uint8_t *ip, uint8_t proto,
                                    size_t l4_len) noexcept nogil:
    """The IPv6 pseudo-header's contribution (RFC 8200 8.1): both addresses, the upper-layer
    length and the next header."""
    return sum16(ip + 8, 32, 0) + proto + l4_len


cdef inline bint finish_checksum(uint8_t *pkt, size_t n, const virtio_net_hdr *h) noexcept nogil:
    """Complete a checksum the kernel left partial (NEEDS_CSUM): the field holds the
    pseudo-header sum; the sum from csum_start to the end, complemented, is the checksum."""
    cdef size_t start = h.csum_start
    cdef size_t field = start + h.csum_offset
    if field + 2 > n:
        return False
    cdef uint16_t csum = ~fold(sum16(pkt + start, n - start, 0)) & 0xFFFF
    if csum == 0 and h.csum_offset == 6:  # UDP: 0 would mean "no checksum"
        csum = 0xFFFF
    store16(pkt + field, csum)
    return True


# How a TCP super-packet is cut: every segment carries gso_size payload bytes (the last one what
# is left) behind a copy of the headers, with its own length, sequence number, flags and
# checksums, and over IPv4 its own ID. An IPv6 one (TSO6) has no ID and no header checksum.
cdef struct TsoCut:
    bint v6             # TCP/IPv6: a 40-byte header with TCP right behind it
    size_t iph          # IP header length
    size_t tcph         # TCP header length
    size_t hl           # both
    size_t payload      # payload bytes of the super-packet
    size_t count        # segments
    uint16_t gso_size
    uint16_t ident
    uint32_t seq
    uint8_t flags


cdef inline bint tso_plan(const uint8_t *pkt, size_t n, uint16_t gso_size,
                          TsoCut *cut) noexcept nogil:
    """Whether pkt is a TCP/IPv4 or TCP/IPv6 super-packet (by its version) that can be cut into
    gso_size segments; fills cut. An IPv6 one with extension headers is not cut (Linux's TCP
    sends none)."""
    if n < IPV4_HEADER_LEN or gso_size == 0:
        return False
    cut.v6 = pkt[0] >> 4 == 6
    if cut.v6:
        if n < IPV6_HEADER_LEN or pkt[6] != IPPROTO_TCP:
            return False
        cut.iph = IPV6_HEADER_LEN
    else:
        if pkt[9] != IPPROTO_TCP:
            return False
        cut.iph = (pkt[0] & 0x0F) * 4
    if cut.iph < IPV4_HEADER_LEN or cut.iph + 20 > n:
        return False
    cut.tcph = (pkt[cut.iph + 12] >> 4) * 4
    cut.hl = cut.iph + cut.tcph
    # A segment must fit one datagram: a larger gso_size would leave no segment per message.
    if cut.tcph < 20 or cut.hl >= n or cut.hl + gso_size > UDP_MAX_PAYLOAD:
        return False
    cut.payload = n - cut.hl
    cut.count = (cut.payload + gso_size - 1) // gso_size
    cut.gso_size = gso_size
    cut.ident = 0 if cut.v6 else load16(pkt + 4)
    cut.seq = load32(pkt + cut.iph + 4)
    cut.flags = pkt[cut.iph + 13]
    return True


cdef inline size_t tso_segment_len(const TsoCut *cut, size_t i) noexcept nogil:
    """Payload bytes of segment i."""
    return cut.payload - i * cut.gso_size if i == cut.count - 1 else cut.gso_size


cdef inline void copy_words(uint8_t *o, const uint8_t *p, size_t n) noexcept nogil:
    """Copy n bytes, n a multiple of 4 (IPv4 and TCP headers are): a few word moves, where a
    memcpy of a length unknown at compile time became a slow-starting `rep movs`."""
    cdef size_t k
    for k in range(0, n, 4):
        memcpy(o + k, p + k, 4)


cdef inline void tso_header(const uint8_t *pkt, const TsoCut *cut, size_t i,
                            uint8_t *o) noexcept nogil:
    """Write segment i's headers (cut.hl bytes) at o, the checksums complete. The payload stays
    where it is, at pkt + cut.hl + i * cut.gso_size: the TCP checksum is summed there."""
    cdef size_t this = tso_segment_len(cut, i)
    cdef size_t iph = cut.iph
    copy_words(o, pkt, cut.hl)
    cdef uint64_t s
    if cut.v6:
        store16(o + 4, cut.tcph + this)
        s = pseudo_header6(o, IPPROTO_TCP, cut.tcph + this)
    else:
        store16(o + 2, cut.hl + this)
        store16(o + 4, <uint16_t>(cut.ident + i))
        store16(o + 10, 0)
        store16(o + 10, checksum(o, iph))
        s = pseudo_header(o, IPPROTO_TCP, cut.tcph + this)
    store32(o + iph + 4, cut.seq + <uint32_t>(i * cut.gso_size))
    cdef uint8_t f = cut.flags
    if i != cut.count - 1:
        f &= ~(TCP_FIN | TCP_PSH)
    if i != 0:
        f &= ~TCP_CWR
    o[iph + 13] = f
    store16(o + iph + 16, 0)
    s = sum16(o + iph, cut.tcph, s)
    s = sum16(pkt + cut.hl + i * cut.gso_size, this, s)
    store16(o + iph + 16, ~fold(s) & 0xFFFF)


# ---- receive side: coalescing TCP segments into one TUN write --------------------------------

cdef enum:
    # A merged packet is written as iovecs: the virtio_net_hdr, the first segment, then the
    # payload of each segment appended to it.
    GRO_MAX_SEGMENTS = 64
    GRO_MAX_IOVS = GRO_MAX_SEGMENTS + 1


cdef struct Coalescer:
    uint8_t vnet[VNET_HDR_LEN]
    iovec iov[GRO_MAX_IOVS]  # the header, the first segment (whose headers are rewritten on
                             # finish), the payloads after it: all where they were received
    size_t iovcnt
    size_t len          # bytes of packet held; 0: empty
    size_t iph          # IP header length: 20 (IPv4, never options) or 40 (IPv6)
    size_t hl           # IP + TCP or UDP header length
    uint8_t proto       # IPPROTO_TCP or IPPROTO_UDP
    uint32_t next_seq   # TCP: the sequence number a following segment must carry
    uint16_t gso_size   # payload of the first segment: every other one is this or the last
    bint closed         # PSH seen or a short segment appended: nothing more may follow


cdef inline size_t gro_header_len(const uint8_t *p, size_t n, bint udp) noexcept nogil:
    """IPv4 + L4 header length if p may be coalesced, else 0: TCP with only ACK or ACK|PSH and
    some payload; with udp also UDP with DF set and some payload (the kernel segments a merged
    UDP packet again where it is delivered, Linux 6.2+). Never IP options or fragments."""
    if n < 28 or p[0] != 0x45 or (p[6] & 0x3F) or p[7]:
        return 0
    if udp and p[9] == IPPROTO_UDP:
        return 28 if p[6] & 0x40 and n > 28 and load16(p + 24) == n - IPV4_HEADER_LEN else 0
    if n < 40 or p[9] != IPPROTO_TCP:
        return 0
    cdef size_t hl = IPV4_HEADER_LEN + (p[32] >> 4) * 4
    if hl < 40 or hl >= n:
        return 0
    if p[33] != TCP_ACK and p[33] != (TCP_ACK | TCP_PSH):
        return 0
    return hl


cdef inline size_t gro_header_len6(const uint8_t *p, size_t n, bint udp) noexcept nogil:
    """gro_header_len() for a valid IPv6 packet: IPv6 + L4 header length if it may be coalesced,
    else 0. TCP as over IPv4; with udp also UDP with some payload (IPv6 is never fragmented on
    the way, so there is no DF to ask for). Never extension headers."""
    if udp and p[6] == IPPROTO_UDP:
        return 48 if n > 48 and load16(p + 44) == n - IPV6_HEADER_LEN else 0
    if n < 60 or p[6] != IPPROTO_TCP:
        return 0
    cdef size_t hl = IPV6_HEADER_LEN + (p[52] >> 4) * 4
    if hl < 60 or hl >= n:
        return 0
    if p[53] != TCP_ACK and p[53] != (TCP_ACK | TCP_PSH):
        return 0
    return hl


cdef inline void gro_start(Coalescer *c, uint8_t *p, size_t n, size_t hl) noexcept nogil:
    """Hold p (not copied: it must stay in place until the finish) as the first segment."""
    c.iov[0].iov_base = c.vnet
    c.iov[0].iov_len = VNET_HDR_LEN
    c.iov[1].iov_base = p
    c.iov[1].iov_len = n
    c.iovcnt = 2
    c.len = n
    c.hl = hl
    if p[0] >> 4 == 6:
        c.iph = IPV6_HEADER_LEN
        c.proto = p[6]
    else:
        c.iph = IPV4_HEADER_LEN
        c.proto = p[9]
    c.gso_size = <uint16_t>(n - hl)
    if c.proto == IPPROTO_TCP:
        c.next_seq = load32(p + c.iph + 4) + <uint32_t>(n - hl)
        c.closed = p[c.iph + 13] & TCP_PSH
    else:
        c.closed = False


cdef inline void gro_take(Coalescer *c, uint8_t *p, size_t payload, size_t hl) noexcept nogil:
    """Append p's payload, which continues the held flow, by reference."""
    c.iov[c.iovcnt].iov_base = p + hl
    c.iov[c.iovcnt].iov_len = payload
    c.iovcnt += 1
    c.len += payload
    if payload < c.gso_size:
        c.closed = True


cdef inline bint gro_append6(Coalescer *c, uint8_t *p, size_t n, size_t hl) noexcept nogil:
    """gro_append() for an IPv6 packet."""
    cdef uint8_t *h = <uint8_t *>c.iov[1].iov_base
    cdef size_t payload = n - hl
    if (c.len == 0 or c.closed or c.iph != IPV6_HEADER_LEN or hl != c.hl or p[6] != c.proto
            or payload > c.gso_size or c.iovcnt == GRO_MAX_IOVS
            or c.len + payload > MAX_IPV4_PACKET):
        return False
    # Same traffic class and flow label (as the kernel's IPv6 GRO), next header, hop limit,
    # addresses and ports. The payload length and the checksums may differ.
    if (memcmp(h, p, 4) or h[6] != p[6] or h[7] != p[7] or memcmp(h + 8, p + 8, 32)
            or memcmp(h + 40, p + 40, 4)):
        return False
    if c.proto == IPPROTO_TCP:
        if (load32(p + 44) != c.next_seq or memcmp(h + 48, p + 48, 5)
                or (h[53] | TCP_PSH) != (p[53] | TCP_PSH) or memcmp(h + 54, p + 54, 2)
                or memcmp(h + 60, p + 60, hl - 60)):
            return False
        c.next_seq += <uint32_t>payload
        if p[53] & TCP_PSH:
            h[53] |= TCP_PSH
            c.closed = True
    gro_take(c, p, payload, hl)
    return True


cdef inline bint gro_append(Coalescer *c, uint8_t *p, size_t n, size_t hl) noexcept nogil:
    """Append p's payload (by reference) if it continues the held segment's flow exactly; False
    if not."""
    cdef uint8_t *h = <uint8_t *>c.iov[1].iov_base
    cdef size_t payload = n - hl
    if (c.len == 0 or c.closed or c.iph != IPV4_HEADER_LEN or hl != c.hl or p[9] != c.proto
            or payload > c.gso_size or c.iovcnt == GRO_MAX_IOVS
            or c.len + payload > MAX_IPV4_PACKET):
        return False
    # Same ToS, DF, TTL, protocol, addresses and ports. The IP length, ID and checksums may
    # differ (they are rewritten, as the kernel's GRO does).
    if (h[1] != p[1] or h[6] != p[6] or h[8] != p[8] or memcmp(h + 12, p + 12, 8)
            or memcmp(h + 20, p + 20, 4)):
        return False
    if c.proto == IPPROTO_TCP:
        # And the same ACK, header length, flags but PSH, window and options, in sequence.
        if (load32(p + 24) != c.next_seq or memcmp(h + 28, p + 28, 5)
                or (h[33] | TCP_PSH) != (p[33] | TCP_PSH) or memcmp(h + 34, p + 34, 2)
                or memcmp(h + 40, p + 40, hl - 40)):
            return False
        c.next_seq += <uint32_t>payload
        if p[33] & TCP_PSH:
            h[33] |= TCP_PSH
            c.closed = True
    gro_take(c, p, payload, hl)
    return True


cdef inline size_t gro_finish(Coalescer *c) noexcept nogil:
    """Fill the virtio_net_hdr (and, for a merged packet, the first segment's IP length, the
    IPv4 header checksum and the TCP or UDP pseudo-header sum the kernel completes); returns
    the bytes the iovecs hold, ready to write, and empties the coalescer."""
    cdef uint8_t *p = <uint8_t *>c.iov[1].iov_base
    cdef virtio_net_hdr *h = <virtio_net_hdr *>c.vnet
    memset(c.vnet, 0, VNET_HDR_LEN)
    cdef size_t csum_offset = 16 if c.proto == IPPROTO_TCP else 6
    cdef size_t iph = c.iph
    cdef uint64_t pseudo
    if c.iovcnt > 2:
        if iph == IPV6_HEADER_LEN:
            store16(p + 4, <uint16_t>(c.len - iph))
            pseudo = pseudo_header6(p, c.proto, c.len - iph)
            h.gso_type = VIRTIO_NET_HDR_GSO_TCPV6
        else:
            store16(p + 2, <uint16_t>c.len)
            store16(p + 10, 0)
            store16(p + 10, checksum(p, IPV4_HEADER_LEN))
            pseudo = pseudo_header(p, c.proto, c.len - iph)
            h.gso_type = VIRTIO_NET_HDR_GSO_TCPV4
        if c.proto == IPPROTO_UDP:
            store16(p + iph + 4, <uint16_t>(c.len - iph))
            h.gso_type = VIRTIO_NET_HDR_GSO_UDP_L4
        store16(p + iph + csum_offset, fold(pseudo))
        h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
        h.hdr_len = <uint16_t>c.hl
        h.gso_size = c.gso_size
        h.csum_start = <uint16_t>iph
        h.csum_offset = csum_offset
    cdef size_t total = VNET_HDR_LEN + c.len
    c.len = 0
    return total
