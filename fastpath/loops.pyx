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

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from posix.uio cimport iovec, writev
from posix.unistd cimport read, write

from fastpath.offload cimport (
    UDP_MAX_PAYLOAD, UDP_MAX_SEGMENTS, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR_LEN,
    Coalescer, finish_checksum, gro_append, gro_finish, gro_header_len, gro_start, tso_split,
    virtio_net_hdr,
)
from fastpath.packet cimport (
    BAD_HEADER, BAD_LENGTH, IPV4_HEADER_LEN, TOO_BIG, TOO_SHORT, Verdict, build_net_unreachable,
    check_ipv4, decrement_ttl, load32, wants_unreachable,
)
from fastpath.system cimport (
    AF_INET, CMSG_DATA, CMSG_FIRSTHDR, CMSG_LEN, CMSG_NXTHDR, CMSG_SPACE, MSG_DONTWAIT, MSG_TRUNC,
    POLLIN, SOL_UDP, UDP_GRO, UDP_SEGMENT, cmsghdr, htonl, htons, msghdr, pf_add, pf_load, poll,
    pollfd, recvmmsg, sendmmsg,
)
from fastpath.table cimport ENTRY_ADDR_SHIFT, table_lookup

# Written before a packet that needs nothing from the kernel: no GSO, checksum complete.
cdef uint8_t PLAIN_VNET_HDR[VNET_HDR_LEN]


cdef int vector_init(PacketVector *vec, unsigned int slots, size_t slot_size,
                     unsigned int max_msgs, size_t out_size) noexcept nogil:
    """Allocate the slots, the message headers and the arena; -1 if out of memory."""
    vec.slots = slots
    vec.slot_size = slot_size
    vec.max_msgs = max_msgs
    vec.out_size = out_size
    vec.data = <uint8_t *>calloc(slots, slot_size)
    vec.msgs = <mmsghdr *>calloc(max_msgs, sizeof(mmsghdr))
    vec.iovs = <iovec *>calloc(max_msgs, sizeof(iovec))
    vec.addrs = <sockaddr_in *>calloc(max_msgs, sizeof(sockaddr_in))
    vec.control = <uint8_t *>calloc(max_msgs, CONTROL_LEN)
    vec.segments = <uint32_t *>calloc(max_msgs, sizeof(uint32_t))
    vec.out = <uint8_t *>calloc(1, out_size)
    if not (vec.data and vec.msgs and vec.iovs and vec.addrs and vec.control and vec.segments
            and vec.out):
        vector_free(vec)
        return -1
    cdef unsigned int i
    for i in range(max_msgs):
        vec.msgs[i].msg_hdr.msg_iov = &vec.iovs[i]
        vec.msgs[i].msg_hdr.msg_iovlen = 1
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


cdef inline void count_batch(uint64_t *batches, uint64_t *buckets, unsigned int n) noexcept nogil:
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
    """Write one finished IPv4 packet into the TUN (behind a plain virtio_net_hdr if offloading)."""
    cdef iovec iov[2]
    if not offload:
        return write(fd, pkt, n) == <ssize_t>n
    iov[0].iov_base = PLAIN_VNET_HDR
    iov[0].iov_len = VNET_HDR_LEN
    iov[1].iov_base = pkt
    iov[1].iov_len = n
    return writev(fd, iov, 2) == <ssize_t>(n + VNET_HDR_LEN)


# ---- TUN -> UDP ----------------------------------------------------------------------------------

cdef inline void add_message(TxLoop *loop, unsigned int *m, uint8_t *data, size_t n,
                             uint64_t entry, size_t segment, uint32_t count) noexcept nogil:
    """Queue n bytes for the peer in `entry`: one datagram, or with segment > 0 `count`
    datagrams of `segment` bytes (UDP_SEGMENT)."""
    cdef unsigned int i = m[0]
    cdef sockaddr_in *addr = &loop.vec.addrs[i]
    cdef mmsghdr *msg = &loop.vec.msgs[i]
    cdef cmsghdr *cmsg
    addr.sin_family = AF_INET
    addr.sin_port = htons(<uint16_t>(entry & 0xFFFF))
    addr.sin_addr.s_addr = htonl(<uint32_t>(entry >> ENTRY_ADDR_SHIFT))
    msg.msg_hdr.msg_name = addr
    msg.msg_hdr.msg_namelen = sizeof(sockaddr_in)
    loop.vec.iovs[i].iov_base = data
    loop.vec.iovs[i].iov_len = n
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
    m[0] = i + 1


