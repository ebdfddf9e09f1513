# The packet loops. No Python objects, no GIL: plain syscalls on vectors of packets.
#
# Each turn: wait in poll() for the fd or the stop eventfd, then move at most one vector: read what
# is there (never waiting to fill it), route or check each packet, send the vector. A full vector
# means more is likely queued, so the next turn skips poll() and only checks the stop flag.
#
# With offloads the same loops carry super-packets: TUN reads start with a virtio_net_hdr and may
# hold 64 KiB of one TCP flow, cut into MTU-sized packets sent with UDP_SEGMENT; UDP_GRO receives
# hand over many datagrams at once, whose TCP segments are merged again for one TUN write. On the
# wire every datagram is still one IPv4 packet, as flanneld sends and expects.
#
# IPv6 packets take the same way but through a table of their own (the IPv6 Network's), which
# the control plane fills only for pyflannel peers (flanneld's proxy drops what is not IPv4).
# The family is told by one compare of the version where the IPv4 checks fail, so IPv4 pays
# nothing for it.
#
# Over an IPv6 underlay (outer IPv6: loop.peers6 set) every datagram goes to and comes from an
# IPv6 peer: an entry's 32 address bits are then an index into peers6. The one branch on it is
# where the message's address is written or the sender compared, so the IPv4 underlay's way
# is the one it was.

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.uio cimport iovec, writev
from posix.unistd cimport read, write

from fastpath.offload cimport (
    IPPROTO_TCP, MAX_IPV4_PACKET, TCP_CWR, UDP_MAX_PAYLOAD, UDP_MAX_SEGMENTS,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VNET_HDR_LEN,
    Coalescer, TsoCut, finish_checksum, gro_append, gro_append6, gro_finish, gro_header_len,
    gro_header_len6, gro_start,
    tso_header, tso_plan, tso_segment_len, virtio_net_hdr,
)
from fastpath.packet cimport (
    BAD_HEADER, BAD_LENGTH, ICMP6_DEST_UNREACH, ICMP6_HOP_LIMIT_EXCEEDED, ICMP6_NO_ROUTE,
    ICMP6_PACKET_TOO_BIG, ICMP6_TIME_EXCEEDED, IPV4_HEADER_LEN, IPV6_HEADER_LEN, OK, TOO_BIG,
    TOO_SHORT, Verdict, build_icmp6_error, build_net_unreachable, check_ipv4, check_ipv6,
    decrement_hop_limit, decrement_ttl, load32, wants_icmp6_error, wants_unreachable,
)
from fastpath.system cimport (
    AF_INET, AF_INET6, CMSG_DATA, CMSG_FIRSTHDR, CMSG_LEN, CMSG_NXTHDR, CMSG_SPACE, MSG_DONTWAIT,
    MSG_TRUNC, POLLIN, SOL_UDP, UDP_GRO, UDP_SEGMENT, cmsghdr, htonl, htons, msghdr, pf_add,
    pf_load, poll, pollfd, recvmmsg, sendmmsg, sendto, sockaddr_in, sockaddr_in6, socklen_t,
)
from fastpath.table cimport ENTRY_ADDR_SHIFT, table_lookup, table_lookup6

# fastpath/hello.py's hellos: the hello, and the kernel hello (its magic, then 24 more bytes).
cdef enum:
    HELLO_PROTOCOL = 253
    HELLO_LEN = 16
    KERNEL_HELLO_LEN = 40
cdef const char *HELLO_MAGIC = b"pyflannel-whole1"
cdef const char *KERNEL_MAGIC = b"pyflannel-kernel"

# Written before a packet that needs nothing from the kernel: no GSO, checksum complete.
cdef uint8_t PLAIN_VNET_HDR[VNET_HDR_LEN]


