# The two packet loops, TUN -> UDP and UDP -> TUN. Each runs in its own thread without the GIL and
# moves a vector of packets per wake-up. A loop owns its state; other threads only read the counters
# (atomic loads) and raise the stop flag.

from libc.stdint cimport uint8_t, uint64_t
from posix.uio cimport iovec

from fastpath.packet cimport ICMP_UNREACH_MAX_LEN
from fastpath.system cimport mmsghdr, sockaddr_in
from fastpath.table cimport route_table_t

# Batch sizes are counted in power-of-two buckets: 1, 2-3, 4-7, ..., 128 and more.
cdef enum:
    BATCH_BUCKETS = 8


# A vector of packet buffers with the mmsghdr/iovec/address arrays that describe them to
# sendmmsg/recvmmsg. Slot i's buffer is data + i * buf_size.
cdef struct PacketVector:
    unsigned int count
    size_t buf_size
    uint8_t *data
    mmsghdr *msgs
    iovec *iovs
    sockaddr_in *addrs


cdef struct TxCounters:
    uint64_t packets           # sent to a peer
    uint64_t bytes
    uint64_t batches
    uint64_t batch_sizes[BATCH_BUCKETS]
    uint64_t drop_not_ipv4     # IPv6 and anything else that is not IPv4
    uint64_t drop_no_route
    uint64_t drop_ttl
    uint64_t drop_send_error
    uint64_t drop_read_error
    uint64_t icmp_unreachable  # ICMP errors written back into the TUN


cdef struct RxCounters:
    uint64_t packets           # written to the TUN
    uint64_t bytes
    uint64_t batches
    uint64_t batch_sizes[BATCH_BUCKETS]
    uint64_t drop_too_short
    uint64_t drop_bad_header
    uint64_t drop_bad_length
    uint64_t drop_too_big
    uint64_t drop_ttl
    uint64_t drop_write_error
    uint64_t drop_recv_error


cdef struct TxLoop:
    int tun_fd
    int sock_fd
    int wake_fd                # readable once stop is asked
    const uint64_t *stop
    const route_table_t *table
    PacketVector vec
    uint8_t icmp[ICMP_UNREACH_MAX_LEN]
    TxCounters counters


cdef struct RxLoop:
    int tun_fd
    int sock_fd
    int wake_fd
    const uint64_t *stop
    size_t mtu
    PacketVector vec
    RxCounters counters


cdef int vector_init(PacketVector *vec, unsigned int count, size_t buf_size) noexcept nogil
cdef void vector_free(PacketVector *vec) noexcept nogil
cdef void tx_run(TxLoop *loop) noexcept nogil
cdef void rx_run(RxLoop *loop) noexcept nogil
