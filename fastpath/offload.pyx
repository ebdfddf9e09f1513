"""Python wrappers over the offload stage in offload.pxd, so tests run the code the loops run."""

from libc.stdint cimport uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy


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
    """A TCP/IPv4 super-packet cut into its segments, as the send loop cuts it."""
    cdef size_t cap = packet.shape[0] + 128 * 60 + 1
    cdef uint8_t *out = <uint8_t *>malloc(cap)
    cdef size_t segment = 0
    if out == NULL:
        raise MemoryError()
    try:
        count = tso_split(&packet[0], packet.shape[0], gso_size, out, cap, &segment)
        if count < 0:
            raise ValueError("not a TCP/IPv4 super-packet that can be cut")
        total = packet.shape[0] + (count - 1) * (segment - gso_size)
        blob = bytes(out[:total])
    finally:
        free(out)
    return [blob[i:i + segment] for i in range(0, total, segment)]


def coalesce(packets) -> list:
    """What the receive loop writes into the TUN for these packets, in order:
    (virtio_net_hdr, packet) pairs."""
    cdef Coalescer c
    cdef uint8_t *buf = <uint8_t *>malloc(VNET_HDR_LEN + MAX_IPV4_PACKET)
    cdef const uint8_t[:] p
    cdef size_t headers, total
    if buf == NULL:
        raise MemoryError()
    c.buf = buf
    c.len = 0
    writes = []

    def flush_held():
        nonlocal total
        if c.len:
            total = gro_finish(&c)
            writes.append((bytes(buf[:VNET_HDR_LEN]), bytes(buf[VNET_HDR_LEN:total])))

    try:
        for packet in packets:
            p = packet
            headers = gro_header_len(&p[0], p.shape[0])
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