cdef int vector_init(PacketVector *vec, unsigned int slots, size_t slot_size,
                     unsigned int max_msgs, unsigned int max_iovs, size_t out_size) noexcept nogil:
    """Allocate the slots, the message headers, the iovecs and the arena (none for out_size 0);
    -1 if out of memory."""
    vec.slots = slots
    vec.slot_size = slot_size
    vec.max_msgs = max_msgs
    vec.max_iovs = max_iovs
    vec.out_size = out_size
    vec.data = <uint8_t *>calloc(slots, slot_size)
    vec.msgs = <mmsghdr *>calloc(max_msgs, sizeof(mmsghdr))
    vec.iovs = <iovec *>calloc(max_iovs, sizeof(iovec))
    vec.addrs = <sockaddr_in6 *>calloc(max_msgs, sizeof(sockaddr_in6))
    vec.control = <uint8_t *>calloc(max_msgs, CONTROL_LEN)
    vec.segments = <uint32_t *>calloc(max_msgs, sizeof(uint32_t))
    vec.out = <uint8_t *>calloc(1, out_size) if out_size else NULL
    if not (vec.data and vec.msgs and vec.iovs and vec.addrs and vec.control and vec.segments
            and (vec.out or not out_size)):
        vector_free(vec)
        return -1
    return 0


cdef void vector_free(PacketVector *vec) noexcept nogil:
    free(vec.data)
    free(vec.msgs)
    free(vec.iovs)
    free(vec.addrs)
    free(vec.control)
    free(vec.segments)
    free(vec.out)
    vec.data = NULL
    vec.msgs = NULL
    vec.iovs = NULL
    vec.addrs = NULL
    vec.control = NULL
    vec.segments = NULL
    vec.out = NULL


cdef inline void count_batch(uint64_t *batches, uint64_t *buckets, uint64_t *packets,
                             unsigned int n) noexcept nogil:
    """One wake-up that moved n packets: counted, in its bucket, and n added to the sum."""
    pf_add(packets, n)
    cdef unsigned int bucket = 0
    while n > 1 and bucket < BATCH_BUCKETS - 1:
        n >>= 1
        bucket += 1
    pf_add(batches, 1)
    pf_add(&buckets[bucket], 1)


cdef inline bint wait_readable(int fd, int wake_fd) noexcept nogil:
    """Block until fd is readable; False once the loop is asked to stop."""
    cdef pollfd fds[2]
    fds[0].fd = fd
    fds[0].events = POLLIN
    fds[1].fd = wake_fd
    fds[1].events = POLLIN
    while True:
        fds[0].revents = 0
        fds[1].revents = 0
        if poll(fds, 2, -1) < 0 and errno != EINTR:
            return False
        if fds[1].revents:
            return False
        if fds[0].revents:
            return True


cdef inline bint tun_write(int fd, bint offload, uint8_t *pkt, size_t n) noexcept nogil:
    """Write one finished IP packet into the TUN (behind a plain virtio_net_hdr if offloading)."""
    cdef iovec iov[2]
    if not offload:
        return write(fd, pkt, n) == <ssize_t>n
    iov[0].iov_base = PLAIN_VNET_HDR
    iov[0].iov_len = VNET_HDR_LEN
    iov[1].iov_base = pkt
    iov[1].iov_len = n
    return writev(fd, iov, 2) == <ssize_t>(n + VNET_HDR_LEN)


cdef inline bint icmp_allowed(IcmpBucket *bucket, uint64_t *limited) noexcept nogil:
    """Whether the rate limit lets one more ICMP error go now; if not, counted in limited.
    Asked only where an error is due, so the clock is read off the forwarding path."""
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    cdef uint64_t ns = <uint64_t>now.tv_sec * 1000000000 + <uint64_t>now.tv_nsec
    cdef uint64_t ms = (ns - bucket.last_ns) // 1000000
    if ms:
        bucket.tokens = min(<uint64_t>ICMP_BURST, bucket.tokens + ms * ICMP_PER_MS)
        bucket.last_ns += ms * 1000000
    if bucket.tokens == 0:
        pf_add(limited, 1)
        return False
    bucket.tokens -= 1
    return True


# ---- TUN -> UDP ----------------------------------------------------------------------------------

cdef void send_vector(TxLoop *loop) noexcept nogil:
    """sendmmsg the queued messages; a message the kernel refuses is counted and skipped. The
    vector is empty afterwards."""
    cdef unsigned int n = loop.queued
    cdef unsigned int done = 0
    cdef unsigned int i
    cdef int sent
    while done < n:
        sent = sendmmsg(loop.sock_fd, loop.vec.msgs + done, n - done, 0)
        if sent < 0:
            if errno == EINTR:
                continue
            pf_add(&loop.counters.drop_send_error, loop.vec.segments[done])
            done += 1
            continue
        for i in range(done, done + sent):
            pf_add(&loop.counters.bytes, loop.vec.msgs[i].msg_len)
            pf_add(&loop.counters.packets, loop.vec.segments[i])
        done += sent
    loop.queued = 0
    loop.iovs_used = 0
    loop.out_used = 0