cdef void send_vector(TxLoop *loop, unsigned int n) noexcept nogil:
    """sendmmsg the first n messages; a message the kernel refuses is counted and skipped."""
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


cdef inline void queue_superpacket(TxLoop *loop, unsigned int *m, size_t *out_used,
                                   uint8_t *pkt, size_t n, uint16_t gso_size,
                                   uint64_t entry) noexcept nogil:
    """Cut a TCP super-packet into the arena and queue its segments, 64 per message at most."""
    cdef PacketVector *vec = &loop.vec
    cdef size_t segment
    cdef int count = tso_split(pkt, n, gso_size, vec.out + out_used[0],
                               vec.out_size - out_used[0], &segment)
    if count < 0 and out_used[0]:
        # The arena is full: send what is queued, then cut into an empty arena.
        send_vector(loop, m[0])
        m[0] = 0
        out_used[0] = 0
        count = tso_split(pkt, n, gso_size, vec.out, vec.out_size, &segment)
    if count < 0:
        pf_add(&loop.counters.drop_bad_offload, 1)
        return
    pf_add(&loop.counters.tso_superpackets, 1)
    cdef size_t headers = segment - gso_size
    cdef size_t total = n + <size_t>(count - 1) * headers
    cdef size_t per_message = UDP_MAX_PAYLOAD // segment
    if per_message > UDP_MAX_SEGMENTS:
        per_message = UDP_MAX_SEGMENTS
    cdef size_t offset = 0, take, length
    cdef size_t left = <size_t>count
    while left:
        take = per_message if left > per_message else left
        length = take * segment if offset + take * segment <= total else total - offset
        if m[0] == vec.max_msgs:
            send_vector(loop, m[0])
            m[0] = 0
        add_message(loop, m, vec.out + out_used[0] + offset, length, entry,
                    segment if take > 1 else 0, <uint32_t>take)
        offset += length
        left -= take
    out_used[0] += total


cdef inline void queue_packet(TxLoop *loop, unsigned int *m, size_t *out_used, uint8_t *buf,
                              size_t n) noexcept nogil:
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
        pf_add(&loop.counters.drop_not_ipv4, 1)
        return
    cdef uint8_t gso_type = VIRTIO_NET_HDR_GSO_NONE
    if vnet != NULL:
        gso_type = vnet.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
        if gso_type == VIRTIO_NET_HDR_GSO_NONE and vnet.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            if not finish_checksum(pkt, n, vnet):
                pf_add(&loop.counters.drop_bad_offload, 1)
                return
        elif gso_type != VIRTIO_NET_HDR_GSO_NONE and gso_type != VIRTIO_NET_HDR_GSO_TCPV4:
            pf_add(&loop.counters.drop_bad_offload, 1)
            return
    cdef uint64_t entry = table_lookup(loop.table, load32(pkt + 16))
    cdef size_t reply_len
    if entry == 0:
        pf_add(&loop.counters.drop_no_route, 1)
        if wants_unreachable(pkt, n):
            reply_len = build_net_unreachable(pkt, n, loop.icmp)
            if tun_write(loop.tun_fd, loop.offload, loop.icmp, reply_len):
                pf_add(&loop.counters.icmp_unreachable, 1)
        return
    if not decrement_ttl(pkt):
        pf_add(&loop.counters.drop_ttl, 1)
        return
    if gso_type == VIRTIO_NET_HDR_GSO_TCPV4:
        queue_superpacket(loop, m, out_used, pkt, n, vnet.gso_size, entry)
        return
    if m[0] == loop.vec.max_msgs:
        send_vector(loop, m[0])
        m[0] = 0
        out_used[0] = 0
    add_message(loop, m, pkt, n, entry, 0, 1)


