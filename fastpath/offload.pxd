# TUN offloads as a stage on the packet vector, the way wireguard-go keeps them in its own module.
#
# With IFF_VNET_HDR and TUNSETOFFLOAD(CSUM | TSO4) the kernel hands the TUN reader TCP
# "super-packets" of up to 64 KiB with a virtio_net_hdr in front, and packets whose L4 checksum
# is left for us to finish. tso_split() cuts a super-packet into the MTU-sized IPv4 packets that go
# on the wire (one UDP datagram each, as flanneld sends), laid end to end so one sendmsg with
# UDP_SEGMENT sends them all. On the way in, UDP_GRO hands us many datagrams per receive; the
# Coalescer merges consecutive segments of one TCP flow back into one super-packet for one TUN
# write. All inline and GIL-free; offload.pyx wraps them for the table-driven tests.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from fastpath.packet cimport IPV4_HEADER_LEN, checksum, fold, load16, load32, store16, sum16


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
        VIRTIO_NET_HDR_GSO_ECN


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


cdef inline int tso_split(const uint8_t *pkt, size_t n, uint16_t gso_size, uint8_t *out,
                          size_t out_cap, size_t *seg_len) noexcept nogil:
    """Cut a TCP/IPv4 super-packet into segments of gso_size payload bytes at out, each a
    complete IPv4 packet (lengths, IDs, sequence numbers, flags and both checksums set), every one
    seg_len bytes apart (the last may be shorter). Returns the count, or -1 if it cannot."""
    if n < IPV4_HEADER_LEN or pkt[9] != IPPROTO_TCP or gso_size == 0:
        return -1
    cdef size_t iph = (pkt[0] & 0x0F) * 4
    if iph < IPV4_HEADER_LEN or iph + 20 > n:
        return -1
    cdef size_t tcph = (pkt[iph + 12] >> 4) * 4
    cdef size_t hl = iph + tcph
    if tcph < 20 or hl >= n:
        return -1
    cdef size_t payload = n - hl
    cdef size_t count = (payload + gso_size - 1) // gso_size
    if count * hl + payload > out_cap:
        return -1
    cdef uint32_t seq = load32(pkt + iph + 4)
    cdef uint16_t ident = load16(pkt + 4)
    cdef uint8_t flags = pkt[iph + 13]
    cdef size_t i, this
    cdef uint8_t *o
    cdef uint8_t f
    for i in range(count):
        this = payload - i * gso_size if i == count - 1 else gso_size
        o = out + i * (hl + gso_size)
        memcpy(o, pkt, hl)
        memcpy(o + hl, pkt + hl + i * gso_size, this)
        store16(o + 2, hl + this)
        store16(o + 4, <uint16_t>(ident + i))
        store16(o + 10, 0)
        store16(o + 10, checksum(o, iph))
        store32(o + iph + 4, seq + <uint32_t>(i * gso_size))
        f = flags
        if i != count - 1:
            f &= ~(TCP_FIN | TCP_PSH)
        if i != 0:
            f &= ~TCP_CWR
        o[iph + 13] = f
        store16(o + iph + 16, 0)
        store16(o + iph + 16, ~fold(sum16(o + iph, tcph + this,
                                            pseudo_header(o, IPPROTO_TCP, tcph + this))) & 0xFFFF)
    seg_len[0] = hl + gso_size
    return <int>count


# ---- receive side: coalescing TCP segments into one TUN write --------------------------------

cdef struct Coalescer:
    uint8_t *buf        # VNET_HDR_LEN + MAX_IPV4_PACKET bytes: the header, then the packet
    size_t len          # bytes of packet held; 0: empty
    size_t hl           # IPv4 + TCP header length
    uint32_t next_seq   # the sequence number a following segment must carry
    uint16_t gso_size   # payload of the first segment: every other one is this or the last
    uint16_t merged     # segments appended to the first
    bint closed         # PSH seen or a short segment appended: nothing more may follow


cdef inline size_t gro_header_len(const uint8_t *p, size_t n) noexcept nogil:
    """IPv4 + TCP header length if p may be coalesced (TCP over IPv4 with no IP options and no
    fragmenting, only ACK or ACK|PSH, some payload), else 0."""
    if n < 40 or p[0] != 0x45 or p[9] != IPPROTO_TCP or (p[6] & 0x3F) or p[7]:
        return 0
    cdef size_t hl = IPV4_HEADER_LEN + (p[32] >> 4) * 4
    if hl < 40 or hl >= n:
        return 0
    if p[33] != TCP_ACK and p[33] != (TCP_ACK | TCP_PSH):
        return 0
    return hl


cdef inline void gro_start(Coalescer *c, const uint8_t *p, size_t n, size_t hl) noexcept nogil:
    memcpy(c.buf + VNET_HDR_LEN, p, n)
    c.len = n
    c.hl = hl
    c.next_seq = load32(p + 24) + <uint32_t>(n - hl)
    c.gso_size = <uint16_t>(n - hl)
    c.merged = 0
    c.closed = p[33] & TCP_PSH


cdef inline bint gro_append(Coalescer *c, const uint8_t *p, size_t n, size_t hl) noexcept nogil:
    """Append p's payload if it continues the held segment's flow exactly; False if not."""
    cdef const uint8_t *h = c.buf + VNET_HDR_LEN
    cdef size_t payload = n - hl
    if (c.len == 0 or c.closed or hl != c.hl or payload > c.gso_size
            or c.len + payload > MAX_IPV4_PACKET or load32(p + 24) != c.next_seq):
        return False
    # Same ToS, DF, TTL, protocol, addresses; same ports, ACK, header length, flags but PSH,
    # window and options. The IP length, ID, checksums and TCP sequence may differ.
    if (h[1] != p[1] or h[6] != p[6] or h[8] != p[8] or memcmp(h + 12, p + 12, 8)
            or memcmp(h + 20, p + 20, 4) or memcmp(h + 28, p + 28, 5)
            or (h[33] | TCP_PSH) != (p[33] | TCP_PSH) or memcmp(h + 34, p + 34, 2)
            or memcmp(h + 40, p + 40, hl - 40)):
        return False
    memcpy(c.buf + VNET_HDR_LEN + c.len, p + hl, payload)
    c.len += payload
    c.next_seq += <uint32_t>payload
    c.merged += 1
    if p[33] & TCP_PSH:
        c.buf[VNET_HDR_LEN + 33] |= TCP_PSH
        c.closed = True
    if payload < c.gso_size:
        c.closed = True
    return True


cdef inline size_t gro_finish(Coalescer *c) noexcept nogil:
    """Fill the virtio_net_hdr (and, for a merged packet, the IPv4 length and checksum and the
    TCP pseudo-header sum the kernel completes); returns the bytes to write."""
    cdef uint8_t *p = c.buf + VNET_HDR_LEN
    cdef virtio_net_hdr *h = <virtio_net_hdr *>c.buf
    memset(c.buf, 0, VNET_HDR_LEN)
    if c.merged:
        store16(p + 2, <uint16_t>c.len)
        store16(p + 10, 0)
        store16(p + 10, checksum(p, IPV4_HEADER_LEN))
        store16(p + 36, fold(pseudo_header(p, IPPROTO_TCP, c.len - IPV4_HEADER_LEN)))
        h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
        h.gso_type = VIRTIO_NET_HDR_GSO_TCPV4
        h.hdr_len = <uint16_t>c.hl
        h.gso_size = c.gso_size
        h.csum_start = IPV4_HEADER_LEN
        h.csum_offset = 16
    cdef size_t total = VNET_HDR_LEN + c.len
    c.len = 0
    return total