cdef inline void reserve(TxLoop *loop, unsigned int iovs, size_t out_bytes) noexcept nogil:
    """Make room for one more message of `iovs` iovecs and `out_bytes` in the arena: send what
    is queued when the vector is full. (The vectors are sized so that one message always fits.)"""
    if (loop.queued == loop.vec.max_msgs or loop.iovs_used + iovs > loop.vec.max_iovs
            or loop.out_used + out_bytes > loop.vec.out_size):
        send_vector(loop)


cdef inline void entry_address(uint64_t entry, sockaddr_in *addr) noexcept nogil:
    """The peer's address and port that a route entry packs."""
    addr.sin_family = AF_INET
    addr.sin_port = htons(<uint16_t>(entry & 0xFFFF))
    addr.sin_addr.s_addr = htonl(<uint32_t>(entry >> ENTRY_ADDR_SHIFT))


cdef inline void entry_address6(uint64_t entry, const uint8_t *peers6,
                                sockaddr_in6 *addr) noexcept nogil:
    """The peer's address and port that an outer-IPv6 entry names: its address is at the
    entry's index in peers6."""
    addr.sin6_family = AF_INET6
    addr.sin6_port = htons(<uint16_t>(entry & 0xFFFF))
    addr.sin6_flowinfo = 0
    memcpy(&addr.sin6_addr, peers6 + 16 * <size_t>(<uint32_t>(entry >> ENTRY_ADDR_SHIFT)), 16)
    addr.sin6_scope_id = 0


cdef inline socklen_t peer_address(const uint8_t *peers6, uint64_t entry,
                                   sockaddr_in6 *addr) noexcept nogil:
    """Write the entry's peer into addr (a sockaddr_in over IPv4): its length."""
    if peers6 == NULL:
        entry_address(entry, <sockaddr_in *>addr)
        return sizeof(sockaddr_in)
    entry_address6(entry, peers6, addr)
    return sizeof(sockaddr_in6)


cdef inline bint other_sender(const uint8_t *peers6, uint64_t entry, uint32_t sender,
                              const uint8_t *sender6) noexcept nogil:
    """Whether the entry's peer is not the datagram's sender: `sender` (host order) over IPv4,
    the 16 bytes at sender6 over IPv6."""
    if peers6 == NULL:
        return <uint32_t>(entry >> ENTRY_ADDR_SHIFT) != sender
    return memcmp(peers6 + 16 * <size_t>(<uint32_t>(entry >> ENTRY_ADDR_SHIFT)), sender6,
                  16) != 0


cdef inline void add_message(TxLoop *loop, unsigned int iovs, uint64_t entry, size_t segment,
                             uint32_t count) noexcept nogil:
    """Queue the `iovs` iovecs at iovs_used as one message to the peer in `entry`: one datagram,
    or with segment > 0 `count` datagrams of `segment` bytes (UDP_SEGMENT)."""
    cdef unsigned int i = loop.queued
    cdef sockaddr_in6 *addr = &loop.vec.addrs[i]
    cdef mmsghdr *msg = &loop.vec.msgs[i]
    cdef cmsghdr *cmsg
    msg.msg_hdr.msg_name = addr
    msg.msg_hdr.msg_namelen = peer_address(loop.peers6, entry, addr)
    msg.msg_hdr.msg_iov = loop.vec.iovs + loop.iovs_used
    msg.msg_hdr.msg_iovlen = iovs
    if segment:
        cmsg = <cmsghdr *>(loop.vec.control + i * CONTROL_LEN)
        cmsg.cmsg_len = CMSG_LEN(sizeof(uint16_t))
        cmsg.cmsg_level = SOL_UDP
        cmsg.cmsg_type = UDP_SEGMENT
        (<uint16_t *>CMSG_DATA(cmsg))[0] = <uint16_t>segment
        msg.msg_hdr.msg_control = cmsg
        msg.msg_hdr.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
    else:
        msg.msg_hdr.msg_control = NULL
        msg.msg_hdr.msg_controllen = 0
    loop.vec.segments[i] = count
    loop.iovs_used += iovs
    loop.queued = i + 1