cdef void tx_run(TxLoop *loop) noexcept nogil:
    cdef PacketVector *vec = &loop.vec
    cdef unsigned int got, queued
    cdef size_t out_used
    cdef ssize_t n
    cdef uint8_t *buf
    cdef bint full = False
    while not pf_load(loop.stop):
        if not full and not wait_readable(loop.tun_fd, loop.wake_fd):
            break
        got = 0
        queued = 0
        out_used = 0
        while got < vec.slots:
            buf = vec.data + got * vec.slot_size
            n = read(loop.tun_fd, buf, vec.slot_size)
            if n < 0:
                if errno != EAGAIN and errno != EINTR:
                    pf_add(&loop.counters.drop_read_error, 1)
                break
            got += 1
            queue_packet(loop, &queued, &out_used, buf, n)
        full = got == vec.slots
        if got:
            count_batch(&loop.counters.batches, loop.counters.batch_sizes, got)
        if queued:
            send_vector(loop, queued)


# ---- UDP -> TUN ----------------------------------------------------------------------------------

cdef inline void flush(RxLoop *loop) noexcept nogil:
    """Write the held (possibly merged) packet into the TUN."""
    cdef Coalescer *c = &loop.coalescer
    if c.len == 0:
        return
    cdef uint64_t packets = c.merged + 1
    cdef uint64_t inner_bytes = c.len + c.merged * c.hl
    cdef size_t total = gro_finish(c)
    if write(loop.tun_fd, c.buf, total) == <ssize_t>total:
        pf_add(&loop.counters.packets, packets)
        pf_add(&loop.counters.bytes, inner_bytes)
        pf_add(&loop.counters.coalesced, packets - 1)
    else:
        pf_add(&loop.counters.drop_write_error, packets)


cdef inline void deliver(RxLoop *loop, uint8_t *pkt, size_t n) noexcept nogil:
    """Check one datagram from the underlay and hand its packet to the TUN: merged with the held
    TCP segment, held for the next, or written on its own."""
    cdef Verdict verdict = check_ipv4(pkt, n, loop.mtu)
    if verdict == TOO_SHORT:
        pf_add(&loop.counters.drop_too_short, 1)
        return
    if verdict == BAD_HEADER:
        pf_add(&loop.counters.drop_bad_header, 1)
        return
    if verdict == BAD_LENGTH:
        pf_add(&loop.counters.drop_bad_length, 1)
        return
    if verdict == TOO_BIG:
        pf_add(&loop.counters.drop_too_big, 1)
        return
    if not decrement_ttl(pkt):
        pf_add(&loop.counters.drop_ttl, 1)
        return
    cdef size_t headers = 0
    if loop.offload:
        headers = gro_header_len(pkt, n)
        if headers and gro_append(&loop.coalescer, pkt, n, headers):
            return
        flush(loop)  # keeps the packets in the order they came
        if headers:
            gro_start(&loop.coalescer, pkt, n, headers)
            return
    if tun_write(loop.tun_fd, loop.offload, pkt, n):
        pf_add(&loop.counters.packets, 1)
        pf_add(&loop.counters.bytes, n)
    else:
        pf_add(&loop.counters.drop_write_error, 1)


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
    cdef size_t n, segment, offset, this, datagrams
    cdef uint8_t *data
    cdef bint full = False
    loop.coalescer.buf = vec.out
    loop.coalescer.len = 0
    for i in range(vec.max_msgs):
        vec.iovs[i].iov_base = vec.data + i * vec.slot_size
    while not pf_load(loop.stop):
        if not full and not wait_readable(loop.sock_fd, loop.wake_fd):
            break
        for i in range(vec.max_msgs):
            vec.iovs[i].iov_len = vec.slot_size
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
            offset = 0
            while True:  # each datagram of the receive, once even when it is empty
                this = segment if offset + segment <= n else n - offset
                deliver(loop, data + offset, this)
                datagrams += 1
                offset += this
                if offset >= n:
                    break
        if loop.offload:
            flush(loop)
        if datagrams:
            count_batch(&loop.counters.batches, loop.counters.batch_sizes, datagrams)
