"""Python wrappers over the offload stage in offload.pxd, so tests run the code the loops run."""

from libc.stdint cimport uint8_t
from libc.stdlib cimport free, malloc


cdef size_t gather(const iovec *iov, size_t iovcnt, uint8_t *out) noexcept:
    """Copy what iovecs point at into one buffer (what writev would write); returns the bytes
    copied."""
    cdef size_t i, n = 0
    for i in range(iovcnt):
        memcpy(out + n, iov[i].iov_base, iov[i].iov_len)
        n += iov[i].iov_len
    return n


def finish(const uint8_t[:] vnet, const uint8_t[:] packet) -> bytes:
    """The packet with the checksum that its virtio_net_hdr left partial completed."""
    if vnet.shape[0] != VNET_HDR_LEN:
        raise ValueError("a virtio_net_hdr is 10 bytes")
    out = bytearray(packet)
    cdef uint8_t[:] view = out
    if not finish_checksum(&view[0], view.shape[0], <const virtio_net_hdr *>&vnet[0]):
        raise ValueError("the checksum offsets lie outside the packet")
    return bytes(out)


def split(const uint8_t[:] packet, unsigned int gso_size) -> list:
    """A TCP/IPv4 or TCP/IPv6 super-packet cut into its segments, as the send loop cuts it: each
    segment's headers from tso_header(), its payload where it lies in the super-packet."""
    cdef TsoCut cut
    if packet.shape[0] == 0 or not tso_plan(&packet[0], packet.shape[0], gso_size, &cut):
        raise ValueError("not a TCP super-packet that can be cut")
    cdef uint8_t header[120]
    data = bytes(packet)
    segments = []
    for i in range(cut.count):
        tso_header(&packet[0], &cut, i, header)
        start = cut.hl + i * cut.gso_size
        segments.append(bytes(header[:cut.hl]) + data[start:start + tso_segment_len(&cut, i)])
    return segments


def coalesce(packets, bint udp=False) -> list:
    """What the receive loop writes into the TUN for these packets (valid IPv4 or IPv6 ones), in
    order:
    (virtio_net_hdr, packet) pairs, each gathered from the coalescer's iovecs; with udp, UDP
    datagrams are merged too."""
    cdef Coalescer c
    cdef uint8_t *buf = <uint8_t *>malloc(VNET_HDR_LEN + MAX_IPV4_PACKET)
    cdef uint8_t[:] p
    cdef size_t headers, total
    if buf == NULL:
        raise MemoryError()
    c.len = 0
    writes = []
    # The coalescer holds packets by reference and rewrites the first one's headers in place,
    # as it does in the receive buffers.
    held = [bytearray(packet) for packet in packets]

    def flush_held():
        if c.len:
            total = gro_finish(&c)
            gather(c.iov, c.iovcnt, buf)
            writes.append((bytes(buf[:VNET_HDR_LEN]), bytes(buf[VNET_HDR_LEN:total])))

    try:
        for packet in held:
            p = packet
            # As the receive loop: an IPv6 packet by IPv6's rules.
            if p.shape[0] >= IPV6_HEADER_LEN and p[0] >> 4 == 6:
                headers = gro_header_len6(&p[0], p.shape[0], udp)
                if headers and gro_append6(&c, &p[0], p.shape[0], headers):
                    continue
            else:
                headers = gro_header_len(&p[0], p.shape[0], udp)
                if headers and gro_append(&c, &p[0], p.shape[0], headers):
                    continue
            flush_held()
            if headers:
                gro_start(&c, &p[0], p.shape[0], headers)
            else:
                writes.append((bytes(VNET_HDR_LEN), bytes(packet)))
        flush_held()
    finally:
        free(buf)
    return writes