cdef inline void queue_superpacket(TxLoop *loop, uint8_t *pkt, size_t n, uint16_t gso_size,
                                   uint64_t entry) noexcept nogil:
    """Cut a TCP super-packet into segments and queue them, 64 (and 65507 bytes) per message at
    most, as iovecs: each segment's headers, written into the arena, then its payload where the
    TUN read put it (no payload is copied)."""
    cdef TsoCut cut
    if not tso_plan(pkt, n, gso_size, &cut):
        pf_add(&loop.counters.drop_bad_offload, 1)
        return
    pf_add(&loop.counters.tso_superpackets, 1)
    cdef PacketVector *vec = &loop.vec
    cdef size_t segment = cut.hl + gso_size
    cdef size_t per_message = UDP_MAX_PAYLOAD // segment
    if per_message > UDP_MAX_SEGMENTS:
        per_message = UDP_MAX_SEGMENTS
    cdef size_t first = 0, take, j
    cdef uint8_t *o
    cdef iovec *iov
    while first < cut.count:
        take = cut.count - first if cut.count - first < per_message else per_message
        reserve(loop, 2 * take, take * cut.hl)
        o = vec.out + loop.out_used
        iov = vec.iovs + loop.iovs_used
        for j in range(take):
            tso_header(pkt, &cut, first + j, o)
            iov[2 * j].iov_base = o
            iov[2 * j].iov_len = cut.hl
            iov[2 * j + 1].iov_base = pkt + cut.hl + (first + j) * gso_size
            iov[2 * j + 1].iov_len = tso_segment_len(&cut, first + j)
            o += cut.hl
        loop.out_used += take * cut.hl
        add_message(loop, 2 * take, entry, segment if take > 1 else 0, <uint32_t>take)
        first += take


cdef inline int offload_type(TxLoop *loop, virtio_net_hdr *vnet, uint8_t *pkt, size_t n,
                             uint8_t tcp_gso) noexcept nogil:
    """The packet's GSO type from its virtio-net header (none without offloads), its checksum
    finished where the TUN left it to us; -1, counted, for a header the loops cannot serve (a
    GSO type other than this family's TCP one)."""
    if vnet == NULL:
        return VIRTIO_NET_HDR_GSO_NONE
    cdef uint8_t gso_type = vnet.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gso_type == VIRTIO_NET_HDR_GSO_NONE and vnet.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        if not finish_checksum(pkt, n, vnet):
            pf_add(&loop.counters.drop_bad_offload, 1)
            return -1
    elif gso_type != VIRTIO_NET_HDR_GSO_NONE and gso_type != tcp_gso:
        pf_add(&loop.counters.drop_bad_offload, 1)
        return -1
    return gso_type


cdef inline void answer6(TxLoop *loop, const uint8_t *pkt, size_t n, uint8_t kind, uint8_t code,
                         uint32_t param, uint64_t *counter) noexcept nogil:
    """Write the ICMPv6 error kind/code into the TUN for an IPv6 packet that goes no further,
    where one is due; it comes from the address the packet was for, as the IPv4 unreachable."""
    if not wants_icmp6_error(pkt, n) or not icmp_allowed(&loop.icmp_bucket,
                                                          &loop.counters.icmp_rate_limited):
        return
    cdef size_t reply_len = build_icmp6_error(pkt, n, kind, code, param, pkt + 24, loop.icmp6)
    if tun_write(loop.tun_fd, loop.offload, loop.icmp6, reply_len):
        pf_add(counter, 1)


