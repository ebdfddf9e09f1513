# The packet loops. No Python objects, no GIL: plain syscalls on vectors of packets.
#
# Each turn: wait in poll() for the fd or the stop eventfd, then move at most one vector: read what
# is there (never waiting to fill it), route or check each packet, send the vector. A full vector
# means more is likely queued, so the next turn skips poll() and only checks the stop flag.

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from posix.unistd cimport read, write

from fastpath.packet cimport (
    BAD_HEADER, BAD_LENGTH, IPV4_HEADER_LEN, TOO_BIG, TOO_SHORT, Verdict, build_net_unreachable,
    check_ipv4, decrement_ttl, load32, wants_unreachable,
)
from fastpath.system cimport (
    AF_INET, MSG_DONTWAIT, MSG_TRUNC, POLLIN, htonl, htons, pf_add, pf_load, pollfd, poll, recvmmsg, sendmmsg,
)
from fastpath.table cimport ENTRY_ADDR_SHIFT, table_lookup


cdef int vector_init(PacketVector *vec, unsigned int count, size_t buf_size) noexcept nogil:
    """Allocate count slots of buf_size bytes with their message headers; -1 if out of memory."""
    vec.count = count
    vec.buf_size = buf_size
    vec.data = <uint8_t *>calloc(count, buf_size)
    vec.msgs = <mmsghdr *>calloc(count, sizeof(mmsghdr))
    vec.iovs = <iovec *>calloc(count, sizeof(iovec))
    vec.addrs = <sockaddr_in *>calloc(count, sizeof(sockaddr_in))
    if not (vec.data and vec.msgs and vec.iovs and vec.addrs):
        vector_free(vec)
        return -1
    cdef unsigned int i
    for i in range(count):
        vec.iovs[i].iov_base = vec.data + i * buf_size
        vec.iovs[i].iov_len = buf_size
        vec.msgs[i].msg_hdr.msg_iov = &vec.iovs[i]
        vec.msgs[i].msg_hdr.msg_iovlen = 1
    return 0


cdef void vector_free(PacketVector *vec) noexcept nogil:
    free(vec.data)
    free(vec.msgs)
    free(vec.iovs)
    free(vec.addrs)
    vec.data = NULL
    vec.msgs = NULL
    vec.iovs = NULL
    vec.addrs = NULL


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


# ---- TUN -> UDP ----------------------------------------------------------------------------------

cdef inline bint route_packet(TxLoop *loop, uint8_t *pkt, size_t n, unsigned int slot) noexcept nogil:
    """Decide one packet read from the TUN: fill slot's message to send it, or drop it (and
    answer it with an ICMP error when it has no route). True when it is to be sent."""
    if n < IPV4_HEADER_LEN or pkt[0] >> 4 != 4:
        pf_add(&loop.counters.drop_not_ipv4, 1)
        return False
    cdef uint64_t entry = table_lookup(loop.table, load32(pkt + 16))
    cdef size_t reply_len
    if entry == 0:
        pf_add(&loop.counters.drop_no_route, 1)
        if wants_unreachable(pkt, n):
            reply_len = build_net_unreachable(pkt, n, loop.icmp)
            if write(loop.tun_fd, loop.icmp, reply_len) == <ssize_t>reply_len:
                pf_add(&loop.counters.icmp_unreachable, 1)
        return False
    if not decrement_ttl(pkt):
        pf_add(&loop.counters.drop_ttl, 1)
        return False
    cdef sockaddr_in *addr = &loop.vec.addrs[slot]
    addr.sin_family = AF_INET
    addr.sin_port = htons(<uint16_t>(entry & 0xFFFF))
    addr.sin_addr.s_addr = htonl(<uint32_t>(entry >> ENTRY_ADDR_SHIFT))
    cdef mmsghdr *msg = &loop.vec.msgs[slot]
    msg.msg_hdr.msg_name = addr
    msg.msg_hdr.msg_namelen = sizeof(sockaddr_in)
    loop.vec.iovs[slot].iov_len = n
    return True


cdef void send_vector(TxLoop *loop, unsigned int n) noexcept nogil:
    """sendmmsg the first n slots; a message the kernel refuses is counted and skipped."""
    cdef unsigned int done = 0
    cdef unsigned int i
    cdef int sent
    while done < n:
        sent = sendmmsg(loop.sock_fd, loop.vec.msgs + done, n - done, 0)
        if sent < 0:
            if errno == EINTR:
                continue
            pf_add(&loop.counters.drop_send_error, 1)
            done += 1
            continue
        for i in range(done, done + sent):
            pf_add(&loop.counters.bytes, loop.vec.msgs[i].msg_len)
        pf_add(&loop.counters.packets, sent)
        done += sent


cdef void tx_run(TxLoop *loop) noexcept nogil:
    cdef PacketVector *vec = &loop.vec
    cdef unsigned int got, queued
    cdef ssize_t n
    cdef uint8_t *buf
    cdef bint full = False
    while not pf_load(loop.stop):
        if not full and not wait_readable(loop.tun_fd, loop.wake_fd):
            break
        got = 0
        queued = 0
        while got < vec.count:
            buf = vec.data + queued * vec.buf_size
            n = read(loop.tun_fd, buf, vec.buf_size)
            if n < 0:
                if errno != EAGAIN and errno != EINTR:
                    pf_add(&loop.counters.drop_read_error, 1)
                break
            got += 1
            if route_packet(loop, buf, n, queued):
                queued += 1
        full = got == vec.count
        if got:
            count_batch(&loop.counters.batches, loop.counters.batch_sizes, got)
        if queued:
            send_vector(loop, queued)


# ---- UDP -> TUN ----------------------------------------------------------------------------------

cdef inline void deliver(RxLoop *loop, uint8_t *pkt, size_t n, int flags) noexcept nogil:
    """Check one datagram from the underlay and write its packet into the TUN."""
    cdef Verdict verdict = TOO_BIG if flags & MSG_TRUNC else check_ipv4(pkt, n, loop.mtu)
    if verdict == TOO_SHORT:
        pf_add(&loop.counters.drop_too_short, 1)
    elif verdict == BAD_HEADER:
        pf_add(&loop.counters.drop_bad_header, 1)
    elif verdict == BAD_LENGTH:
        pf_add(&loop.counters.drop_bad_length, 1)
    elif verdict == TOO_BIG:
        pf_add(&loop.counters.drop_too_big, 1)
    elif not decrement_ttl(pkt):
        pf_add(&loop.counters.drop_ttl, 1)
    elif write(loop.tun_fd, pkt, n) != <ssize_t>n:
        pf_add(&loop.counters.drop_write_error, 1)
    else:
        pf_add(&loop.counters.packets, 1)
        pf_add(&loop.counters.bytes, n)


cdef void rx_run(RxLoop *loop) noexcept nogil:
    cdef PacketVector *vec = &loop.vec
    cdef int got, i
    cdef bint full = False
    while not pf_load(loop.stop):
        if not full and not wait_readable(loop.sock_fd, loop.wake_fd):
            break
        got = recvmmsg(loop.sock_fd, vec.msgs, vec.count, MSG_DONTWAIT, NULL)
        if got < 0:
            if errno != EAGAIN and errno != EINTR:
                pf_add(&loop.counters.drop_recv_error, 1)
            full = False
            continue
        full = <unsigned int>got == vec.count
        if got:
            count_batch(&loop.counters.batches, loop.counters.batch_sizes, got)
        for i in range(got):
            deliver(loop, vec.data + i * vec.buf_size, vec.msgs[i].msg_len,
                    vec.msgs[i].msg_hdr.msg_flags)
