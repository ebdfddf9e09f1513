# The two packet loops, TUN -> UDP and UDP -> TUN. Each runs in its own thread without the GIL and
# moves a vector of packets per wake-up. A loop owns its state; other threads only read the counters
# (atomic loads) and raise the stop flag.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from posix.uio cimport iovec

from fastpath.offload cimport Coalescer
from fastpath.packet cimport ICMP6_ERROR_MAX_LEN, ICMP_UNREACH_MAX_LEN
from fastpath.system cimport mmsghdr, sockaddr_in6
from fastpath.table cimport route_table6_t, route_table_t

cdef enum:
    # Batch sizes are counted in power-of-two buckets: 1, 2-3, 4-7, ..., 128 and more.
    BATCH_BUCKETS = 8
    # ICMP and ICMPv6 errors a loop sends: 1000 a second after a burst of 50, as Linux's own
    # (net.ipv4.icmp_msgs_per_sec, icmp_msgs_burst; RFC 4443 2.4 (f) asks for a limit).
    ICMP_PER_MS = 1
    ICMP_BURST = 50
    # Room for one control message (UDP_SEGMENT's u16 out, UDP_GRO's int in), 8-byte aligned.
    CONTROL_LEN = 32


# The packets of one wake-up and the message headers that describe them to sendmmsg/recvmmsg.
# Slot i's buffer is data + i * slot_size. On the send side a TCP super-packet read from the TUN is
# cut into segments and needs one message per 64 of them, each message a run of iovecs (a
# segment's headers in `out`, its payload in the slot), so slots, messages and iovecs are counted
# apart.
cdef struct PacketVector:
    unsigned int slots
    size_t slot_size
    uint8_t *data
    unsigned int max_msgs
    mmsghdr *msgs
    unsigned int max_iovs
    iovec *iovs           # a message's iovecs are consecutive
    sockaddr_in6 *addrs   # each message's peer: a sockaddr_in in the first bytes over IPv4
    uint8_t *control      # max_msgs * CONTROL_LEN
    uint32_t *segments    # datagrams carried by each message
    uint8_t *out          # send: the headers of super-packets' segments; NULL where there are
    size_t out_size       # none (no offloads, and the receive side)


# A token bucket for the errors a loop sends: a token a millisecond, at most ICMP_BURST kept.
cdef struct IcmpBucket:
    uint64_t last_ns      # CLOCK_MONOTONIC of the last refill (0: never: the bucket is full)
    uint64_t tokens


cdef struct TxCounters:
    uint64_t packets           # datagrams sent to peers
    uint64_t bytes
    uint64_t batches
    uint64_t batch_sizes[BATCH_BUCKETS]
    uint64_t batch_packets     # TUN reads of those wake-ups (a TSO super-packet is one)
    uint64_t tso_superpackets  # TCP super-packets read from the TUN and cut into segments
    uint64_t drop_family       # neither IPv4 nor IPv6 (or shorter than its header), or IPv6
                               # without an IPv6 Network
    uint64_t drop_no_route
    uint64_t drop_ttl          # TTL or hop limit run out
    uint64_t drop_too_big      # IPv6 longer than the MTU (not a super-packet)
    uint64_t drop_bad_offload  # a virtio_net_hdr that cannot be honoured
    uint64_t drop_send_error
    uint64_t drop_read_error
    uint64_t icmp_unreachable  # ICMP (and ICMPv6) destination unreachable written into the TUN
    uint64_t icmp_time_exceeded  # ICMPv6 time exceeded written into the TUN
    uint64_t icmp_too_big      # ICMPv6 packet too big written into the TUN
    uint64_t icmp_rate_limited  # ICMP and ICMPv6 errors not sent: over the rate limit


cdef struct RxCounters:
    uint64_t packets           # IP packets written to the TUN (before coalescing)
    uint64_t bytes
    uint64_t batches
    uint64_t batch_sizes[BATCH_BUCKETS]
    uint64_t batch_packets     # datagrams received in those wake-ups
    uint64_t gro_superdatagrams  # receives the kernel's UDP_GRO merged from several datagrams
    uint64_t gro_datagrams     # the datagrams in them
    uint64_t coalesced         # packets merged into the one before them: TUN writes saved
    uint64_t whole_superpackets  # datagrams that were one whole TCP super-packet, written as one
    uint64_t hellos            # peers' hellos (fastpath/hello.py) that reached the loops
    uint64_t drop_too_short
    uint64_t drop_bad_header
    uint64_t drop_bad_length
    uint64_t drop_too_big
    uint64_t drop_ttl
    uint64_t drop_write_error
    uint64_t drop_recv_error
    # Source verification: the inner source must lie in the subnet leased to the outer source.
    uint64_t drop_spoof_unrouted_source  # in no other host's subnet (nor outside the Network)
    uint64_t drop_spoof_wrong_sender     # in another host's subnet than the sender's
    uint64_t icmp_time_exceeded  # ICMPv6 time exceeded sent back to the sender
    uint64_t icmp_rate_limited   # those not sent: over the rate limit

cdef struct TxLoop:
    int tun_fd
    int sock_fd
    int wake_fd                # readable once stop is asked
    bint offload               # the TUN has IFF_VNET_HDR with CSUM, TSO4 and TSO6
    const uint64_t *stop
    const route_table_t *table
    const route_table6_t *table6
    const uint8_t *peers6      # outer IPv6: the peers' addresses the entries name; NULL: IPv4
    size_t mtu
    PacketVector vec
    unsigned int queued        # messages, iovecs and `out` bytes used by this wake-up so far
    unsigned int iovs_used
    size_t out_used
    uint8_t icmp[ICMP_UNREACH_MAX_LEN]
    uint8_t icmp6[ICMP6_ERROR_MAX_LEN]
    IcmpBucket icmp_bucket
    TxCounters counters


cdef struct RxLoop:
    int tun_fd
    int sock_fd
    int wake_fd
    bint offload               # the TUN takes a virtio_net_hdr; the socket has UDP_GRO
    bint udp_coalesce          # UDP datagrams of one flow are merged too (USO)
    bint verify_source         # deliver only what the sender's own subnet sends
    const uint64_t *stop
    const route_table_t *table
    const route_table6_t *table6
    const uint8_t *peers6      # as TxLoop's
    size_t mtu
    PacketVector vec
    Coalescer coalescer
    uint8_t icmp6[ICMP6_ERROR_MAX_LEN]
    IcmpBucket icmp_bucket
    RxCounters counters


cdef int vector_init(PacketVector *vec, unsigned int slots, size_t slot_size,
                     unsigned int max_msgs, unsigned int max_iovs, size_t out_size) noexcept nogil
cdef void vector_free(PacketVector *vec) noexcept nogil
cdef void tx_run(TxLoop *loop) noexcept nogil
cdef void rx_run(RxLoop *loop) noexcept nogil