cdef void queue_packet6(TxLoop *loop, virtio_net_hdr *vnet, uint8_t *pkt,
                        size_t n) noexcept nogil:
    """queue_packet for what is not IPv4: an IPv6 packet goes as an IPv4 one does, through the
    IPv6 table (only pyflannel peers are in it); the rest is dropped, and so is IPv6 where there
    is no IPv6 Network."""
    if n < IPV6_HEADER_LEN or pkt[0] >> 4 != 6 or loop.table6.size == 0:
        pf_add(&loop.counters.drop_family, 1)
        return
    cdef int gso_type = offload_type(loop, vnet, pkt, n, VIRTIO_NET_HDR_GSO_TCPV6)
    if gso_type < 0:
        return
    cdef uint64_t entry = table_lookup6(loop.table6, pkt + 24)
    if entry == 0:
        pf_add(&loop.counters.drop_no_route, 1)
        answer6(loop, pkt, n, ICMP6_DEST_UNREACH, ICMP6_NO_ROUTE, 0,
                &loop.counters.icmp_unreachable)
        return
    if gso_type == VIRTIO_NET_HDR_GSO_NONE and n > loop.mtu:
        # IPv6 is never fragmented on the way (RFC 8200 5): the sender must learn the MTU.
        pf_add(&loop.counters.drop_too_big, 1)
        answer6(loop, pkt, n, ICMP6_PACKET_TOO_BIG, 0, <uint32_t>loop.mtu,
                &loop.counters.icmp_too_big)
        return
    if not decrement_hop_limit(pkt):
        pf_add(&loop.counters.drop_ttl, 1)
        answer6(loop, pkt, n, ICMP6_TIME_EXCEEDED, ICMP6_HOP_LIMIT_EXCEEDED, 0,
                &loop.counters.icmp_time_exceeded)
        return
    if gso_type == VIRTIO_NET_HDR_GSO_TCPV6:
        queue_superpacket(loop, pkt, n, vnet.gso_size, entry)
        return
    reserve(loop, 1, 0)
    loop.vec.iovs[loop.iovs_used].iov_base = pkt
    loop.vec.iovs[loop.iovs_used].iov_len = n
    add_message(loop, 1, entry, 0, 1)


cdef inline void queue_packet(TxLoop *loop, uint8_t *buf, size_t n) noexcept nogil:
    """Decide one read from the TUN: queue it (cut first if it is a super-packet), or drop it
    (and answer it with an ICMP error when it has no route)."""
    cdef virtio_net_hdr *vnet = NULL
    cdef uint8_t *pkt = buf
    if loop.offload:
        if n < VNET_HDR_LEN:
            pf_add(&loop.counters.drop_bad_offload, 1)
            return
        vnet = <virtio_net_hdr *>buf
        pkt = buf + VNET_HDR_LEN
        n -= VNET_HDR_LEN
    if n < IPV4_HEADER_LEN or pkt[0] >> 4 != 4:
        queue_packet6(loop, vnet, pkt, n)
        return
    cdef int gso_type = offload_type(loop, vnet, pkt, n, VIRTIO_NET_HDR_GSO_TCPV4)
    if gso_type < 0:
        return
    cdef uint64_t entry = table_lookup(loop.table, load32(pkt + 16))
    cdef size_t reply_len
    if entry == 0:
        pf_add(&loop.counters.drop_no_route, 1)
        if wants_unreachable(pkt, n) and icmp_allowed(&loop.icmp_bucket,
                                                      &loop.counters.icmp_rate_limited):
            reply_len = build_net_unreachable(pkt, n, loop.icmp)
            if tun_write(loop.tun_fd, loop.offload, loop.icmp, reply_len):
                pf_add(&loop.counters.icmp_unreachable, 1)
        return
    if not decrement_ttl(pkt):
        pf_add(&loop.counters.drop_ttl, 1)
        return
    if gso_type == VIRTIO_NET_HDR_GSO_TCPV4:
        queue_superpacket(loop, pkt, n, vnet.gso_size, entry)
        return
    reserve(loop, 1, 0)
    loop.vec.iovs[loop.iovs_used].iov_base = pkt
    loop.vec.iovs[loop.iovs_used].iov_len = n
    add_message(loop, 1, entry, 0, 1)


cdef void tx_run(TxLoop *loop) noexcept nogil:
    cdef PacketVector *vec = &loop.vec
    cdef unsigned int got
    cdef ssize_t n
    cdef uint8_t *buf
    cdef bint full = False
    loop.queued = 0
    loop.iovs_used = 0
    loop.out_used = 0
    while not pf_load(loop.stop):
        if not full and not wait_readable(loop.tun_fd, loop.wake_fd):
            break
        got = 0
        while got < vec.slots:
            buf = vec.data + got * vec.slot_size
            n = read(loop.tun_fd, buf, vec.slot_size)
            if n < 0:
                if errno != EAGAIN and errno != EINTR:
                    pf_add(&loop.counters.drop_read_error, 1)
                break
            got += 1
            queue_packet(loop, buf, n)
        full = got == vec.slots
        if got:
            count_batch(&loop.counters.batches, loop.counters.batch_sizes,
                        &loop.counters.batch_packets, got)
        if loop.queued:
            send_vector(loop)


# ---- UDP -> TUN ----------------------------------------------------------------------------------

cdef inline void flush(RxLoop *loop) noexcept nogil:
    """Write the held (possibly merged) packet into the TUN."""
    cdef Coalescer *c = &loop.coalescer
    if c.len == 0:
        return
    cdef uint64_t packets = c.iovcnt - 1
    cdef uint64_t inner_bytes = c.len + (packets - 1) * c.hl
    cdef size_t total = gro_finish(c)
    if writev(loop.tun_fd, c.iov, c.iovcnt) == <ssize_t>total:
        pf_add(&loop.counters.packets, packets)
        pf_add(&loop.counters.bytes, inner_bytes)
        pf_add(&loop.counters.coalesced, packets - 1)
    else:
        pf_add(&loop.counters.drop_write_error, packets)


cdef inline bint spoofed(RxLoop *loop, const uint8_t *pkt, uint32_t sender,
                        const uint8_t *sender6) noexcept nogil:
    """Whether the packet's source lies outside the subnet leased to `sender` (host order), the
    datagram's outer source (over IPv6: the address at sender6); counted by reason. One lookup
    in the route table, as for sending: the subnet of the inner source must route to the
    sender."""
    cdef uint64_t entry = table_lookup(loop.table, load32(pkt + 12))
    if entry == 0:
        pf_add(&loop.counters.drop_spoof_unrouted_source, 1)
        return True
    if other_sender(loop.peers6, entry, sender, sender6):
        pf_add(&loop.counters.drop_spoof_wrong_sender, 1)
        return True
    return False


cdef inline bint accepted(RxLoop *loop, Verdict verdict) noexcept nogil:
    """Whether a datagram's packet passed validation; if not, counted by why."""
    if verdict == OK:
        return True
    if verdict == TOO_SHORT:
        pf_add(&loop.counters.drop_too_short, 1)
    elif verdict == BAD_HEADER:
        pf_add(&loop.counters.drop_bad_header, 1)
    elif verdict == BAD_LENGTH:
        pf_add(&loop.counters.drop_bad_length, 1)
    else:
        pf_add(&loop.counters.drop_too_big, 1)
    return False


cdef inline bint spoofed6(RxLoop *loop, const uint8_t *pkt, uint32_t sender,
                         const uint8_t *sender6) noexcept nogil:
    """spoofed() for an IPv6 packet: its source must lie in the sender's IPv6 subnet."""
    cdef uint64_t entry = table_lookup6(loop.table6, pkt + 8)
    if entry == 0:
        pf_add(&loop.counters.drop_spoof_unrouted_source, 1)
        return True
    if other_sender(loop.peers6, entry, sender, sender6):
        pf_add(&loop.counters.drop_spoof_wrong_sender, 1)
        return True
    return False


cdef void deliver6(RxLoop *loop, uint8_t *pkt, size_t n, uint32_t sender,
                   const uint8_t *sender6) noexcept nogil:
    """deliver() for a datagram whose packet says it is IPv6: checked, counted, merged and
    written into the TUN as IPv4 ones are. One whose hop limit runs out gets an ICMPv6 time
    exceeded, sent back to the peer that routes its source, from the address it was for."""
    cdef Verdict verdict = check_ipv6(pkt, n, loop.mtu)
    if not accepted(loop, verdict):
        return
    if loop.verify_source and spoofed6(loop, pkt, sender, sender6):
        return
    cdef uint64_t entry
    cdef sockaddr_in6 peer
    cdef socklen_t peer_len
    cdef size_t reply_len
    if not decrement_hop_limit(pkt):
        pf_add(&loop.counters.drop_ttl, 1)
        entry = table_lookup6(loop.table6, pkt + 8)
        if entry and wants_icmp6_error(pkt, n) and icmp_allowed(
                &loop.icmp_bucket, &loop.counters.icmp_rate_limited):
            reply_len = build_icmp6_error(pkt, n, ICMP6_TIME_EXCEEDED, ICMP6_HOP_LIMIT_EXCEEDED,
                                          0, pkt + 24, loop.icmp6)
            peer_len = peer_address(loop.peers6, entry, &peer)
            if sendto(loop.sock_fd, loop.icmp6, reply_len, MSG_DONTWAIT, &peer,
                      peer_len) == <ssize_t>reply_len:
                pf_add(&loop.counters.icmp_time_exceeded, 1)
        return
    cdef size_t headers = gro_header_len6(pkt, n, loop.udp_coalesce) if loop.offload else 0
    to_tun(loop, pkt, n, headers,
           headers != 0 and gro_append6(&loop.coalescer, pkt, n, headers))


cdef inline void to_tun(RxLoop *loop, uint8_t *pkt, size_t n, size_t headers,
                        bint merged) noexcept nogil:
    """Delivery's last step, for either family: a segment merged into the held one is done;
    otherwise what is held goes first (the packets' order), then this packet is held to start
    a merge (`headers`: it can head one) or written on its own."""
    if merged:
        return
    if loop.offload:
        flush(loop)
        if headers:
            gro_start(&loop.coalescer, pkt, n, headers)
            return
    if tun_write(loop.tun_fd, loop.offload, pkt, n):
        pf_add(&loop.counters.packets, 1)
        pf_add(&loop.counters.bytes, n)
    else:
        pf_add(&loop.counters.drop_write_error, 1)


cdef inline bint is_hello(const uint8_t *pkt, size_t n) noexcept nogil:
    """Whether the packet is a peer's hello or kernel hello (fastpath/hello.py)."""
    if pkt[0] != 0x45 or pkt[8] != 1 or pkt[9] != HELLO_PROTOCOL:
        return False
    if n == IPV4_HEADER_LEN + HELLO_LEN:
        return memcmp(pkt + IPV4_HEADER_LEN, HELLO_MAGIC, HELLO_LEN) == 0
    return (n == IPV4_HEADER_LEN + KERNEL_HELLO_LEN
            and memcmp(pkt + IPV4_HEADER_LEN, KERNEL_MAGIC, HELLO_LEN) == 0)


cdef inline void deliver(RxLoop *loop, uint8_t *pkt, size_t n, uint32_t sender,
                         const uint8_t *sender6) noexcept nogil:
    """Check one datagram from `sender` (its outer source, host order; over IPv6 the address at
    sender6) and hand its packet to
    the TUN: merged with the held TCP segment, held for the next, or written on its own. What is
    held points into the receive buffers, so the caller flushes before it receives into them
    again."""
    cdef Verdict verdict = check_ipv4(pkt, n, loop.mtu)
    if verdict != OK and n and pkt[0] >> 4 == 6 and loop.table6.size:
        deliver6(loop, pkt, n, sender, sender6)
        return
    if not accepted(loop, verdict):
        return
    if loop.verify_source and spoofed(loop, pkt, sender, sender6):
        return
    if is_hello(pkt, n):  # the kernel path notes them; without it they go unused
        pf_add(&loop.counters.hellos, 1)
        return
    if not decrement_ttl(pkt):
        pf_add(&loop.counters.drop_ttl, 1)
        return
    cdef size_t headers = gro_header_len(pkt, n, loop.udp_coalesce) if loop.offload else 0
    to_tun(loop, pkt, n, headers,
           headers != 0 and gro_append(&loop.coalescer, pkt, n, headers))


cdef inline bint deliver_whole(RxLoop *loop, uint8_t *pkt, size_t n, uint32_t sender,
                               const uint8_t *sender6) noexcept nogil:
    """Write a datagram longer than the MTU that is one whole TCP super-packet (a pyflannel
    peer's kernel path sends them so over a veth, --fastpath-whole-superpackets) into the TUN as
    one, for the kernel to cut at our MTU where it must; False if it is not one."""
    if check_ipv4(pkt, n, MAX_IPV4_PACKET) != OK or pkt[9] != IPPROTO_TCP:
        return False
    cdef size_t hl = (pkt[0] & 0x0F) * 4
    if n < hl + 20:
        return False
    cdef size_t headers = hl + (pkt[hl + 12] >> 4) * 4
    if headers < hl + 20 or headers + 1 >= loop.mtu or headers >= n:
        return False
    flush(loop)  # keeps the packets in the order they came
    if loop.verify_source and spoofed(loop, pkt, sender, sender6):
        return True
    if not decrement_ttl(pkt):
        pf_add(&loop.counters.drop_ttl, 1)
        return True
    cdef size_t gso_size = loop.mtu - headers
    cdef size_t segments = (n - headers + gso_size - 1) // gso_size
    cdef virtio_net_hdr vnet
    vnet.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM  # the sender's TCP left its pseudo-header sum
    vnet.gso_type = VIRTIO_NET_HDR_GSO_TCPV4
    if pkt[hl + 13] & TCP_CWR:
        vnet.gso_type |= VIRTIO_NET_HDR_GSO_ECN
    vnet.hdr_len = <uint16_t>headers
    vnet.gso_size = <uint16_t>gso_size
    vnet.csum_start = <uint16_t>hl
    vnet.csum_offset = 16
    cdef iovec iov[2]
    iov[0].iov_base = &vnet
    iov[0].iov_len = VNET_HDR_LEN
    iov[1].iov_base = pkt
    iov[1].iov_len = n
    if writev(loop.tun_fd, iov, 2) == <ssize_t>(n + VNET_HDR_LEN):
        pf_add(&loop.counters.packets, segments)
        pf_add(&loop.counters.bytes, n + (segments - 1) * headers)
        pf_add(&loop.counters.whole_superpackets, 1)
    else:
        pf_add(&loop.counters.drop_write_error, segments)
    return True


cdef inline size_t gro_segment(msghdr *hdr, size_t n) noexcept nogil:
    """The size of the datagrams UDP_GRO merged into this receive (n when it merged none)."""
    cdef cmsghdr *cmsg = CMSG_FIRSTHDR(hdr)
    while cmsg != NULL:
        if cmsg.cmsg_level == SOL_UDP and cmsg.cmsg_type == UDP_GRO:
            return (<int *>CMSG_DATA(cmsg))[0]
        cmsg = CMSG_NXTHDR(hdr, cmsg)
    return n


cdef void rx_run(RxLoop *loop) noexcept nogil:
    cdef PacketVector *vec = &loop.vec
    cdef int got, i
    cdef size_t n, segment, offset, this, datagrams, first
    cdef uint32_t sender
    cdef const uint8_t *sender6
    cdef uint8_t *data
    cdef bint full = False
    loop.coalescer.len = 0
    for i in range(vec.max_msgs):
        vec.msgs[i].msg_hdr.msg_iov = &vec.iovs[i]
        vec.msgs[i].msg_hdr.msg_iovlen = 1
        vec.iovs[i].iov_base = vec.data + i * vec.slot_size
        vec.msgs[i].msg_hdr.msg_name = &vec.addrs[i]  # the sender, for verify_source
    while not pf_load(loop.stop):
        if not full and not wait_readable(loop.sock_fd, loop.wake_fd):
            break
        for i in range(vec.max_msgs):
            vec.iovs[i].iov_len = vec.slot_size
            vec.msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in6)
            if loop.offload:
                vec.msgs[i].msg_hdr.msg_control = vec.control + i * CONTROL_LEN
                vec.msgs[i].msg_hdr.msg_controllen = CONTROL_LEN
        got = recvmmsg(loop.sock_fd, vec.msgs, vec.max_msgs, MSG_DONTWAIT, NULL)
        if got < 0:
            if errno != EAGAIN and errno != EINTR:
                pf_add(&loop.counters.drop_recv_error, 1)
            full = False
            continue
        full = <unsigned int>got == vec.max_msgs
        datagrams = 0
        for i in range(got):
            data = vec.data + i * vec.slot_size
            n = vec.msgs[i].msg_len
            if vec.msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                pf_add(&loop.counters.drop_too_big, 1)
                continue
            segment = gro_segment(&vec.msgs[i].msg_hdr, n) if loop.offload else n
            if segment == 0 or segment > n:
                segment = n
            # UDP GRO merges only datagrams of one flow: one sender for all of them.
            sender = load32(<const uint8_t *>&(<sockaddr_in *>&vec.addrs[i]).sin_addr)
            sender6 = <const uint8_t *>&vec.addrs[i].sin6_addr
            if (loop.offload and segment == n and n > loop.mtu
                    and deliver_whole(loop, data, n, sender, sender6)):
                datagrams += 1
                continue
            offset = 0
            first = datagrams
            while True:  # each datagram of the receive, once even when it is empty
                this = segment if offset + segment <= n else n - offset
                deliver(loop, data + offset, this, sender, sender6)
                datagrams += 1
                offset += this
                if offset >= n:
                    break
            if datagrams - first > 1:
                pf_add(&loop.counters.gro_superdatagrams, 1)
                pf_add(&loop.counters.gro_datagrams, datagrams - first)
        if loop.offload:
            flush(loop)
        if datagrams:
            count_batch(&loop.counters.batches, loop.counters.batch_sizes,
                        &loop.counters.batch_packets, datagrams)
